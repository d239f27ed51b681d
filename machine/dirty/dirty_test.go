//go:build linux

package dirty

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mapRegion reserves size bytes the way machine/memory.go does.
func mapRegion(t testing.TB, size int) []byte {
	t.Helper()
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

var uffdOnce = sync.OnceValue(Probe)

// kinds runs f once per tracker kind; the kernel one is skipped, with the
// reason, where the kernel cannot do it (TestProbe says whether it should).
func kinds(t *testing.T, f func(t *testing.T, kind string)) {
	for _, kind := range []string{KindUffd, KindHash} {
		t.Run(kind, func(t *testing.T) {
			if kind == KindUffd {
				if err := uffdOnce(); err != nil {
					t.Skipf("kernel tracker unavailable: %v", err)
				}
			}
			f(t, kind)
		})
	}
}

// kindHot names the kernel tracker with Options.HotPages in tests.
const kindHot = "uffd-wp+hot"

// Names of the kernel tracker used through CollectDeferred and Rearm,
// without and with hot pages.
const (
	kindDeferred    = "uffd-wp deferred"
	kindHotDeferred = "uffd-wp+hot deferred"
)

// kindsAndHot is kinds plus the kernel tracker with hot pages, and both
// re-armed after the copy (Deferrer).
func kindsAndHot(t *testing.T, f func(t *testing.T, kind string)) {
	kinds(t, f)
	for _, kind := range []string{kindHot, kindDeferred, kindHotDeferred} {
		t.Run(kind, func(t *testing.T) {
			if err := uffdOnce(); err != nil {
				t.Skipf("kernel tracker unavailable: %v", err)
			}
			f(t, kind)
		})
	}
}

func newHotTracker(t testing.TB, region []byte, used uint64) *uffdTracker {
	t.Helper()
	tr, err := New(region, Options{Used: used, HotPages: true})
	if err != nil {
		t.Fatal(err)
	}
	u, ok := tr.(*uffdTracker)
	if !ok || u.hot == nil {
		t.Fatalf("got a %s tracker (%s) without hot pages", tr.Kind(), tr.Reason())
	}
	t.Cleanup(func() { tr.Close() })
	return u
}

// writtenHotTracker maps a region of pages pages, writes every one of them,
// and tracks it with hot pages from a first Collect on (skipping the test
// where the kernel tracker is unavailable).
func writtenHotTracker(t *testing.T, pages int) (region []byte, tr *uffdTracker) {
	t.Helper()
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	size := pages * PageSize
	region = mapRegion(t, size)
	for p := range uint32(pages) {
		stamp(region, p)
	}
	tr = newHotTracker(t, region, uint64(size))
	collect(t, tr, size)
	return region, tr
}

// eachKernelTracker runs test with the kernel tracker over a fresh region
// of pages pages (and a zeroed image of it for the test's copies), without
// hot pages and with them; it skips where the kernel tracker is missing.
func eachKernelTracker(t *testing.T, pages int, test func(t *testing.T, region, image []byte, tr Tracker)) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	for _, hot := range []bool{false, true} {
		t.Run(fmt.Sprintf("hot=%v", hot), func(t *testing.T) {
			region := mapRegion(t, pages*PageSize)
			test(t, region, make([]byte, len(region)), newKernelTracker(t, region, uint64(len(region)), hot))
		})
	}
}

// newKernelTracker is the kernel tracker for region, with hot pages or
// without.
func newKernelTracker(t testing.TB, region []byte, used uint64, hot bool) Tracker {
	t.Helper()
	if hot {
		return newHotTracker(t, region, used)
	}
	return newTracker(t, region, used, KindUffd)
}

func newTracker(t testing.TB, region []byte, used uint64, kind string) Tracker {
	t.Helper()
	tr, err := New(region, Options{Used: used, ForceHash: kind == KindHash})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Kind() != kind {
		t.Fatalf("got a %s tracker (%s), want %s", tr.Kind(), tr.Reason(), kind)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func collect(t testing.TB, tr Tracker, used int) []uint32 {
	t.Helper()
	got, err := tr.Collect(nil, uint64(used))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("%s: Collect returned unsorted or repeated indices: %v at %d of %d", tr.Kind(), got[max(0, i-5):min(len(got), i+5)], i, len(got))
		}
	}
	return got
}

func expect(t testing.TB, what string, got, want []uint32) {
	t.Helper()
	if !slices.Equal(got, want) {
		missing, extra := diff(want, got), diff(got, want)
		t.Fatalf("%s: %d pages reported, want %d; missing %v, extra %v", what, len(got), len(want), head(missing), head(extra))
	}
}

func diff(a, b []uint32) (out []uint32) {
	for _, x := range a {
		if _, ok := slices.BinarySearch(b, x); !ok {
			out = append(out, x)
		}
	}
	return out
}

func head(s []uint32) []uint32 { return s[:min(len(s), 10)] }

// populate gives every page of region memory (writing a zero into it), so
// that the kernel tracker leaves no fresh slot in it (fresh_linux.go): for
// tests of walks over armed memory, and where a reader (the hash tracker)
// would fault fresh pages in, which the kernel tracker then reports where
// the kernel maps no shared zero page for reads (this project's VMs).
func populate(region []byte) {
	for i := 0; i < len(region); i += PageSize {
		region[i] = 0
	}
}

