package snapshot

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Stager copies pages out of guest memory into chunks of staging memory
// taken from a StagePool. That copy is the only part of a checkpoint that
// needs the guest paused; the snapshot is then encoded from the copy while
// the guest runs again. A chunk is one encoder batch (DefaultBatchPages
// pages), so every batch's pages lie back to back and compress in place.
//
// Staging memory must not be allocated in a pause: fresh memory pays a page
// fault for every page on first touch (5–20 µs each on a VM with shadow
// paging: 15 ms for 760 pages, the whole tail of the pause), so the pool
// keeps chunks already faulted in, and Refill, called while the guest runs,
// tops it up for the next pause. The zero Stager has a pool of its own.
type Stager struct {
	// Pool supplies the chunks; nil: a pool of the Stager's own.
	Pool   *StagePool
	chunks []stageChunk
	pages  []Page
	idx    []uint32
	slots  int // slots of the chunks in use: Stage's pages, then Add's
	extra  []Page
	merged []Page
}

// Stage copies the pages listed in indices (any order, duplicates allowed)
// out of mem and returns them sorted, ready for a Snapshot. The chunks of
// the previous Stage go back to the pool first: pages stay valid until the
// next Stage or Release.
func (st *Stager) Stage(mem []byte, indices []uint32) ([]Page, error) {
	st.Release()
	if err := st.index(mem, indices); err != nil {
		return nil, err
	}
	n := len(st.idx)
	for need := (n + stageChunkPages - 1) / stageChunkPages; len(st.chunks) < need; {
		st.chunks = append(st.chunks, st.Pool.get())
	}
	// Room for what an Add in the pause may bring (addRoom): growing
	// the slice there would allocate fresh memory, faulting a page per
	// 64 pages listed (a checkpoint of 770 pages copied ahead of its
	// pause spent about 300 of its 600 µs in that).
	if want := n + addRoom(n); cap(st.pages) < want {
		st.pages = make([]Page, 0, want)
	}
	if room := addRoom(n); cap(st.extra) < room {
		st.extra = make([]Page, 0, room)
	}
	st.pages = st.pages[:0]
	pc := newPageCopier(mem)
	for i, x := range st.idx {
		c := st.chunks[i/stageChunkPages].b
		o := (i % stageChunkPages) * PageSize
		d := c[o : o+PageSize] // capped at the chunk's end: a batch is one chunk
		pc.add(d, x)
		st.pages = append(st.pages, Page{Index: x, Data: d})
	}
	pc.flush()
	st.slots = n
	return st.pages, nil
}

// Add copies more pages (any order, duplicates allowed) out of mem into
// the staging, keeping what Stage and earlier Adds staged: a page staged
// already is copied again over its old copy, a new one takes the next
// free slot. It returns every staged page, sorted (a slice returned by an
// earlier Stage or Add is not valid afterwards; the pages' Data are). It is the pause's half of a
// checkpoint whose pages were mostly staged while the guest ran
// (machine.CollectAhead): the pause copies only the pages written since.
// (The pages it adds do not lie back to back with their neighbours in
// index order, so the encoder copies those batches once more.)
func (st *Stager) Add(mem []byte, indices []uint32) ([]Page, error) {
	if err := st.index(mem, indices); err != nil {
		return nil, err
	}
	st.extra = st.extra[:0]
	old := st.pages
	pc := newPageCopier(mem)
	for _, x := range st.idx {
		if i, ok := slices.BinarySearchFunc(old, x, func(p Page, x uint32) int { return cmp.Compare(p.Index, x) }); ok {
			pc.add(old[i].Data, x)
			continue
		}
		for st.slots >= len(st.chunks)*stageChunkPages {
			st.chunks = append(st.chunks, st.Pool.get())
		}
		c := st.chunks[st.slots/stageChunkPages].b
		o := (st.slots % stageChunkPages) * PageSize
		d := c[o : o+PageSize]
		pc.add(d, x)
		st.extra = append(st.extra, Page{Index: x, Data: d})
		st.slots++
	}
	pc.flush()
	if len(st.extra) == 0 {
		return st.pages, nil
	}
	// Both sorted: merge, from the back, in place when Stage left the
	// room.
	if n, k := len(old), len(st.extra); cap(old) >= n+k {
		all := old[:n+k]
		for i, j, w := n-1, k-1, n+k-1; j >= 0; w-- {
			if i >= 0 && old[i].Index > st.extra[j].Index {
				all[w] = old[i]
				i--
			} else {
				all[w] = st.extra[j]
				j--
			}
		}
		st.pages = all
		return st.pages, nil
	}
	st.merged = slices.Grow(st.merged[:0], len(old)+len(st.extra))
	i, j := 0, 0
	for i < len(old) || j < len(st.extra) {
		if j == len(st.extra) || (i < len(old) && old[i].Index < st.extra[j].Index) {
			st.merged = append(st.merged, old[i])
			i++
		} else {
			st.merged = append(st.merged, st.extra[j])
			j++
		}
	}
	st.pages, st.merged = st.merged, st.pages
	return st.pages, nil
}

