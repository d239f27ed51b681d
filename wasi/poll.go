package wasi

import (
	"encoding/binary"
	"math"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// poll_oneoff and the interruptible waits behind blocking calls.
//
// Unlike hosts that report sockets as always ready (which makes an idle Go
// net server spin), poll_oneoff here sleeps until a host descriptor is
// ready, the earliest clock deadline passes, or the wake eventfd is written
// by Interrupt or Stop: in Go's network poller when it watches descriptors
// (idle.go), else in ppoll. An idle guest costs no CPU.

// pollScratch is poll_oneoff's and the socket calls' reusable working memory,
// kept in Devices so that the hot path allocates nothing. Only the guest's
// goroutine touches it, inside host calls.
type pollScratch struct {
	subs []pollSub
	pfds []unix.PollFd
	out  []byte
	iov  []unix.Iovec // recvmsg(2) vectors (sock.go)
}

// pollSub is one parsed subscription and, once it fires, its event.
type pollSub struct {
	userdata uint64
	deadline uint64 // clock: absolute deadline on clock
	nbytes   uint64
	clock    uint32
	pfd      int32 // index into pollScratch.pfds, or -1
	kind     Kind  // fd subscriptions: the kind of the descriptor
	host     int32
	fd       uint32 // fd subscriptions: the guest's descriptor
	errno    Errno
	flags    uint16 // eventrwflags
	typ      uint8
	ready    bool
}

// goingIdle tells the OnIdle hook that the guest is about to sleep. When the
// hook asked for a pause (a Remus checkpoint of the epoch whose output
// waits), this thread yields for up to idleYield first, so the request,
// made by a goroutine the hook woke, comes in before the sleep rather than
// as a wake-up of a thread asleep in ppoll: on a busy machine that was tens
// of microseconds of every idle checkpoint's, so of the output's, delay.
// It reports whether a pause is requested now.
func (d *Devices) goingIdle() (pause bool) {
	if d.onIdle == nil || !d.onIdle() {
		return false
	}
	// The flag may be up already: the goroutine the hook woke can run on
	// another CPU before this line. That pause is as much this wait's end
	// as one that comes while yielding; the wait must not sleep for it.
	deadline := time.Now().Add(idleYield)
	for !d.pause.Load() && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	return d.pause.Load()
}

// idleYield bounds the yielding of goingIdle (a variable for tests).
var idleYield = 50 * time.Microsecond

// waitFd blocks until the host descriptor has one of events ready (or an
// error or hangup, which the caller's next syscall reports), or the device
// layer is stopped (EINTR). A plain Interrupt only re-checks: a blocking
// call must not fail because the machine looked at the VM.
//
// A wait that has had no effect yet (restartable) also gives up with
// errRestart when the machine requests a pause.
func (d *Devices) waitFd(host int, events int16, restartable bool) Errno {
	if errno := readyNow(host, events); errno != EAGAIN {
		return errno
	}
	fds := [2]unix.PollFd{{Fd: int32(host), Events: events}, {Fd: int32(d.wake), Events: unix.POLLIN}}
	d.counters.PollWaits.Add(1)
	if restartable {
		if d.goingIdle() {
			d.drainPauseWake() // the pause's Interrupt: this wait is over
			return errRestart
		}
	} else if d.onIdle != nil {
		d.onIdle()
	}
	for {
		if d.closed.Load() {
			return EINTR
		}
		if restartable && d.pause.Load() {
			return errRestart
		}
		fds[0].Revents, fds[1].Revents = 0, 0
		d.waiting.Store(true)
		_, err := unix.Ppoll(fds[:], nil, nil)
		d.waiting.Store(false)
		if d.onWake != nil {
			d.onWake()
		}
		if err == unix.EINTR {
			continue // a signal to the host thread (Go preemption), not to the guest
		}
		if err != nil {
			return errnoOf(err)
		}
		if fds[1].Revents != 0 {
			d.drainWake()
		}
		if fds[0].Revents != 0 {
			return readyErrno(fds[0].Revents)
		}
	}
}

// readyErrno turns a ready descriptor's revents into the wait's result: only
// a descriptor the kernel does not know is an error of the wait itself.
func readyErrno(revents int16) Errno {
	if revents&unix.POLLNVAL != 0 {
		return EBADF
	}
	return ESUCCESS
}

// drainWake consumes pending Interrupt()s so the next wait sleeps again.
func (d *Devices) drainWake() {
	var buf [8]byte
	unix.Read(d.wake, buf[:])
}

// drainPauseWake consumes the Interrupt of a RequestPause whose flag was
// seen before the wait slept (goingIdle). RequestPause raises the flag and
// then writes the wake-up: on a busy machine its goroutine may be held up
// in between, and a write landing after a plain drain would wake the next
// wait for nothing. So the drain waits until every RequestPause begun has
// written (yielding; at most pauseWakeWait).
func (d *Devices) drainPauseWake() {
	for deadline := time.Now().Add(pauseWakeWait); d.pauseWoken.Load() != d.pauseAsked.Load() && time.Now().Before(deadline); {
		runtime.Gosched()
	}
	d.drainWake()
}

// pauseWakeWait bounds drainPauseWake's wait for RequestPause's write.
const pauseWakeWait = 10 * time.Millisecond

// clockNow reads a guest clock for poll_oneoff deadlines. The CPU-time clocks
// are the monotonic clock, as in clock_time_get.
func (d *Devices) clockNow(id uint32) (uint64, bool) {
	switch id {
	case ClockRealtime:
		return d.clock.Realtime(), true
	case ClockMonotonic, ClockProcessCputimeID, ClockThreadCputimeID:
		return d.clock.Monotonic(), true
	}
	return 0, false
}

func pollOneoff(d *Devices, m Mem, p []uint64) Errno {
	errno := pollOneoffWait(d, m, p)
	if d.pollWait.Load() != nil {
		d.pollWait.Store(nil) // published by a wait of this call
	}
	return errno
}

func pollOneoffWait(d *Devices, m Mem, p []uint64) Errno {
	inPtr, outPtr, n, neventsPtr := uint32(p[0]), uint32(p[1]), uint32(p[2]), uint32(p[3])
	if n == 0 {
		return EINVAL
	}
	// Check every buffer before waiting, so a bad pointer never costs a wait
	// or loses an event.
	if uint64(n)*sizeSubscription > m.Len() {
		return EFAULT
	}
	in, ok := m.Slice(inPtr, n*sizeSubscription)
	if !ok {
		return EFAULT
	}
	if _, ok := m.Slice(outPtr, n*sizeEvent); !ok {
		return EFAULT
	}
	if _, ok := m.Slice(neventsPtr, 4); !ok {
		return EFAULT
	}

	s := &d.pollScratch
	s.subs = s.subs[:0]
	s.pfds = append(s.pfds[:0], unix.PollFd{Fd: int32(d.wake), Events: unix.POLLIN})
	for i := uint32(0); i < n; i++ {
		b := in[i*sizeSubscription : (i+1)*sizeSubscription]
		sub := pollSub{userdata: binary.LittleEndian.Uint64(b), typ: b[8], pfd: -1, host: -1}
		switch sub.typ {
		case EventtypeClock:
			d.parseClockSub(&sub, b)
		case EventtypeFdRead, EventtypeFdWrite:
			d.parseFdSub(&sub, binary.LittleEndian.Uint32(b[16:]))
		default:
			return EINVAL
		}
		s.subs = append(s.subs, sub)
	}

	slept := false
	for {
		timeout, infinite := d.pollTimeout()
		// A stopping VM only looks at what is ready now, never sleeps.
		stopping := d.closed.Load()
		if stopping {
			timeout, infinite = 0, false
		}
		// Fast path: nothing to ask the kernel about (no descriptor
		// subscriptions, or only always-ready ones) and something is
		// already due: no system call.
		if len(s.pfds) == 1 && !infinite && timeout == 0 && d.collect() > 0 {
			break
		}
		if (timeout > 0 || infinite) && !slept {
			slept = true
			d.publishWait(infinite)
			d.counters.PollWaits.Add(1)
			if d.goingIdle() && !stopping {
				d.drainPauseWake() // the pause's Interrupt: this wait is over
				return errRestart  // nothing happened: start again at the safe point
			}
		}
		clearRevents(s.pfds)
		var err error
		blocking := timeout > 0 || infinite
		if blocking {
			d.waiting.Store(true)
		}
		switch {
		case blocking && len(s.pfds) > 1 && d.idle != nil && d.idle.wait(s.pfds, timeout, infinite):
			// Slept in the runtime's poller; now see what fired. (A
			// sleep on clocks alone stays in ppoll: its timeout is
			// exact and cheap, and such sleeps are short.)
			var zero unix.Timespec
			_, err = unix.Ppoll(s.pfds, &zero, nil)
		case infinite:
			_, err = unix.Ppoll(s.pfds, nil, nil)
		default:
			ts := unix.NsecToTimespec(timeout)
			_, err = unix.Ppoll(s.pfds, &ts, nil)
		}
		if blocking {
			d.waiting.Store(false)
			if d.onWake != nil {
				d.onWake()
			}
		}
		if err == unix.EINTR {
			continue // a signal to the host thread; deadlines are recomputed
		}
		if err != nil {
			return errnoOf(err)
		}
		if s.pfds[0].Revents != 0 {
			d.drainWake()
		}
		if d.collect() > 0 {
			break
		}
		// Nothing fired: a wake-up, or the kernel woke us a hair before a
		// deadline. A stopping VM returns; otherwise wait again.
		if stopping || d.closed.Load() {
			return EINTR
		}
		if d.pause.Load() {
			return errRestart // nothing happened: start again at the safe point
		}
	}

	out := d.writeEvents()
	m.Write(outPtr, out)
	nevents := uint32(len(out) / sizeEvent)
	m.PutU32(neventsPtr, nevents)
	d.input(Input{Kind: InputPoll, Call: CallPollOneoff, Fd: -1, Value: uint64(nevents), Data: out})
	return ESUCCESS
}

// parseClockSub turns a clock subscription into an absolute deadline on its
// clock. A bad clock or flags give an event with EINVAL.
func (d *Devices) parseClockSub(sub *pollSub, b []byte) {
	sub.clock = binary.LittleEndian.Uint32(b[16:])
	timeout := binary.LittleEndian.Uint64(b[24:])
	flags := binary.LittleEndian.Uint16(b[40:])
	now, ok := d.clockNow(sub.clock)
	if !ok || flags&^SubclockAbstime != 0 {
		sub.errno, sub.ready = EINVAL, true
		return
	}
	if flags&SubclockAbstime != 0 {
		sub.deadline = timeout
	} else if timeout > math.MaxUint64-now {
		sub.deadline = math.MaxUint64
	} else {
		sub.deadline = now + timeout
	}
	sub.ready = sub.deadline <= now
}

// parseFdSub resolves an FD_READ/FD_WRITE subscription: sockets and stdio on
// host descriptors are polled for real; regular files, directories and
// stdio backed by Go readers/writers are always ready; a bad descriptor is an
// event carrying the error, not a failure of the call.
func (d *Devices) parseFdSub(sub *pollSub, fd uint32) {
	sub.fd = fd
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		sub.errno, sub.ready = errno, true
		return
	}
	sub.kind = f.Kind
	sub.host = int32(f.Host)
	if f.Kind == KindDir {
		sub.ready = true
		return
	}
	if !f.can(RightPollFdReadwrite) {
		sub.errno, sub.ready = ENOTCAPABLE, true
		return
	}
	if f.Host < 0 {
		sub.ready = true // stdio backed by a Go reader or writer
		return
	}
	if f.Filetype == FiletypeRegularFile {
		if sub.typ == EventtypeFdRead {
			sub.nbytes = fileRemaining(f)
		}
		sub.ready = true
		return
	}
	events := int16(unix.POLLOUT)
	if sub.typ == EventtypeFdRead {
		events = unix.POLLIN | unix.POLLRDHUP
	}
	sub.pfd = int32(len(d.pollScratch.pfds))
	d.pollScratch.pfds = append(d.pollScratch.pfds, unix.PollFd{Fd: int32(f.Host), Events: events})
}

