package machine

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	stdbits "math/bits"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetratelabs/wazero/api"

	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/machine/instrument"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

// Safe points, pause and resume.
//
// Every host call is a safe point. When a pause is requested, the next host
// call (or a call blocked in a wait, which gives up and starts over) unwinds
// the guest's wasm stack with Asyncify into a scratch region borrowed from
// guest memory: _start returns to the run loop, which copies the stack blob
// out and puts the region's bytes back, so that memory is exactly the
// guest's. While the VM is stopped there, the pauser reads (or, on restore,
// writes) memory, globals, stack and devices. To continue, the run loop
// borrows the region again, puts the blob back, and calls _start to rewind:
// the guest re-enters its frames up to the host call, which then runs for
// real. The pause happens at the entry of the call, before any effect, so
// a restored VM simply makes the call.

// ErrNotInstrumented is returned when a pause is asked of a VM that was
// started without instrumentation.
var ErrNotInstrumented = errors.New("the VM was started without instrumentation (safe points need Asyncify)")

// ErrNotRunning is returned when a pause is asked of a VM that has ended.
var ErrNotRunning = errors.New("the VM is not running")

// ErrClosed is Run's error after Close: the VM's resources are gone.
var ErrClosed = errors.New("the VM is closed")

// ErrRan is Run's error the second time: a Machine runs its guest once
// (restore a snapshot into a new one to run it again).
var ErrRan = errors.New("the VM has run already")

// asyncify are the instrumented module's control functions.
type asyncify struct {
	startUnwind, stopUnwind, startRewind, stopRewind api.Function
}

// control is the rendezvous between pausers and the guest goroutine. A
// pauser queues its work; the guest goroutine, once unwound at a safe point,
// runs the queued work itself and continues at once: no goroutine has to be
// scheduled while the guest is stopped.
type control struct {
	mu    sync.Mutex
	queue []*pauseJob
	// want counts queued jobs; atomic so that the safe point on every host
	// call reads it without the lock.
	want  atomic.Int32
	ended bool
	// stop is set by a job (Paused.Stop): the VM ends at this safe point.
	stop bool
}

// pauseJob is one WithPaused call waiting for, or running in, a pause.
// A PauseAsync job has a result channel instead of done: its result is
// put there without waking anyone who does not wait for it.
type pauseJob struct {
	fn     func(p *Paused) error
	err    error
	done   chan struct{}
	result chan error // buffered (1); PauseAsync's
}

// finish hands the job's result over.
func (j *pauseJob) finish(err error) {
	j.err = err
	if j.result != nil {
		j.result <- err
		close(j.result)
		return
	}
	close(j.done)
}

// scratchSize is the region borrowed for the Asyncify stack. Go keeps its
// goroutine stacks in linear memory, so its wasm stack is small; C and Rust
// recursion may need more. The bytes are saved and put back each time.
const scratchSize = 256 << 10

// scratchFor is the region borrowed in a memory of memLen bytes: the top
// scratchSize bytes, or the whole memory when it is smaller. Any bytes
// will do, the guest's own data and stack included, since they are saved
// and put back; a C program that never allocates runs in its initial 64 or
// 128 KiB for ever, and must be able to pause all the same. 0: no memory.
func scratchFor(memLen int) uint32 {
	return uint32(min(scratchSize, memLen) &^ (dirty.PageSize - 1))
}

// stackState is the guest's unwound wasm stack.
type stackState struct {
	addr uint32 // the data structure's address (its 8-byte header first)
	end  uint32 // the header's end pointer
	blob []byte // the bytes between addr+8 and the header's position
}

