// Package snapshot is ftvm's snapshot format: a VM's linear memory, wasm
// globals, Asyncify stack and device state, written so that damage of any
// kind is an error and never a half-restored guest.
//
// A snapshot is full (every non-zero page) or incremental (the pages
// dirtied since its parent, named by the parent's ID). Restore applies a
// full snapshot and then its incrementals in order; Apply checks each link
// (parent ID, sequence number, module) before it touches the image. The
// same encoding carries checkpoints between hosts: a primary stages its
// dirty pages (Stager) while the guest is paused and encodes the copy
// after resuming it; the receiver Decodes, which verifies every byte
// (pages sent as deltas: once Resolved against its own copies), and only
// then Applies.
//
// # Layout (versions 1 to 3, little-endian)
//
//	prefix   "FTVMSNAP" | u32 version | u32 crc32c(previous 12 bytes)
//	section* frame | payload
//	frame    u16 type | u16 codec | u32 stored length | u32 raw length |
//	         u32 crc32c(payload as stored) | u32 crc32c(previous 16 bytes)
//
// Sections come in a fixed order, each once, except module (optional) and
// pages (zero or more, or, in version 2, one memory section instead):
//
//	header   u8 kind | 3 zero bytes | u32 page size (4096) | [32] module SHA-256 |
//	         u64 seq | [32] parent ID (zero if full) | u64 memory size |
//	         u32 page count | [16] nonce
//	meta     i64 created (Unix ns, 0 = unset) | 3 × (u16 length | UTF-8):
//	         host, ftvm version, reason
//	globals  u32 count | count × (u32 index | u8 wasm valtype | u64 bits)
//	stack    u64 address in linear memory | blob
//	devices  blob (the device layer's JSON)
//	module   u16 length | name | wasm binary: an optional copy of the module,
//	         which must hash to the header's module hash
//	pages    u32 count | count × u32 page index | page data, raw or one
//	         S2 block of count × 4096 bytes (codec 0 none, 1 S2); with a
//	         delta codec (incremental snapshots only: 2 none and 3 S2,
//	         version 3; 4 sparse, version 4), the indices are followed by
//	         count × u32 crc32c(page as resolved) and each page's data is
//	         XORed with the receiver's current copy of it (see
//	         Snapshot.Resolve); sparse stores, per page, u16 runs, then
//	         per run u16 zero bytes skipped | u16 length | the bytes
//	memory   u32 count | count × u32 page index | count × u32 crc32c(page),
//	         then, outside the frame, zero padding to a multiple of 4096
//	         bytes and the whole memory, page i at i × 4096, unlisted pages
//	         zero (holes in a file): version 2 and later, full
//	         snapshots only
//	end      u32 sections before it | u32 zero | u64 its own offset | [32] ID
//
// The memory section (Options.Mappable) exists so that a restore can map
// the memory copy-on-write rather than decompress and copy it: Image.Map
// maps the data after checking every listed page's checksum with pread
// (reading through the fresh mapping would fault every page in), and the
// guest then faults in only what it touches. Its pages and checksums enter
// the ID as page sections' would.
//
// Every byte is under a checksum: the prefix's, a frame header's (checked
// before its lengths are believed), or a payload's, so a damaged byte is
// ErrCorrupt and never misread as a length. Lengths are checked against
// per-section caps before anything is read, and reading allocates only as
// the bytes arrive. The end section is the only way a snapshot ends:
// anything cut short is ErrTruncated. Pages are sorted and unique across
// all batches, within the memory size, which is a multiple of 64 KiB.
// A page section's raw length must be exactly that of its page count, so
// decompression has one exact buffer to fill.
//
// CRC-32C rather than xxhash: it is in the standard library, runs on a CPU
// instruction (GB/s, never the bottleneck), and guarantees to catch every
// burst of up to 32 bits, so every single-byte corruption, which a 64-bit
// non-cryptographic hash only makes likely.
//
// # ID
//
// A snapshot's ID is SHA-256 over a salt, the payloads of the header,
// meta, globals, stack and devices sections (each with its type and
// length), and for each page its index and the CRC-32C of its
// decompressed data (of a delta page: of the page once resolved, as its
// section lists it). It therefore names the content, not the encoding:
// batch size, worker count or codec choices do not change it, nor does
// the module copy (not state), and re-encoding a decoded snapshot keeps
// its children valid. The random
// nonce in the header makes two snapshots of identical states distinct.
// Decode recomputes the ID from what it decompressed and compares it with
// the trailer's, which checks the decompressor's output end to end; for a
// delta page it checks the listed checksum, and Resolve checks the
// resolved page against it (CRC-32C: a base that differs in up to 32
// consecutive bits is always caught, any other difference all but
// always, with probability 1 - 2^-32).
// Hashing page CRCs instead of page bytes keeps SHA-256 (about 200 MB/s
// without SHA instructions) off the page data's path.
//
// # Versions
//
// Every version keeps the 16-byte prefix and its checksum, so a reader
// tells a newer file (ErrVersion) from a damaged one (ErrCorrupt). Version
// 2 only adds the memory section, version 3 only the delta codecs, version
// 4 only the sparse one; a snapshot is written with the oldest version
// whose codecs the encoder may use for it (see Version), so one with none
// of them is version 1, which every build reads. Delta pages only travel
// between a Remus primary and its backup, which resolves them before it
// stores anything: snapshot files never hold them.
//
// A delta page's checksum in the ID is the one its section lists, which
// Decode cannot check without the receiver's copy; Resolve checks each
// resolved page against it, and Apply refuses a snapshot with pages not
// yet resolved, so a page is never taken unchecked.
package snapshot
