package snapshot

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// Magic starts every snapshot.
const Magic = "FTVMSNAP"

// Version is the newest format version this build writes and reads.
// Version 2 adds the memory section, version 3 the delta codecs, version 4
// the sparse delta codec. A snapshot is written with the oldest version
// whose codecs the encoder may use for it, decided before its pages are
// encoded: 1 without a memory section or delta pages (every build reads
// it), 2 with a memory section, 4 with delta pages (3 when they are stored
// raw, Options.Uncompressed).
const Version = 4

// versionMemory, versionDelta and versionSparse are the versions that
// added the memory section, the delta codecs and CodecDeltaSparse.
const (
	versionMemory = 2
	versionDelta  = 3
	versionSparse = 4
)

// versionPaged is the version of a snapshot whose pages are all in page
// sections.
const versionPaged = 1

const (
	prefixSize  = 16 // magic, u32 version, u32 crc32c of the first 12 bytes
	frameSize   = 20 // u16 type, u16 codec, u32 stored, u32 raw, u32 payload crc, u32 header crc
	headerSize  = 108
	endSize     = 48
	pageRefSize = 4 // a page index in a page section
	globalSize  = 13
)

// SectionType names a section. The order in a file is fixed: header, meta,
// globals, stack, devices, module (optional), pages (zero or more), end.
type SectionType uint16

const (
	SecHeader  SectionType = 1
	SecMeta    SectionType = 2
	SecGlobals SectionType = 3
	SecStack   SectionType = 4
	SecDevices SectionType = 5
	SecPages   SectionType = 6
	SecModule  SectionType = 7
	SecMemory  SectionType = 8
	SecEnd     SectionType = 0xff
)

func (t SectionType) String() string {
	switch t {
	case SecHeader:
		return "header"
	case SecMeta:
		return "meta"
	case SecGlobals:
		return "globals"
	case SecStack:
		return "stack"
	case SecDevices:
		return "devices"
	case SecPages:
		return "pages"
	case SecModule:
		return "module"
	case SecMemory:
		return "memory"
	case SecEnd:
		return "end"
	}
	return fmt.Sprintf("type-%d", uint16(t))
}

// Codec is how a page section's page data is stored.
type Codec uint16

const (
	// CodecNone: raw pages, used when compression would not shrink a batch.
	CodecNone Codec = 0
	// CodecS2: the batch's pages as one S2 block (klauspost/compress).
	CodecS2 Codec = 1
	// CodecDeltaNone and CodecDeltaS2 (version 3, incremental snapshots
	// only): every page of the batch is stored XORed with the receiver's
	// current copy of it, raw or as one S2 block, and the section lists,
	// after the indices, each page's checksum once the receiver has XORed
	// it back (Snapshot.Resolve checks them). A page written a little
	// since the last checkpoint is then mostly zeros: a Remus primary
	// sends the pages it sent before this way.
	CodecDeltaNone Codec = 2
	CodecDeltaS2   Codec = 3
	// CodecDeltaSparse (version 4, incremental snapshots only) stores
	// each page XORed with the receiver's copy as runs: per page a u16
	// run count, then per run a u16 gap (bytes left zero since the end of
	// the one before, or the page's start), a u16 length (at least 1) and
	// the bytes. The encoder makes a run of each stretch of 8-byte words
	// that differ from the copy. Runs cover at most the page; the rest is
	// zero. A page written in a few places costs a few dozen bytes, and
	// decodes as that many copies: S2 decodes a delta's long zero runs a
	// few bytes at a time (a quarter of a Remus backup's CPU under a KV
	// load).
	CodecDeltaSparse Codec = 4
)

// delta reports whether the codec stores pages XORed with the receiver's.
func (c Codec) delta() bool {
	return c == CodecDeltaNone || c == CodecDeltaS2 || c == CodecDeltaSparse
}

// pageHead is the bytes a page section lists per page before the data:
// its index, and with a delta codec its checksum once resolved.
func (c Codec) pageHead() uint64 {
	if c.delta() {
		return pageRefSize + 4
	}
	return pageRefSize
}

// compressed reports whether the codec stores fewer bytes than the pages
// (an S2 block, or sparse runs).
func (c Codec) compressed() bool { return c == CodecS2 || c == CodecDeltaS2 || c == CodecDeltaSparse }

func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecS2:
		return "s2"
	case CodecDeltaNone:
		return "delta"
	case CodecDeltaS2:
		return "delta-s2"
	case CodecDeltaSparse:
		return "delta-sparse"
	}
	return fmt.Sprintf("codec(%d)", uint16(c))
}

// SectionInfo is one section as laid out in an encoding.
type SectionInfo struct {
	Type   SectionType
	Codec  Codec
	Offset int64  // of the frame header
	Stored uint32 // payload bytes in the file
	Raw    uint32 // payload bytes after decompression
	Pages  int    // page and memory sections: the pages they hold
	// Memory sections: where the page-aligned memory area starts in the
	// encoding, and its length (the memory size).
	DataOffset int64
	DataLength int64
}

// castagnoli is CRC-32C: computed by a CPU instruction on amd64 and arm64
// (many GB/s, so checking is never the bottleneck), in the standard
// library, and, unlike a 64-bit non-cryptographic hash, it guarantees to
// detect every error burst up to 32 bits, so every single-byte corruption.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

var le = binary.LittleEndian

type frame struct {
	typ    SectionType
	codec  Codec
	stored uint32
	raw    uint32
	sum    uint32 // crc32c of the stored payload
}

func (f frame) put(b []byte) {
	le.PutUint16(b[0:], uint16(f.typ))
	le.PutUint16(b[2:], uint16(f.codec))
	le.PutUint32(b[4:], f.stored)
	le.PutUint32(b[8:], f.raw)
	le.PutUint32(b[12:], f.sum)
	le.PutUint32(b[16:], crc(b[:16]))
}

func putPrefix(b []byte, version uint32) {
	copy(b, Magic)
	le.PutUint32(b[8:], version)
	le.PutUint32(b[12:], crc(b[:12]))
}

// idSalt separates snapshot IDs from any other SHA-256 in the system.
const idSalt = "ftvm snapshot id v1\x00"