// randomPages picks count distinct pages below n, sorted.
func randomPages(rng *rand.Rand, n, count int) []uint32 {
	set := map[uint32]bool{}
	for len(set) < count {
		set[uint32(rng.IntN(n))] = true
	}
	out := make([]uint32, 0, count)
	for p := range set {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// stamp writes a value never written before somewhere in page p, so that
// the hash tracker sees a change too.
var stampSeq atomic.Uint64

func stamp(region []byte, p uint32) {
	v := stampSeq.Add(1)
	off := int(p)*PageSize + int(v%(PageSize/8))*8
	binary.LittleEndian.PutUint64(region[off:], v)
}

func TestIoctlABI(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"UFFDIO_API", uffdioAPI, 0xC018AA3F},
		{"UFFDIO_REGISTER", uffdioRegister, 0xC020AA00},
		{"UFFDIO_WRITEPROTECT", uffdioWP, 0xC018AA06},
		{"USERFAULTFD_IOC_NEW", userfaultfdIoNew, 0xAA00},
		{"PAGEMAP_SCAN", pagemapScan, 0xC0606610},
		{"sizeof(struct page_region)", unsafe.Sizeof(pageRegion{}), 24},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// TestProbe fails where the kernel is new enough and nothing forbids
// userfaultfd, so that the kernel tracker cannot be lost unnoticed.
func TestProbe(t *testing.T) {
	err := Probe()
	t.Logf("Probe: %v", err)
	if err == nil {
		return
	}
	var u unix.Utsname
	unix.Uname(&u)
	var major, minor int
	for i, f := range strings.SplitN(unix.ByteSliceToString(u.Release[:]), ".", 3)[:2] {
		for _, c := range f {
			if c < '0' || c > '9' {
				break
			}
			if i == 0 {
				major = major*10 + int(c-'0')
			} else {
				minor = minor*10 + int(c-'0')
			}
		}
	}
	denied := errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || strings.Contains(err.Error(), "permission denied") ||
		strings.Contains(err.Error(), "operation not permitted")
	if (major > 6 || major == 6 && minor >= 7) && !denied {
		t.Fatalf("kernel %d.%d should support userfaultfd WP_ASYNC and PAGEMAP_SCAN: %v", major, minor, err)
	}
}

// TestGoWrites: pages written by Go code are reported exactly, reads and
// pages written before New are not, and a second Collect is empty.
func TestGoWrites(t *testing.T) {
	kinds(t, func(t *testing.T, kind string) {
		const pages = 8192 // 32 MiB
		size := pages * PageSize
		region := mapRegion(t, size)
		rng := rand.New(rand.NewPCG(1, 2))
		for _, p := range randomPages(rng, pages, 500) {
			stamp(region, p) // before New: baseline, not dirty
		}
		tr := newTracker(t, region, uint64(size), kind)
		expect(t, "after New", collect(t, tr, size), nil)
		var sink byte
		for round := range 6 {
			want := randomPages(rng, pages, 1+rng.IntN(700))
			for _, p := range want {
				stamp(region, p)
			}
			for _, p := range randomPages(rng, pages, 300) {
				sink += region[int(p)*PageSize+100] // reads, often of untouched pages
			}
			expect(t, "round "+string(rune('0'+round)), collect(t, tr, size), want)
			expect(t, "again", collect(t, tr, size), nil)
		}
		_ = sink
	})
}

// TestKernelWrites: pages the kernel writes into (getrandom(2), pread(2)
// from a file) are reported exactly, as host calls copying into guest
// memory would be.
func TestKernelWrites(t *testing.T) {
	kinds(t, func(t *testing.T, kind string) {
		const pages = 4096
		size := pages * PageSize
		region := mapRegion(t, size)
		tr := newTracker(t, region, uint64(size), kind)
		f, err := os.CreateTemp(t.TempDir(), "src")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		src := make([]byte, 3*PageSize)
		for i := range src {
			src[i] = byte(i%251 + 1)
		}
		f.Write(src)
		rng := rand.New(rand.NewPCG(3, 4))
		for round := range 4 {
			var want []uint32
			for _, p := range randomPages(rng, pages-2, 200) {
				off := int(p)*PageSize + 1000
				if round%2 == 0 {
					// A few bytes inside one page.
					if _, err := unix.Getrandom(region[off:off+64], 0); err != nil {
						t.Fatal(err)
					}
					want = append(want, p)
				} else {
					// Straddling into the next page.
					n, err := unix.Pread(int(f.Fd()), region[off:off+PageSize], int64(rng.IntN(PageSize)))
					if err != nil || n != PageSize {
						t.Fatal(n, err)
					}
					want = append(want, p, p+1)
				}
			}
			slices.Sort(want)
			want = slices.Compact(want)
			if round%2 == 1 {
				// Pread may rewrite what an earlier straddling read put
				// there; only the kernel tracker must report those.
				got := collect(t, tr, size)
				if kind == KindUffd {
					expect(t, "pread", got, want)
				} else if len(diff(got, want)) != 0 {
					t.Fatalf("hash reported unwritten pages %v", head(diff(got, want)))
				}
				continue
			}
			expect(t, "getrandom", collect(t, tr, size), want)
		}
	})
}

// TestGrowth: a page is reported once usedBytes covers it, pages written
// while beyond usedBytes included; grown pages never written are not.
func TestGrowth(t *testing.T) {
	kinds(t, func(t *testing.T, kind string) {
		const pages = 1024
		region := mapRegion(t, pages*PageSize)
		tr := newTracker(t, region, 64*PageSize, kind)
		var sink byte
		sink += region[300*PageSize] // read beyond the used part
		for _, p := range []uint32{10, 63, 64, 70, 200, 1023} {
			stamp(region, p)
		}
		expect(t, "used 64", collect(t, tr, 64*PageSize), []uint32{10, 63})
		expect(t, "used 64+1 byte", collect(t, tr, 64*PageSize+1), []uint32{64})
		stamp(region, 10)
		expect(t, "used 128", collect(t, tr, 128*PageSize), []uint32{10, 70})
		expect(t, "used 1024", collect(t, tr, pages*PageSize), []uint32{200, 1023})
		expect(t, "again", collect(t, tr, pages*PageSize), nil)
		stamp(region, 500)
		expect(t, "shrunk", collect(t, tr, 256*PageSize), nil)
		expect(t, "regrown", collect(t, tr, pages*PageSize), []uint32{500})
		if _, err := tr.Collect(nil, pages*PageSize+1); err == nil {
			t.Fatal("Collect beyond the region succeeded")
		}
		_ = sink
	})
}

// TestBaselineBeyondUsed: pages written before New past Options.Used are
// not part of the baseline, which takes them as zero.
func TestBaselineBeyondUsed(t *testing.T) {
	kinds(t, func(t *testing.T, kind string) {
		region := mapRegion(t, 256*PageSize)
		stamp(region, 5)
		stamp(region, 100)
		var sink byte
		sink += region[101*PageSize] // mapped, but zero
		tr := newTracker(t, region, 64*PageSize, kind)
		expect(t, "grown", collect(t, tr, 256*PageSize), []uint32{100})
		_ = sink
	})
}

// TestManyRuns: more separate runs of dirty pages than one scan's output
// buffer holds, so the walk resumes from walk_end.
func TestManyRuns(t *testing.T) {
	kinds(t, func(t *testing.T, kind string) {
		const pages = 16384
		region := mapRegion(t, pages*PageSize)
		tr := newTracker(t, region, pages*PageSize, kind)
		var want []uint32
		for p := uint32(1); p < pages; p += 3 {
			stamp(region, p)
			stamp(region, p+1)
			want = append(want, p, p+1)
		}
		if len(want)/2 <= scanRegions {
			t.Fatal("test too small")
		}
		expect(t, "runs", collect(t, tr, pages*PageSize), want)
	})
}

// TestStaleWalkEnd: when a walk produced more regions than the kernel's
// internal chunk (512) but fewer than the buffer, Linux 6.18 returns a
// walk_end from mid-range; resuming from it would walk again and report
// pages written meanwhile out of order, and twice.
func TestStaleWalkEnd(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 4096
	region := mapRegion(t, pages*PageSize)
	populate(region)
	tr := newTracker(t, region, pages*PageSize, KindUffd)
	var want []uint32
	for p := uint32(0); p < 1200; p += 2 {
		stamp(region, p)
		want = append(want, p)
	}
	calls := 0
	testAfterScan = func() {
		if calls++; calls == 1 {
			stamp(region, 1100) // reported, protected again, written again
		}
	}
	defer func() { testAfterScan = nil }()
	expect(t, "first", collect(t, tr, pages*PageSize), want)
	expect(t, "next", collect(t, tr, pages*PageSize), []uint32{1100})
}

// TestSameAnswers runs both trackers on one region (the hash one only
// reads it) and compares every Collect, growth included.
func TestSameAnswers(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 4096
	region := mapRegion(t, pages*PageSize)
	used := 1024
	// No fresh slots (fresh_linux.go): the hash tracker reads every page
	// in use, and where reads fault in memory rather than the shared zero
	// page (this project's VMs) the kernel tracker would report the fresh
	// slots it read whole.
	tr, err := New(region, Options{Used: uint64(used * PageSize), FileBacked: pages * PageSize})
	if err != nil || tr.Kind() != KindUffd {
		t.Fatalf("New: %v %v", tr, err)
	}
	t.Cleanup(func() { tr.Close() })
	u := tr
	h := newTracker(t, region, uint64(used*PageSize), KindHash)
	rng := rand.New(rand.NewPCG(5, 6))
	for round := range 20 {
		for _, p := range randomPages(rng, pages, rng.IntN(400)) {
			if rng.IntN(2) == 0 {
				stamp(region, p)
			} else {
				off := int(p)*PageSize + rng.IntN(PageSize-16)
				unix.Getrandom(region[off:off+16], 0)
			}
		}
		if round%5 == 4 {
			used = min(pages, used+rng.IntN(1024))
		}
		a, b := collect(t, u, used*PageSize), collect(t, h, used*PageSize)
		expect(t, "hash vs uffd", b, a)
	}
}

// TestConcurrentWriters: writers (Go stores and getrandom(2)) run while
// Collect is called over and over; a consumer copying the reported pages
// after each Collect ends with an exact image, and every page written was
// reported at least once.
func TestConcurrentWriters(t *testing.T) {
	kindsAndHot(t, func(t *testing.T, kind string) {
		const pages = 2048
		size := pages * PageSize
		region := mapRegion(t, size)
		image := make([]byte, size)
		var tr Tracker
		switch kind {
		case kindHot, kindHotDeferred:
			tr = newHotTracker(t, region, uint64(size))
		case kindDeferred:
			tr = newTracker(t, region, uint64(size), KindUffd)
		default:
			tr = newTracker(t, region, uint64(size), kind)
		}
		deferred := kind == kindDeferred || kind == kindHotDeferred
		written := make([][]bool, 3)
		for w := range written {
			written[w] = make([]bool, pages)
		}
		stop := startWriters(t, len(written), 7, func(w int, c uint64, rng *rand.Rand) {
			p := rng.IntN(pages)
			written[w][p] = true
			off := p*PageSize + w*8*64 + int(c%64)*8
			if w == 2 {
				unix.Getrandom(region[off:off+8], 0)
				return
			}
			// A counter that only grows: every store changes the page.
			atomic.StoreUint64((*uint64)(unsafe.Pointer(&region[off])), c)
		})
		k := &imageKeeper{t: t, tr: tr, region: region, image: image, reported: make([]bool, pages), deferred: deferred}
		deadline := time.Now().Add(500 * time.Millisecond)
		rounds, total := 0, 0
		for time.Now().Before(deadline) {
			total += k.take()
			rounds++
		}
		stop()
		total += k.take()
		if deferred {
			total += k.take() // what the last Rearm carried over
		}
		t.Logf("%d Collects, %d pages reported", rounds+1, total)
		k.check(written)
	})
}

// imageKeeper is a tracker's consumer in tests: it keeps an image of the
// region by copying the pages each collection reports, and remembers which
// pages were ever reported.
type imageKeeper struct {
	t             *testing.T
	tr            Tracker
	region, image []byte
	reported      []bool
	deferred      bool // collect with CollectDeferred, re-arm after the copy
}

// take collects, copies what was reported and, if deferred, re-arms; it
// returns how many pages were reported.
func (k *imageKeeper) take() int {
	k.t.Helper()
	var got []uint32
	var gen uint64
	if k.deferred {
		var err error
		if got, gen, err = k.tr.(Deferrer).CollectDeferred(nil, uint64(len(k.region))); err != nil {
			k.t.Fatal(err)
		}
	} else {
		got = collect(k.t, k.tr, len(k.region))
	}
	k.saw(got)
	copyPages(k.image, k.region, got)
	if k.deferred {
		// Re-armed after the copy, while any writers go on.
		if err := k.tr.(Deferrer).Rearm(gen, func(p uint32) []byte { return k.image[int(p)*PageSize : int(p+1)*PageSize] }); err != nil {
			k.t.Fatal(err)
		}
	}
	return len(got)
}

func (k *imageKeeper) saw(pages []uint32) {
	for _, p := range pages {
		k.reported[p] = true
	}
}

// check fails the test unless every page in written (per writer) was
// reported and the image equals the region.
func (k *imageKeeper) check(written [][]bool) {
	k.t.Helper()
	for w := range written {
		for p, ok := range written[w] {
			if ok && !k.reported[p] {
				k.t.Fatalf("page %d written by writer %d never reported", p, w)
			}
		}
	}
	for p := 0; p < len(k.region); p += PageSize {
		if string(k.image[p:p+PageSize]) != string(k.region[p:p+PageSize]) {
			k.t.Fatalf("image of page %d stale: a write was lost", p/PageSize)
		}
	}
}

// startWriters runs write(w, c, rng) over and over on n goroutines (w is
// the goroutine's number, c counts its calls from 1, rng is its own,
// seeded with w and seed) until stop, which waits for them. They are
// stopped at the test's end in any case, before the region they write is
// unmapped (a cleanup registered after mapRegion's runs before it).
func startWriters(t *testing.T, n int, seed uint64, write func(w int, c uint64, rng *rand.Rand)) (stop func()) {
	var quit atomic.Bool
	var wg sync.WaitGroup
	for w := range n {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), seed))
			for c := uint64(1); !quit.Load(); c++ {
				write(w, c, rng)
			}
		})
	}
	stop = func() { quit.Store(true); wg.Wait() }
	t.Cleanup(stop)
	return stop
}

