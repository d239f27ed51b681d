package dirty

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel ABI, defined here because distribution headers (and x/sys) may be
// older than the kernel. From include/uapi/linux/userfaultfd.h and
// include/uapi/linux/fs.h (PAGEMAP_SCAN, Linux 6.7).

const (
	uffdAPI          = 0xAA
	uffdUserModeOnly = 1 // userfaultfd(2) flag: no faults from kernel mode

	uffdFeatureWPUnpopulated = 1 << 13
	uffdFeatureWPAsync       = 1 << 15

	uffdioRegisterModeWP = 1 << 1

	uffdioWriteprotectModeWP = 1 << 0

	pageIsWritten = 1 << 1
	pageIsPresent = 1 << 3
	pageIsSwapped = 1 << 4
	pageIsPFNZero = 1 << 5
	pageIsHuge    = 1 << 6

	pmScanWPMatching   = 1 << 0 // write-protect the pages reported
	pmScanCheckWPAsync = 1 << 1 // fail (EPERM) on a VMA without async WP
)

type uffdioAPIArg struct{ api, features, ioctls uint64 }

type uffdioRange struct{ start, len uint64 }

type uffdioRegisterArg struct {
	rng    uffdioRange
	mode   uint64
	ioctls uint64
}

type uffdioWriteprotectArg struct {
	rng  uffdioRange
	mode uint64
}

type pmScanArg struct {
	size, flags, start, end, walkEnd, vec, vecLen, maxPages       uint64
	categoryInverted, categoryMask, categoryAnyofMask, returnMask uint64
}

type pageRegion struct{ start, end, categories uint64 }

// ioc encodes an ioctl number the way the generic asm/ioctl.h does
// (x86, arm64, riscv, loongarch, s390); dir 0 is _IO, 3 is _IOWR.
func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | typ<<8 | nr
}

var (
	uffdioAPI        = ioc(3, 0xAA, 0x3F, unsafe.Sizeof(uffdioAPIArg{}))
	uffdioRegister   = ioc(3, 0xAA, 0x00, unsafe.Sizeof(uffdioRegisterArg{}))
	uffdioWP         = ioc(3, 0xAA, 0x06, unsafe.Sizeof(uffdioWriteprotectArg{}))
	userfaultfdIoNew = ioc(0, 0xAA, 0x00, 0)
	pagemapScan      = ioc(3, 'f', 16, unsafe.Sizeof(pmScanArg{}))
)

// genericIoctl lists the architectures whose ioctl encoding ioc matches
// (powerpc and mips put the direction bits elsewhere).
func genericIoctl() bool {
	switch runtime.GOARCH {
	case "amd64", "386", "arm64", "arm", "riscv64", "loong64", "s390x":
		return true
	}
	return false
}

// ioctl passes arg, a pointer to a Go struct, to the kernel. The
// conversion to uintptr in the call itself is the form the unsafe rules
// allow: arg stays alive and in place for the call.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return 0, e
	}
	return r, nil
}

// An opener makes a userfaultfd one way. There are three because each can
// be refused on its own: the syscall by seccomp or by
// vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, the device by its
// file mode. User-mode-only is allowed to anyone and suffices, since
// asynchronous write faults are resolved without reaching the point where
// it matters, but it is tried last in case a kernel ever disagrees.
type opener struct {
	name string
	open func() (int, error)
}

const uffdFlags = unix.O_CLOEXEC | unix.O_NONBLOCK

var openers = []opener{
	{"userfaultfd(2)", func() (int, error) { return sysUserfaultfd(uffdFlags) }},
	{"/dev/userfaultfd", openDevice},
	{"userfaultfd(2) user-mode-only", func() (int, error) { return sysUserfaultfd(uffdFlags | uffdUserModeOnly) }},
}

func sysUserfaultfd(flags uintptr) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, flags, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

func openDevice() (int, error) {
	dev, err := unix.Open("/dev/userfaultfd", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(dev)
	fd, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), userfaultfdIoNew, uffdFlags)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// openUffd returns a userfaultfd with asynchronous write protection
// enabled, from the first opener that works.
func openUffd(ops []opener) (int, error) {
	var why []string
	for _, op := range ops {
		fd, err := op.open()
		if err != nil {
			why = append(why, op.name+": "+err.Error())
			continue
		}
		api := uffdioAPIArg{api: uffdAPI, features: uffdFeatureWPAsync | uffdFeatureWPUnpopulated}
		if _, err := ioctl(fd, uffdioAPI, unsafe.Pointer(&api)); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("UFFDIO_API asking for WP_ASYNC|WP_UNPOPULATED: %v (%s)", err, features(op))
		}
		return fd, nil
	}
	return -1, errors.New("no userfaultfd: " + strings.Join(why, "; "))
}

