//go:build linux

package dirty

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// threadFaults is the calling thread's count of minor page faults: a write
// to a write-protected page is one.
func threadFaults(t *testing.T) int64 {
	t.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Fatal(err)
	}
	return ru.Minflt
}

// TestKeepHotStopsTheFaults: pages the caller writes before every Collect
// and puts back (the machine's scratch region at each pause) fault under
// write protection whenever they cool, and kept hot they never do, while a
// real change to them is still reported. Once no longer kept, they cool
// and are protected again.
func TestKeepHotStopsTheFaults(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const pages = 64
	size := pages * PageSize
	region := mapRegion(t, size)
	for p := range uint32(pages) {
		stamp(region, p) // present before tracking starts
	}
	tr := newHotTracker(t, region, uint64(size))
	const keptLo, keptHi, other = 10, 12, 20
	tr.KeepHot(keptLo, keptHi)
	// borrow writes pages and puts their bytes back, as a pause does.
	borrow := func(ps ...uint32) {
		for _, p := range ps {
			o := int(p) * PageSize
			old := region[o]
			region[o] = old + 1
			region[o] = old
		}
	}
	borrow(keptLo, keptLo+1, other)
	expect(t, "the first Collect", collect(t, tr, size), []uint32{keptLo, keptLo + 1, other})
	// Promoted by that Collect, the kept pages were protected by its walk
	// all the same: each faults once more, and from then on never.
	borrow(keptLo, keptLo+1)
	collect(t, tr, size)

	const rounds = 3 * (coolAfter + promoteAfter)
	var keptFaults, otherFaults int64
	for range rounds {
		f := threadFaults(t)
		borrow(keptLo, keptLo+1)
		keptFaults += threadFaults(t) - f
		f = threadFaults(t)
		borrow(other)
		otherFaults += threadFaults(t) - f
		got := collect(t, tr, size)
		for _, p := range got {
			if p != other {
				t.Fatalf("Collect reported page %d, whose contents did not change (got %v)", p, got)
			}
		}
	}
	if keptFaults != 0 {
		t.Errorf("the kept pages faulted %d times in %d rounds, want 0", keptFaults, rounds)
	}
	// The control: the same writes to a page not kept fault once it cools
	// (the test's measure of faults works).
	if otherFaults == 0 {
		t.Errorf("page %d, not kept, never faulted in %d rounds: the fault count does not see write protection", other, rounds)
	}
	t.Logf("in %d rounds: kept pages %d faults, the other page %d", rounds, keptFaults, otherFaults)

	// A real change to a kept page is reported.
	stamp(region, keptLo+1)
	expect(t, "a kept page changed", collect(t, tr, size), []uint32{keptLo + 1})

	// No longer kept: unchanged for coolAfter Collects, the pages are
	// protected again, and the next write faults and is reported.
	tr.KeepHot(0, 0)
	for range coolAfter + 1 {
		expect(t, "nothing written", collect(t, tr, size), nil)
	}
	f := threadFaults(t)
	stamp(region, keptLo)
	if threadFaults(t) == f {
		t.Errorf("page %d, no longer kept and cooled, took a write without a fault", keptLo)
	}
	expect(t, "a page no longer kept, written", collect(t, tr, size), []uint32{keptLo})
}