// TestHugePageAdvice: a region advised MADV_HUGEPAGE still tracks 4 KiB
// pages, because New takes the advice back.
func TestHugePageAdvice(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const huge = 2 << 20
	raw := mapRegion(t, 4*huge)
	off := (huge - int(uintptr(unsafe.Pointer(&raw[0])))%huge) % huge
	region := raw[off : off+2*huge]
	unix.Madvise(region, unix.MADV_HUGEPAGE)
	populate(region) // huge pages, protected whole at New
	tr := newTracker(t, region, uint64(len(region)), KindUffd)
	stamp(region, 3)
	stamp(region, 600)
	expect(t, "huge", collect(t, tr, len(region)), []uint32{3, 600})
}

// TestOpeners: each way of getting a userfaultfd works and tracks kernel
// writes (user-mode-only included: asynchronous faults never reach the
// point where kernel-mode faults would be refused).
func TestOpeners(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	saved := openers
	defer func() { openers = saved }()
	for _, op := range saved {
		t.Run(op.name, func(t *testing.T) {
			openers = []opener{op}
			if fd, err := op.open(); err != nil {
				t.Skipf("not available here: %v", err)
			} else {
				unix.Close(fd)
			}
			region := mapRegion(t, 64*PageSize)
			tr := newTracker(t, region, 64*PageSize, KindUffd)
			unix.Getrandom(region[5*PageSize:5*PageSize+8], 0)
			stamp(region, 9)
			expect(t, op.name, collect(t, tr, 64*PageSize), []uint32{5, 9})
		})
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestFallbackReason: every way the kernel tracker can fail yields a
// working hash tracker whose Reason says why, and leaks no descriptor.
func TestFallbackReason(t *testing.T) {
	region := mapRegion(t, 64*PageSize)
	check := func(name string, tr Tracker, err error, want string, region []byte) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer tr.Close()
		if tr.Kind() != KindHash || !strings.Contains(tr.Reason(), want) {
			t.Fatalf("%s: kind %s, reason %q; want hash, reason containing %q", name, tr.Kind(), tr.Reason(), want)
		}
		t.Logf("%s: %s", name, tr.Reason())
		stamp(region, 7)
		expect(t, name, collect(t, tr, len(region)), []uint32{7})
	}
	before := openFDs(t)
	tr, err := New(region, Options{ForceHash: true, Used: uint64(len(region))})
	check("forced", tr, err, "ForceHash", region)
	tr, err = New(region[PageSize-1:], Options{Used: uint64(len(region) - PageSize + 1)})
	check("unaligned", tr, err, "not page-aligned", region[PageSize-1:])
	if uffdOnce() == nil {
		for _, step := range []string{"open", "register", "scan"} {
			tr, err := New(region, Options{Used: uint64(len(region)), failAt: step})
			check(step, tr, err, map[string]string{"open": "injected", "register": "UFFDIO_REGISTER", "scan": "PAGEMAP_SCAN"}[step], region)
		}
		// A region already tracked cannot be registered twice (EBUSY);
		// the first tracker is unaffected.
		first := newTracker(t, region, uint64(len(region)), KindUffd)
		tr, err = New(region, Options{Used: uint64(len(region))})
		check("second tracker", tr, err, "device or resource busy", region)
		stamp(region, 11)
		expect(t, "first tracker", collect(t, first, len(region)), []uint32{7, 11})
		first.Close()
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors open after, %d before", after, before)
	}
}

func TestArguments(t *testing.T) {
	region := mapRegion(t, 16*PageSize)
	if _, err := New(nil, Options{}); err == nil {
		t.Error("New(nil) succeeded")
	}
	if _, err := New(region, Options{Used: uint64(len(region)) + 1}); err == nil {
		t.Error("New with Used beyond the region succeeded")
	}
	kinds(t, func(t *testing.T, kind string) {
		tr := newTracker(t, region, 0, kind)
		if err := tr.Close(); err != nil {
			t.Fatal(err)
		}
		if err := tr.Close(); err != nil {
			t.Fatal("second Close:", err)
		}
		if _, err := tr.Collect(nil, 0); !errors.Is(err, ErrClosed) {
			t.Fatalf("Collect after Close: %v", err)
		}
		stamp(region, 1) // still writable
		dst := []uint32{99}
		tr2 := newTracker(t, region, uint64(len(region)), kind)
		stamp(region, 2)
		got, _ := tr2.Collect(dst, uint64(len(region)))
		expect(t, "appended", got, []uint32{99, 2})
	})
}

// TestHotPages: pages written Collect after Collect become hot (left
// writable, compared by contents) and cool down once left alone, and
// through it all the tracker with hot pages reports exactly the pages whose
// contents changed — the hash fallback's answer, when every write changes
// its page — and a consumer copying what it reports keeps an exact image.
// Hot pages form runs both few (so protection goes around them) and many
// (so it walks through them), and some rounds write pages at random in
// many runs.
func TestHotPages(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 4096
	size := pages * PageSize
	region := mapRegion(t, size)
	image := make([]byte, size)
	for p := range pages / 2 { // half in use with data, half never touched
		stamp(region, uint32(p))
	}
	copy(image, region)
	hot := newHotTracker(t, region, uint64(size))
	ref := newTracker(t, region, uint64(size), KindHash)
	// Few runs: two clusters. Many runs: 60 pages apart from each other.
	// All amid the pages written at random.
	var few, many []uint32
	for p := uint32(1100); p < 1120; p++ {
		few = append(few, p)
	}
	for p := uint32(2500); p < 2510; p++ {
		few = append(few, p)
	}
	for i := range uint32(60) {
		many = append(many, 1000+29*i)
	}
	rng := rand.New(rand.NewPCG(11, 12))
	round := func(what string, hotSet []uint32, scattered int, r int) {
		t.Helper()
		for _, p := range hotSet {
			stamp(region, p)
		}
		// Rewriting a hot page with what it holds is no change.
		if len(hotSet) > 0 {
			p := hotSet[rng.IntN(len(hotSet))]
			if h := hotPagesOf(hot); slices.Contains(h, p) {
				o := int(p) * PageSize
				copy(region[o:o+PageSize], slices.Clone(region[o:o+PageSize]))
			}
		}
		// Random pages from a third of the region that changes every
		// round, so they are never written twice in a row.
		lo := 1000 + (r%3)*600
		for _, p := range randomPages(rng, 600, scattered) {
			if p += uint32(lo); !slices.Contains(hotSet, p) && (len(hotSet) > 0 || !slices.Contains(hotPagesOf(hot), p)) {
				stamp(region, p) // cooling hot pages are left alone
			}
		}
		got, want := collect(t, hot, size), collect(t, ref, size)
		expect(t, fmt.Sprintf("%s, round %d: hot vs hash", what, r), got, want)
		copyPages(image, region, got)
		if !slices.Equal(image, region) {
			t.Fatalf("%s, round %d: the consumer's image is stale", what, r)
		}
	}
	// Writes at random over much of the memory, some pages by chance
	// several times in a row: none is taken for hot, that is luck.
	for r := range 3 * promoteAfter {
		for _, p := range randomPages(rng, pages/2, pages/8) {
			stamp(region, p)
		}
		got, want := collect(t, hot, size), collect(t, ref, size)
		expect(t, fmt.Sprintf("random writes, round %d: hot vs hash", r), got, want)
		copyPages(image, region, got)
		if h := hotPagesOf(hot); len(h) != 0 {
			t.Fatalf("random writes, round %d: pages made hot: %v", r, head(h))
		}
	}
	for _, c := range []struct {
		name   string
		hotSet []uint32
	}{{"few runs", few}, {"many runs", many}} {
		for r := range promoteAfter + 2 {
			round(c.name, c.hotSet, 5, r)
		}
		if h := hotPagesOf(hot); !isSubset(c.hotSet, h) {
			t.Fatalf("%s: after %d rounds writing them, hot pages are %v, want all of %v", c.name, promoteAfter+2, head(h), head(c.hotSet))
		}
		// Once hot, they stay hot through scattered writes (which are
		// protected around them, or through them).
		for r := range 3 {
			round(c.name+", hot amid scattered writes", c.hotSet, 200, r)
		}
		if h := hotPagesOf(hot); !isSubset(c.hotSet, h) {
			t.Fatalf("%s: hot pages lost amid scattered writes: %v, want all of %v", c.name, head(h), head(c.hotSet))
		}
		// Left alone, they cool down and are protected again; a write
		// to one afterwards is seen by the kernel.
		for r := range coolAfter + 2 {
			round(c.name+", cooling", nil, 5*(r%2)+200*(r%3/2), r)
		}
		if h := hotPagesOf(hot); len(h) != 0 {
			t.Fatalf("%s: %d pages still hot after %d rounds without writes: %v", c.name, len(h), coolAfter+2, head(h))
		}
		round(c.name+", cooled", c.hotSet[:1], 0, 0)
	}
}

func copyPages(image, region []byte, pages []uint32) {
	for _, p := range pages {
		o := int(p) * PageSize
		copy(image[o:o+PageSize], region[o:o+PageSize])
	}
}

func hotPagesOf(t *uffdTracker) []uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []uint32
	for _, p := range t.hot.hot {
		out = append(out, p.idx)
	}
	return out
}

