package snapshot

import (
	"bytes"
	"errors"
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

	for _, workers := range []int{1, 4} {
		o := Options{BatchPages: 16, Workers: workers}
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
		got := mustDecode(t, enc, workers)
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
		err := got.Resolve(func(idx uint32) []byte { return wrong[int(idx)*PageSize : int(idx+1)*PageSize] })
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "page "+strconv.Itoa(int(victim))+" ") {
			t.Fatalf("resolving against a different copy of page %d: %v", victim, err)
		}
	}

	// Only incremental snapshots have a base to be a delta against.
	bad := *full
	bad.Pages = append([]Page(nil), full.Pages...)
	bad.Pages[0].Base = bad.Pages[0].Data
	if err := bad.Encode(&bytes.Buffer{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a full snapshot with a delta page: %v", err)
	}
	// A delta codec in a version 1 file is damage, not a delta.
	enc := encodeT(t, inc, Options{})
	if v := le.Uint32(enc[8:]); v != versionDelta {
		t.Fatalf("written as version %d, want %d", v, versionDelta)
	}
	old := bytes.Clone(enc)
	putPrefix(old, versionPaged)
	if _, err := DecodeBytes(old, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "version 1") {
		t.Fatalf("a delta codec in a version 1 snapshot: %v", err)
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