// safePoint is the device layer's hook at the entry of every host call.
func (m *Machine) safePoint(ctx context.Context, mod api.Module, c wasi.Call) bool {
	if steward.wanted.Load() {
		collectAtHostCall()
	}
	if m.rewinding {
		// The guest has been rewound to this call: finish the rewind,
		// give the borrowed region its bytes back, and make the call.
		m.rewinding = false
		if _, err := m.asy.stopRewind.Call(ctx); err != nil {
			panic(fmt.Errorf("asyncify_stop_rewind: %w", err))
		}
		m.returnRewind(8 + uint32(len(m.stack.blob)))
		m.runAfterResume()
		// The pause ends here, not at the rewind: the guest waited for
		// what the pausers queued with AfterResume too.
		if !m.pauseStart.IsZero() {
			d := time.Since(m.pauseStart)
			m.pauseStart = time.Time{}
			m.pauses.record(d)
			if f := m.onPaused.Load(); f != nil {
				(*f)(d)
			}
		}
		m.finishJobs()
		return false // the call was counted when it unwound
	}
	if m.asy.startUnwind == nil {
		return false
	}
	if c == wasi.CallPoll {
		// A loop poll: not a host call (--snapshot-at-call counts those).
		if !m.pauseWanted() {
			return false
		}
	} else {
		m.calls++
		if m.cfg.SnapshotAtCall != 0 && m.calls == m.cfg.SnapshotAtCall {
			m.autoSnap = true
		} else if !m.pauseWanted() {
			return false
		}
	}
	mem := m.alloc.memory().Bytes()
	size := scratchFor(len(mem))
	if size == 0 {
		// No memory to borrow from; pause at a later call.
		if m.autoSnap {
			m.autoSnap = false
			m.cfg.SnapshotAtCall++
		}
		return false
	}
	m.pauseStart = time.Now()
	addr := uint32(len(mem)) - size
	// The stack's size is unknown until it is unwound: save it all. Only
	// the part Asyncify writes is put back afterwards.
	m.saveScratch(addr, size)
	binary.LittleEndian.PutUint32(mem[addr:], addr+8)
	binary.LittleEndian.PutUint32(mem[addr+4:], addr+size)
	if _, err := m.asy.startUnwind.Call(ctx, uint64(addr)); err != nil {
		panic(fmt.Errorf("asyncify_start_unwind: %w", err))
	}
	m.unwinding = true
	m.pausedAt = c
	m.stack.addr = addr
	return true
}

// saveScratch brings the copy of the scratch region at addr up to date
// before an unwind writes into it. At the end of every pause the region
// holds exactly the copy again (only the part Asyncify wrote is put back,
// and it is put back from the copy), so when the dirty tracker can say
// which of its pages were written since (by the guest, or by our own
// putting back), only those are copied: usually one or two of its 64
// pages, instead of all 256 KiB each pause.
func (m *Machine) saveScratch(addr, size uint32) {
	mem := m.alloc.memory().Bytes()
	if m.scratchValid && m.scratchAddr == addr && len(m.scratchSaved) == int(size) {
		if pk, ok := m.tracker.(dirty.Peeker); ok {
			var fresh bool
			m.scratchPages, fresh = pk.Written(m.scratchPages[:0], uint64(addr), uint64(addr)+uint64(size))
			if fresh {
				for _, p := range m.scratchPages {
					off := p*dirty.PageSize - addr
					copy(m.scratchSaved[off:off+dirty.PageSize], mem[p*dirty.PageSize:])
				}
				if checkScratch {
					m.verifyScratch(addr, size)
				}
				return
			}
		}
	}
	m.scratchAddr = addr
	m.scratchSaved = append(m.scratchSaved[:0], mem[addr:addr+size]...)
	m.scratchValid = true
}

// checkScratch (FTVM_CHECK_SCRATCH=1; make test sets it) makes every
// pause compare the copy of the scratch region, refreshed by the pages
// the tracker says were written, with the region itself. A page missing
// from the tracker's answer would have its stale copy written back over
// the guest's data: silent corruption of the guest and of every
// checkpoint after it, which tests rarely see as such. The check costs a
// comparison of 256 KiB a pause.
var checkScratch = os.Getenv("FTVM_CHECK_SCRATCH") == "1"

// verifyScratch panics, naming the pages, if the refreshed copy of the
// scratch region differs from the region.
func (m *Machine) verifyScratch(addr, size uint32) {
	mem := m.alloc.memory().Bytes()[addr : addr+size]
	if bytes.Equal(mem, m.scratchSaved) {
		return
	}
	var stale []uint32
	for off := uint32(0); off < size; off += dirty.PageSize {
		if !bytes.Equal(mem[off:off+dirty.PageSize], m.scratchSaved[off:off+dirty.PageSize]) {
			stale = append(stale, (addr+off)/dirty.PageSize)
		}
	}
	panic(fmt.Sprintf("FTVM_CHECK_SCRATCH: pages %v of the scratch region changed since the last pause, "+
		"but the %s tracker reported only %v as written", stale, m.tracker.Kind(), m.scratchPages))
}

// returnScratch puts back the first n bytes of the borrowed region (all
// that the unwind wrote to it) from the copy.
func (m *Machine) returnScratch(n uint32) {
	n = min(n, uint32(len(m.scratchSaved)))
	copy(m.alloc.memory().Bytes()[m.scratchAddr:], m.scratchSaved[:n])
}