func isSubset(a, b []uint32) bool {
	for _, x := range a {
		if _, ok := slices.BinarySearch(b, x); !ok {
			return false
		}
	}
	return true
}

// TestHotPagesRaces: writes to a hot page at the moments Collect cannot
// order by itself — to a cooling page right after it is protected again,
// and right after the kernel was asked — are reported, now or at the next
// Collect; a hot page beyond the part in use waits.
func TestHotPagesRaces(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 64
	size := pages * PageSize
	region := mapRegion(t, size)
	tr := newHotTracker(t, region, uint64(size))
	const p = 40
	for range promoteAfter {
		stamp(region, p)
		collect(t, tr, size)
	}
	if !slices.Equal(hotPagesOf(tr), []uint32{p}) {
		t.Fatalf("hot pages %v, want [%d]", hotPagesOf(tr), p)
	}
	// In use only below it: not compared, still hot.
	stamp(region, p)
	expect(t, "hot page beyond usedBytes", collect(t, tr, 10*PageSize), nil)
	expect(t, "back in use", collect(t, tr, size), []uint32{p})
	for range coolAfter {
		expect(t, "cooling", collect(t, tr, size), nil)
	}
	// Protected again at the start of this Collect, then written.
	testAfterProtect = func() { stamp(region, p) }
	expect(t, "written right after cooling", collect(t, tr, size), []uint32{p})
	testAfterProtect = nil
	expect(t, "and protected again", collect(t, tr, size), nil)
	for range promoteAfter {
		stamp(region, p)
		collect(t, tr, size)
	}
	for range coolAfter {
		collect(t, tr, size)
	}
	// Written after the kernel was asked, while cooling: seen by its
	// contents, and by the kernel at the next Collect.
	testAfterScan = func() { stamp(region, p) }
	expect(t, "written after the scan, cooling", collect(t, tr, size), []uint32{p})
	testAfterScan = nil
	stamp(region, p)
	expect(t, "written again", collect(t, tr, size), []uint32{p})
	if len(hotPagesOf(tr)) != 0 {
		t.Fatalf("hot pages %v, want none", hotPagesOf(tr))
	}
}