// addRoom is the room Stage leaves after n pages for an Add's: as many
// again (a guest can write that many while its pause is asked for).
func addRoom(n int) int { return max(64, n) }

// Len is the number of pages staged.
func (st *Stager) Len() int { return len(st.pages) }

// index sets st.idx to indices sorted, without repeats, checked against
// mem, and gives the Stager a pool if it has none.
func (st *Stager) index(mem []byte, indices []uint32) error {
	if st.Pool == nil {
		st.Pool = &StagePool{}
	}
	st.idx = append(st.idx[:0], indices...)
	if !slices.IsSorted(st.idx) {
		slices.Sort(st.idx)
	}
	st.idx = slices.Compact(st.idx)
	if n := len(st.idx); n > 0 && (uint64(st.idx[n-1])+1)*PageSize > uint64(len(mem)) {
		return fmt.Errorf("snapshot: page %d is beyond the memory's %d bytes", st.idx[n-1], len(mem))
	}
	return nil
}

// Release gives the chunks back to the pool; the staged pages are invalid
// afterwards.
func (st *Stager) Release() {
	for k, c := range st.chunks {
		// The pages staged in it are faulted in now, whatever it was.
		used := min(stageChunkPages, max(0, st.slots-k*stageChunkPages))
		c.ready = max(c.ready, used*PageSize)
		st.Pool.put(c)
	}
	clear(st.chunks)
	st.chunks = st.chunks[:0]
	clear(st.pages)
	st.pages = st.pages[:0]
	clear(st.merged[:cap(st.merged)])
	st.merged = st.merged[:0]
	clear(st.extra)
	st.extra = st.extra[:0]
	st.slots = 0
}

// stageChunkPages is a staging chunk: one encoder batch.
const stageChunkPages = DefaultBatchPages

const stageChunkBytes = stageChunkPages * PageSize

// DefaultMaxFreeChunks bounds the staging memory a StagePool keeps between
// uses (32 chunks, 128 MiB): a full snapshot's chunks serve later bursts,
// up to that.
const DefaultMaxFreeChunks = 32

// StagePool keeps staging chunks, faulted in, for reuse. Safe for
// concurrent use: Remus stages the next checkpoint while the last one's
// chunks are still being sent.
type StagePool struct {
	// MaxFree bounds the chunks kept free (0: DefaultMaxFreeChunks); more
	// are left to the garbage collector.
	MaxFree int

	mu   sync.Mutex
	free []stageChunk
	high int    // the recent largest Expect, in pages, decaying
	mem  uint64 // the memory size below which staged pages are steady
	// memKnown is set by the first Expect, which learns mem. (mem may be
	// 0: the machine announces a memory's first allocation as a growth
	// from nothing, and then every page is a grown one at first.)
	memKnown bool
	growth   int          // pages grown and not staged yet, which stagings may carry
	idle     int          // stagings in a row that carried none of them
	made     atomic.Int64 // chunks allocated, ever
	// memPages is the memory's size as told (growths, Expect's memBytes);
	// 0: not known. No staging carries more pages than it holds.
	memPages uint64
	faulted  atomic.Int64 // bytes of chunks faulted in, ever
}

// stageChunk is a staging chunk and how far from its start it is faulted
// in: a small memory's stagings never reach past its size, so its chunks
// are faulted in only that far (readyBytes).
type stageChunk struct {
	b     []byte
	ready int
}

func (sp *StagePool) maxFree() int {
	if sp.MaxFree > 0 {
		return sp.MaxFree
	}
	return DefaultMaxFreeChunks
}

