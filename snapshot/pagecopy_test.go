package snapshot

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"
)

// slowClock is a pageClock whose every reading is perPage×probeEvery later
// than the last: each group of pages the copier times seems to take
// perPage a page.
func slowClock(t *testing.T, perPage *time.Duration) {
	t.Helper()
	now := time.Unix(0, 0)
	old := pageClock
	pageClock = func() time.Time {
		now = now.Add(probeEvery * *perPage)
		return now
	}
	t.Cleanup(func() { pageClock = old })
}

func randomMemory(pages int, seed uint64) []byte {
	mem := make([]byte, pages*PageSize)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range mem {
		mem[i] = byte(r.Uint32())
	}
	return mem
}

// copyThrough copies 8×kernelRun pages of random memory with a copier
// whose clock times every page at perPage, changed to pace[i] from page i
// on, checks the copy, and returns how many pages went through the kernel.
func copyThrough(t *testing.T, seed uint64, perPage time.Duration, pace map[int]time.Duration) uint64 {
	t.Helper()
	if !kernelCopyWorks() {
		t.Skip("process_vm_readv of this process is refused here")
	}
	slowClock(t, &perPage)
	const pages = 8 * kernelRun
	mem := randomMemory(pages, seed)
	dst := make([]byte, len(mem))
	before := KernelCopiedPages()
	c := newPageCopier(mem)
	for i := 0; i < pages; i++ {
		if d, ok := pace[i]; ok {
			perPage = d
		}
		c.add(dst[i*PageSize:(i+1)*PageSize], uint32(i))
	}
	c.flush()
	if !bytes.Equal(dst, mem) {
		t.Fatal("the copy differs from the memory")
	}
	return KernelCopiedPages() - before
}

// TestCopierTakesTheKernelRoadWhileSlow: one slow group alone changes
// nothing; two in a row send the next kernelRun pages through the kernel,
// then memcpy is tried again; every page arrives intact either way.
func TestCopierTakesTheKernelRoadWhileSlow(t *testing.T) {
	fast, slow := 300*time.Nanosecond, 5*time.Microsecond
	// The clock is read at the end of each group of probeEvery pages:
	// the group of pages [16, 32) is timed slow alone, then, past the
	// run a switch there would have made, [1024, 1056) two in a row;
	// after the run through the kernel that follows, the groups are fast
	// again.
	got := copyThrough(t, 1, fast, map[int]time.Duration{probeEvery: slow, 2 * probeEvery: fast, 4 * kernelRun: slow, 4*kernelRun + 2*probeEvery: fast})
	if got != kernelRun {
		t.Fatalf("%d pages went through the kernel, want %d (one run after two slow groups, then memcpy again)", got, kernelRun)
	}
}

// TestStagerThroughTheKernel: Stage and Add stage the same bytes when
// every page goes through the kernel, also when the kernel copies only
// part of a batch (the rest is copied by hand).
func TestStagerThroughTheKernel(t *testing.T) {
	if !kernelCopyWorks() {
		t.Skip("process_vm_readv of this process is refused here")
	}
	perPage := 10 * time.Microsecond // every group slow
	slowClock(t, &perPage)
	for _, limit := range []int{0, 3} {
		testKernelCap = limit
		mem := randomMemory(3000, 2)
		r := rand.New(rand.NewPCG(3, uint64(limit)))
		var first, more []uint32
		for range 1500 {
			first = append(first, uint32(r.IntN(3000)))
			more = append(more, uint32(r.IntN(3000)))
		}
		var st Stager
		before := KernelCopiedPages()
		if _, err := st.Stage(mem, first); err != nil {
			t.Fatal(err)
		}
		// The memory changes between Stage and Add, as a guest's does
		// between a copy ahead and the pause.
		for _, x := range more {
			mem[int(x)*PageSize+7]++
		}
		pages, err := st.Add(mem, more)
		if err != nil {
			t.Fatal(err)
		}
		if KernelCopiedPages() == before {
			t.Fatal("no page went through the kernel")
		}
		// Pages of first alone were not changed since Stage: every staged
		// page equals the memory now.
		for _, p := range pages {
			if !bytes.Equal(p.Data, mem[int(p.Index)*PageSize:int(p.Index+1)*PageSize]) {
				t.Fatalf("kernel cap %d: page %d staged wrong", limit, p.Index)
			}
		}
		st.Release()
	}
	testKernelCap = 0
}

// TestCopierStaysOnTheKernelRoadWhileSlow: within a slow stretch, one
// slow group after a run through the kernel is enough for the next run.
func TestCopierStaysOnTheKernelRoadWhileSlow(t *testing.T) {
	got := copyThrough(t, 4, 5*time.Microsecond, nil)
	// Two probe groups before the first run, one before each of the
	// next, which double: 32 by memcpy, 256 through the kernel, 16, 512,
	// 16, 1024, 16, and the last 176 through the kernel.
	if want := uint64(8*kernelRun - 2*probeEvery - 3*probeEvery); got != want {
		t.Fatalf("%d pages went through the kernel, want %d", got, want)
	}
}