// TestDeferredRearm: pages CollectDeferred reports stay writable until
// Rearm; a write to one before Rearm (its copy then differs) or to another
// page during a Rearm's walk is reported by the next Collect; a Rearm that
// never comes, or comes after a later Collect, loses nothing.
func TestDeferredRearm(t *testing.T) {
	eachKernelTracker(t, 1024, func(t *testing.T, region, image []byte, tr Tracker) {
		size := len(region)
		d := tr.(Deferrer)
		copyOf := func(p uint32) []byte { return image[int(p)*PageSize : int(p+1)*PageSize] }
		take := func(what string, want []uint32) uint64 {
			t.Helper()
			got, gen, err := d.CollectDeferred(nil, uint64(size))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, what, got, want)
			copyPages(image, region, got)
			return gen
		}
		// Few runs (protected one by one) and many (one walk).
		few := []uint32{10, 11, 12, 500}
		var many []uint32
		for p := uint32(100); p < 400; p += 3 {
			many = append(many, p)
		}
		for _, set := range [][]uint32{few, many} {
			for _, p := range set {
				stamp(region, p)
			}
			gen := take("written", set)
			stamp(region, set[1]) // after the copy, before Rearm
			if err := d.Rearm(gen, copyOf); err != nil {
				t.Fatal(err)
			}
			stamp(region, set[2]) // after Rearm: the kernel sees it
			gen = take("written before and after Rearm", []uint32{set[1], set[2]})
			if err := d.Rearm(gen, copyOf); err != nil {
				t.Fatal(err)
			}
			take("nothing", nil)
		}
		// Rearm never comes: the next Collect reports them again.
		for _, p := range few {
			stamp(region, p)
		}
		take("written", few)
		gen := take("not re-armed", few)
		// A stale Rearm does nothing; the current one works.
		if err := d.Rearm(gen-1, copyOf); err != nil {
			t.Fatal(err)
		}
		if err := d.Rearm(gen, copyOf); err != nil {
			t.Fatal(err)
		}
		take("re-armed", nil)
		// A page outside the pending ones, written before a Rearm
		// walks over it, is carried to the next Collect.
		for _, p := range many {
			stamp(region, p)
		}
		gen = take("many", many)
		stamp(region, 101) // between pending pages, not one of them
		if err := d.Rearm(gen, copyOf); err != nil {
			t.Fatal(err)
		}
		take("written during the walk's span", []uint32{101})
		if !slices.Equal(image, region) {
			t.Fatal("the consumer's image is stale")
		}
	})
}

