package snapshot

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
	"time"
)

var testModule = ModuleHash([]byte("\x00asm test module"))

// fillPage writes one of the kinds of content a guest heap has.
func fillPage(rng *rand.Rand, p []byte) {
	switch rng.IntN(6) {
	case 0: // random: encrypted or compressed data
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
	case 1: // pointers into a 16 MiB heap, 8-byte aligned, with small ints
		for i := 0; i+8 <= len(p); i += 8 {
			v := uint64(0x100000 + rng.IntN(16<<20)&^7)
			if rng.IntN(4) == 0 {
				v = uint64(rng.IntN(100))
			}
			binary.LittleEndian.PutUint64(p[i:], v)
		}
	case 2: // text
		words := []string{"snapshot ", "page ", "the ", "guest ", "memory ", "error: ", "GET /index.html ", "\n"}
		for i := 0; i < len(p); {
			i += copy(p[i:], words[rng.IntN(len(words))])
		}
	case 3: // mostly zero with a few words
		clear(p)
		for range 8 {
			binary.LittleEndian.PutUint32(p[rng.IntN(len(p)/4)*4:], rng.Uint32())
		}
	case 4: // a repeated record
		rec := make([]byte, 24+rng.IntN(40))
		for i := range rec {
			rec[i] = byte(rng.Uint32())
		}
		for i := 0; i < len(p); i += len(rec) {
			copy(p[i:], rec)
		}
	default: // a sparse patch over what was there
		for range 16 {
			p[rng.IntN(len(p))] = byte(rng.Uint32())
		}
	}
}

// testSnapshot builds a valid snapshot with n pages spread over memSize.
func testSnapshot(rng *rand.Rand, kind Kind, memSize uint64, n int) *Snapshot {
	s := &Snapshot{Kind: kind, Module: testModule, MemorySize: memSize,
		Globals:   []Global{{0, I32, 0x10000}, {1, I64, 1 << 40}, {3, F64, 0x400921fb54442d18}, {7, F32, 0x7fc00001}},
		StackAddr: 1024, Stack: []byte("asyncify stack blob"),
		Devices: []byte(`{"fds":[0,1,2],"clock":12345}`),
		Meta:    Meta{Created: time.Unix(1700000000, 123456789), Host: "host-a", Version: "v0.0.1", Reason: "test"}}
	if kind == Incremental {
		s.Seq = 1
		s.Parent[0] = 1
	}
	total := int(memSize / PageSize)
	idx := rng.Perm(total)[:min(n, total)]
	mem := make([]byte, len(idx)*PageSize)
	seen := map[int]bool{}
	for i, x := range idx {
		seen[x] = true
		d := mem[i*PageSize : (i+1)*PageSize]
		fillPage(rng, d)
		s.Pages = append(s.Pages, Page{Index: uint32(x), Data: d})
	}
	SortPages(s.Pages)
	return s
}

func encodeT(t testing.TB, s *Snapshot, o Options) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := s.EncodeOptions(&b, o); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// sameSnapshot compares everything but Sections.
func sameSnapshot(t testing.TB, got, want *Snapshot) {
	t.Helper()
	if got.Kind != want.Kind || got.Module != want.Module || got.Seq != want.Seq || got.Parent != want.Parent ||
		got.MemorySize != want.MemorySize || got.StackAddr != want.StackAddr || got.Nonce != want.Nonce || got.ID != want.ID {
		t.Fatalf("header differs:\n got %+v\nwant %+v", summaryOf(got), summaryOf(want))
	}
	if !bytes.Equal(got.Stack, want.Stack) || !bytes.Equal(got.Devices, want.Devices) {
		t.Fatal("stack or devices differ")
	}
	if !got.Meta.Created.Equal(want.Meta.Created) || got.Meta.Host != want.Meta.Host ||
		got.Meta.Version != want.Meta.Version || got.Meta.Reason != want.Meta.Reason {
		t.Fatalf("meta differs: %+v vs %+v", got.Meta, want.Meta)
	}
	if len(got.Globals) != len(want.Globals) {
		t.Fatalf("%d globals, want %d", len(got.Globals), len(want.Globals))
	}
	for i := range got.Globals {
		if got.Globals[i] != want.Globals[i] {
			t.Fatalf("global %d: %+v, want %+v", i, got.Globals[i], want.Globals[i])
		}
	}
	if len(got.Pages) != len(want.Pages) {
		t.Fatalf("%d pages, want %d", len(got.Pages), len(want.Pages))
	}
	for i := range got.Pages {
		if got.Pages[i].Index != want.Pages[i].Index || !bytes.Equal(got.Pages[i].Data, want.Pages[i].Data) {
			t.Fatalf("page %d (index %d) differs", i, want.Pages[i].Index)
		}
	}
}

func summaryOf(s *Snapshot) Summary { return Describe(s) }
