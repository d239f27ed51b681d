package remus

import (
	"bytes"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/snapshot"
)

// mergeJobs is two incremental checkpoints of n fresh, barely compressible
// pages each (a heap's growth), as the persister merges them.
func mergeJobs(n int, seed uint64) []persistJob {
	rng := rand.New(rand.NewPCG(seed, 1))
	var jobs []persistJob
	for j := range 2 {
		snap := &snapshot.Snapshot{Kind: snapshot.Incremental, Seq: uint64(10 + j), Parent: snapshot.Hash{1},
			MemorySize: uint64(4*n) * snapshot.PageSize}
		for i := range n {
			d := make([]byte, snapshot.PageSize)
			for k := range d {
				d[k] = byte(rng.IntN(16)) // about half the bits: S2 keeps most of them
			}
			snap.Pages = append(snap.Pages, snapshot.Page{Index: uint32(2*n*j + i), Data: d})
		}
		jobs = append(jobs, persistJob{seq: snap.Seq, snap: snap})
	}
	return jobs
}

// TestMergeReusesItsBuffer: the persister's merges encode into a buffer it
// keeps, so a merge of a heap's growth (400 pages here) no longer
// allocates, copies and clears its encoding's size over again as a fresh
// buffer doubles. What a second merge of the same size allocates must be
// well under its encoding (the pages themselves are not copied: the merged
// snapshot points at the jobs' memory). The encoding is the same either
// way.
func TestMergeReusesItsBuffer(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector drops sync.Pool items at random: the encoder's buffers are allocated anew")
	}
	const n = 200
	jobs := mergeJobs(n, 7)
	var buf bytes.Buffer
	raw1, m1, err := mergeIncrementals(&buf, jobs, 3, snapshot.Hash{2})
	if err != nil {
		t.Fatal(err)
	}
	size := len(raw1)
	first := bytes.Clone(raw1)
	// The encoder's own pooled buffers settle over a few merges.
	for range 3 {
		if _, _, err := mergeIncrementals(&buf, jobs, 3, snapshot.Hash{2}); err != nil {
			t.Fatal(err)
		}
	}
	const runs = 4
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	var raw2 []byte
	var m2 *snapshot.Snapshot
	for range runs {
		if raw2, m2, err = mergeIncrementals(&buf, jobs, 3, snapshot.Hash{2}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if alloc := (after.TotalAlloc - before.TotalAlloc) / runs; alloc > uint64(size)/2 {
		t.Errorf("a merge of %d bytes allocated %d bytes", size, alloc)
	}
	if len(m2.Pages) != 2*n || len(m1.Pages) != 2*n {
		t.Fatalf("merged %d and %d pages, want %d", len(m1.Pages), len(m2.Pages), 2*n)
	}
	// Same content (the nonce differs: a fresh one each encoding).
	a, err := snapshot.DecodeBytes(first, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := snapshot.DecodeBytes(raw2, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range a.Pages {
		if a.Pages[i].Index != b.Pages[i].Index || !bytes.Equal(a.Pages[i].Data, b.Pages[i].Data) {
			t.Fatalf("page %d differs between the merges", i)
		}
	}
}

// TestStoreEncodesAtThePersistersPriority: the goroutines that compress
// what a slot's store encodes (a compaction's base, records re-encoded
// onto it) run at the persister's niceness, not at the guests' (the store
// compressed on normal-priority threads beside the niced persister);
// once a failover hurried the persister, at its priority again.
func TestStoreEncodesAtThePersistersPriority(t *testing.T) {
	hurried := new(atomic.Bool)
	opts := storeOptions(0, hurried)
	nice := func() int {
		got := make(chan int)
		go func() { // its thread, if locked, ends with it
			opts.EncodeWorkerInit()
			n, _ := threadPriority(t, unix.Gettid())
			got <- n
		}()
		return <-got
	}
	if n := nice(); n != persistNice {
		t.Errorf("the store's encoding goroutine runs at nice %d, want the persister's %d", n, persistNice)
	}
	hurried.Store(true)
	if n := nice(); n != 0 {
		t.Errorf("after a failover hurried the persister, the store's encoding goroutine runs at nice %d, want 0", n)
	}
}

// TestMergeBufferInHugePages: a merge of a heap's growth (here 1,200
// pages) encodes into a buffer of whole 2 MiB-aligned huge pages
// (snapshot.HugeBuffer): faulted in 4 KiB at a time, the first merge's
// buffer cost the backup about 30 ms of CPU per 8 MB on this project's VM.
func TestMergeBufferInHugePages(t *testing.T) {
	var buf bytes.Buffer
	raw, _, err := mergeIncrementals(&buf, mergeJobs(600, 9), 3, snapshot.Hash{2})
	if err != nil {
		t.Fatal(err)
	}
	if addr := uintptr(unsafe.Pointer(&raw[0])); addr%(2<<20) != 0 {
		t.Fatalf("the merge's %d bytes are encoded at %#x, not at the start of a huge page", len(raw), addr)
	}
}
