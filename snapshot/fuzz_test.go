package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

// checkDecoded is what both fuzz targets demand of any input: an error is
// one of ours, with a known kind; a success re-encodes to the same ID and
// decodes back to the same snapshot, and a full snapshot applies.
func checkDecoded(t *testing.T, data []byte) {
	s, err := DecodeBytes(data, nil)
	// Decompressing batches on several goroutines decides the same.
	ps, perr := DecodeBytesWorkers(data, nil, 3)
	if (err == nil) != (perr == nil) {
		t.Fatalf("sequential decoding: %v; with workers: %v", err, perr)
	}
	if err != nil {
		var e, pe *Error
		if errors.As(err, &e) && (!errors.As(perr, &pe) || pe.Kind != e.Kind || pe.Offset != e.Offset) {
			t.Fatalf("sequential decoding: %v; with workers: %v", err, perr)
		}
	} else {
		sameSnapshot(t, ps, s)
	}
	// So does decoding into memory full of garbage (a Remus backup's
	// recycled buffers), with and without workers.
	// Its sparse deltas are kept as runs until resolved: both are
	// compared resolved (against zero pages).
	for _, w := range []int{1, 3} {
		gs, gerr := DecodeBytesInto(data, nil, w, func(n int) []byte { return bytes.Repeat([]byte{0x5a}, n) })
		if (err == nil) != (gerr == nil) {
			t.Fatalf("decoding into fresh memory: %v; into garbage (%d workers): %v", err, w, gerr)
		}
		if err != nil {
			continue
		}
		if gs.ID != s.ID || len(gs.Pages) != len(s.Pages) {
			t.Fatalf("decoded into garbage: ID %s, %d pages; want %s, %d", gs.ID.Short(), len(gs.Pages), s.ID.Short(), len(s.Pages))
		}
		fresh, _ := DecodeBytes(data, nil)
		zero := func(uint32) []byte { return nil }
		ferr, gerr := fresh.Resolve(zero), gs.Resolve(zero)
		if (ferr == nil) != (gerr == nil) {
			t.Fatalf("resolving the fresh decoding: %v; the one into garbage: %v", ferr, gerr)
		}
		if ferr == nil {
			sameSnapshot(t, gs, fresh)
		}
	}
	// So does decoding from a reader that hands out a few bytes at a time
	// (a Remus backup decoding a checkpoint as it arrives).
	rs, rerr := DecodeReaderWorkers(iotest.HalfReader(bytes.NewReader(data)), nil, 2)
	if (err == nil) != (rerr == nil) {
		t.Fatalf("decoding bytes: %v; from a reader: %v", err, rerr)
	}
	if err == nil {
		sameSnapshot(t, rs, s)
	} else {
		var e, re *Error
		if errors.As(err, &e) && (!errors.As(rerr, &re) || re.Kind != e.Kind) {
			t.Fatalf("decoding bytes: %v; from a reader: %v", err, rerr)
		}
	}
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("error of another type: %T %v", err, err)
		}
		if e.Kind != ErrCorrupt && e.Kind != ErrTruncated && e.Kind != ErrVersion {
			t.Fatalf("unexpected kind: %v", err)
		}
		return
	}
	if s.HasDeltas() {
		// Against a receiver that has only zero pages, a delta is the
		// page itself, or else it resolves to the wrong checksum.
		if err := s.Resolve(func(uint32) []byte { return nil }); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("resolving deltas: %v", err)
			}
			return
		}
	}
	id := s.ID
	var b bytes.Buffer
	if err := s.Encode(&b); err != nil {
		t.Fatalf("a decoded snapshot does not encode: %v", err)
	}
	if s.ID != id {
		t.Fatal("re-encoding changed the ID")
	}
	s2, err := DecodeBytes(b.Bytes(), nil)
	if err != nil {
		t.Fatalf("re-encoded snapshot does not decode: %v", err)
	}
	sameSnapshot(t, s2, s)
	if s.Kind == Full {
		if err := Apply(&Image{}, s); err != nil {
			t.Fatalf("a decoded full snapshot does not apply: %v", err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) { checkDecoded(t, data) })
}

