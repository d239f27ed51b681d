// Package dirty tells which 4 KiB pages of a memory region were written
// since the last look: the user-space analogue of KVM's dirty log, used to
// checkpoint, migrate and replicate a running guest by copying only what
// changed.
//
// Two trackers implement it:
//
//   - "uffd-wp": the kernel's own write tracking. The region is registered
//     with a userfaultfd in asynchronous write-protect mode, so the first
//     write to a protected page costs one minor fault that the kernel
//     resolves by itself (no handler thread), and the PAGEMAP_SCAN ioctl
//     on /proc/self/pagemap reports the written pages and write-protects
//     them again in the same page-table walk. Every writer counts: guest
//     code, host Go code and the kernel (read(2) into the region).
//   - "hash": the fallback where the kernel lacks the above (before Linux
//     6.7, or userfaultfd forbidden by seccomp or permissions). It keeps a
//     64-bit hash per page (8 B/page) and reports pages whose contents
//     changed. Writes that leave a page as it was are not reported, which
//     is all a checkpoint needs.
//
// Two refinements of the kernel tracker, for a machine with shadow paging
// (a software hypervisor, as on this project's hosts), where changing a
// page-table entry is dear: a write fault costs 10–18 µs, and protecting
// 760 scattered pages again takes 860 µs of a 950 µs Collect.
//
//   - Hot pages (Options.HotPages, hot.go): a page written in three
//     Collects in a row is left writable and compared by hash instead, so
//     a guest's working set costs no faults; only where writes repeat far
//     more often than chance would have it.
//   - Deferred re-arming (Deferrer): a checkpoint collects without
//     protecting, copies the pages while the guest is paused, and protects
//     them after it runs again, comparing each with its copy to catch a
//     write in between. The pause keeps only the cheap read-only walk.
//   - Collecting ahead (Aheader): a checkpoint with many dirty pages
//     collects and copies most of them while the guest still runs, and
//     the pause copies only the pages written after that.
//   - Fresh slots (fresh_linux.go): memory that holds nothing yet, in
//     whole 2 MiB slots, is left unprotected until it does, so that a
//     growing heap's first writes fault once per huge page rather than
//     twice per 4 KiB page; a full copy skips it (Holer).
//
// The baseline. New takes the region's contents as the starting point: the
// first Options.Used bytes as they are, and every page past them as zero,
// which is what the untouched part of a fresh anonymous reservation holds
// (a wasm memory's reservation beyond its current size). A consumer that
// copies [0, Used) at New and then, after every Collect, copies the pages
// it reported holds an exact image of [0, usedBytes), provided it copies
// them after Collect returns and treats never-reported pages as the zeros
// (or older contents) it already has.
//
// What is not tracked: pages discarded with madvise(MADV_DONTNEED) or
// remapped (their contents become zero without a write), and device DMA
// into pages pinned before a Collect (O_DIRECT, io_uring fixed buffers)
// that completes after it. ftvm does neither to guest memory.
package dirty

import (
	"errors"
	"fmt"
	"time"
)

// PageSize is the tracking granularity: indices count 4 KiB pages from
// the start of the region, whatever the system page size.
const PageSize = 4096

// Tracker kinds, as returned by Kind.
const (
	KindUffd = "uffd-wp"
	KindHash = "hash"
)

// ErrClosed is returned by Collect after Close.
var ErrClosed = errors.New("dirty: tracker closed")

// Tracker reports the pages of a region written since the previous Collect.
// Its methods are safe for concurrent use; Collect calls are serialised.
type Tracker interface {
	// Collect appends to dst (pass dst[:0] to reuse it) the indices, in
	// increasing order, of the 4 KiB pages in [0, usedBytes) written
	// since the last Collect (or since New), and re-arms tracking for
	// them atomically with respect to the scan: a write racing with
	// Collect is in this result or the next, never lost. usedBytes is the
	// part of the region in use now (a guest memory's current size); it
	// may grow between calls and is rounded up to whole pages. A page
	// written while outside usedBytes is reported once usedBytes covers
	// it. On error the tracking state is unknown: the caller should take
	// a full copy.
	Collect(dst []uint32, usedBytes uint64) ([]uint32, error)
	// Kind is KindUffd or KindHash.
	Kind() string
	// Reason says why the hash fallback was chosen; "" for KindUffd.
	Reason() string
	// Close stops tracking and releases the kernel objects. The region
	// itself stays mapped and writable. Close is idempotent.
	Close() error
}