// features says what the kernel offers, on a fresh descriptor since one
// takes a single UFFDIO_API.
func features(op opener) string {
	fd, err := op.open()
	if err != nil {
		return "features unknown"
	}
	defer unix.Close(fd)
	api := uffdioAPIArg{api: uffdAPI}
	if _, err := ioctl(fd, uffdioAPI, unsafe.Pointer(&api)); err != nil {
		return "features unknown: " + err.Error()
	}
	var lack []string
	if api.features&uffdFeatureWPAsync == 0 {
		lack = append(lack, "WP_ASYNC")
	}
	if api.features&uffdFeatureWPUnpopulated == 0 {
		lack = append(lack, "WP_UNPOPULATED")
	}
	return fmt.Sprintf("kernel features %#x, lacking %s", api.features, strings.Join(lack, ", "))
}

// testAfterScan, if set, runs after each PAGEMAP_SCAN call: tests write
// pages there to race with Collect deterministically.
var testAfterScan func()

// testAfterProtect, if set, runs after a Collect with hot pages protected
// the cooled ones.
var testAfterProtect func()

// scanRegions is the output buffer of one PAGEMAP_SCAN call (24 KiB): a
// bigger one saves calls only when dirty pages form over 1024 separate
// runs, and then the walk resumes where it stopped.
const scanRegions = 1024

// uffdTracker is the kernel tracker. The kernel counts a page as written
// when it is not write-protected, and that includes pages never touched
// and never protected (no page table entry yet): so every page must be
// protected once before its first scan, or it would be reported whether
// written or not. [base, armed) is the part protected so far; Collect
// arms the rest as usedBytes grows.
type uffdTracker struct {
	mu      sync.Mutex
	region  []byte
	base    uintptr
	armed   uintptr
	uffd    int
	pagemap int
	sysPage uint64
	arg     pmScanArg
	buf     []pageRegion
	closed  bool
	// hot is non-nil with Options.HotPages (and 4 KiB system pages).
	hot   *hotState
	spans [][2]uint32
	// gen counts Collects; pending are the pages the last one, if
	// deferred, left for Rearm to protect; carry are pages to report at
	// the next Collect (written while Rearm protected them).
	gen     uint64
	pending []uint32
	carry   []uint32
	// collected is when the last Collect ended (Warm skips its walk
	// shortly after one).
	collected time.Time
	// ahead are the pages the last CollectAhead reported (sorted), for
	// the next Collect's hot-page streaks; the next Collect clears them.
	ahead []uint32
	// peekLo, peekHi span the pages Written was asked about since the
	// last Collect: a pending page there may have been reported to a
	// consumer that copied it then, so its Rearm must carry it whatever
	// the Collect's copy says (peekHi == 0: none).
	peekLo, peekHi uint32
	// fresh are the ranges of pages [lo, hi) of [0, armed), sorted, made
	// of whole huge-page slots, that held no memory when they came into
	// use and are not protected (fresh_linux.go); slotOff is the first page on
	// a slot boundary, and hasFresh says whether slots are tracked so
	// (4 KiB system pages). freshNext, armedBuf and runBuf are scratch.
	fresh     [][2]uint32
	freshNext [][2]uint32
	armedBuf  [][2]uint32
	runBuf    [][2]uint32
	slotOff   uint32
	hasFresh  bool
	// anonFrom is the first page past Options.FileBacked.
	anonFrom uint32
}