// FuzzDecodeResigned fixes every checksum of the input before decoding, so
// that the fuzzer's mutations get past the CRCs and reach the structural
// checks and the decompressor, which FuzzDecode's inputs rarely do.
func FuzzDecodeResigned(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) { checkDecoded(t, resign(data)) })
}

// resign recomputes the prefix and every complete frame's checksums.
func resign(b []byte) []byte {
	b = bytes.Clone(b)
	if len(b) < prefixSize {
		return b
	}
	le.PutUint32(b[12:], crc(b[:12]))
	var memSize int64
	for off := prefixSize; off+frameSize <= len(b); {
		typ := SectionType(le.Uint16(b[off:]))
		stored := int(le.Uint32(b[off+4:]))
		if stored > len(b)-off-frameSize {
			le.PutUint32(b[off+16:], crc(b[off:off+16]))
			break
		}
		le.PutUint32(b[off+12:], crc(b[off+frameSize:off+frameSize+stored]))
		le.PutUint32(b[off+16:], crc(b[off:off+16]))
		if typ == SecHeader && stored >= 88 {
			memSize = int64(le.Uint64(b[off+frameSize+80:]))
		}
		off += frameSize + stored
		if typ == SecMemory { // the memory data follows, unframed
			next := int64(off) + padding(int64(off)) + memSize
			if next > int64(len(b)) || next < 0 {
				break
			}
			off = int(next)
		}
	}
	return b
}

type fuzzSeed struct {
	name  string
	data  []byte
	valid bool
}

// fuzzSeeds are small, deterministic snapshots covering each section and
// both codecs, plus a damaged one of each kind.
func fuzzSeeds() []fuzzSeed {
	rng := rand.New(rand.NewPCG(20, 21))
	enc := func(s *Snapshot, batch int) []byte {
		s.Nonce = [16]byte{1, 2, 3}
		var b bytes.Buffer
		if err := s.EncodeOptions(&b, Options{BatchPages: batch, Workers: 1}); err != nil {
			panic(err)
		}
		return b.Bytes()
	}
	empty := enc(&Snapshot{Kind: Full, Module: testModule}, 0)
	text := testSnapshot(rng, Full, 64<<10, 0)
	for i := range 3 {
		d := bytes.Repeat([]byte(fmt.Sprintf("page %d of text, ", i)), PageSize/16)[:PageSize]
		text.Pages = append(text.Pages, Page{Index: uint32(2 * i), Data: d})
	}
	full := enc(text, 2)
	inc := testSnapshot(rng, Incremental, 128<<10, 0)
	raw := make([]byte, PageSize)
	for i := range raw {
		raw[i] = byte(rng.Uint32())
	}
	inc.Pages = []Page{{Index: 5, Data: raw}, {Index: 31, Data: bytes.Repeat([]byte{0, 0, 1, 0}, PageSize/4)}}
	incremental := enc(inc, 1)
	code := []byte("\x00asm\x01\x00\x00\x00")
	withModule := enc(&Snapshot{Kind: Full, Module: ModuleHash(code), MemorySize: 64 << 10,
		Pages: []Page{{Index: 3, Data: bytes.Repeat([]byte("ab"), PageSize/2)}}, ModuleCode: code, ModuleName: "m.wasm"}, 0)
	mappable := &Snapshot{Kind: Full, Module: testModule, MemorySize: 64 << 10, Nonce: [16]byte{4, 5, 6},
		Pages: []Page{{Index: 1, Data: bytes.Repeat([]byte("memory section "), PageSize/15+1)[:PageSize]},
			{Index: 15, Data: bytes.Repeat([]byte{9, 0, 0, 0}, PageSize/4)}}}
	var mb bytes.Buffer
	if err := mappable.EncodeOptions(&mb, Options{Mappable: true}); err != nil {
		panic(err)
	}
	// Deltas: against zero pages (so they resolve with no receiver's
	// memory at hand), in one raw batch and one S2 batch, and one against
	// a page a receiver with zero pages does not have.
	delta := testSnapshot(rng, Incremental, 128<<10, 0)
	zero := make([]byte, PageSize)
	delta.Pages = []Page{{Index: 2, Data: raw, Base: zero}, {Index: 3, Data: bytes.Repeat([]byte("delta "), PageSize/6+1)[:PageSize], Base: zero},
		{Index: 9, Data: bytes.Repeat([]byte{7}, PageSize)}, {Index: 12, Data: bytes.Repeat([]byte{7, 0}, PageSize/2), Base: bytes.Repeat([]byte{7}, PageSize)}}
	deltas := enc(delta, 2)
	var ds2 bytes.Buffer // as version 3 wrote them
	if err := delta.EncodeOptions(&ds2, Options{BatchPages: 2, Workers: 1, deltaS2: true}); err != nil {
		panic(err)
	}
	flipped := bytes.Clone(full)
	flipped[len(flipped)/2] ^= 4
	return []fuzzSeed{
		{"empty-full", empty, true},
		{"full-text-pages", full, true},
		{"incremental-raw-and-s2", incremental, true},
		{"full-with-module", withModule, true},
		{"full-mappable-memory", mb.Bytes(), true},
		{"incremental-deltas", deltas, true},
		{"incremental-deltas-s2", ds2.Bytes(), true},
		{"truncated", full[:len(full)-20], false},
		{"flipped-bit", flipped, false},
		{"not-a-snapshot", []byte("\x00asm\x01\x00\x00\x00"), false},
	}
}

