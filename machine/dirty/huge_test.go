//go:build linux

package dirty

import (
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// hugeRegion maps n bytes (a multiple of 2 MiB) on a 2 MiB boundary,
// marked for transparent huge pages and written, and skips the test if the
// kernel granted none.
func hugeRegion(t *testing.T, n int) []byte {
	t.Helper()
	const huge = 2 << 20
	raw, err := unix.Mmap(-1, 0, n+huge, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(raw) })
	off := (huge - int(uintptr(unsafe.Pointer(&raw[0]))%huge)) % huge
	region := raw[off : off+n : off+n]
	if err := unix.Madvise(region, unix.MADV_HUGEPAGE); err != nil {
		t.Skipf("MADV_HUGEPAGE: %v", err)
	}
	for i := 0; i < n; i += PageSize {
		region[i] = 1
	}
	if anonHugeKiB(t) == 0 {
		t.Skip("the kernel granted no transparent huge page")
	}
	return region
}

// anonHugeKiB is the process's memory in transparent huge pages.
func anonHugeKiB(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		t.Skipf("smaps_rollup: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "AnonHugePages:" {
			n := 0
			for _, c := range f[1] {
				n = n*10 + int(c-'0')
			}
			return n
		}
	}
	return 0
}

// The machine backs guest memory with transparent huge pages because the
// kernel tracker keeps its 4 KiB granularity on them: a write to a
// write-protected huge page splits it and only the page written is
// reported. If a kernel reported the whole 2 MiB, every checkpoint would
// copy 512 times the pages a guest wrote.
func TestHugePagesTrackedPer4KiB(t *testing.T) {
	if err := Probe(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	if HugePagesCoarsen() {
		t.Fatalf("HugePagesCoarsen: %s", hugeWhy)
	}
	t.Logf("probe: %s", hugeWhy)
	const size = 32 << 20
	region := hugeRegion(t, size)
	tr, err := New(region, Options{Used: size, HotPages: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Kind() != KindUffd {
		t.Skipf("fell back: %s", tr.Reason())
	}
	var got []uint32
	for round := range 20 {
		var want []uint32
		for range 1 + round%5 {
			p := uint32(rand.IntN(size / PageSize))
			region[int(p)*PageSize+rand.IntN(PageSize)]++
			want = append(want, p)
		}
		slices.Sort(want)
		want = slices.Compact(want)
		if got, err = tr.Collect(got[:0], size); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("round %d: collected %v, wrote %v (huge pages left: %d KiB)", round, got, want, anonHugeKiB(t))
		}
	}
}