func newUffd(region []byte, opts Options) (_ *uffdTracker, err error) {
	if !genericIoctl() {
		return nil, fmt.Errorf("userfaultfd: ioctl encoding of %s not supported", runtime.GOARCH)
	}
	sysPage := uint64(os.Getpagesize())
	// Only the region's address is taken: it is memory outside the Go heap
	// that the kernel is told to watch.
	base := uintptr(unsafe.Pointer(unsafe.SliceData(region)))
	if uint64(base)%sysPage != 0 {
		return nil, fmt.Errorf("userfaultfd: region at %#x is not page-aligned", base)
	}
	length := (uint64(len(region)) + sysPage - 1) &^ (sysPage - 1)
	t := &uffdTracker{region: region, base: base, armed: base, uffd: -1, pagemap: -1,
		sysPage: sysPage, buf: make([]pageRegion, scanRegions)}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	if opts.failAt == "open" {
		return nil, errors.New("userfaultfd: injected failure")
	}
	if t.uffd, err = openUffd(openers); err != nil {
		return nil, fmt.Errorf("userfaultfd: %w", err)
	}
	if !opts.keepHuge && HugePagesCoarsen() {
		// Ignored if it fails: huge pages only coarsen the tracking.
		// (The kernel rounds the length up to whole pages.)
		unix.Madvise(region, unix.MADV_NOHUGEPAGE)
	}
	reg := uffdioRegisterArg{rng: uffdioRange{uint64(base), length}, mode: uffdioRegisterModeWP}
	if opts.failAt == "register" {
		reg.rng.start++ // EINVAL: unaligned
	}
	if _, err = ioctl(t.uffd, uffdioRegister, unsafe.Pointer(&reg)); err != nil {
		return nil, fmt.Errorf("userfaultfd: UFFDIO_REGISTER write-protect of %d bytes at %#x: %w", length, base, err)
	}
	if t.pagemap, err = unix.Open("/proc/self/pagemap", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		return nil, fmt.Errorf("PAGEMAP_SCAN: /proc/self/pagemap: %w", err)
	}
	if sysPage == PageSize {
		t.hasFresh = true
		t.slotOff = uint32((slotSize-base%slotSize)%slotSize) / PageSize
		t.anonFrom = uint32(min((opts.FileBacked+PageSize-1)/PageSize, uint64(len(region)/PageSize)))
	}
	// The baseline: protect what is in use now, reporting nothing, but
	// for the slots that hold no memory yet. This is also the probe for
	// PAGEMAP_SCAN (ENOTTY before Linux 6.7).
	end := t.roundUp(opts.Used)
	if opts.failAt == "scan" {
		err = t.scanFlags(base+1, base+uintptr(sysPage), pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, nil) // EINVAL: unaligned
	} else {
		err = t.arm(0, t.page(end), pageIsWritten, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("PAGEMAP_SCAN: %w", err)
	}
	t.armed = end
	if opts.HotPages && sysPage == PageSize {
		t.hot = &hotState{}
	}
	return t, nil
}

// KeepHot implements Keeper.
func (t *uffdTracker) KeepHot(from, to uint32) {
	if t.hot == nil {
		return
	}
	t.mu.Lock()
	t.hot.keepLo, t.hot.keepHi = from, max(from, to)
	t.mu.Unlock()
}

// roundUp is the address that ends the first n bytes, in system pages.
func (t *uffdTracker) roundUp(n uint64) uintptr {
	return t.base + uintptr((n+t.sysPage-1)&^(t.sysPage-1))
}

func (t *uffdTracker) Kind() string   { return KindUffd }
func (t *uffdTracker) Reason() string { return "" }

// Close closes the userfaultfd, which unregisters the region: pages keep
// their contents and become writable without faults.
func (t *uffdTracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	var errs []error
	for _, fd := range []int{t.uffd, t.pagemap} {
		if fd >= 0 {
			errs = append(errs, unix.Close(fd))
		}
	}
	return errors.Join(errs...)
}

func (t *uffdTracker) Collect(dst []uint32, usedBytes uint64) ([]uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.collect(dst, usedBytes, false)
}

// CollectAhead implements Aheader.
func (t *uffdTracker) CollectAhead(dst []uint32, usedBytes uint64, use func(region []byte, pages []uint32)) ([]uint32, bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return dst, false, ErrClosed
	}
	if len(t.pending) > 0 || t.ahead != nil {
		return dst, false, nil
	}
	if t.hot != nil {
		t.hot.refill() // as Warm does
	}
	pages, err := checkUsed(usedBytes, len(t.region))
	if err != nil {
		return dst, false, err
	}
	limit := uint64(pages)
	end := min(t.roundUp(limit*PageSize), t.armed)
	start := len(dst)
	emit := func(r []pageRegion) { dst = t.appendPages(dst, r, limit) }
	if t.hot == nil {
		err = t.scanArmed(0, t.page(end), pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, emit)
	} else {
		// Around the hot pages: they stay writable, compared by content
		// at the next Collect.
		var few bool
		t.spans, few = t.hot.spansWithout(t.spans[:0], 0, uint32((end-t.base)/PageSize), maxProtectCalls, true)
		if few {
			for _, s := range t.spans {
				if err = t.scanArmed(s[0], s[1], pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, emit); err != nil {
					break
				}
			}
		} else {
			dst, err = t.aheadAmidHot(dst, end, limit)
		}
	}
	if err == nil {
		// Fresh slots the guest wrote since the last Collect, armed now
		// and copied ahead with the rest.
		n := len(dst)
		if dst, err = t.absorb(dst, uint32(limit)); len(dst) > n {
			slices.Sort(dst[start:])
		}
	}
	if err != nil {
		// What was reported is protected again: the next Collect must
		// report it, as the caller does not copy it.
		t.carry = append(t.carry, dst[start:]...)
		return dst[:start], false, err
	}
	t.ahead = append(make([]uint32, 0, len(dst)-start), dst[start:]...)
	t.collected = time.Now() // the page tables are cached now
	if use != nil {
		use(t.region, dst[start:])
	}
	return dst, true, nil
}