// fileRemaining is how many bytes a read at the current offset could return.
// Files opened by path keep their offset in Pos; stdio redirected from a
// file uses the host offset.
func fileRemaining(f *FD) uint64 {
	var st unix.Stat_t
	if unix.Fstat(f.Host, &st) != nil {
		return 0
	}
	off := f.Pos
	if f.Kind != KindFile {
		var err error
		if off, err = unix.Seek(f.Host, 0, unix.SEEK_CUR); err != nil {
			return 0
		}
	}
	if off >= st.Size {
		return 0
	}
	return uint64(st.Size - off)
}

// pollTimeout is how long the next ppoll may sleep: zero if an event is
// already there, until the earliest clock deadline, or forever.
func (d *Devices) pollTimeout() (ns int64, infinite bool) {
	infinite = true
	for i := range d.pollScratch.subs {
		sub := &d.pollScratch.subs[i]
		if sub.ready {
			return 0, false
		}
		if sub.typ != EventtypeClock {
			continue
		}
		now, _ := d.clockNow(sub.clock)
		if sub.deadline <= now {
			return 0, false
		}
		left := sub.deadline - now
		if left > math.MaxInt64 {
			left = math.MaxInt64
		}
		if infinite || int64(left) < ns {
			ns, infinite = int64(left), false
		}
	}
	return ns, infinite
}