// borrowForRewind saves the first n bytes at addr, which a rewind is about
// to overwrite with the stack, in a buffer of its own (the full copy stays
// as it is), and returnRewind puts them back.
func (m *Machine) borrowForRewind(addr, n uint32) {
	mem := m.alloc.memory().Bytes()
	m.rewindAddr = addr
	m.rewindSaved = append(m.rewindSaved[:0], mem[addr:addr+n]...)
}

func (m *Machine) returnRewind(n uint32) {
	n = min(n, uint32(len(m.rewindSaved)))
	copy(m.alloc.memory().Bytes()[m.rewindAddr:], m.rewindSaved[:n])
}

// afterUnwind runs when _start has returned because of an unwind: it ends
// the unwind, keeps the stack blob and returns the scratch region.
func (m *Machine) afterUnwind(ctx context.Context) error {
	m.unwinding = false
	if _, err := m.asy.stopUnwind.Call(ctx); err != nil {
		return fmt.Errorf("asyncify_stop_unwind: %w", err)
	}
	mem := m.alloc.memory().Bytes()
	a := m.stack.addr
	pos := binary.LittleEndian.Uint32(mem[a:])
	end := binary.LittleEndian.Uint32(mem[a+4:])
	if pos < a+8 || pos > end || uint64(end) > uint64(len(mem)) {
		return fmt.Errorf("asyncify left an impossible stack [%#x, %#x) at %#x", pos, end, a)
	}
	m.stack.end = end
	m.stack.blob = append(m.stack.blob[:0], mem[a+8:pos]...)
	m.returnScratch(pos - a)
	m.keepScratchHot(a, pos)
	return nil
}

// keepScratchHot has the tracker keep the pages of the scratch region
// that pauses write, [a, pos), writable and watched by content
// (dirty.Keeper): the header and the stack go there at every unwind and
// rewind, and the bytes are put back, so under write protection those
// pages faulted at every pause once cooled (45 µs a fault on a VM with
// shadow paging, measured here, in 9% of the pauses of an idle 256 MiB
// guest). The range grows to the deepest stack seen at this address and
// starts again when the memory grows (the region moves).
func (m *Machine) keepScratchHot(a, pos uint32) {
	k, ok := m.tracker.(dirty.Keeper)
	if !ok {
		return
	}
	lo, hi := a/dirty.PageSize, (pos+dirty.PageSize-1)/dirty.PageSize
	if lo == m.keptLo && hi <= m.keptHi {
		return
	}
	if lo != m.keptLo {
		m.keptHi = 0
	}
	m.keptLo, m.keptHi = lo, max(hi, m.keptHi)
	k.KeepHot(m.keptLo, m.keptHi)
}

// beforeRewind borrows the scratch region again, puts the stack back as the
// unwind left it, and arms the rewind; the next _start call rewinds.
func (m *Machine) beforeRewind(ctx context.Context) error {
	mem := m.alloc.memory().Bytes()
	a := m.stack.addr
	if uint64(a)+8+uint64(len(m.stack.blob)) > uint64(m.stack.end) || uint64(m.stack.end) > uint64(len(mem)) {
		return fmt.Errorf("the saved wasm stack (%d bytes at %#x) does not fit the memory (%d bytes)",
			len(m.stack.blob), a, len(mem))
	}
	// Rewinding only reads the stack back (and moves the header's
	// position), so only that much is borrowed.
	m.borrowForRewind(a, 8+uint32(len(m.stack.blob)))
	binary.LittleEndian.PutUint32(mem[a:], a+8+uint32(len(m.stack.blob)))
	binary.LittleEndian.PutUint32(mem[a+4:], m.stack.end)
	copy(mem[a+8:], m.stack.blob)
	if _, err := m.asy.startRewind.Call(ctx, uint64(a)); err != nil {
		return fmt.Errorf("asyncify_start_rewind: %w", err)
	}
	m.rewinding = true
	return nil
}

func (m *Machine) pauseWanted() bool { return m.ctl.want.Load() > 0 }

// stopped runs on the guest goroutine while the guest is unwound: it runs
// the queued pausers' work on the stopped VM, and reports whether the VM
// must end here.
func (m *Machine) stopped(ctx context.Context) (stop bool) {
	c := &m.ctl
	// The device's pause flag is raised and cleared under c.mu, with the
	// queue: cleared outside it, a request queued meanwhile and taken in
	// this pause left the flag up with nothing queued, and a guest blocked
	// in a wait woke, restarted and woke again at 100% of a core.
	c.mu.Lock()
	m.dev.ClearPause()
	jobs := c.queue
	c.queue = nil
	c.want.Add(-int32(len(jobs)))
	c.mu.Unlock()
	p := &Paused{m: m}
	var panicked any
	for _, j := range jobs {
		// A job that panics fails the VM (below), but its caller and
		// those of the jobs after it are answered (endControl answers
		// the finished), not left waiting for ever.
		func() {
			defer func() {
				if r := recover(); r != nil {
					j.err = fmt.Errorf("the pause's work failed: %v", r)
					if panicked == nil {
						panicked = r
					}
				}
			}()
			if panicked != nil {
				j.err = ErrNotRunning
				return
			}
			j.err = j.fn(p)
		}()
		m.finished = append(m.finished, j)
	}
	if panicked != nil {
		panic(panicked)
	}
	return c.stop || ctx.Err() != nil
}

