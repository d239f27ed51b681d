//go:build linux

package dirty

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// slotRegion maps n slots on a slot boundary, marked for transparent huge
// pages as the machine marks guest memory.
func slotRegion(t *testing.T, n int) []byte {
	t.Helper()
	raw := mapRegion(t, (n+1)*slotSize)
	off := (slotSize - int(uintptr(unsafe.Pointer(&raw[0])))%slotSize) % slotSize
	region := raw[off : off+n*slotSize : off+n*slotSize]
	if err := unix.Madvise(region, unix.MADV_HUGEPAGE); err != nil {
		t.Logf("MADV_HUGEPAGE: %v", err)
	}
	return region
}

// TestFreshSlotFaultsLess: a 2 MiB slot that held no memory when tracking
// began is not protected, so filling it costs what it costs untracked (one
// fault for a huge page, or one per 4 KiB page where none is granted),
// where a slot protected page by page costs two faults a page; the pages
// written are reported all the same, and a write after that Collect is
// tracked per 4 KiB like any other.
func TestFreshSlotFaultsLess(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	region := slotRegion(t, 4)
	size := len(region)
	region[0] = 1 // slot 0 holds memory: protected, holes included
	tr := newKernelTracker(t, region, uint64(size), false)
	fill := func(slot int) int64 {
		f0 := threadFaults(t)
		for p := slot * slotPages; p < (slot+1)*slotPages; p++ {
			region[p*PageSize+8] = byte(p) | 1
		}
		return threadFaults(t) - f0
	}
	// Walks over the memory leave the fresh slot as it is.
	expect(t, "nothing written", collect(t, tr, size), nil)
	if _, _, err := tr.(Aheader).CollectAhead(nil, uint64(size), nil); err != nil {
		t.Fatal(err)
	}
	tr.(Warmer).Warm(uint64(size))
	expect(t, "nothing written yet", collect(t, tr, size), nil)
	armed, fresh := fill(0), fill(2)
	t.Logf("faults filling a slot: %d armed, %d fresh", armed, fresh)
	if armed < slotPages {
		t.Fatalf("filling the armed slot took %d faults, fewer than its %d pages: not protected?", armed, slotPages)
	}
	if fresh > armed*3/4 {
		t.Fatalf("filling a fresh slot took %d faults against %d for an armed one", fresh, armed)
	}
	got := collect(t, tr, size)
	var want []uint32
	for p := range uint32(slotPages) {
		want = append(want, p, 2*slotPages+p)
	}
	slices.Sort(want)
	expect(t, "both slots", got, want)
	region[(2*slotPages+7)*PageSize]++
	expect(t, "a page of the absorbed slot", collect(t, tr, size), []uint32{2*slotPages + 7})
}

// TestFreshSlotsKeepTheImage: a consumer copying what each Collect (and
// CollectAhead) reports keeps an exact image of the memory in use while
// pages are written, read and filled whole across fresh slots, slots that
// held memory and memory not in use yet, as the memory grows; with and
// without hot pages and deferred re-arming. Holes lists only zero pages.
func TestFreshSlotsKeepTheImage(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	for _, kind := range []string{KindUffd, kindHot, kindDeferred, kindHotDeferred} {
		for seed := range uint64(2) {
			t.Run(fmt.Sprintf("%s/seed=%d", kind, seed), func(t *testing.T) {
				freshModel(t, kind, seed)
			})
		}
	}
}

var readSink byte