func clearRevents(pfds []unix.PollFd) {
	for i := range pfds {
		pfds[i].Revents = 0
	}
}

// collect marks the subscriptions that fired after a ppoll and fills in
// their event details; it returns how many fired.
func (d *Devices) collect() int {
	count := 0
	for i := range d.pollScratch.subs {
		sub := &d.pollScratch.subs[i]
		switch {
		case sub.typ == EventtypeClock && !sub.ready:
			now, _ := d.clockNow(sub.clock)
			sub.ready = sub.deadline <= now
		case sub.pfd >= 0:
			rev := d.pollScratch.pfds[sub.pfd].Revents
			if rev == 0 {
				break
			}
			sub.ready = true
			if rev&unix.POLLNVAL != 0 {
				sub.errno = EBADF
				break
			}
			if rev&unix.POLLHUP != 0 || (sub.typ == EventtypeFdRead && rev&unix.POLLRDHUP != 0) {
				sub.flags |= EventFdReadwriteHangup
			}
			if sub.typ == EventtypeFdRead {
				sub.nbytes = readable(sub.kind, int(sub.host))
			}
		}
		if sub.ready {
			count++
		}
	}
	return count
}

// readable is the FIONREAD count of a ready descriptor. A listener has no
// byte count; it reports 1 for "a connection is waiting".
func readable(kind Kind, host int) uint64 {
	if kind == KindListener {
		return 1
	}
	n, err := unix.IoctlGetInt(host, unix.TIOCINQ) // FIONREAD
	if err != nil || n < 0 {
		return 0
	}
	return uint64(n)
}

