package dirty

import (
	"hash/maphash"
	"runtime"
	"sync"
)

// hashTracker is the fallback: one 64-bit hash per page, compared at each
// Collect. It sees every writer (guest, host, kernel) because it looks at
// contents, not at how they changed. A random per-tracker seed makes a
// collision (a changed page with an equal hash, odds 2^-64 per changed
// page) impossible to aim for.
type hashTracker struct {
	mu     sync.Mutex
	region []byte
	reason string
	seed   maphash.Seed
	// sums[i] is page i's hash at the last Collect. Pages not yet seen
	// (past the largest usedBytes so far) are zero at baseline and get
	// the zero page's hash when first covered.
	sums   []uint64
	closed bool
}

var zeroPage [PageSize]byte

func newHash(region []byte, used uint64, reason string) *hashTracker {
	t := &hashTracker{region: region, reason: reason, seed: maphash.MakeSeed()}
	pages, _ := checkUsed(used, len(region))
	t.sums = make([]uint64, pages)
	t.scan(0, pages, nil, true)
	return t
}

func (t *hashTracker) Kind() string   { return KindHash }
func (t *hashTracker) Reason() string { return t.reason }

func (t *hashTracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	t.sums = nil
	return nil
}

func (t *hashTracker) page(i int) []byte {
	off := i * PageSize
	return t.region[off:min(off+PageSize, len(t.region))]
}

func (t *hashTracker) Collect(dst []uint32, usedBytes uint64) ([]uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return dst, ErrClosed
	}
	pages, err := checkUsed(usedBytes, len(t.region))
	if err != nil {
		return dst, err
	}
	for i := len(t.sums); i < pages; i++ {
		t.sums = append(t.sums, maphash.Bytes(t.seed, zeroPage[:len(t.page(i))]))
	}
	return t.scan(0, pages, dst, false), nil
}

// parallelPages is the size above which Collect hashes on several cores:
// a 1 GiB region takes tens of milliseconds on one.
const parallelPages = 4096

// scan hashes pages [lo, hi), appending changed ones to dst unless
// baseline, and records the new hashes. Large ranges are split across
// GOMAXPROCS goroutines, each owning a contiguous slice of sums, and their
// results joined in order so dst stays sorted.
func (t *hashTracker) scan(lo, hi int, dst []uint32, baseline bool) []uint32 {
	workers := min(runtime.GOMAXPROCS(0), (hi-lo)/parallelPages)
	if workers <= 1 {
		return t.scanRange(lo, hi, dst, baseline)
	}
	parts := make([][]uint32, workers)
	var wg sync.WaitGroup
	chunk := (hi - lo + workers - 1) / workers
	for w := range workers {
		a, b := lo+w*chunk, min(lo+(w+1)*chunk, hi)
		wg.Go(func() { parts[w] = t.scanRange(a, b, nil, baseline) })
	}
	wg.Wait()
	for _, p := range parts {
		dst = append(dst, p...)
	}
	return dst
}

func (t *hashTracker) scanRange(lo, hi int, dst []uint32, baseline bool) []uint32 {
	for i := lo; i < hi; i++ {
		h := maphash.Bytes(t.seed, t.page(i))
		if h != t.sums[i] {
			t.sums[i] = h
			if !baseline {
				dst = append(dst, uint32(i))
			}
		}
	}
	return dst
}