func freshModel(t *testing.T, kind string, seed uint64) {
	const slots = 12
	rng := rand.New(rand.NewPCG(seed, 77))
	region := slotRegion(t, slots)
	size := len(region)
	pages := size / PageSize
	// Memory before tracking: a few pages here and there, some past the
	// part in use.
	for range 20 {
		stamp(region, uint32(rng.IntN(pages)))
	}
	used := (4 + rng.IntN(3)) * slotPages
	image := make([]byte, size)
	copy(image, region[:used*PageSize])
	tr := newKernelTracker(t, region, uint64(used*PageSize), kind == kindHot || kind == kindHotDeferred)
	u := tr.(*uffdTracker)
	deferred := kind == kindDeferred || kind == kindHotDeferred
	copyOf := func(p uint32) []byte { return image[int(p)*PageSize : int(p+1)*PageSize] }
	write := func() {
		switch rng.IntN(4) {
		case 0: // a whole slot, most likely a fresh one
			s := rng.IntN(slots)
			for p := s * slotPages; p < (s+1)*slotPages; p++ {
				region[p*PageSize+rng.IntN(PageSize)] = byte(rng.Uint32()) | 1
			}
		case 1: // reads: fault memory in without writing
			for range 20 {
				readSink += region[rng.IntN(size)]
			}
		default:
			for range 1 + rng.IntN(40) {
				stamp(region, uint32(rng.IntN(pages)))
			}
		}
	}
	check := func(round int, what string) {
		t.Helper()
		if n := used * PageSize; !slices.Equal(image[:n], region[:n]) {
			for p := 0; p < used; p++ {
				if !slices.Equal(image[p*PageSize:(p+1)*PageSize], region[p*PageSize:(p+1)*PageSize]) {
					t.Fatalf("round %d, after %s: page %d differs from the image (fresh %v)", round, what, p, u.fresh)
				}
			}
		}
	}
	for round := range 60 {
		write()
		if rng.IntN(6) == 0 && used < pages {
			used = min(pages, used+rng.IntN(3*slotPages))
		}
		if rng.IntN(3) == 0 {
			got, ok, err := tr.(Aheader).CollectAhead(nil, uint64(used*PageSize), func(r []byte, ps []uint32) { copyPages(image, r, ps) })
			if err != nil {
				t.Fatal(err)
			}
			if ok && !slices.IsSorted(got) {
				t.Fatalf("round %d: CollectAhead unsorted: %v", round, head(got))
			}
			write() // the guest runs on until its pause
		}
		if deferred {
			got, gen, err := tr.(Deferrer).CollectDeferred(nil, uint64(used*PageSize))
			if err != nil {
				t.Fatal(err)
			}
			copyPages(image, region, got)
			check(round, "CollectDeferred")
			write() // the guest runs again before the re-arming
			if err := tr.(Deferrer).Rearm(gen, copyOf); err != nil {
				t.Fatal(err)
			}
		} else {
			copyPages(image, region, collect(t, tr, used*PageSize))
			check(round, "Collect")
		}
		holes, err := u.Holes(nil, uint64(used*PageSize))
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range holes {
			for p := h[0]; p < h[1]; p += 97 {
				if o := int(p) * PageSize; !slices.Equal(region[o:o+PageSize], zeroPageForTest[:]) {
					t.Fatalf("round %d: page %d in a hole %v holds data", round, p, h)
				}
			}
		}
	}
	// The last writes, collected.
	copyPages(image, region, collect(t, tr, used*PageSize))
	check(60, "the last Collect")
}

var zeroPageForTest [PageSize]byte

// TestMinus: the range subtraction behind the walks around fresh slots,
// absorbing slots and Holes.
func TestMinus(t *testing.T) {
	type rs = [][2]uint32
	for _, c := range []struct{ a, b, want rs }{
		{rs{{0, 10}}, nil, rs{{0, 10}}},
		{rs{{0, 10}}, rs{{0, 10}}, nil},
		{rs{{0, 10}}, rs{{2, 4}, {6, 8}}, rs{{0, 2}, {4, 6}, {8, 10}}},
		{rs{{0, 10}, {20, 30}}, rs{{5, 25}}, rs{{0, 5}, {25, 30}}},
		{rs{{10, 20}}, rs{{0, 5}, {30, 40}}, rs{{10, 20}}},
		{rs{{0, 4}, {8, 12}, {16, 20}}, rs{{0, 4}, {10, 18}}, rs{{8, 10}, {18, 20}}},
	} {
		if got := minus(nil, c.a, c.b); !slices.Equal(got, c.want) {
			t.Errorf("%v minus %v = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}
