package store

import (
	"bytes"
	"math/rand/v2"
	"os"
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

// TestRecordOntoTheSlotsTip: after a compaction the slot's files have IDs
// of their own. A record encoded onto them (its parent Tip: a Remus
// backup's merge of checkpoints) is stored as it came, not encoded a
// second time; one naming the primary's ID is still re-encoded; and the
// chain restores either way.
func TestRecordOntoTheSlotsTip(t *testing.T) {
	dir := t.TempDir()
	var encodes atomic.Int32 // goroutines the slot's own encodings started
	s, err := Open(dir, Options{MaxRecords: -1, MaxRecordBytes: -1, EncodeWorkerInit: func() { encodes.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const pages = 2*snapshot.DefaultBatchPages + 16 // a record of them is encoded in parallel
	mem := make([]byte, pages*snapshot.PageSize)
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	snap := func(kind snapshot.Kind, seq uint64, parent snapshot.Hash, idx ...uint32) (*snapshot.Snapshot, []byte) {
		sn := &snapshot.Snapshot{Kind: kind, Module: testModule, Seq: seq, Parent: parent, MemorySize: uint64(len(mem))}
		for _, i := range idx {
			mem[int(i)*snapshot.PageSize] = byte(seq)
			sn.Pages = append(sn.Pages, snapshot.Page{Index: i, Data: bytes.Clone(mem[int(i)*snapshot.PageSize:][:snapshot.PageSize])})
		}
		var b bytes.Buffer
		if err := sn.Encode(&b); err != nil {
			t.Fatal(err)
		}
		return sn, b.Bytes()
	}
	all := make([]uint32, pages)
	for i := range all {
		all[i] = uint32(i)
	}
	full, raw := snap(snapshot.Full, 1, snapshot.Hash{}, all...)
	if err := s.CommitFull(1, raw, nil, nil); err != nil {
		t.Fatal(err)
	}
	if s.Tip() != full.ID {
		t.Fatalf("Tip %s after the full checkpoint %s", s.Tip().Short(), full.ID.Short())
	}
	inc, raw := snap(snapshot.Incremental, 2, full.ID, 3, 9)
	if err := s.CommitIncremental(2, raw, nil); err != nil {
		t.Fatal(err)
	}
	img, err := s.Image()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Compact(img); err != nil {
		t.Fatal(err)
	}
	tip := s.Tip()
	if tip == inc.ID || tip.IsZero() {
		t.Fatalf("Tip %s after the compaction: want the compacted base's own ID", tip.Short())
	}
	// Onto the slot's files: stored as it came, not encoded again.
	encodes.Store(0)
	_, raw3 := snap(snapshot.Incremental, 3, tip, all...)
	if err := s.CommitIncremental(3, raw3, nil); err != nil {
		t.Fatal(err)
	}
	if n := encodes.Load(); n != 0 {
		t.Errorf("a record onto the slot's tip was encoded again (%d encoding goroutines)", n)
	}
	_, recs := s.Paths()
	if got, err := os.ReadFile(recs[len(recs)-1]); err != nil || !bytes.Equal(got, raw3) {
		t.Fatalf("a record onto the slot's tip was not stored as it came (err %v)", err)
	}
	// Naming the last record as the caller encoded it is that same ID
	// now; one naming an ID the slot never had is refused.
	if _, bad := snap(snapshot.Incremental, 4, inc.ID, 6); s.CommitIncremental(4, bad, nil) == nil {
		t.Fatal("a record after a checkpoint the slot does not hold was stored")
	}
	_, raw4 := snap(snapshot.Incremental, 4, s.Tip(), 6, 7)
	if err := s.CommitIncremental(4, raw4, nil); err != nil {
		t.Fatal(err)
	}
	base, recs := s.Paths()
	got, err := snapshot.Restore(nil, append([]string{base}, recs...)...)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Memory, mem) {
		t.Fatal("the chain does not restore the memory")
	}
}