// TestCloseWaitsForRearm: Close does not return while a Rearm (which reads
// the region) runs on another goroutine, so the region can be unmapped
// right after it; a Rearm after Close does nothing.
func TestCloseWaitsForRearm(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	region := mapRegion(t, 64*PageSize)
	tr := newTracker(t, region, 64*PageSize, KindUffd)
	d := tr.(Deferrer)
	stamp(region, 3)
	_, gen, err := d.CollectDeferred(nil, 64*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	inside, release := make(chan struct{}), make(chan struct{})
	rearmed := make(chan error)
	go func() {
		rearmed <- d.Rearm(gen, func(uint32) []byte { close(inside); <-release; return nil })
	}()
	<-inside
	closed := make(chan struct{})
	go func() { tr.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while Rearm was reading the region")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-rearmed; err != nil {
		t.Fatal(err)
	}
	<-closed
	if err := d.Rearm(gen, func(uint32) []byte { t.Fatal("Rearm after Close read the region"); return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Rearm after Close: %v, want ErrClosed", err)
	}
}

// TestWarmLosesNothing: Warm walks without reporting or protecting, so the
// pages written before it (and after it) are still what Collect reports;
// so does a Warm right after a Collect (which skips its walk), and one
// after Close does not fail.
func TestWarmLosesNothing(t *testing.T) {
	eachKernelTracker(t, 1024, func(t *testing.T, region, _ []byte, tr Tracker) {
		size := len(region)
		w, ok := tr.(Warmer)
		if !ok {
			t.Fatal("the kernel tracker is not a Warmer")
		}
		collect := func(what string, want []uint32) {
			t.Helper()
			got, err := tr.Collect(nil, uint64(size))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, what, got, want)
		}
		collect("nothing yet", nil)
		for round := 0; round < 4; round++ {
			stamp(region, 7)
			stamp(region, 300)
			time.Sleep(WarmAfter + time.Millisecond) // past the skip: Warm walks
			w.Warm(uint64(size))
			stamp(region, 301)
			w.Warm(uint64(size))
			collect("written around two Warms", []uint32{7, 300, 301})
		}
		w.Warm(uint64(size)) // just after a Collect: skipped
		collect("nothing", nil)
		tr.Close()
		w.Warm(uint64(size)) // closed: nothing, no panic
	})
}

// TestWrittenSeesPagesRearmCarried: a page written after a deferred Collect
// and before its Rearm is protected by that Rearm without the kernel
// having reported it; Rearm carries it to the next Collect, and Written
// (which the machine uses to refresh its copy of the region Asyncify
// borrows) must report it too, or that copy stays stale and is written
// back over the guest's data at the next pause.
func TestWrittenSeesPagesRearmCarried(t *testing.T) {
	eachKernelTracker(t, 64, func(t *testing.T, region, image []byte, tr Tracker) {
		size := len(region)
		d, pk := tr.(Deferrer), tr.(Peeker)
		tr.Collect(nil, uint64(size))
		for _, set := range [][]uint32{{40}, {40, 41, 42, 50, 51, 60}} {
			for _, p := range set {
				stamp(region, p)
			}
			got, gen, err := d.CollectDeferred(nil, uint64(size))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, "written", got, set)
			copyPages(image, region, got)
			stamp(region, set[0]) // the guest runs before Rearm
			if err := d.Rearm(gen, func(p uint32) []byte { return image[int(p)*PageSize : int(p+1)*PageSize] }); err != nil {
				t.Fatal(err)
			}
			w, ok := pk.Written(nil, 32*PageSize, uint64(size))
			if !ok {
				t.Fatal("Written could not tell")
			}
			expect(t, "Written after a Rearm that carried a page", w, []uint32{set[0]})
			got, err = tr.Collect(nil, uint64(size))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, "Collect after it", got, []uint32{set[0]})
		}
	})
}