// aheadAmidHot is CollectAhead's walk when hot pages lie in too many runs
// to walk around: one walk that only reports, then the pages it reported
// that are not hot are protected, one run at a time if they form few runs,
// else in one walk over their span, which also protects the hot pages
// there (each faults once at its next write and stays hot) and reports
// the pages written since the first walk, which are added. Pages are
// copied only after all this, so a write after the first walk is either
// in the copy or faults and is reported again.
func (t *uffdTracker) aheadAmidHot(dst []uint32, end uintptr, limit uint64) ([]uint32, error) {
	h := t.hot
	start := len(dst)
	h.written = h.written[:0]
	if err := t.scanArmed(0, t.page(end), pmScanCheckWPAsync, pageIsWritten, func(r []pageRegion) {
		h.written = t.appendPages(h.written, r, limit)
	}); err != nil {
		return dst, err // nothing protected
	}
	for _, p := range h.written {
		if !h.isHot(p) {
			dst = append(dst, p)
		}
	}
	mine := dst[start:]
	if len(mine) == 0 {
		return dst, nil
	}
	if runs(mine) <= maxProtectCalls {
		return dst, t.protectRuns(mine)
	}
	from, to := mine[0], mine[len(mine)-1]+1
	n := len(dst)
	err := t.scanArmed(from, to, pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, func(r []pageRegion) {
		for _, p := range t.appendPages(nil, r, limit) {
			if _, ok := slices.BinarySearch(dst[start:n], p); !ok && !h.isHot(p) {
				dst = append(dst, p)
			}
		}
	})
	if len(dst) > n {
		slices.Sort(dst[start:])
	}
	return dst, err
}

// CollectDeferred implements Deferrer.
func (t *uffdTracker) CollectDeferred(dst []uint32, usedBytes uint64) ([]uint32, uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	dst, err := t.collect(dst, usedBytes, true)
	return dst, t.gen, err
}

func (t *uffdTracker) collect(dst []uint32, usedBytes uint64, deferred bool) ([]uint32, error) {
	if t.closed {
		return dst, ErrClosed
	}
	defer func() { t.collected = time.Now() }()
	pages, err := checkUsed(usedBytes, len(t.region))
	if err != nil {
		return dst, err
	}
	// Pages a previous CollectDeferred left writable and nobody re-armed
	// are still written to the kernel: the scan reports them again.
	t.pending = t.pending[:0]
	t.peekLo, t.peekHi = 0, 0
	t.gen++
	ahead := t.ahead
	t.ahead = nil
	start := len(dst)
	limit := uint64(pages)
	end := t.roundUp(limit * PageSize)
	if t.hot != nil {
		if dst, err = t.collectHot(dst, limit, min(end, t.armed), deferred, ahead); err != nil {
			// Forgetting the hot pages is safe: left writable, they
			// show as written until protected again.
			t.hot.reset()
			return dst, err
		}
	} else {
		// The armed part: the kernel's fast path, written pages only,
		// protected in the same walk unless deferred.
		flags := uint64(pmScanWPMatching | pmScanCheckWPAsync)
		if deferred {
			flags = pmScanCheckWPAsync
		}
		if err := t.scanArmed(0, t.page(min(end, t.armed)), flags, pageIsWritten, func(r []pageRegion) {
			dst = t.appendPages(dst, r, limit)
		}); err != nil {
			return dst, err
		}
		if deferred {
			t.pending = append(t.pending, dst[start:]...)
		}
	}
	n := len(dst)
	if dst, err = t.absorb(dst, uint32(limit)); err != nil {
		return dst, err
	}
	if len(t.carry) > 0 || len(dst) > n {
		// Written while a Rearm protected them, or in fresh slots:
		// reported now, in order.
		dst = append(dst, t.carry...)
		slices.Sort(dst[start:])
		dst = dst[:start+len(slices.Compact(dst[start:]))]
		t.carry = t.carry[:0]
	}
	if end <= t.armed {
		return dst, nil
	}
	// The part newly in use: unprotected throughout, so all "written" to
	// the kernel. Report only pages that hold memory other than the shared
	// zero page (the rest read as zeros, as the baseline says), and
	// protect them all, holes included, in the same walk (not deferred:
	// it happens only when the memory grows), but for the slots that hold
	// no memory at all, which stay fresh.
	err = t.arm(t.page(t.armed), t.page(end), holdsMask, func(r []pageRegion) {
		dst = t.appendHolding(dst, r, limit)
	})
	if err == nil {
		t.armed = end
	}
	return dst, err
}