// Peeker is implemented by trackers that can say which pages of a range
// may have been written since the last Collect, without re-arming anything
// (the userfaultfd tracker): the machine uses it to refresh its copy of
// the region it borrows for Asyncify's stack by the pages the guest
// changed, not all of it, so a page written and left out would have that
// copy written back over it. ok is false when it cannot tell (then assume
// all).
type Peeker interface {
	Written(dst []uint32, from, to uint64) (pages []uint32, ok bool)
}

// Warmer is implemented by trackers whose Collect walks the region's page
// tables (the userfaultfd tracker). Warm does that walk without reporting
// or protecting anything, so that the walk of a Collect soon after finds
// the page tables in the CPU's caches: called while the guest runs, just
// before a pause, it moves about half of the pause's walk out of it
// (measured here for 256 MiB, 25 ms after the previous Collect: 215 µs
// cold, 90–119 µs after a Warm on another thread). It does nothing within
// WarmAfter of a Collect, when the tables are still cached, nor while the
// tracker is busy (it never waits).
type Warmer interface {
	Warm(usedBytes uint64)
}

// Holer is implemented by trackers that know parts of the region that hold
// no memory at all (the kernel tracker's fresh slots): they read as zeros,
// and reading them would only make the kernel allocate memory for them
// (on a VM with shadow paging, 7–30 µs a page). Holes appends those ranges
// of pages, [lo, hi), below usedBytes, as they are at the call: a full copy
// of a paused guest's memory skips them.
type Holer interface {
	Holes(dst [][2]uint32, usedBytes uint64) ([][2]uint32, error)
}

// WarmAfter is how long after a Collect a Warm starts doing its walk.
const WarmAfter = 5 * time.Millisecond

// Deferrer is implemented by trackers that can leave re-arming the pages a
// Collect reports for later, out of a pause: the userfaultfd tracker,
// where write-protecting them again is most of a Collect's time (860 µs of
// 950 for 760 scattered pages on a VM with shadow paging: each changed
// page-table entry must be flushed) while finding them is cheap.
type Deferrer interface {
	// CollectDeferred is Collect, except that the pages it reports are
	// left writable: writes to them are not seen until Rearm. gen names
	// this Collect for Rearm.
	CollectDeferred(dst []uint32, usedBytes uint64) (pages []uint32, gen uint64, err error)
	// Rearm protects the pages Collect gen reported, then compares each
	// with copyOf(page), the caller's copy of it taken before the region
	// was written again (nil if none): a page that differs was written
	// in between, and the next Collect reports it. It may run while the
	// region is being written. A Rearm that comes after a later Collect
	// does nothing (that Collect reported the pages again, still
	// writable); so does one that never comes.
	Rearm(gen uint64, copyOf func(page uint32) []byte) error
}

// Aheader is implemented by trackers that can collect while the region is
// being written (the userfaultfd tracker): the pages written so far are
// reported and write-protected in one walk, so a copy taken of them
// afterwards is either final or superseded by the next Collect, which
// reports every page written since. A checkpoint of a guest that writes
// many pages an epoch thus copies most of them before the pause, and the
// pause copies only the pages written in between.
type Aheader interface {
	// CollectAhead reports, like Collect, the pages written since the
	// last Collect and protects them, except pages the next Collect
	// watches by content (hot pages) and pages of memory grown since
	// (those stay for the next Collect). It calls use with the region
	// and the pages (appended to dst) while the region cannot be
	// unmapped: use copies them. ok is false when it did nothing (a
	// Deferrer's pages not re-armed yet, an earlier CollectAhead not
	// followed by a Collect, hot pages in too many runs). The next
	// Collect reports only what was written after; CollectAhead reports
	// nothing it reported already.
	CollectAhead(dst []uint32, usedBytes uint64, use func(region []byte, pages []uint32)) (pages []uint32, ok bool, err error)
}

