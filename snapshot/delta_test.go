package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// TestDeltaPages sends an incremental snapshot with most of its pages as
// deltas against the receiver's copies, in runs mixed with whole pages and
// over several batches, and checks what a receiver needs: the same ID as
// the whole-page encoding (the ID names contents, not the encoding), fewer
// bytes, pages that cannot be applied before they are resolved, resolved
// pages equal to the sender's, and a receiver whose copy of a page is not
// the one the sender meant told so, naming the page.
func TestDeltaPages(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	const memSize = 1 << 20
	// The receiver's memory: what a full snapshot gave it.
	full := testSnapshot(rng, Full, memSize, 200)
	var img Image
	if err := Apply(&img, mustDecode(t, encodeT(t, full, Options{}), 1)); err != nil {
		t.Fatal(err)
	}
	// The next incremental: pages the receiver has, changed a little,
	// most sent as deltas; a few whole; a few new.
	inc := &Snapshot{Kind: Incremental, Module: full.Module, Seq: 1, Parent: full.ID, MemorySize: memSize,
		Globals: full.Globals, StackAddr: full.StackAddr, Stack: full.Stack, Devices: full.Devices, Meta: full.Meta}
	want := bytes.Clone(img.Memory)
	deltas := 0
	for i, p := range full.Pages {
		if i%3 == 2 {
			continue
		}
		data := bytes.Clone(p.Data)
		for range 1 + rng.IntN(20) {
			data[rng.IntN(PageSize)] ^= byte(1 + rng.IntN(255))
		}
		copy(want[int(p.Index)*PageSize:], data)
		page := Page{Index: p.Index, Data: data}
		if i%7 != 0 {
			page.Base = img.Memory[int(p.Index)*PageSize : int(p.Index+1)*PageSize]
			deltas++
		}
		inc.Pages = append(inc.Pages, page)
	}
	SortPages(inc.Pages)
	whole := make([]Page, len(inc.Pages))
	for i, p := range inc.Pages {
		whole[i] = Page{Index: p.Index, Data: p.Data}
	}
	wholeSnap := *inc
	wholeSnap.Pages = whole

	for _, c := range []struct {
		workers int
		s2      bool
	}{{1, false}, {4, false}, {1, true}, {4, true}} {
		workers := c.workers
		o := Options{BatchPages: 16, Workers: workers, deltaS2: c.s2}
		enc := encodeT(t, inc, o)
		id := inc.ID
		wholeSnap.Nonce = inc.Nonce
		plain := encodeT(t, &wholeSnap, o)
		if wholeSnap.ID != id {
			t.Fatalf("the ID depends on the encoding: %s as deltas, %s whole", id, wholeSnap.ID)
		}
		if len(enc) >= len(plain)*2/3 {
			t.Errorf("deltas take %d bytes, whole pages %d: expected far fewer", len(enc), len(plain))
		}
		wantCodec := CodecDeltaSparse
		if c.s2 {
			wantCodec = CodecDeltaS2
		}
		for _, sec := range inc.Sections {
			if sec.Type == SecPages && sec.Codec.delta() && sec.Codec != wantCodec {
				t.Fatalf("a delta batch stored %s, want %s", sec.Codec, wantCodec)
			}
		}
		got := mustDecode(t, enc, workers)
		// Into reused memory (DecodeBytesInto), whatever it held: the
		// same pages, deltas and whole ones.
		for _, b := range [][]byte{enc, plain} {
			sameDecoding(t, b, workers, func(idx uint32) []byte { return img.Memory[int(idx)*PageSize : int(idx+1)*PageSize] })
		}
		n := 0
		for _, p := range got.Pages {
			if p.Delta {
				n++
			}
		}
		if n != deltas || !got.HasDeltas() {
			t.Fatalf("%d pages arrived as deltas, want %d", n, deltas)
		}
		try := img
		try.Memory = bytes.Clone(img.Memory)
		if err := Apply(&try, got); err == nil || !strings.Contains(err.Error(), "unresolved delta") {
			t.Fatalf("applying unresolved deltas: %v", err)
		}
		base := func(idx uint32) []byte { return try.Memory[int(idx)*PageSize : int(idx+1)*PageSize] }
		if err := got.Resolve(base); err != nil {
			t.Fatal(err)
		}
		if got.HasDeltas() {
			t.Fatal("pages left unresolved")
		}
		if err := Apply(&try, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(try.Memory, want) {
			t.Fatal("the resolved pages differ from the sender's")
		}

		// A receiver whose copy of one page differs.
		got = mustDecode(t, enc, workers)
		wrong := bytes.Clone(img.Memory)
		var victim uint32
		for _, p := range got.Pages {
			if p.Delta {
				victim = p.Index
				break
			}
		}
		wrong[int(victim)*PageSize+100] ^= 1
		wrongBase := func(idx uint32) []byte { return wrong[int(idx)*PageSize : int(idx+1)*PageSize] }
		err := got.Resolve(wrongBase)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "page "+strconv.Itoa(int(victim))+" ") {
			t.Fatalf("resolving against a different copy of page %d: %v", victim, err)
		}
		// So does one decoded into reused memory, its deltas kept as runs.
		into, err := DecodeBytesInto(enc, nil, workers, func(n int) []byte { return make([]byte, n) })
		if err != nil {
			t.Fatal(err)
		}
		if err := into.Resolve(wrongBase); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "page "+strconv.Itoa(int(victim))+" ") {
			t.Fatalf("resolving runs against a different copy of page %d: %v", victim, err)
		}
	}

	// Only incremental snapshots have a base to be a delta against.
	bad := *full
	bad.Pages = append([]Page(nil), full.Pages...)
	bad.Pages[0].Base = bad.Pages[0].Data
	if err := bad.Encode(&bytes.Buffer{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a full snapshot with a delta page: %v", err)
	}
	// A delta codec in a file of a version before it is damage.
	for _, c := range []struct {
		o      Options
		v, old uint32
	}{{Options{}, versionSparse, versionDelta}, {Options{deltaS2: true}, versionDelta, versionPaged}, {Options{Uncompressed: true}, versionDelta, versionPaged}} {
		enc := encodeT(t, inc, c.o)
		if v := le.Uint32(enc[8:]); v != c.v {
			t.Fatalf("%+v: written as version %d, want %d", c.o, v, c.v)
		}
		old := bytes.Clone(enc)
		putPrefix(old, c.old)
		if _, err := DecodeBytes(old, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), fmt.Sprintf("version %d", c.old)) {
			t.Fatalf("%+v as version %d: %v", c.o, c.old, err)
		}
	}
}