// Warm implements Warmer: a walk of the armed part that neither protects
// nor keeps what it finds. A tracker busy with a Collect or a Rearm is
// left alone: waiting for it would hold up the caller (Remus's loop) for
// no gain.
func (t *uffdTracker) Warm(usedBytes uint64) {
	if !t.mu.TryLock() {
		return
	}
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	if t.hot != nil {
		t.hot.refill() // while the guest runs: the pause's promotions take these
	}
	if time.Since(t.collected) < WarmAfter {
		return
	}
	pages, err := checkUsed(usedBytes, len(t.region))
	if err != nil {
		return
	}
	end := min(t.roundUp(uint64(pages)*PageSize), t.armed)
	_ = t.scanArmed(0, t.page(end), pmScanCheckWPAsync, pageIsWritten, func([]pageRegion) {})
}

// Rearm implements Deferrer.
func (t *uffdTracker) Rearm(gen uint64, copyOf func(page uint32) []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	if gen != t.gen || len(t.pending) == 0 {
		return nil // a later Collect reported them again
	}
	pend := t.pending
	t.pending = t.pending[:0]
	var err error
	if runs(pend) <= maxProtectCalls {
		err = t.protectRuns(pend)
	} else {
		// One walk over their span. It protects whatever is written
		// there: a page it finds that is neither pending nor hot was
		// written since the Collect, and is reported next time.
		from, to := pend[0], pend[len(pend)-1]+1
		err = t.scanArmed(from, to, pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, func(r []pageRegion) {
			for _, x := range r {
				lo, hi := uint32((x.start-uint64(t.base))/PageSize), uint32((x.end-uint64(t.base))/PageSize)
				for p := lo; p < hi; p++ {
					if _, ok := slices.BinarySearch(pend, p); !ok && (t.hot == nil || !t.hot.isHot(p)) {
						t.carry = append(t.carry, p)
					}
				}
			}
		})
	}
	if err != nil {
		// Some may be protected with writes since the Collect unseen:
		// report them all again.
		t.carry = append(t.carry, pend...)
		return err
	}
	// Protected now: a write from here on is the kernel's to see. One
	// before it shows as a difference from the caller's copy, unless it
	// put back what that copy holds after Written reported the page to
	// someone who copied it in between: pages Written was asked about are
	// carried in any case.
	for _, p := range pend {
		o := int(p) * PageSize
		if c := copyOf(p); c == nil || (p >= t.peekLo && p < t.peekHi) || !bytes.Equal(c, t.region[o:o+PageSize]) {
			t.carry = append(t.carry, p)
		}
	}
	return nil
}