// writeEvents encodes the fired subscriptions, in subscription order, into
// the reused output buffer.
func (d *Devices) writeEvents() []byte {
	s := &d.pollScratch
	need := len(s.subs) * sizeEvent
	if cap(s.out) < need {
		s.out = make([]byte, need)
	}
	out := s.out[:0]
	for i := range s.subs {
		sub := &s.subs[i]
		if !sub.ready {
			continue
		}
		ev := out[len(out) : len(out)+sizeEvent]
		clear(ev)
		le64(ev, 0, sub.userdata)
		le16(ev, 8, uint16(sub.errno))
		ev[10] = sub.typ
		if sub.typ != EventtypeClock {
			le64(ev, 16, sub.nbytes)
			le16(ev, 24, sub.flags)
		}
		out = out[:len(out)+sizeEvent]
	}
	return out
}

// PollWait describes a guest blocked in poll_oneoff, for status reports:
// since when, and what it waits for, each descriptor with whether it is
// ready now. A guest that stays asleep while one of them stays ready lost
// a wake-up (at an ordinary wake-up a descriptor reads as ready for a
// moment); one that waits for none of the descriptors its clients use is
// waiting in its own code. Publishing it costs a sleeping poll_oneoff two
// allocations (the description and its list).
type PollWait struct {
	Since       time.Time    `json:"since"`
	Seconds     float64      `json:"seconds"`
	HasDeadline bool         `json:"has_deadline"`
	Fds         []PollWaitFd `json:"fds"`
}

// PollWaitFd is one descriptor subscription of a PollWait.
type PollWaitFd struct {
	Fd       uint32 `json:"fd"`
	HostFd   int32  `json:"host_fd"`
	Event    string `json:"event"` // "read" or "write"
	ReadyNow bool   `json:"ready_now"`
	events   int16  // what poll_oneoff polls the host descriptor for
}

// publishWait records the subscriptions of a poll_oneoff about to sleep.
func (d *Devices) publishWait(infinite bool) {
	w := &PollWait{Since: time.Now(), HasDeadline: !infinite}
	for i := range d.pollScratch.subs {
		sub := &d.pollScratch.subs[i]
		if sub.pfd < 0 {
			continue
		}
		ev := "read"
		if sub.typ == EventtypeFdWrite {
			ev = "write"
		}
		w.Fds = append(w.Fds, PollWaitFd{Fd: sub.fd, HostFd: sub.host, Event: ev,
			events: d.pollScratch.pfds[sub.pfd].Events})
	}
	d.pollWait.Store(w)
}

// PollWait returns what the guest waits for in poll_oneoff now, nil if it
// is not blocked there. Safe from any goroutine; readiness is read at the
// time of the call (a descriptor closed meanwhile may read as anything:
// its number can be another file's by then).
func (d *Devices) PollWait() *PollWait {
	w := d.pollWait.Load()
	if w == nil {
		return nil
	}
	out := *w
	out.Seconds = time.Since(w.Since).Seconds()
	out.Fds = append([]PollWaitFd(nil), w.Fds...)
	pfds := make([]unix.PollFd, len(out.Fds))
	for i, f := range out.Fds {
		pfds[i] = unix.PollFd{Fd: f.HostFd, Events: f.events}
	}
	var zero unix.Timespec
	if _, err := unix.Ppoll(pfds, &zero, nil); err == nil {
		for i := range out.Fds {
			out.Fds[i].ReadyNow = pfds[i].Revents&^unix.POLLNVAL != 0
		}
	}
	return &out
}