// finishJobs hands the results of the jobs that ran in the last pause to
// their callers. It runs once the guest runs on (or the VM ends): waking a
// WithPaused caller is a futex call and a thread's wake-up, which the guest
// need not wait for.
func (m *Machine) finishJobs() {
	for i, j := range m.finished {
		j.finish(j.err)
		m.finished[i] = nil
	}
	m.finished = m.finished[:0]
}

// Paused is a VM stopped at a safe point, handed to the function given to
// WithPaused. Its methods are valid only during that function.
type Paused struct {
	m *Machine
}

// WithPaused stops the guest at its next safe point, runs fn on the stopped
// VM, and lets the guest continue (or end, if fn called Stop). fn runs on the
// guest's own goroutine, so the guest is stopped exactly as long as fn and
// the unwind and rewind take. WithPaused returns fn's result once the pause
// is over (the guest runs on, or has ended). A VM that has not reached its
// first safe point yet is waited for.
func (m *Machine) WithPaused(ctx context.Context, fn func(p *Paused) error) error {
	if m.inst == nil {
		return ErrNotInstrumented
	}
	job := &pauseJob{fn: fn, done: make(chan struct{})}
	if err := m.queuePause(job); err != nil {
		return err
	}
	c := &m.ctl
	select {
	case <-job.done:
		return job.err
	case <-ctx.Done():
	}
	// Withdraw the job unless the guest goroutine has taken it already.
	c.mu.Lock()
	for i, q := range c.queue {
		if q == job {
			c.queue = append(c.queue[:i], c.queue[i+1:]...)
			c.want.Add(-1)
			if len(c.queue) == 0 {
				m.dev.ClearPause() // nothing left to pause for
			}
			c.mu.Unlock()
			return ctx.Err()
		}
	}
	c.mu.Unlock()
	<-job.done
	return job.err
}

// queuePause queues job for the next safe point.
func (m *Machine) queuePause(job *pauseJob) error {
	c := &m.ctl
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return ErrNotRunning
	}
	c.queue = append(c.queue, job)
	c.want.Add(1)
	m.dev.RequestPause() // under c.mu: see stopped
	c.mu.Unlock()
	return nil
}

// PauseAsync is WithPaused without the wait: fn is queued before PauseAsync
// returns, so when it is called on the guest goroutine (from an output gate,
// say) the guest stops at its very next safe point. done receives fn's
// result (or ErrNotRunning) and is closed. Nothing else runs for it: a
// caller that does not wait on done wakes no goroutine during the pause.
func (m *Machine) PauseAsync(fn func(p *Paused) error) (done <-chan error) {
	ch := make(chan error, 1)
	if m.inst == nil {
		ch <- ErrNotInstrumented
		close(ch)
		return ch
	}
	if err := m.queuePause(&pauseJob{fn: fn, result: ch}); err != nil {
		ch <- err
		close(ch)
	}
	return ch
}

// endControl marks the VM as ended: queued pausers get ErrNotRunning.
func (m *Machine) endControl() {
	c := &m.ctl
	c.mu.Lock()
	c.ended = true
	jobs := c.queue
	c.queue = nil
	c.want.Add(-int32(len(jobs)))
	c.mu.Unlock()
	for _, j := range jobs {
		j.finish(ErrNotRunning)
	}
	m.runAfterResume()
	m.finishJobs()
}

// Stop makes the VM end once the pauser returns, without running the guest
// any further (ftvm snapshot --stop).
func (p *Paused) Stop() { p.m.ctl.stop = true }

// AfterResume runs fn on the guest goroutine once the guest is rewound,
// before the host call it stopped at runs, or, if the VM ends at this safe
// point instead, when it ends. The guest still waits for fn, and the pause
// as measured (PauseStats, OnPaused) includes it; what goes there is work
// that must follow the rewind: waking other goroutines (the encoder of a
// capture), which would otherwise compete with the rewind for the CPU.
func (p *Paused) AfterResume(fn func()) { p.m.afterResume = append(p.m.afterResume, fn) }

