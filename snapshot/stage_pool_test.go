package snapshot

import "testing"

// readyLengths is the ready length of each free chunk of the pool.
func readyLengths(sp *StagePool) []int {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	r := make([]int, len(sp.free))
	for i, c := range sp.free {
		r[i] = c.ready
	}
	return r
}

// TestStagePoolSmallMemory: a 128 KiB memory (its first allocation, a
// growth from 0) is staged at most 32 pages at a time: the pool keeps two
// chunks, faulted in one huge page each, not three whole ones (12 MiB,
// 3–7 ms of CPU at a small guest's start). When the memory grows to 8 MiB
// the pool is short until Refill has faulted its chunks in whole and added
// those two stagings of it need.
func TestStagePoolSmallMemory(t *testing.T) {
	pool := &StagePool{}
	pool.ExpectGrowth(32)
	pool.Refill()
	if got := pool.freeChunks(); got > 2 {
		t.Errorf("for a 128 KiB memory Refill keeps %d chunks, want at most 2", got)
	}
	if got := pool.faulted.Load(); got > 2*hugeSize {
		t.Errorf("for a 128 KiB memory Refill faulted in %d bytes, want at most %d (two huge pages)", got, 2*hugeSize)
	}
	if pool.Short() {
		t.Fatal("the pool is short after Refill")
	}

	before := pool.faulted.Load()
	pool.ExpectGrowth(2*stageChunkPages - 32) // now 8 MiB
	if !pool.Short() {
		t.Fatal("after the memory grew to 8 MiB the pool is not short")
	}
	pool.Refill()
	if pool.Short() {
		t.Fatal("the pool is short after Refill")
	}
	want := pool.want()
	if want > 4 {
		t.Errorf("for an 8 MiB memory the pool wants %d chunks, want at most 4 (two stagings of two)", want)
	}
	if got := pool.freeChunks(); got != want {
		t.Errorf("Refill keeps %d chunks, want %d", got, want)
	}
	for i, r := range readyLengths(pool) {
		if r != stageChunkBytes {
			t.Errorf("chunk %d is faulted in %d bytes, want %d", i, r, stageChunkBytes)
		}
	}
	// Every chunk faulted in whole, and no part of one twice.
	if got, want := pool.faulted.Load(), int64(pool.Made())*stageChunkBytes; got != want {
		t.Errorf("the pool faulted in %d bytes in all (%d after the growth), want %d: %d chunks, once each",
			got, got-before, want, pool.Made())
	}
}

// TestStagePoolChunkKeepsReadyLength: a chunk lent to a Stager comes back
// faulted in as far as it went out, or as far as the staging wrote into
// it, and Refill faults in only the rest.
func TestStagePoolChunkKeepsReadyLength(t *testing.T) {
	pool := &StagePool{}
	pool.ExpectGrowth(32) // 128 KiB
	pool.Refill()
	made, faulted := pool.Made(), pool.faulted.Load()
	mem := make([]byte, 32*PageSize)
	st := Stager{Pool: pool}
	if _, err := st.Stage(mem, []uint32{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	st.Release()
	if pool.Short() {
		t.Fatal("the pool is short with its chunk back")
	}
	pool.Refill()
	if pool.Made() != made || pool.faulted.Load() != faulted {
		t.Fatalf("Refill after the chunk came back made %d chunks and faulted in %d bytes, want none",
			pool.Made()-made, pool.faulted.Load()-faulted)
	}
	if got := readyLengths(pool); len(got) != 2 || got[0] != hugeSize || got[1] != hugeSize {
		t.Fatalf("the chunks are faulted in %v bytes, want a huge page each", got)
	}

	// The memory grows to 1,032 pages and a pause stages all of them
	// before Refill runs: the first chunk, written whole, is ready; the
	// second, 8 pages in, is faulted in only the rest of the way.
	const pages = stageChunkPages + 8
	pool.ExpectGrowth(pages - 32)
	mem = make([]byte, pages*PageSize)
	idx := make([]uint32, pages)
	for i := range idx {
		idx[i] = uint32(i)
	}
	if _, err := st.Stage(mem, idx); err != nil {
		t.Fatal(err)
	}
	st.Release()
	made, faulted = pool.Made(), pool.faulted.Load()
	pool.Refill()
	added := pool.Made() - made
	if got, want := pool.faulted.Load()-faulted, int64(added)*stageChunkBytes+(stageChunkBytes-hugeSize); got != want {
		t.Fatalf("Refill faulted in %d bytes, want %d: %d new chunks and the second half of the one partly written",
			got, want, added)
	}
	for i, r := range readyLengths(pool) {
		if r != stageChunkBytes {
			t.Errorf("chunk %d is faulted in %d bytes, want %d", i, r, stageChunkBytes)
		}
	}
}

// want is how many chunks Refill keeps free (wantLocked, for tests).
func (sp *StagePool) want() int {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.wantLocked()
}