// get takes a chunk as it is (one not faulted in far enough faults in the
// staging), or allocates one (in a pause: only when the pool ran dry).
func (sp *StagePool) get() stageChunk {
	sp.mu.Lock()
	if n := len(sp.free); n > 0 {
		c := sp.free[n-1]
		sp.free[n-1] = stageChunk{}
		sp.free = sp.free[:n-1]
		sp.mu.Unlock()
		return c
	}
	ready := sp.readyBytes()
	sp.mu.Unlock()
	return sp.newChunk(ready, false)
}

// newChunk allocates a staging chunk, faulted in up to ready: on this
// project's VM a 4 KiB page first touched by a copy costs about 13 µs, one
// populated first about 7.5 µs (the hypervisor's shadow page table filling
// on first access), so the chunk is made of transparent huge pages where
// the kernel grants them (HugeBuffer): 1–2.4 ms a chunk instead of 8.5–10,
// and a pause copying a heap's growth into it (2,000 pages) took 1 ms
// instead of 7.
func (sp *StagePool) newChunk(ready int, touch bool) stageChunk {
	sp.made.Add(1)
	c := stageChunk{b: HugeBuffer(stageChunkBytes)}
	sp.faultIn(&c, ready, touch)
	return c
}

// faultIn faults c in from its ready length up to ready, populating, and
// then touching each page if touch (to have the hypervisor map it now,
// too).
func (sp *StagePool) faultIn(c *stageChunk, ready int, touch bool) {
	if ready <= c.ready {
		return
	}
	b := c.b[c.ready:ready] // starts on a page: the chunk is 2 MiB-aligned
	populate(b)
	if touch {
		for i := 0; i < len(b); i += PageSize {
			b[i] = 1
		}
	}
	sp.faulted.Add(int64(len(b)))
	c.ready = ready
}

// readyBytes is how far Refill faults chunks in: as far as a staging of
// the whole memory reaches, in whole huge pages (THP faults those whole
// anyway). A 128 KiB guest had 12 MiB faulted in at its start (3–7 ms of
// CPU in a 50 ms run) for stagings that never went past 128 KiB. Called
// with sp.mu held.
func (sp *StagePool) readyBytes() int {
	if sp.memPages == 0 {
		return stageChunkBytes
	}
	return int(min(stageChunkBytes, (sp.memPages*PageSize+hugeSize-1)&^(hugeSize-1)))
}

// populate faults b in for writing with one madvise, where that is cheaper
// than faulting page by page as it is filled: b must start on a page (a
// Go allocation of 32 KiB or more does) and be at least populateMin long.
func populate(b []byte) {
	if len(b) >= populateMin {
		_ = unix.Madvise(b, unix.MADV_POPULATE_WRITE)
	}
}

// populateMin is the least length populate bothers with: below it the
// syscall costs about what it saves.
const populateMin = 16 * PageSize

func (sp *StagePool) put(c stageChunk) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if len(sp.free) < sp.maxFree() {
		sp.free = append(sp.free, c)
		return
	}
	// Full: keep the chunks faulted in furthest.
	low := 0
	for i := range sp.free {
		if sp.free[i].ready < sp.free[low].ready {
			low = i
		}
	}
	if sp.free[low].ready < c.ready {
		sp.free[low] = c
	}
}

// Expect records an incremental staging (not a full snapshot's every
// page), which pauses will repeat: Refill's target follows the largest of
// late, decaying slowly. Pages of a growth are left out of it: a memory
// that grew is staged whole once (a guest's heap growing from 128 KiB to
// 8 MiB: 2,000 pages), and keeping that much staging memory faulted in for
// pauses that never need it would cost as much CPU again. They count
// instead against the growth ExpectGrowth announced, which stays pending
// (its chunks kept ready) until stagings have carried that many pages of
// it (a page staged twice counts twice), or growthPatience stagings in a
// row carried none: a guest may write its new heap over several epochs.
func (sp *StagePool) Expect(staged []Page, memBytes uint64) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if !sp.memKnown {
		// Grown before the first Expect (Remus's full checkpoint makes
		// none): the memory before it is what it is now less the growth.
		// Taking a mem of 0 for "not known yet" once counted a 38 MiB
		// heap growth, staged whole, as the steady working set, and had
		// Refill fault in 30 chunks (120 MiB, 8 ms of CPU each) for
		// pauses that never came.
		sp.mem = memBytes - min(memBytes, uint64(sp.growth)*PageSize)
		sp.memKnown = true
	}
	sp.memPages = max(sp.memPages, memBytes/PageSize)
	n := pagesBelow(staged, uint32(sp.mem/PageSize))
	grown := len(staged) - n
	sp.high = max(n, sp.high-sp.high/32)
	sp.growth = max(0, sp.growth-grown)
	if grown > 0 {
		sp.idle = 0
	} else if sp.growth > 0 {
		sp.idle++
	}
	if sp.growth == 0 || sp.idle >= growthPatience {
		// Settled: from now on pages of the grown memory are steady.
		sp.growth, sp.idle = 0, 0
		sp.mem = max(sp.mem, memBytes)
	}
}

