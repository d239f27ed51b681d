package store

import (
	"bytes"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
)

// TestEncodeWorkerInit: the snapshots the slot encodes itself (a
// compaction's base, and a record re-encoded onto it) compress their
// batches on goroutines that run Options.EncodeWorkerInit first. The
// backup's persister runs at a low priority; with the default options its
// commits compressed on normal-priority threads beside it.
func TestEncodeWorkerInit(t *testing.T) {
	var inits atomic.Int32
	s, err := Open(t.TempDir(), Options{MaxRecords: -1, MaxRecordBytes: -1, EncodeWorkerInit: func() { inits.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	const pages = 3 * snapshot.DefaultBatchPages // three batches: compressed in parallel
	page := func(i uint32) snapshot.Page {
		d := make([]byte, snapshot.PageSize)
		for k := range d {
			d[k] = byte(rng.IntN(4))
		}
		return snapshot.Page{Index: i, Data: d}
	}
	encode := func(sn *snapshot.Snapshot) []byte {
		var b bytes.Buffer
		if err := sn.EncodeOptions(&b, snapshot.Options{Workers: 1}); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: testModule, Seq: 1, MemorySize: pages * snapshot.PageSize}
	for i := range uint32(pages) {
		full.Pages = append(full.Pages, page(i))
	}
	if err := s.CommitFull(1, encode(full), nil, nil); err != nil {
		t.Fatal(err)
	}
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: testModule, Seq: 2, Parent: full.ID,
		MemorySize: full.MemorySize, Pages: []snapshot.Page{page(0)}}
	if err := s.CommitIncremental(2, encode(inc), nil); err != nil {
		t.Fatal(err)
	}
	if inits.Load() != 0 {
		t.Fatalf("stored as they came, yet %d encoding goroutines started", inits.Load())
	}
	img, err := s.Image()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Compact(img); err != nil {
		t.Fatal(err)
	}
	if inits.Load() == 0 {
		t.Error("the compaction's base was compressed without EncodeWorkerInit")
	}
	inits.Store(0)
	// After the compaction, the primary's next checkpoint names the
	// primary's ID as its parent: the slot re-encodes it onto its base.
	next := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: testModule, Seq: 3, Parent: inc.ID,
		MemorySize: full.MemorySize}
	for i := range uint32(pages) {
		next.Pages = append(next.Pages, page(i))
	}
	if err := s.CommitIncremental(3, encode(next), nil); err != nil {
		t.Fatal(err)
	}
	if inits.Load() == 0 {
		t.Error("the record re-encoded after the compaction was compressed without EncodeWorkerInit")
	}
}