// runAfterResume runs (once) the functions AfterResume queued.
func (m *Machine) runAfterResume() {
	for len(m.afterResume) > 0 {
		fns := m.afterResume
		m.afterResume = nil
		for _, fn := range fns {
			fn()
		}
	}
}

// OnPaused has fn told, on the guest's goroutine, of every pause the guest
// resumed from, with how long it stopped the guest: from the safe point to
// its running on (the unwind, the pausers' work, the rewind and what they
// queued with AfterResume). fn must be quick. nil stops it.
func (m *Machine) OnPaused(fn func(d time.Duration)) {
	if fn == nil {
		m.onPaused.Store(nil)
		return
	}
	m.onPaused.Store(&fn)
}

// At names the safe point the guest is paused at: a WASI call
// ("fd_write"), or "ftvm.safepoint" for a loop poll (Config.LoopPolls).
func (p *Paused) At() string { return p.m.pausedAt.String() }

// Memory is the guest's linear memory, aliased: valid while paused.
func (p *Paused) Memory() []byte { return p.m.alloc.memory().Bytes() }

// DirtyPages appends the indices of the 4 KiB pages written since the
// previous call (or since the VM started) to dst.
func (p *Paused) DirtyPages(dst []uint32) ([]uint32, error) {
	if p.m.tracker == nil {
		return nil, errors.New("dirty tracking is not available")
	}
	start := len(dst)
	pages, err := p.m.tracker.Collect(dst, uint64(len(p.Memory())))
	p.m.viewsMu.Lock()
	defer p.m.viewsMu.Unlock()
	return p.m.views.collected(viewSnapshots, pages, start, len(p.Memory()), err, true), err
}

// DirtyPagesDeferred is DirtyPages for a caller that copies the pages
// before the guest runs again and then, while it runs, hands the copies to
// Machine.RearmDirty: re-protecting the pages — most of the cost of
// finding them with the kernel tracker — then happens out of the pause.
// gen is for RearmDirty; with a tracker that cannot defer it is 0 and
// the pages are re-armed now.
func (p *Paused) DirtyPagesDeferred(dst []uint32) (pages []uint32, gen uint64, err error) {
	if p.m.tracker == nil {
		return nil, 0, errors.New("dirty tracking is not available")
	}
	start := len(dst)
	if d, ok := p.m.tracker.(dirty.Deferrer); ok {
		pages, gen, err = d.CollectDeferred(dst, uint64(len(p.Memory())))
	} else {
		pages, err = p.m.tracker.Collect(dst, uint64(len(p.Memory())))
	}
	p.m.viewsMu.Lock()
	defer p.m.viewsMu.Unlock()
	return p.m.views.collected(viewStream, pages, start, len(p.Memory()), err, true), gen, err
}

// NonZeroPages lists the pages of the paused guest's memory that a full
// copy must hold, those not all zeros, without reading the parts that hold
// no memory yet (dirty.Holer): on a VM with shadow paging, reading them
// makes the kernel allocate each page, 7–30 µs apiece, and the guest's
// memory resident in full.
func (p *Paused) NonZeroPages() []uint32 {
	mem := p.Memory()
	var holes [][2]uint32
	if h, ok := p.m.tracker.(dirty.Holer); ok {
		var err error
		if holes, err = h.Holes(nil, uint64(len(mem))); err != nil {
			holes = nil // read it all
		}
	}
	return snapshot.NonZeroPagesBut(mem, holes)
}

// Two consumers collect dirty pages from the one tracker: snapshots
// (DirtyPages: an incremental is relative to the VM's previous snapshot)
// and checkpoint streams (DirtyPagesDeferred: Remus). A collection re-arms
// what it reports, so pages one consumer collected would be missing from
// the other's next collection — a snapshot of a protected primary would
// have left its backup without them. Each consumer's view therefore
// carries the pages the other collected since its own last collection.
const (
	viewSnapshots = iota
	viewStream
	numViews
)

type dirtyViews [numViews]struct {
	active bool     // the consumer has collected at least once
	carry  []uint64 // bitset of pages collected by the others since
}