// growthPatience is how many stagings in a row may carry no page of an
// announced growth before the pool stops keeping chunks for it.
const growthPatience = 8

// ExpectGrowth records that the memory grew by pages: the stagings that
// follow carry those of them the guest writes, and until they have, Refill
// keeps as many chunks more faulted in (within MaxFree) rather than leave
// them to be allocated in a pause. A heap growing by 38 MiB made a 56 ms
// pause here, most of it allocating staging memory; a growth announced
// just before an unrelated pause once had its chunks given up at that
// pause, and the next one, which carried it, allocated them (31 ms).
func (sp *StagePool) ExpectGrowth(pages int) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.growth += pages
	sp.idle = 0
	sp.memPages += uint64(max(0, pages))
}

// Short reports whether the pool holds fewer free chunks than Refill would
// keep, or one not faulted in as far as Refill would (the memory grew).
func (sp *StagePool) Short() bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return len(sp.free) < sp.wantLocked() || sp.unready(sp.readyBytes()) >= 0
}

// unready returns the index of a free chunk faulted in less than ready
// bytes, or -1. Called with sp.mu held.
func (sp *StagePool) unready(ready int) int {
	for i := range sp.free {
		if sp.free[i].ready < ready {
			return i
		}
	}
	return -1
}

// Dry reports whether the pool holds no free chunk: the next staging would
// allocate one in its pause. (Chunks lent out come back once what was
// staged in them is sent: a pool that is only Short gets them back.)
func (sp *StagePool) Dry() bool { return sp.freeChunks() == 0 }

// Made is how many chunks the pool has allocated so far, in stagings
// (get) and in Refill.
func (sp *StagePool) Made() int { return int(sp.made.Load()) }

// wantLocked is how many chunks Refill keeps free, called with sp.mu
// held: never more than two stagings of the whole memory fill, once its
// size is known (a 128 KiB guest was kept 3 chunks, where a staging fills
// at most 32 pages of one).
func (sp *StagePool) wantLocked() int {
	steady := max(2, 2*((sp.high+stageChunkPages-1)/stageChunkPages))
	w := min(steady+(sp.growth+stageChunkPages-1)/stageChunkPages, sp.maxFree())
	if sp.memPages > 0 {
		w = min(w, int(2*((sp.memPages+stageChunkPages-1)/stageChunkPages)))
	}
	return w
}

// Refill makes sure the pool holds enough chunks, faulted in as far as the
// memory reaches, for the next stagings (the Expect target twice over, at
// least two chunks, plus the growth ExpectGrowth announced, but no more
// than two stagings of the whole memory fill), allocating and touching
// them now, and faulting in further the chunks it holds if the memory
// grew. Call it while the guest runs, never in a pause.
func (sp *StagePool) Refill() {
	for { // the targets may rise meanwhile (ExpectGrowth)
		sp.mu.Lock()
		ready := sp.readyBytes()
		if len(sp.free) < sp.wantLocked() {
			sp.mu.Unlock()
			sp.put(sp.newChunk(ready, true))
			continue
		}
		i := sp.unready(ready)
		if i < 0 {
			sp.mu.Unlock()
			return
		}
		// Out of the pool while it is touched: a staging taking it
		// meanwhile would race with the touching.
		c, last := sp.free[i], len(sp.free)-1
		sp.free[i], sp.free[last] = sp.free[last], stageChunk{}
		sp.free = sp.free[:last]
		sp.mu.Unlock()
		sp.faultIn(&c, ready, true)
		sp.put(c)
	}
}

// freeChunks returns how many chunks the pool holds ready.
func (sp *StagePool) freeChunks() int {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return len(sp.free)
}