// Keeper is implemented by trackers with hot pages (the userfaultfd
// tracker with Options.HotPages). KeepHot names the pages [from, to) that
// the caller itself writes before every Collect and puts back afterwards:
// the region the machine borrows for the unwound stack at every pause.
// Watched by write protection, such a page faults at every pause, and
// cools again and again as the caller puts its contents back (16 quiet
// Collects), costing three faults per return to hot: on a VM with shadow
// paging, 45 µs each, inside the pause. Kept pages are promoted the first
// time a Collect reports them, whatever their streak or the room left,
// and stay hot (compared by content) until a later KeepHot leaves them
// out. A call replaces the range; from == to keeps none.
type Keeper interface {
	KeepHot(from, to uint32)
}

// Options tune New.
type Options struct {
	// Used is the number of bytes at the start of the region in use at
	// New, whose contents form the baseline; pages past it are taken to
	// be zero (see the package doc).
	Used uint64
	// ForceHash selects the hash fallback even where the kernel tracker
	// works, for tests and benchmarks.
	ForceHash bool
	// HotPages lets the kernel tracker leave pages written in several
	// Collects in a row writable and watch their contents instead (see
	// hot.go): it saves a write fault per such page per Collect, and
	// requires the caller to copy the pages a Collect reports before
	// anything writes the region again (a paused guest). The hash
	// fallback ignores it.
	HotPages bool
	// FileBacked is how many bytes at the start of the region may be a
	// private mapping of a file (a restore that maps a snapshot): a page
	// there that holds no memory holds the file's data, not zeros, and
	// reading it maps the file's page. The kernel tracker leaves only
	// memory past it unprotected while it holds nothing (fresh slots,
	// fresh_linux.go).
	FileBacked uint64

	// failAt makes the uffd setup fail at the named step, to test the
	// fallback and its clean-up.
	failAt string
	// keepHuge leaves the region's huge pages alone (HugePagesCoarsen's
	// own probe).
	keepHuge bool
}

// New returns a tracker for region, the kernel's (KindUffd) where it
// works, else the hash fallback (KindHash) with Reason saying why. It
// fails only for arguments no tracker can take. For KindUffd, region must
// be a page-aligned part of a private anonymous mapping (as unix.Mmap
// returns), tracked by no other Tracker. Transparent huge pages in it
// are fine where the kernel splits one at the first write after
// protection, as Linux does: tracking stays per 4 KiB, and a huge page
// nobody writes costs the walk one entry instead of 512. Where a kernel
// would track them per 2 MiB instead (HugePagesCoarsen), New marks the
// region MADV_NOHUGEPAGE.
func New(region []byte, opts Options) (Tracker, error) {
	if len(region) == 0 {
		return nil, errors.New("dirty: empty region")
	}
	if opts.Used > uint64(len(region)) {
		return nil, fmt.Errorf("dirty: Options.Used %d beyond the region's %d bytes", opts.Used, len(region))
	}
	reason := "forced by Options.ForceHash"
	if !opts.ForceHash {
		t, err := newUffd(region, opts)
		if err == nil {
			return t, nil
		}
		reason = err.Error()
	}
	return newHash(region, opts.Used, reason), nil
}

// Probe reports whether the kernel tracker works here: nil, or the reason
// New would fall back. It tries it on a small mapping of its own.
func Probe() error { return probe() }

// checkUsed validates Collect's usedBytes and returns it in whole pages.
func checkUsed(usedBytes uint64, size int) (pages int, err error) {
	if usedBytes > uint64(size) {
		return 0, fmt.Errorf("dirty: usedBytes %d beyond the region's %d bytes", usedBytes, size)
	}
	return int((usedBytes + PageSize - 1) / PageSize), nil
}