// collected records the pages view own just collected (pages[start:]) for
// the other views and, if takeCarry, adds its own carried pages to them,
// sorted and without repeats. A failed collection leaves the tracking
// unknown: the other views then carry every page of the memory (memBytes).
//
// Only a collection in a pause takes the carry: a carried page may be hot
// (left writable, compared by content at the next Collect), and a copy of
// it taken while the guest runs, then changed back by the guest to what it
// held at that Collect, would never be reported again.
func (v *dirtyViews) collected(own int, pages []uint32, start, memBytes int, err error, takeCarry bool) []uint32 {
	for i := range v {
		if i == own || !v[i].active {
			continue
		}
		if err != nil {
			for p := range uint32((memBytes + dirty.PageSize - 1) / dirty.PageSize) {
				v[i].carry = setBit(v[i].carry, p)
			}
			continue
		}
		for _, p := range pages[start:] {
			v[i].carry = setBit(v[i].carry, p)
		}
	}
	me := &v[own]
	me.active = true
	if err != nil || !takeCarry {
		return pages
	}
	n := len(pages)
	for w, bits := range me.carry {
		for ; bits != 0; bits &= bits - 1 {
			pages = append(pages, uint32(w*64+stdbits.TrailingZeros64(bits)))
		}
	}
	if len(pages) > n {
		clear(me.carry)
		slices.Sort(pages[start:])
		pages = pages[:start+len(slices.Compact(pages[start:]))]
	}
	return pages
}

func setBit(set []uint64, p uint32) []uint64 {
	w := int(p / 64)
	if w >= len(set) {
		set = append(set, make([]uint64, w+1-len(set))...)
	}
	set[w] |= 1 << (p % 64)
	return set
}

// WarmDirty prepares the next pause's dirty-page collection while the
// guest runs: where the tracker walks page tables (dirty.Warmer), it walks
// them now, so that the walk in the pause finds them cached. Call it from
// another goroutine just before asking for a pause; it is cheap when the
// last collection was recent, and does nothing for other trackers.
func (m *Machine) WarmDirty() {
	m.mu.Lock()
	w := m.warm
	m.mu.Unlock()
	if w != nil {
		w()
	}
}

// CollectAhead starts the next checkpoint stream's collection
// (DirtyPagesDeferred) while the guest runs: it finds the pages written so
// far, re-arms tracking for them, and calls copy with the guest's memory
// and those pages (sorted) so that the caller copies them now. The
// DirtyPagesDeferred of the next pause then reports only the pages written
// after (and those a snapshot collected meanwhile, which may be hot pages:
// copied in the pause only), which are all the pause must copy: for a guest that writes many
// pages an epoch, most of the copying moves out of the pause. Call it from
// another goroutine, just before asking for a pause, and not twice before
// it. ok is false when nothing was collected (the tracker cannot, or its
// previous pages are not re-armed yet: RearmDirty). If copy fails, the
// pages are reported again by the next DirtyPagesDeferred. The memory passed to
// copy is valid only during the call; the guest writes it meanwhile, and
// any page it writes after it was reported is reported again by the next
// DirtyPagesDeferred.
func (m *Machine) CollectAhead(dst []uint32, copy func(mem []byte, pages []uint32) error) (pages []uint32, ok bool, err error) {
	return m.collectAhead(viewStream, dst, copy)
}

// collectAhead is CollectAhead for view's consumer.
func (m *Machine) collectAhead(view int, dst []uint32, copy func(mem []byte, pages []uint32) error) (pages []uint32, ok bool, err error) {
	m.mu.Lock()
	tracker := m.tracker
	m.mu.Unlock()
	a, isA := tracker.(dirty.Aheader)
	lm := m.alloc.memory()
	if !isA || lm == nil {
		return dst, false, nil
	}
	used := lm.size.Load()
	start := len(dst)
	var all []uint32
	var copyErr error
	dst, ok, err = a.CollectAhead(dst, used, func(region []byte, got []uint32) {
		m.viewsMu.Lock()
		defer m.viewsMu.Unlock()
		// As a collection of the view's: the other consumer's next
		// collection carries these pages. Pages the other collected
		// since this view's last collection stay carried, for the
		// pause's.
		all = m.views.collected(view, got, 0, int(used), nil, false)
		if copy == nil {
			return
		}
		if copyErr = copy(region[:used], all); copyErr != nil {
			// Not copied, and protected: the view's next collection
			// reports them.
			for _, p := range all {
				m.views[view].carry = setBit(m.views[view].carry, p)
			}
		}
	})
	if err == nil && copyErr != nil {
		return dst[:start], false, copyErr
	}
	if ok {
		dst = append(dst[:start], all...)
	}
	return dst, ok, err
}