// TestSparseCodec: pages changed in no place, the first or last word, a
// few scattered bytes, every other word, or everywhere decode back to the
// same XOR; a page that would not shrink is refused by the encoder; and
// damaged runs (truncated, past the page, empty, bytes left over) are
// errors.
func TestSparseCodec(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	base := make([]byte, PageSize)
	for i := range base {
		base[i] = byte(rng.Uint32())
	}
	edits := map[string]func(p []byte){
		"same":       func(p []byte) {},
		"first byte": func(p []byte) { p[0] ^= 1 },
		"last byte":  func(p []byte) { p[PageSize-1] ^= 0x80 },
		"scattered": func(p []byte) {
			for range 30 {
				p[rng.IntN(PageSize)] ^= byte(1 + rng.IntN(255))
			}
		},
		"every other word": func(p []byte) {
			for i := 0; i < PageSize; i += 16 {
				p[i] ^= 1
			}
		},
		"a run": func(p []byte) {
			for i := 1000; i < 1900; i++ {
				p[i] ^= 3
			}
		},
	}
	for name, edit := range edits {
		page := bytes.Clone(base)
		edit(page)
		enc, ok := appendSparse([]byte("prefix"), page, base, PageSize-1)
		if !ok {
			t.Fatalf("%s: not encoded", name)
		}
		enc = enc[len("prefix"):]
		got := make([]byte, PageSize)
		if err := decodeSparse(enc, got, nil); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := make([]byte, PageSize)
		xorPage(want, page, base)
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: decodes to another XOR", name)
		}
		if name == "scattered" && len(enc) > 30*12+2 {
			t.Errorf("%s: %d bytes for 30 changed bytes", name, len(enc))
		}
	}
	noise := make([]byte, PageSize)
	for i := range noise {
		noise[i] = byte(rng.Uint32()) | 1
	}
	if _, ok := appendSparse(nil, noise, base, PageSize-1); ok {
		t.Fatal("a page that does not shrink was encoded")
	}
	page := bytes.Clone(base)
	page[100] ^= 1
	page[3000] ^= 1
	good, _ := appendSparse(nil, page, base, PageSize-1)
	dst := make([]byte, 2*PageSize)
	// maxSparseRuns+1 runs of one byte each, with all their data: only
	// the count is wrong.
	tooMany := le.AppendUint16(nil, maxSparseRuns+1)
	for range maxSparseRuns + 1 {
		tooMany = append(tooMany, 0, 0, 1, 0, 7)
	}
	// The limit is what the encoder may use, exactly: a page that differs
	// in every word takes 2 + 4 + 4096 bytes.
	if _, ok := appendSparse(nil, noise, base, 2+4+PageSize); !ok {
		t.Error("a sparse page of exactly the limit was refused")
	}
	if _, ok := appendSparse(nil, noise, base, 2+4+PageSize-1); ok {
		t.Error("a sparse page one byte over the limit was accepted")
	}
	for name, bad := range map[string][]byte{
		"empty":          nil,
		"truncated run":  good[:5],
		"truncated data": good[:len(good)-1],
		"left over":      append(bytes.Clone(good), 0),
		"past the page":  append([]byte{1, 0, 0xf8, 0x0f, 16, 0}, make([]byte, 16)...), // 4088 + 16 bytes
		"empty run":      {1, 0, 0, 0, 0, 0},
		"too many runs":  tooMany,
	} {
		// Two pages: a run past the first must not spill into the second.
		if err := decodeSparse(append(bad, 0, 0), dst, nil); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// sameDecoding checks that b decoded into memory full of garbage
// (DecodeBytesInto) gives the pages of its plain decoding, once both are
// resolved against base.
func sameDecoding(t *testing.T, b []byte, workers int, base func(uint32) []byte) {
	t.Helper()
	want := mustDecode(t, b, workers)
	allocs := 0
	garbage := func(n int) []byte {
		allocs++
		return bytes.Repeat([]byte{0xa5}, n)
	}
	got, err := DecodeBytesInto(b, nil, workers, garbage)
	if err != nil {
		t.Fatal(err)
	}
	if allocs == 0 || got.ID != want.ID || len(got.Pages) != len(want.Pages) {
		t.Fatalf("decoded into reused memory: %d allocations, ID %s, %d pages; want ID %s, %d pages",
			allocs, got.ID.Short(), len(got.Pages), want.ID.Short(), len(want.Pages))
	}
	for i, p := range got.Pages {
		w := want.Pages[i]
		if p.Index != w.Index || p.Delta != w.Delta || p.Sum != w.Sum {
			t.Fatalf("page %d decoded into reused memory differs (delta %v)", p.Index, w.Delta)
		}
	}
	if err := want.Resolve(base); err != nil {
		t.Fatal(err)
	}
	if err := got.Resolve(base); err != nil {
		t.Fatalf("resolving the decoding into reused memory: %v", err)
	}
	for i, p := range got.Pages {
		if !bytes.Equal(p.Data, want.Pages[i].Data) {
			t.Fatalf("page %d decoded into reused memory resolves to other bytes", p.Index)
		}
	}
}

func mustDecode(t *testing.T, b []byte, workers int) *Snapshot {
	t.Helper()
	s, err := DecodeBytesWorkers(b, nil, workers)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