// collectHot is Collect's armed part, [base, armedEnd), with hot pages.
// It protects the hot pages that cooled first, so that a write to one
// after that is seen by the kernel. Then, if the hot pages form few runs,
// it asks the kernel as without them — report and protect in one walk —
// over each span between them; the hot pages themselves are compared by
// hash. If they form many runs, it asks the kernel without protecting,
// over everything at once, and protects afterwards only what it reported
// and did not promote. Protecting after reporting loses nothing: a write
// in between lands in a page the caller copies afterwards.
func (t *uffdTracker) collectHot(dst []uint32, limit uint64, armedEnd uintptr, deferred bool, ahead []uint32) ([]uint32, error) {
	h := t.hot
	start := len(dst)
	h.protect = h.cooled(h.protect[:0])
	if err := t.protectRuns(h.protect); err != nil {
		return dst, err
	}
	if testAfterProtect != nil {
		testAfterProtect()
	}
	page := func(p uint32) []byte {
		o := int(p) * PageSize
		return t.region[o : o+PageSize]
	}
	h.written = h.written[:0]
	emit := func(r []pageRegion) { h.written = t.appendPages(h.written, r, limit) }
	var few bool
	if !deferred {
		t.spans, few = h.spansWithout(t.spans[:0], 0, uint32((armedEnd-t.base)/PageSize), maxProtectCalls, false)
	}
	if few {
		for _, s := range t.spans {
			if err := t.scanArmed(s[0], s[1], pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, emit); err != nil {
				return dst, err
			}
		}
		// All that classify would protect is protected (the pages it
		// promotes too: each faults once more, then stays writable).
		return h.classify(dst, limit, page, ahead), nil
	}
	if err := t.scanArmed(0, t.page(armedEnd), pmScanCheckWPAsync, pageIsWritten, emit); err != nil {
		return dst, err
	}
	dst = h.classify(dst, limit, page, ahead)
	if deferred {
		t.pending = append(t.pending, h.protect...)
		return dst, nil
	}
	if len(h.protect) == 0 {
		return dst, nil
	}
	if runs(h.protect) <= maxProtectCalls {
		return dst, t.protectRuns(h.protect)
	}
	// Many runs of both: protect in one walk over the span the reported
	// pages cover, hot pages included (one protected so faults once on
	// its next write, and stays hot). The walk protects whatever is
	// written there, so it must also report a page written since the
	// kernel was asked above and not reported yet (only a writer racing
	// with Collect does that).
	from, to := h.protect[0], h.protect[len(h.protect)-1]+1
	reported := dst[start:]
	h.written = h.written[:0]
	err := t.scanArmed(from, to, pmScanWPMatching|pmScanCheckWPAsync, pageIsWritten, func(r []pageRegion) {
		for _, p := range t.appendPages(nil, r, limit) {
			if _, ok := slices.BinarySearch(reported, p); !ok && !h.isHot(p) {
				h.written = append(h.written, p)
			}
		}
	})
	if err != nil {
		return dst, err
	}
	if len(h.written) > 0 {
		dst = append(dst, h.written...)
		slices.Sort(dst[start:])
	}
	return dst, nil
}

// protectRuns write-protects the listed pages (sorted), one
// UFFDIO_WRITEPROTECT per run of consecutive pages.
func (t *uffdTracker) protectRuns(pages []uint32) error {
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && pages[j] == pages[j-1]+1 {
			j++
		}
		arg := uffdioWriteprotectArg{
			rng:  uffdioRange{uint64(t.base) + uint64(pages[i])*PageSize, uint64(j-i) * PageSize},
			mode: uffdioWriteprotectModeWP,
		}
		_, err := ioctl(t.uffd, uffdioWP, unsafe.Pointer(&arg))
		for tries := 0; (err == unix.EAGAIN || err == unix.EINTR) && tries < 100; tries++ {
			// EAGAIN: the address space is changing under a
			// concurrent mremap or fork; it is brief.
			_, err = ioctl(t.uffd, uffdioWP, unsafe.Pointer(&arg))
		}
		if err != nil {
			return fmt.Errorf("UFFDIO_WRITEPROTECT of pages [%d, %d): %w", pages[i], pages[j-1]+1, err)
		}
		i = j
	}
	return nil
}

// appendPages appends the 4 KiB page indices of runs, below limit pages.
func (t *uffdTracker) appendPages(dst []uint32, runs []pageRegion, limit uint64) []uint32 {
	for _, r := range runs {
		lo := (r.start - uint64(t.base)) / PageSize
		hi := min((r.end-uint64(t.base))/PageSize, limit)
		for i := lo; i < hi; i++ {
			dst = append(dst, uint32(i))
		}
	}
	return dst
}