// RearmDirty re-arms dirty tracking for the pages DirtyPagesDeferred gen
// reported, given copyOf, the copy of each page the caller took during
// that pause (nil if none): pages written since are reported next time.
// It is safe to call while the guest runs; a late or missing call only
// makes the next DirtyPages report those pages again.
func (m *Machine) RearmDirty(gen uint64, copyOf func(page uint32) []byte) error {
	if d, ok := m.tracker.(dirty.Deferrer); ok && gen != 0 {
		return d.Rearm(gen, copyOf)
	}
	return nil
}

// Globals returns the value of every global.
func (p *Paused) Globals() []snapshot.Global {
	out := make([]snapshot.Global, 0, len(p.m.globals))
	for _, g := range p.m.globals {
		out = append(out, snapshot.Global{Index: g.Index, Type: snapshot.ValType(g.Type), Value: g.value.Get()})
	}
	return out
}

// Stack is the unwound wasm call stack: where its Asyncify data structure
// lives and the saved bytes.
func (p *Paused) Stack() (addr uint64, blob []byte) {
	return uint64(p.m.stack.addr), p.m.stack.blob
}

// Devices is the device state.
func (p *Paused) Devices() *wasi.State { return p.DevicesInto(nil) }

// DevicesInto is Devices into st, reusing its memory (wasi.CaptureInto).
func (p *Paused) DevicesInto(st *wasi.State) *wasi.State {
	st = p.m.dev.CaptureInto(st)
	st.Instrumentation = p.m.instrumentation
	return st
}

// ModuleHash is the SHA-256 of the original (uninstrumented) module.
func (p *Paused) ModuleHash() snapshot.Hash { return p.m.moduleHash }

// global is one exported global of the instrumented module.
type global struct {
	instrument.Global
	value api.Global
}

// bindInstrumented finds the asyncify functions and the globals of an
// instantiated instrumented module, and starts dirty tracking.
func (m *Machine) bindInstrumented(mod api.Module) error {
	m.asy = asyncify{
		startUnwind: mod.ExportedFunction(instrument.ExportStartUnwind),
		stopUnwind:  mod.ExportedFunction(instrument.ExportStopUnwind),
		startRewind: mod.ExportedFunction(instrument.ExportStartRewind),
		stopRewind:  mod.ExportedFunction(instrument.ExportStopRewind),
	}
	if m.asy.startUnwind == nil || m.asy.stopUnwind == nil || m.asy.startRewind == nil || m.asy.stopRewind == nil {
		return errors.New("the instrumented module lacks the asyncify exports")
	}
	m.globals = m.globals[:0]
	for _, g := range m.inst.Globals {
		v := mod.ExportedGlobal(g.Export)
		if v == nil {
			return fmt.Errorf("the instrumented module does not export global %d as %q", g.Index, g.Export)
		}
		m.globals = append(m.globals, global{Global: g, value: v})
	}
	return nil
}

// startTracking begins dirty-page tracking of linear memory.
func (m *Machine) startTracking() {
	lm := m.alloc.memory()
	if lm == nil || lm.region == nil {
		return
	}
	// Hot pages: the machine collects and copies only while the guest is
	// paused, which is what they require.
	t, err := dirty.New(lm.region, dirty.Options{Used: lm.size.Load(), HotPages: true, FileBacked: lm.fileBacked})
	if err == nil {
		// A restored VM's next incremental snapshot builds on the one it
		// was restored from, whose memory is the tracker's baseline: the
		// snapshots' view must hear of every page another consumer (a
		// checkpoint stream) collects from now on, not only after its
		// own first collection.
		m.viewsMu.Lock()
		m.views[viewSnapshots].active = m.cfg.Restore != nil
		m.viewsMu.Unlock()
		lm.beforeFree = func() { t.Close() }
		if r := t.Reason(); r != "" {
			slog.Warn("dirty-page tracking falls back to page hashing", "reason", r)
		}
		m.mu.Lock()
		// Under m.mu: CollectAhead, on another goroutine (an API
		// snapshot request), may ask for it as the VM starts.
		m.tracker = t
		m.trackerKind = t.Kind()
		m.warm = nil
		if w, ok := t.(dirty.Warmer); ok {
			m.warm = func() { w.Warm(lm.size.Load()) }
		}
		m.mu.Unlock()
	}
}

