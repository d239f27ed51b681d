package dirty

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// TestCollectAheadWithConcurrentWriters: writers change pages all the time
// while each round first collects ahead (copying what it reports at once)
// and then collects as a pause would (copying again). The consumer's image
// ends exact, every page written is reported by one or the other, and the
// Collect after a CollectAhead reports only pages written since: with
// writers stopped, a CollectAhead followed by a Collect reports nothing
// twice.
func TestCollectAheadWithConcurrentWriters(t *testing.T) {
	for _, kind := range []string{KindUffd, kindHot, kindDeferred, kindHotDeferred} {
		t.Run(kind, func(t *testing.T) {
			if err := uffdOnce(); err != nil {
				t.Skipf("kernel tracker unavailable: %v", err)
			}
			const pages = 2048
			size := pages * PageSize
			region := mapRegion(t, size)
			image := make([]byte, size)
			var tr Tracker
			if kind == kindHot || kind == kindHotDeferred {
				tr = newHotTracker(t, region, uint64(size))
			} else {
				tr = newTracker(t, region, uint64(size), KindUffd)
			}
			deferred := kind == kindDeferred || kind == kindHotDeferred
			written := make([][]bool, 2)
			for w := range written {
				written[w] = make([]bool, pages)
			}
			stop := startWriters(t, len(written), 9, func(w int, c uint64, rng *rand.Rand) {
				// A working set in many runs (its pages become hot,
				// too scattered to walk around) and writes at random.
				p := rng.IntN(pages)
				if c%2 == 0 {
					p = rng.IntN(40) * 37
				}
				written[w][p] = true
				off := p*PageSize + w*8*64 + int(c%64)*8
				atomic.StoreUint64((*uint64)(unsafe.Pointer(&region[off])), c)
			})
			k := &imageKeeper{t: t, tr: tr, region: region, image: image, reported: make([]bool, pages), deferred: deferred}
			aheads := 0
			deadline := time.Now().Add(400 * time.Millisecond)
			rounds := 0
			for ; time.Now().Before(deadline); rounds++ {
				got, ok, err := tr.(Aheader).CollectAhead(nil, uint64(size), func(r []byte, ps []uint32) {
					copyPages(image, r, ps)
				})
				if err != nil {
					t.Fatal(err)
				}
				if ok {
					aheads++
				}
				k.saw(got)
				k.take()
			}
			stop()
			for range 3 { // what the last Rearm carried, and hot pages' last change
				k.take()
			}
			if aheads < rounds/2 {
				t.Fatalf("CollectAhead did its work in only %d of %d rounds", aheads, rounds)
			}
			t.Logf("%d rounds, %d collected ahead", rounds, aheads)
			k.check(written)
			// Quiet now: pages written, collected ahead, then nothing.
			want := []uint32{3, 700, 701, 1500}
			for _, p := range want {
				stamp(region, p)
			}
			got, ok, err := tr.(Aheader).CollectAhead(nil, uint64(size), nil)
			if err != nil || !ok {
				t.Fatalf("CollectAhead: ok %v, err %v", ok, err)
			}
			// Hot pages are left to the Collect (not reported ahead).
			if !isSubset(got, want) {
				t.Fatalf("CollectAhead reported %v, want a subset of %v", head(got), want)
			}
			copyPages(image, region, got)
			var again []uint32
			if deferred {
				again, _, err = tr.(Deferrer).CollectDeferred(nil, uint64(size))
			} else {
				again, err = tr.Collect(nil, uint64(size))
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range again {
				if slices.Contains(got, p) {
					t.Fatalf("page %d reported by CollectAhead and again by the Collect after it, unwritten in between", p)
				}
			}
			copyPages(image, region, again)
			if !slices.Equal(image, region) {
				t.Fatal("image stale after a quiet CollectAhead and Collect")
			}
		})
	}
}

// TestCollectAheadKeepsHotPagesHot: pages written every round and always
// collected ahead (so never by the Collect that follows) still become hot,
// and once hot they are left to the Collect, which reports them when they
// change; CollectAhead reports the others. Hot pages in a few runs are
// walked around; in many, CollectAhead protects what it reports after one
// walk that only reads.
func TestCollectAheadKeepsHotPagesHot(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	var many []uint32
	for i := range uint32(40) {
		many = append(many, 20+23*i)
	}
	for _, c := range []struct {
		name string
		set  []uint32
	}{{"few runs", []uint32{10, 11, 12, 500}}, {"many runs", many}} {
		t.Run(c.name, func(t *testing.T) {
			const pages = 1024
			size := pages * PageSize
			region := mapRegion(t, size)
			image := make([]byte, size)
			tr := newHotTracker(t, region, uint64(size))
			for r := range promoteAfter + 1 {
				for _, p := range c.set {
					stamp(region, p)
				}
				_, ok, err := tr.CollectAhead(nil, uint64(size), func(r []byte, ps []uint32) { copyPages(image, r, ps) })
				if err != nil || !ok {
					t.Fatalf("round %d: CollectAhead: ok %v, err %v", r, ok, err)
				}
				copyPages(image, region, collect(t, tr, size))
			}
			if h := hotPagesOf(tr); !isSubset(c.set, h) {
				t.Fatalf("hot pages %v, want all of %v: pages collected ahead did not count", head(h), head(c.set))
			}
			for r := range 3 {
				changed := c.set[r]
				cold := []uint32{1000 + 2*uint32(r), 900 - uint32(r), 2 + 3*uint32(r)}
				stamp(region, changed)
				for _, p := range cold {
					stamp(region, p)
				}
				got, ok, err := tr.CollectAhead(nil, uint64(size), func(r []byte, ps []uint32) { copyPages(image, r, ps) })
				if err != nil || !ok || !slices.Equal(got, slices.Sorted(slices.Values(cold))) {
					t.Fatalf("round %d: CollectAhead: %v (ok %v, err %v), want the cold pages %v", r, got, ok, err, cold)
				}
				after := collect(t, tr, size)
				if !slices.Equal(after, []uint32{changed}) {
					t.Fatalf("round %d: Collect after CollectAhead: %v, want the changed hot page [%d]", r, after, changed)
				}
				copyPages(image, region, after)
				if !slices.Equal(image, region) {
					t.Fatalf("round %d: image stale", r)
				}
				if h := hotPagesOf(tr); !isSubset(c.set, h) {
					t.Fatalf("round %d: hot pages lost: %v", r, head(h))
				}
			}
			// Left alone, the hot pages cool: none is reported, ahead or
			// not, on the way (one cooled but not yet protected again
			// is the Collect's to protect, not written), and once cool
			// they are protected, so a write shows ahead again.
			for r := range coolAfter + 1 {
				got, ok, err := tr.CollectAhead(nil, uint64(size), nil)
				if err != nil || !ok || len(got) != 0 {
					t.Fatalf("quiet round %d: CollectAhead: %v (ok %v, err %v), want nothing", r, got, ok, err)
				}
				if after := collect(t, tr, size); len(after) != 0 {
					t.Fatalf("quiet round %d: Collect: %v, want nothing", r, after)
				}
			}
			if h := hotPagesOf(tr); len(h) != 0 {
				t.Fatalf("hot pages %v after %d quiet Collects, want none", head(h), coolAfter+1)
			}
			stamp(region, c.set[0])
			if got, ok, err := tr.CollectAhead(nil, uint64(size), nil); err != nil || !ok || !slices.Equal(got, c.set[:1]) {
				t.Fatalf("a cooled page written: CollectAhead %v (ok %v, err %v), want %v", got, ok, err, c.set[:1])
			}
		})
	}
}

// TestCollectAheadRefuses: CollectAhead does nothing (ok false, nothing
// reported, nothing protected) while a Deferrer's pages wait for Rearm or
// after another CollectAhead with no Collect since, and fails once closed.
func TestCollectAheadRefuses(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 64
	size := pages * PageSize
	region := mapRegion(t, size)
	tr := newTracker(t, region, uint64(size), KindUffd).(*uffdTracker)
	stamp(region, 5)
	if _, _, err := tr.CollectDeferred(nil, uint64(size)); err != nil {
		t.Fatal(err)
	}
	stamp(region, 6)
	if got, ok, err := tr.CollectAhead(nil, uint64(size), nil); ok || err != nil || len(got) != 0 {
		t.Fatalf("with pages waiting for Rearm: %v, ok %v, err %v", got, ok, err)
	}
	// Not re-armed: the Collect reports 5 again, and 6.
	if got := collect(t, tr, size); !slices.Equal(got, []uint32{5, 6}) {
		t.Fatalf("Collect: %v, want [5 6]", got)
	}
	stamp(region, 7)
	if got, ok, _ := tr.CollectAhead(nil, uint64(size), nil); !ok || !slices.Equal(got, []uint32{7}) {
		t.Fatalf("CollectAhead: %v ok %v, want [7]", got, ok)
	}
	stamp(region, 8)
	if got, ok, _ := tr.CollectAhead(nil, uint64(size), nil); ok || len(got) != 0 {
		t.Fatalf("second CollectAhead: %v ok %v, want nothing", got, ok)
	}
	if got := collect(t, tr, size); !slices.Equal(got, []uint32{8}) {
		t.Fatalf("Collect: %v, want [8]", got)
	}
	tr.Close()
	if _, _, err := tr.CollectAhead(nil, uint64(size), nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v, want ErrClosed", err)
	}
}