// Written implements Peeker: every page of [from, to) that may have been
// written since the last Collect — written to the kernel, collected ahead,
// carried by a Rearm, or hot — without protecting anything (PAGEMAP_SCAN with no
// write-protect flag).
func (t *uffdTracker) Written(dst []uint32, from, to uint64) ([]uint32, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	start, end := t.base+uintptr(from&^(PageSize-1)), t.roundUp(to)
	if t.closed || end > t.armed || start >= end {
		return dst, false // not armed there: everything counts as written
	}
	limit := (to + PageSize - 1) / PageSize
	first := len(dst)
	err := t.scanFlags(start, end, 0, pageIsWritten, func(r []pageRegion) {
		dst = t.appendPages(dst, r, limit)
	})
	// Pages a Rearm protected after they were written are protected to
	// the kernel but written all the same: the next Collect reports them
	// (carry), and so must this. So may hot pages be (a Rearm's walk
	// protects them too, and Collect finds their change by hash): being
	// hot, they are taken as written.
	lo := uint32(from / PageSize)
	if hi := uint32(limit); t.peekHi == 0 {
		t.peekLo, t.peekHi = lo, hi
	} else {
		t.peekLo, t.peekHi = min(t.peekLo, lo), max(t.peekHi, hi)
	}
	added := false
	// Pages a CollectAhead reported and protected again since the last
	// Collect: written since it all the same.
	i, _ := slices.BinarySearch(t.ahead, lo)
	for ; i < len(t.ahead) && uint64(t.ahead[i]) < limit; i++ {
		dst = append(dst, t.ahead[i])
		added = true
	}
	for _, p := range t.carry {
		if p >= lo && uint64(p) < limit {
			dst = append(dst, p)
			added = true
		}
	}
	if t.hot != nil {
		for _, h := range t.hot.hot {
			if h.idx >= lo && uint64(h.idx) < limit {
				dst = append(dst, h.idx)
				added = true
			}
		}
	}
	if added {
		slices.Sort(dst[first:])
		dst = dst[:first+len(slices.Compact(dst[first:]))]
	}
	return dst, err == nil
}

// scanFlags runs PAGEMAP_SCAN over [start, end) for the pages written
// since they were last write-protected, with the categories in returnMask.
// With pmScanWPMatching it protects them in the same walk under the
// page-table lock, so a concurrent write either happened before (and is
// reported) or faults after (and is reported next time). emit gets each
// batch; with a nil emit the scan only protects. The walk stops early when
// the buffer fills and resumes from walk_end.
func (t *uffdTracker) scanFlags(start, end uintptr, flags, returnMask uint64, emit func([]pageRegion)) error {
	return t.scanCat(start, end, flags, pageIsWritten, 0, returnMask, emit)
}

// scanCat is PAGEMAP_SCAN over [start, end) for the pages in every category
// of all and (if any is not 0) in one of any.
func (t *uffdTracker) scanCat(start, end uintptr, flags, all, any, returnMask uint64, emit func([]pageRegion)) error {
	for start < end {
		t.arg = pmScanArg{
			size:              uint64(unsafe.Sizeof(pmScanArg{})),
			flags:             flags,
			start:             uint64(start),
			end:               uint64(end),
			categoryMask:      all,
			categoryAnyofMask: any,
			returnMask:        returnMask,
		}
		if emit != nil {
			t.arg.vec = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(t.buf))))
			// A range of n pages holds at most n/2+1 runs of written
			// pages: ask for no more room (pages of other categories
			// side by side may make more regions; a full buffer then
			// resumes below). The kernel allocates a buffer as long (up
			// to 512 regions, 12 KiB) for every call; for the scratch
			// region's 64 pages, each pause, that allocation was a
			// third of Written's time and most of its tail.
			t.arg.vecLen = min(uint64(len(t.buf)), uint64((end-start)/PageSize/2+1))
		}
		n, err := ioctl(t.pagemap, pagemapScan, unsafe.Pointer(&t.arg))
		runtime.KeepAlive(t.buf) // the kernel wrote into it through arg.vec
		if testAfterScan != nil {
			testAfterScan()
		}
		if err != nil {
			// Pages already reported were also protected again: hand
			// them over rather than lose them. The kernel fills the
			// buffer in order and it was zero before.
			k := 0
			for emit != nil && k < len(t.buf) && t.buf[k].end != 0 {
				k++
			}
			if k > 0 {
				start = max(start, uintptr(t.buf[k-1].end))
				emit(t.buf[:k])
				clear(t.buf[:k])
			}
			if err == unix.EINTR { // only for a fatal signal, but harmless
				continue
			}
			return err
		}
		if emit == nil || n < uintptr(t.arg.vecLen) {
			// Only a full buffer (as long as asked for, not t.buf)
			// stops the walk early. (walk_end is
			// not to be trusted otherwise: Linux 6.18 leaves it at
			// the last internal chunk's stop, mid-range, when the
			// walk went on to the end.)
			if emit != nil {
				emit(t.buf[:n])
				clear(t.buf[:n])
			}
			return nil
		}
		// Resume after both walk_end and the last page reported, so
		// that the result stays sorted and free of repeats even if
		// walk_end is stale as above.
		next := max(uintptr(t.arg.walkEnd), uintptr(t.buf[n-1].end))
		emit(t.buf[:n])
		clear(t.buf[:n])
		if next <= start {
			return fmt.Errorf("PAGEMAP_SCAN made no progress at %#x", start)
		}
		start = next
	}
	return nil
}

