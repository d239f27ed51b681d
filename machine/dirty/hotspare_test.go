//go:build linux

package dirty

import (
	"runtime"
	"testing"
)

// TestPromotionsTakeSpareCopies: the copies of pages promoted to hot come
// from the spares Warm faulted in while the guest ran, not from the heap
// in the pause (fresh heap pages fault there), and pages that cool give
// theirs back.
func TestPromotionsTakeSpareCopies(t *testing.T) {
	const pages, written = 1024, 40 // few of many: a pattern, not chance
	size := pages * PageSize
	region, tr := writtenHotTracker(t, pages)
	writeAll := func() {
		for p := range uint32(written) {
			stamp(region, p)
		}
	}
	for range promoteAfter - 1 {
		writeAll()
		collect(t, tr, size)
	}
	tr.Warm(uint64(size)) // as the primary does before asking for a pause
	if got := len(tr.hot.spare); got != spareHot {
		t.Fatalf("Warm left %d spare copies, want %d", got, spareHot)
	}
	writeAll()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	collect(t, tr, size) // promotes the written pages
	runtime.ReadMemStats(&after)
	if n := len(tr.hot.hot); n != written {
		t.Fatalf("%d hot pages, want %d", n, written)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got >= written*PageSize/2 {
		t.Fatalf("the Collect that promoted %d pages allocated %d bytes: their copies came from the heap", written, got)
	}
	if got := len(tr.hot.spare); got != spareHot-written {
		t.Fatalf("%d spare copies after promoting %d, want %d", got, written, spareHot-written)
	}
	// Left alone, they cool and give their copies back.
	for range coolAfter + 1 {
		collect(t, tr, size)
	}
	if n := len(tr.hot.hot); n != 0 {
		t.Fatalf("%d pages still hot after %d quiet Collects", n, coolAfter+1)
	}
	if got := len(tr.hot.spare); got != spareHot {
		t.Fatalf("%d spare copies after the hot pages cooled, want %d back", got, spareHot)
	}
}
