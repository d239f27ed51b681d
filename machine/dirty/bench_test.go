//go:build linux

package dirty

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Run with: go test -run '^$' -bench . -benchtime 2s ./machine/dirty/

const batchPages = 16384 // 64 MiB

// BenchmarkWrite is the cost of one write to a page: untracked, and under
// uffd-wp where the page is write-protected (one fault the kernel resolves
// itself). "populated" pages already hold memory; "fresh" ones are touched
// for the first time (the kernel allocates and zeroes a page either way);
// "fresh-madvise-populate" ones are faulted in by one madvise first, as the
// staging pool and a Remus backup's image do.
// The hash fallback adds nothing to writes: it is "none".
func BenchmarkWrite(b *testing.B) {
	for _, c := range []struct {
		name                   string
		track, fresh, populate bool
	}{
		{"none/populated", false, false, false},
		{"uffd-wp/populated", true, false, false},
		{"none/fresh", false, true, false},
		{"uffd-wp/fresh", true, true, false},
		// Fresh pages faulted in by one madvise(MADV_POPULATE_WRITE)
		// first, the call timed with the writes.
		{"none/fresh-madvise-populate", false, true, true},
	} {
		b.Run(c.name, func(b *testing.B) {
			if c.track && uffdOnce() != nil {
				b.Skip(uffdOnce())
			}
			size := batchPages * PageSize
			var region []byte
			var tr Tracker
			release := func() {
				if tr != nil {
					tr.Close()
					tr = nil
				}
				if region != nil {
					unix.Munmap(region)
					region = nil
				}
			}
			defer release()
			prepare := func() {
				if c.fresh || region == nil {
					release()
					var err error
					region, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
						unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
					if err != nil {
						b.Fatal(err)
					}
					if !c.fresh {
						for p := 0; p < size; p += PageSize {
							region[p] = 1
						}
					}
					if c.track {
						tr = newTracker(b, region, uint64(size), KindUffd)
					}
				} else if tr != nil {
					tr.Collect(nil, uint64(size)) // protect again
				}
			}
			b.ResetTimer()
			for done := 0; done < b.N; {
				b.StopTimer()
				prepare()
				n := min(batchPages, b.N-done)
				b.StartTimer()
				if c.populate {
					if err := unix.Madvise(region[:n*PageSize], unix.MADV_POPULATE_WRITE); err != nil {
						b.Fatal(err)
					}
				}
				for p := range n {
					region[p*PageSize+8]++
				}
				done += n
			}
		})
	}
}

// BenchmarkCollect is the time of one Collect over a fully populated
// region with k pages written since the last, scattered at random.
// "4GiB-sparse" is a whole wasm32 reservation in use but only 64 MiB of it
// touched.
func BenchmarkCollect(b *testing.B) {
	type sz struct {
		name       string
		size, fill uint64
	}
	for _, s := range []sz{{"64MiB", 64 << 20, 64 << 20}, {"1GiB", 1 << 30, 1 << 30}, {"4GiB-sparse", 4 << 30, 64 << 20}} {
		if s.size > math.MaxInt {
			continue
		}
		region := mapRegion(b, int(s.size))
		for p := 0; p < int(s.fill); p += PageSize {
			region[p] = 1
		}
		pages := int(s.fill / PageSize)
		for _, kind := range []string{KindUffd, KindHash} {
			if kind == KindUffd && uffdOnce() != nil {
				continue
			}
			counts := []int{0, 100, 1000, 10000}
			if s.name == "4GiB-sparse" {
				counts = []int{0, 1000}
			}
			b.Run(fmt.Sprintf("%s/%s", kind, s.name), func(b *testing.B) {
				pt := vmPTE()
				tr := newTracker(b, region, s.size, kind)
				tr.Collect(nil, s.size)
				if kind == KindUffd {
					b.Logf("page tables grew by %d KiB arming %s", vmPTE()-pt, s.name)
				}
				rng := rand.New(rand.NewPCG(1, 2))
				for _, k := range counts {
					b.Run(fmt.Sprintf("dirty=%d", k), func(b *testing.B) {
						var dst []uint32
						var err error
						for range b.N {
							b.StopTimer()
							for _, p := range randomPages(rng, pages, k) {
								stamp(region, p)
							}
							b.StartTimer()
							if dst, err = tr.Collect(dst[:0], s.size); err != nil {
								b.Fatal(err)
							}
						}
						if len(dst) != k {
							b.Fatalf("%d pages reported for %d writes", len(dst), k)
						}
					})
				}
				tr.Close()
			})
		}
	}
}

// BenchmarkNew is the cost of starting to track a whole 4 GiB reservation
// in use but untouched: uffd-wp arms every page (page tables included).
func BenchmarkNew(b *testing.B) {
	if uffdOnce() != nil {
		b.Skip(uffdOnce())
	}
	size := uint64(4 << 30)
	if size > math.MaxInt {
		b.Skip("32-bit")
	}
	for range b.N {
		b.StopTimer()
		region, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		tr, err := New(region, Options{Used: size})
		b.StopTimer()
		if err != nil || tr.Kind() != KindUffd {
			b.Fatal(err)
		}
		tr.Close()
		unix.Munmap(region)
		b.StartTimer()
	}
}

// vmPTE is the process's page-table memory in KiB.
func vmPTE() int {
	data, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmPTE:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}