func probe() error {
	size := 4 * os.Getpagesize()
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return err
	}
	defer unix.Munmap(m)
	t, err := newUffd(m, Options{Used: uint64(size)})
	if err != nil {
		return err
	}
	m[PageSize] = 1
	got, err := t.Collect(nil, uint64(size))
	t.Close()
	if err != nil {
		return err
	}
	if len(got) != 1 || got[0] != 1 {
		return fmt.Errorf("PAGEMAP_SCAN reported pages %v after a write to page 1", got)
	}
	return nil
}

// HugePagesCoarsen reports whether transparent huge pages would coarsen the
// kernel tracker here: whether a write to a write-protected huge page
// leaves the whole 2 MiB writable, and reported, rather than only the
// 4 KiB page written. Linux splits the huge page at such a write under
// asynchronous write protection, and tracking stays per 4 KiB (6.18 does);
// a kernel that did not would have New mark its regions MADV_NOHUGEPAGE,
// and the machine leave its memory in small pages. It is found out once
// per process, on a mapping of its own; false where the kernel tracker
// does not work or grants no huge page (nothing to coarsen).
func HugePagesCoarsen() bool {
	hugeOnce.Do(func() { hugeCoarse, hugeWhy = probeHuge() })
	return hugeCoarse
}

var (
	hugeOnce   sync.Once
	hugeCoarse bool
	hugeWhy    string // what probeHuge saw, for tests
)

// probeHuge write-protects one transparent huge page with the kernel
// tracker, writes a byte into its fourth 4 KiB page and reports whether
// more than that page came back as written.
func probeHuge() (coarse bool, why string) {
	const huge = 2 << 20
	raw, err := unix.Mmap(-1, 0, 2*huge, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return false, "mmap: " + err.Error()
	}
	defer unix.Munmap(raw)
	off := (huge - int(uintptr(unsafe.Pointer(&raw[0]))%huge)) % huge
	m := raw[off : off+huge : off+huge]
	if err := unix.Madvise(m, unix.MADV_HUGEPAGE); err != nil {
		return false, "MADV_HUGEPAGE: " + err.Error()
	}
	m[0] = 1 // faulted in whole, if the kernel grants a huge page
	t, err := newUffd(m, Options{Used: huge, keepHuge: true})
	if err != nil {
		return false, err.Error()
	}
	defer t.Close()
	// Armed now: nothing is written, so a scan for present pages (no
	// write-protect flag) tells whether the page is huge.
	var isHuge bool
	t.arg = pmScanArg{size: uint64(unsafe.Sizeof(pmScanArg{})), start: uint64(t.base), end: uint64(t.base) + huge,
		vec: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(t.buf)))), vecLen: uint64(len(t.buf)),
		categoryMask: pageIsPresent, returnMask: pageIsHuge}
	n, err := ioctl(t.pagemap, pagemapScan, unsafe.Pointer(&t.arg))
	runtime.KeepAlive(t.buf)
	if err != nil {
		return false, "PAGEMAP_SCAN: " + err.Error()
	}
	for _, r := range t.buf[:n] {
		isHuge = isHuge || r.categories&pageIsHuge != 0
	}
	clear(t.buf[:n])
	if !isHuge {
		return false, "no transparent huge page granted"
	}
	m[3*PageSize] = 1
	got, err := t.Collect(nil, huge)
	if err != nil {
		return false, "Collect: " + err.Error()
	}
	if len(got) == 1 && got[0] == 3 {
		return false, "a write splits the huge page: tracked per 4 KiB"
	}
	return true, fmt.Sprintf("a write to one 4 KiB page of a write-protected huge page reported %d pages", len(got))
}