// TestWrittenSeesHotPagesARearmProtected: a Rearm with many runs protects
// in one walk whatever is written in their span, a hot page too, without
// carrying it (Collect finds its change by hash); Written must still report
// a hot page written before that walk.
func TestWrittenSeesHotPagesARearmProtected(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 128
	size := pages * PageSize
	region := mapRegion(t, size)
	image := make([]byte, size)
	tr := newHotTracker(t, region, uint64(size))
	const hotPage = 90
	for i := 0; i < promoteAfter+1; i++ {
		stamp(region, hotPage)
		if _, err := tr.Collect(nil, uint64(size)); err != nil {
			t.Fatal(err)
		}
	}
	if !tr.hot.isHot(hotPage) {
		t.Fatalf("page %d written in %d Collects in a row is not hot", hotPage, promoteAfter+1)
	}
	var many []uint32
	for p := uint32(70); p < 112; p += 2 {
		many = append(many, p)
	}
	for _, p := range many {
		stamp(region, p)
	}
	stamp(region, hotPage+1)
	got, gen, err := tr.CollectDeferred(nil, uint64(size))
	if err != nil {
		t.Fatal(err)
	}
	copyPages(image, region, got)
	stamp(region, hotPage) // the guest runs before Rearm
	if err := tr.Rearm(gen, func(p uint32) []byte { return image[int(p)*PageSize : int(p+1)*PageSize] }); err != nil {
		t.Fatal(err)
	}
	w, ok := tr.Written(nil, 64*PageSize, uint64(size))
	if !ok {
		t.Fatal("Written could not tell")
	}
	if _, found := slices.BinarySearch(w, hotPage); !found {
		t.Fatalf("Written after a Rearm walk over a hot page written before it: %v, want page %d among them", w, hotPage)
	}
}