// restoreState writes a captured state into a freshly instantiated VM and
// arms the rewind to the safe point it was captured at.
func (m *Machine) restoreState(ctx context.Context, mod api.Module, img *snapshot.Image) error {
	mem := mod.Memory()
	if mem == nil {
		return errors.New("the module has no memory")
	}
	if want := uint64(len(img.Memory)); uint64(mem.Size()) < want {
		delta := (want - uint64(mem.Size())) / 65536
		if _, ok := mem.Grow(uint32(delta)); !ok {
			return fmt.Errorf("cannot grow memory to the snapshot's %s", FormatSize(want))
		}
	}
	buf := m.alloc.memory().Bytes()
	if uint64(len(buf)) != uint64(len(img.Memory)) {
		return fmt.Errorf("memory is %s, the snapshot's %s", FormatSize(uint64(len(buf))), FormatSize(uint64(len(img.Memory))))
	}
	// Everything is checked before the memory is taken: a failed check
	// must leave the image (a Remus backup's, kept for another try) whole.
	byIndex := map[uint32]global{}
	for _, g := range m.globals {
		byIndex[g.Index] = g
	}
	// Every mutable global is in the state, with its type: one missing
	// would keep its initial value (a Go guest then trapped at once), one
	// of another type would restore, and fail every later capture.
	given := make(map[uint32]bool, len(img.Globals))
	for _, sg := range img.Globals {
		given[sg.Index] = true
	}
	for _, g := range m.globals {
		if g.Mutable && !given[g.Index] {
			return fmt.Errorf("the snapshot lacks mutable global %d of the module", g.Index)
		}
	}
	for _, sg := range img.Globals {
		g, ok := byIndex[sg.Index]
		if !ok {
			return fmt.Errorf("the snapshot has global %d, which the module does not", sg.Index)
		}
		if snapshot.ValType(g.Type) != sg.Type {
			return fmt.Errorf("global %d is of type %v in the snapshot, %v in the module", sg.Index, sg.Type, snapshot.ValType(g.Type))
		}
		if !g.Mutable && g.value.Get() != sg.Value {
			return fmt.Errorf("immutable global %d differs from the snapshot's", sg.Index)
		}
	}
	// The region was the top of memory, of the size borrowed in a memory
	// of this length.
	size := uint64(scratchFor(len(buf)))
	if size == 0 || img.StackAddr != uint64(len(buf))-size {
		return fmt.Errorf("the snapshot's stack address %#x is not where a pause in %d bytes of memory puts it", img.StackAddr, len(buf))
	}
	if im := m.cfg.RestoreMemory; im != nil {
		if len(im.Bytes()) != len(img.Memory) || (len(buf) > 0 && &im.Bytes()[0] != &img.Memory[0]) {
			return errors.New("the restore memory image is not the snapshot image's memory")
		}
		mapped := im.mapped
		if err := im.moveInto(buf); err != nil {
			return err
		}
		if lm := m.alloc.memory(); lm != nil {
			lm.fileBacked = uint64(mapped)
		}
	} else {
		copy(buf, img.Memory)
	}
	for _, sg := range img.Globals {
		if g := byIndex[sg.Index]; g.Mutable {
			g.value.(api.MutableGlobal).Set(sg.Value)
		}
	}
	m.stack = stackState{addr: uint32(img.StackAddr), end: uint32(len(buf)),
		blob: append([]byte(nil), img.Stack...)}
	return m.beforeRewind(ctx)
}

// pauseStats keeps how long the guest was stopped at each pause, from the
// start of the unwind to the end of the rewind: the time the guest loses.
type pauseStats struct {
	mu     sync.Mutex
	count  uint64
	total  time.Duration
	recent [1024]time.Duration
}

func (s *pauseStats) record(d time.Duration) {
	s.mu.Lock()
	s.recent[s.count%uint64(len(s.recent))] = d
	s.count++
	s.total += d
	s.mu.Unlock()
}

// PauseStats summarises the guest's pauses: how many, and the last, median
// and 99th-percentile durations over the most recent 1024.
type PauseStats struct {
	Count  uint64          `json:"count"`
	Last   time.Duration   `json:"last_ns"`
	P50    time.Duration   `json:"p50_ns"`
	P99    time.Duration   `json:"p99_ns"`
	Total  time.Duration   `json:"total_ns"`
	Recent []time.Duration `json:"-"`
}

// PauseStats returns the pause figures so far.
func (m *Machine) PauseStats() PauseStats {
	s := &m.pauses
	s.mu.Lock()
	defer s.mu.Unlock()
	n := min(s.count, uint64(len(s.recent)))
	out := PauseStats{Count: s.count, Total: s.total, Recent: slices.Clone(s.recent[:n])}
	if s.count == 0 {
		return out
	}
	out.Last = s.recent[(s.count-1)%uint64(len(s.recent))]
	sorted := slices.Clone(out.Recent)
	slices.Sort(sorted)
	out.P50 = sorted[len(sorted)/2]
	out.P99 = sorted[min(len(sorted)-1, len(sorted)*99/100)]
	return out
}