// TestFuzzSeeds checks that the committed seeds are what fuzzSeeds makes
// (so they follow the format as it is now) and that the valid ones decode.
// FTVM_UPDATE_SEEDS=1 rewrites them.
func TestFuzzSeeds(t *testing.T) {
	update := os.Getenv("FTVM_UPDATE_SEEDS") != ""
	for _, target := range []string{"FuzzDecode", "FuzzDecodeResigned"} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range fuzzSeeds() {
			content := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s.data)) + ")\n"
			path := filepath.Join(dir, s.name)
			if update {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (FTVM_UPDATE_SEEDS=1 go test -run TestFuzzSeeds ./snapshot/ writes the seeds)", err)
			}
			if string(got) != content {
				t.Errorf("%s is stale: the format changed; FTVM_UPDATE_SEEDS=1 go test -run TestFuzzSeeds ./snapshot/", path)
			}
			if _, err := DecodeBytes(s.data, nil); (err == nil) != s.valid {
				t.Errorf("seed %s: %v", s.name, err)
			}
			if strings.Contains(s.name, "/") {
				t.Fatal("seed name with a slash")
			}
		}
	}
}

// TestDecodeWorkers: decompressing batches on several goroutines gives the
// same snapshot, and for a batch that does not decompress (checksums made
// good) the same error at the same offset, as decoding in one goroutine.
func TestDecodeWorkers(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	s := testSnapshot(rng, Full, 64<<20, 3000)
	data := encodeT(t, s, Options{BatchPages: 256})
	seq, err := DecodeBytes(data, &testModule)
	if err != nil {
		t.Fatal(err)
	}
	par, err := DecodeBytesWorkers(data, &testModule, 4)
	if err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, par, seq)
	if len(par.Sections) < 12 {
		t.Fatalf("%d sections: not enough batches to tell", len(par.Sections))
	}
	// Damage the fifth page batch's S2 block (its stated length, so that
	// it cannot decode), then re-sign.
	batches := 0
	for _, sec := range par.Sections {
		if sec.Type != SecPages {
			continue
		}
		if batches++; batches == 5 {
			if sec.Codec != CodecS2 {
				t.Fatalf("batch 5 is stored with codec %d, not S2", sec.Codec)
			}
			bad := bytes.Clone(data)
			at := int(sec.Offset) + frameSize + 4 + pageRefSize*256
			bad[at] ^= 0x01
			bad = resign(bad)
			_, serr := DecodeBytes(bad, &testModule)
			_, perr := DecodeBytesWorkers(bad, &testModule, 4)
			var se, pe *Error
			if !errors.As(serr, &se) || !errors.As(perr, &pe) || se.Kind != ErrCorrupt || pe.Kind != se.Kind || pe.Offset != se.Offset {
				t.Fatalf("damaged batch: sequential %v, with workers %v; want the same ErrCorrupt", serr, perr)
			}
			if se.Offset != sec.Offset {
				t.Fatalf("damaged batch reported at %d, it starts at %d", se.Offset, sec.Offset)
			}
			return
		}
	}
	t.Fatal("no fifth page batch")
}