// TestWrittenAfterLateRearm: a consumer that copied a pending page when
// Written reported it (a pause without a Collect, between a deferred
// Collect and its Rearm) must hear of the page again if the guest then put
// back the very bytes the Collect's copy holds: Rearm, seeing no
// difference from that copy, would otherwise protect it silently, and the
// consumer's copy would stay stale.
func TestWrittenAfterLateRearm(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 64
	size := pages * PageSize
	region := mapRegion(t, size)
	tr := newTracker(t, region, uint64(size), KindUffd)
	d, pk := tr.(Deferrer), tr.(Peeker)
	tr.Collect(nil, uint64(size))
	const p = 40
	o := p * PageSize
	region[o] = 'A'
	got, gen, err := d.CollectDeferred(nil, uint64(size))
	if err != nil {
		t.Fatal(err)
	}
	expect(t, "written", got, []uint32{p})
	collected := bytes.Clone(region[o : o+PageSize])
	region[o] = 'B'
	w, _ := pk.Written(nil, 32*PageSize, uint64(size))
	expect(t, "Written before the Rearm", w, []uint32{p}) // the consumer copies B
	region[o] = 'A'
	if err := d.Rearm(gen, func(uint32) []byte { return collected }); err != nil {
		t.Fatal(err)
	}
	w, _ = pk.Written(nil, 32*PageSize, uint64(size))
	expect(t, "Written after a late Rearm of a page changed back", w, []uint32{p})
}

// TestScanOfSmallRangesMissesNoRun: a small range is asked with room for
// as many runs as it can hold, no more: every other page written (the
// most runs there are) is reported whole, by Written and by Collect, for
// ranges of odd and even sizes.
func TestScanOfSmallRangesMissesNoRun(t *testing.T) {
	eachKernelTracker(t, 160, func(t *testing.T, region, image []byte, tr Tracker) {
		pk := tr.(Peeker)
		for _, n := range []int{1, 2, 3, 5, 64, 65, 127} {
			from := 16
			tr.Collect(nil, uint64(len(region)))
			var want []uint32
			for p := from; p < from+n; p += 2 {
				stamp(region, uint32(p))
				want = append(want, uint32(p))
			}
			got, ok := pk.Written(nil, uint64(from*PageSize), uint64((from+n)*PageSize))
			if !ok {
				t.Fatal("Written could not tell")
			}
			expect(t, fmt.Sprintf("Written over %d pages", n), got, want)
			got, err := tr.Collect(nil, uint64(len(region)))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, fmt.Sprintf("Collect after %d pages", n), got, want)
		}
	})
}

// TestGrowthWithManyRegions: memory newly in use may hold pages of three
// kinds side by side (written, read as the zero page, untouched), which
// the kernel reports as that many regions, more than the runs of written
// pages: a scan that had room for as many regions as runs, and took a
// full buffer for the end of the walk, missed every written page after
// it.
func TestGrowthWithManyRegions(t *testing.T) {
	if err := uffdOnce(); err != nil {
		t.Skipf("kernel tracker unavailable: %v", err)
	}
	const pages = 256
	region := mapRegion(t, pages*PageSize)
	tr := newTracker(t, region, 16*PageSize, KindUffd)
	var sink byte
	var want []uint32
	for p := uint32(16); p < pages; p += 3 {
		stamp(region, p)
		want = append(want, p)
		if p+1 < pages {
			sink += region[int(p+1)*PageSize] // the zero page; p+2 untouched
		}
	}
	expect(t, "grown", collect(t, tr, pages*PageSize), want)
	_ = sink
}

// TestWrittenSeesPagesCollectedAhead: CollectAhead reports the pages
// written so far and protects them again while the guest runs; Written
// (the machine's refresh of its copy of the region Asyncify borrows)
// must still report them until the next Collect, or that copy stays
// stale and is written back over the guest's data at the next pause.
func TestWrittenSeesPagesCollectedAhead(t *testing.T) {
	eachKernelTracker(t, 64, func(t *testing.T, region, image []byte, tr Tracker) {
		size := len(region)
		a, pk := tr.(Aheader), tr.(Peeker)
		tr.Collect(nil, uint64(size))
		for _, set := range [][]uint32{{40}, {40, 41, 42, 50, 51, 60}} {
			for _, p := range set {
				stamp(region, p)
			}
			got, ok, err := a.CollectAhead(nil, uint64(size), nil)
			if err != nil || !ok {
				t.Fatalf("CollectAhead: ok %v, %v", ok, err)
			}
			expect(t, "collected ahead", got, set)
			w, ok := pk.Written(nil, 32*PageSize, uint64(size))
			if !ok {
				t.Fatal("Written could not tell")
			}
			expect(t, "Written after CollectAhead", w, set)
			// Written before the range: nothing there.
			if w, _ := pk.Written(nil, 0, 32*PageSize); len(w) != 0 {
				t.Fatalf("Written of pages [0, 32): %v, want none", w)
			}
			got, err = tr.Collect(nil, uint64(size))
			if err != nil {
				t.Fatal(err)
			}
			expect(t, "Collect after it", got, nil)
			if w, _ := pk.Written(nil, 32*PageSize, uint64(size)); len(w) != 0 {
				t.Fatalf("Written after the Collect: %v, want none", w)
			}
		}
	})
}
