package wasi

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sub is a subscription to encode at tSubs.
type sub struct {
	userdata uint64
	typ      uint8
	fd       uint32 // FD_READ / FD_WRITE
	clock    uint32
	timeout  uint64
	flags    uint16
}

// event is a decoded event record.
type event struct {
	userdata uint64
	errno    Errno
	typ      uint8
	nbytes   uint64
	flags    uint16
}

func clockSub(userdata uint64, clock uint32, timeout time.Duration, flags uint16) sub {
	return sub{userdata: userdata, typ: EventtypeClock, clock: clock, timeout: uint64(timeout), flags: flags}
}

func readSub(userdata uint64, fd uint32) sub {
	return sub{userdata: userdata, typ: EventtypeFdRead, fd: fd}
}

func writeSub(userdata uint64, fd uint32) sub {
	return sub{userdata: userdata, typ: EventtypeFdWrite, fd: fd}
}

func (v *sockVM) putSubs(subs []sub) {
	for i, s := range subs {
		b := v.mem[tSubs+i*sizeSubscription : tSubs+(i+1)*sizeSubscription]
		clear(b)
		binary.LittleEndian.PutUint64(b, s.userdata)
		b[8] = s.typ
		if s.typ == EventtypeClock {
			binary.LittleEndian.PutUint32(b[16:], s.clock)
			binary.LittleEndian.PutUint64(b[24:], s.timeout)
			binary.LittleEndian.PutUint64(b[32:], 1000)
			binary.LittleEndian.PutUint16(b[40:], s.flags)
		} else {
			binary.LittleEndian.PutUint32(b[16:], s.fd)
		}
	}
}

// poll runs poll_oneoff over subs and decodes the events.
func (v *sockVM) poll(subs ...sub) ([]event, Errno) {
	v.putSubs(subs)
	clear(v.mem[tEvents : tEvents+len(subs)*sizeEvent])
	e := v.call(CallPollOneoff, tSubs, tEvents, uint64(len(subs)), tRes)
	if e != ESUCCESS {
		return nil, e
	}
	n := v.u32(tRes)
	var evs []event
	for i := uint32(0); i < n; i++ {
		b := v.mem[tEvents+i*sizeEvent:]
		evs = append(evs, event{
			userdata: binary.LittleEndian.Uint64(b),
			errno:    Errno(binary.LittleEndian.Uint16(b[8:])),
			typ:      b[10],
			nbytes:   binary.LittleEndian.Uint64(b[16:]),
			flags:    binary.LittleEndian.Uint16(b[24:]),
		})
	}
	return evs, ESUCCESS
}

func TestPollArgs(t *testing.T) {
	v := newSockVM(t, Config{})
	if e := v.call(CallPollOneoff, tSubs, tEvents, 0, tRes); e != EINVAL {
		t.Fatalf("nsubscriptions 0: %v", e)
	}
	v.putSubs([]sub{clockSub(1, ClockMonotonic, 0, 0)})
	if e := v.call(CallPollOneoff, tMemLen-10, tEvents, 1, tRes); e != EFAULT {
		t.Fatalf("bad in: %v", e)
	}
	if e := v.call(CallPollOneoff, tSubs, tMemLen-10, 1, tRes); e != EFAULT {
		t.Fatalf("bad out: %v", e)
	}
	if e := v.call(CallPollOneoff, tSubs, tEvents, 1, tMemLen); e != EFAULT {
		t.Fatalf("bad nevents: %v", e)
	}
	if e := v.call(CallPollOneoff, tSubs, tEvents, 1<<30, tRes); e != EFAULT {
		t.Fatalf("huge n: %v", e)
	}
	if _, e := v.poll(sub{userdata: 1, typ: 9}); e != EINVAL {
		t.Fatalf("bad event type: %v", e)
	}
	// A bad clock or bad flags is an event error, not a call failure.
	evs, e := v.poll(clockSub(7, 99, 0, 0), clockSub(8, ClockMonotonic, 0, 4))
	if e != ESUCCESS || len(evs) != 2 || evs[0].errno != EINVAL || evs[1].errno != EINVAL || evs[1].userdata != 8 {
		t.Fatalf("bad clocks: %+v %v", evs, e)
	}
}

func TestPollClocks(t *testing.T) {
	tap := &recordTap{}
	v := newSockVM(t, Config{Tap: tap})
	// Relative monotonic.
	t0 := time.Now()
	evs, e := v.poll(clockSub(42, ClockMonotonic, 50*time.Millisecond, 0))
	el := time.Since(t0)
	if e != ESUCCESS || len(evs) != 1 || evs[0] != (event{userdata: 42, typ: EventtypeClock}) {
		t.Fatalf("relative: %+v %v", evs, e)
	}
	if el < 50*time.Millisecond || el > time.Second {
		t.Fatalf("relative 50ms took %v", el)
	}
	if v.d.counters.PollWaits.Load() != 1 {
		t.Fatalf("PollWaits = %d", v.d.counters.PollWaits.Load())
	}
	// Absolute monotonic, on the guest's virtual clock.
	v.d.clock.SetMonotonic(1e12)
	deadline := v.d.clock.Monotonic() + uint64(30*time.Millisecond)
	t0 = time.Now()
	evs, e = v.poll(sub{userdata: 1, typ: EventtypeClock, clock: ClockMonotonic, timeout: deadline, flags: SubclockAbstime})
	if e != ESUCCESS || len(evs) != 1 || v.d.clock.Monotonic() < deadline {
		t.Fatalf("abstime: %+v %v", evs, e)
	}
	if el := time.Since(t0); el < 25*time.Millisecond || el > time.Second {
		t.Fatalf("abstime 30ms took %v", el)
	}
	// Absolute realtime in the past fires at once; a later one does not.
	past := uint64(time.Now().Add(-time.Second).UnixNano())
	future := uint64(time.Now().Add(time.Hour).UnixNano())
	waits := v.d.counters.PollWaits.Load()
	evs, e = v.poll(sub{userdata: 2, typ: EventtypeClock, clock: ClockRealtime, timeout: future, flags: SubclockAbstime},
		sub{userdata: 3, typ: EventtypeClock, clock: ClockRealtime, timeout: past, flags: SubclockAbstime})
	if e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 3 {
		t.Fatalf("realtime abstime: %+v %v", evs, e)
	}
	if v.d.counters.PollWaits.Load() != waits {
		t.Fatal("a ready poll counted as a wait")
	}
	// Relative realtime; the earliest of two clocks fires alone.
	t0 = time.Now()
	evs, e = v.poll(clockSub(4, ClockMonotonic, time.Hour, 0), clockSub(5, ClockRealtime, 20*time.Millisecond, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 5 || time.Since(t0) < 20*time.Millisecond {
		t.Fatalf("earliest clock: %+v %v", evs, e)
	}
	// Sub-millisecond timeouts are honoured, not rounded to 0 or 1ms.
	t0 = time.Now()
	if _, e := v.poll(clockSub(6, ClockMonotonic, 300*time.Microsecond, 0)); e != ESUCCESS {
		t.Fatal(e)
	}
	if el := time.Since(t0); el < 300*time.Microsecond || el > 200*time.Millisecond {
		t.Fatalf("300µs took %v", el)
	}
	polls := tap.kinds(InputPoll)
	if len(polls) != 5 || len(polls[0].Data) != sizeEvent || polls[0].Value != 1 ||
		binary.LittleEndian.Uint64(polls[0].Data) != 42 {
		t.Fatalf("tap polls: %d %+v", len(polls), polls[0])
	}
}

func TestPollSockets(t *testing.T) {
	v := newSockVM(t, Config{})
	// The listener becomes readable when a client connects.
	go func() {
		time.Sleep(30 * time.Millisecond)
		if c, err := net.Dial("tcp", v.addr); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}()
	t0 := time.Now()
	evs, e := v.poll(readSub(3, 3), clockSub(99, ClockMonotonic, 5*time.Second, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 3 || evs[0].typ != EventtypeFdRead || evs[0].errno != 0 {
		t.Fatalf("listener: %+v %v", evs, e)
	}
	if el := time.Since(t0); el < 25*time.Millisecond || el > 2*time.Second {
		t.Fatalf("listener ready after %v", el)
	}
	if e := v.call(CallSockAccept, 3, uint64(FdflagNonblock), tRes); e != ESUCCESS {
		t.Fatal(e)
	}
	fd := v.u32(tRes)

	c, cfd := v.dial()
	// Writable at once, not readable.
	evs, e = v.poll(readSub(1, cfd), writeSub(2, cfd))
	if e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 2 || evs[0].typ != EventtypeFdWrite {
		t.Fatalf("writable: %+v %v", evs, e)
	}
	// Readable when the peer writes, from another goroutine, with nbytes.
	go func() {
		time.Sleep(30 * time.Millisecond)
		c.Write([]byte("12345"))
	}()
	t0 = time.Now()
	evs, e = v.poll(readSub(1, cfd), readSub(7, fd), clockSub(99, ClockMonotonic, 5*time.Second, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0] != (event{userdata: 1, typ: EventtypeFdRead, nbytes: 5}) {
		t.Fatalf("readable: %+v %v", evs, e)
	}
	if el := time.Since(t0); el < 25*time.Millisecond || el > 2*time.Second {
		t.Fatalf("readable after %v", el)
	}
	// Hangup when the peer closes.
	c.Close()
	evs, e = v.poll(readSub(1, cfd), clockSub(99, ClockMonotonic, 5*time.Second, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0].flags&EventFdReadwriteHangup == 0 || evs[0].nbytes != 5 {
		t.Fatalf("hangup: %+v %v", evs, e)
	}
	// A bad descriptor is an event with EBADF, alongside real ones.
	evs, e = v.poll(readSub(11, 99), writeSub(12, cfd), readSub(13, 1<<31))
	if e != ESUCCESS || len(evs) != 3 || evs[0] != (event{userdata: 11, errno: EBADF, typ: EventtypeFdRead}) ||
		evs[2].errno != EBADF || evs[1].errno != 0 {
		t.Fatalf("EBADF: %+v %v", evs, e)
	}
	// A descriptor without the poll right.
	if e := v.call(CallFdFdstatSetRights, uint64(cfd), RightsSocket&^RightPollFdReadwrite, 0); e != ESUCCESS {
		t.Fatal(e)
	}
	evs, e = v.poll(readSub(1, cfd))
	if e != ESUCCESS || len(evs) != 1 || evs[0].errno != ENOTCAPABLE {
		t.Fatalf("no right: %+v %v", evs, e)
	}
}

func TestPollFilesAndStdio(t *testing.T) {
	pr, pw := testPipe(t)
	v := newSockVM(t, Config{Stdin: pr})
	// A regular file is always ready; nbytes is what is left after Pos.
	path := filepath.Join(t.TempDir(), "f")
	os.WriteFile(path, []byte("0123456789"), 0o644)
	h, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ffd, _ := v.d.fds.Add(&FD{Kind: KindFile, Filetype: FiletypeRegularFile, Host: h, Root: -1, Pos: 3,
		RightsBase: RightsRegularFile, Readable: true, Writable: true})
	dh, err := unix.Open(t.TempDir(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dfd, _ := v.d.fds.Add(&FD{Kind: KindDir, Filetype: FiletypeDirectory, Host: dh, Root: -1, RightsBase: RightsDirectory})
	evs, e := v.poll(readSub(1, ffd), writeSub(2, ffd), readSub(3, dfd), writeSub(4, 1))
	if e != ESUCCESS || len(evs) != 4 || evs[0].nbytes != 7 || evs[2].errno != 0 || evs[3].userdata != 4 {
		t.Fatalf("files: %+v %v", evs, e)
	}
	// stdin on a host pipe is polled for real: not ready, then ready.
	evs, e = v.poll(readSub(1, 0), clockSub(2, ClockMonotonic, 20*time.Millisecond, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 2 {
		t.Fatalf("idle stdin: %+v %v", evs, e)
	}
	go func() {
		time.Sleep(20 * time.Millisecond)
		pw.Write([]byte("line\n"))
	}()
	evs, e = v.poll(readSub(1, 0), clockSub(2, ClockMonotonic, 5*time.Second, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0] != (event{userdata: 1, typ: EventtypeFdRead, nbytes: 5}) {
		t.Fatalf("stdin: %+v %v", evs, e)
	}
	// stdin backed by a Go reader is always ready.
	v2 := newSockVM(t, Config{Listen: []Listener{}})
	evs, e = v2.poll(readSub(1, 0))
	if e != ESUCCESS || len(evs) != 1 || evs[0].errno != 0 {
		t.Fatalf("Go stdin: %+v %v", evs, e)
	}
}

func TestPollInterruptAndStop(t *testing.T) {
	v := newSockVM(t, Config{})
	_, cfd := v.dial()
	res := make(chan []event, 1)
	go func() {
		evs, e := v.poll(readSub(1, cfd), readSub(3, 3), clockSub(2, ClockMonotonic, 300*time.Millisecond, 0))
		if e != ESUCCESS {
			t.Errorf("poll: %v", e)
		}
		res <- evs
	}()
	// An Interrupt wakes the wait promptly but gives the guest no
	// spurious event: the poll sleeps on until its clock.
	time.Sleep(30 * time.Millisecond)
	t0 := time.Now()
	v.d.Interrupt()
	select {
	case evs := <-res:
		if el := time.Since(t0); el < 200*time.Millisecond || len(evs) != 1 || evs[0].userdata != 2 {
			t.Fatalf("interrupted poll returned after %v with %+v", el, evs)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("poll never returned")
	}
	// Stop makes a blocked poll (no clock: it would wait forever) return
	// EINTR at once, and every later one too.
	errc := make(chan Errno, 1)
	go func() {
		_, e := v.poll(readSub(1, cfd))
		errc <- e
	}()
	time.Sleep(30 * time.Millisecond)
	t0 = time.Now()
	v.d.Stop()
	select {
	case e := <-errc:
		if e != EINTR {
			t.Fatalf("stopped poll: %v", e)
		}
		t.Logf("poll woke %v after Stop", time.Since(t0))
	case <-time.After(2 * time.Second):
		t.Fatal("Stop did not wake poll_oneoff")
	}
	if _, e := v.poll(readSub(1, cfd)); e != EINTR {
		t.Fatalf("poll after Stop: %v", e)
	}
	// What is ready is still reported after Stop.
	if evs, e := v.poll(writeSub(1, cfd)); e != ESUCCESS || len(evs) != 1 {
		t.Fatalf("ready poll after Stop: %+v %v", evs, e)
	}
}

func TestPollAllocs(t *testing.T) {
	v := newSockVM(t, Config{})
	var fds []uint32
	for i := 0; i < 8; i++ {
		_, fd := v.dial()
		fds = append(fds, fd)
	}
	subs := []sub{clockSub(1, ClockMonotonic, 0, 0), readSub(2, 3)}
	for _, fd := range fds {
		subs = append(subs, readSub(uint64(fd), fd), writeSub(uint64(fd), fd))
	}
	v.putSubs(subs)
	params := []uint64{tSubs, tEvents, uint64(len(subs)), tRes}
	poll := handlers[CallPollOneoff]
	poll(v.d, v.m, params)
	n := testing.AllocsPerRun(200, func() {
		if e := poll(v.d, v.m, params); e != ESUCCESS {
			t.Fatal(e)
		}
	})
	if n != 0 {
		t.Fatalf("poll_oneoff allocates %v times per call", n)
	}
	if got := v.u32(tRes); got != uint32(1+len(fds)) {
		t.Fatalf("%d events, want %d", got, 1+len(fds))
	}
}

// BenchmarkPollOneoffReady is the cost of a non-blocking poll over 64
// connections, as the Go scheduler makes between goroutine switches.
func BenchmarkPollOneoffReady(b *testing.B) {
	v := newSockVM(b, Config{})
	subs := []sub{clockSub(1, ClockMonotonic, 0, 0)}
	for i := 0; i < 64; i++ {
		c, err := net.Dial("tcp", v.addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		if e := v.call(CallSockAccept, 3, 0, tRes); e != ESUCCESS {
			b.Fatal(e)
		}
		subs = append(subs, readSub(uint64(i), v.u32(tRes)))
	}
	v.putSubs(subs)
	params := []uint64{tSubs, tEvents, uint64(len(subs)), tRes}
	poll := handlers[CallPollOneoff]
	b.ReportAllocs()
	for b.Loop() {
		poll(v.d, v.m, params)
	}
}

// TestPollIdlePause: a guest going to sleep in poll_oneoff whose OnIdle
// hook asked for a pause (a Remus checkpoint) gets it before it sleeps,
// through the wait's restart (errRestart), with nothing left to wake its
// next wait — even when the pausing goroutine is held up between raising
// the flag and writing the wake-up, as a busy machine may do; a hook that
// asked for nothing costs the wait nothing.
// TestPollIdlePauseAskedAtOnce: the goroutine the hook wakes may raise the
// flag before the hook has even returned (another CPU); the wait must end
// there too, not sleep and be woken.
func TestPollIdlePauseAskedAtOnce(t *testing.T) {
	var v *sockVM
	var wakes atomic.Int32
	v = newSockVM(t, Config{OnWake: func() { wakes.Add(1) }, OnIdle: func() bool {
		v.d.RequestPause() // done before the hook returns
		return true
	}})
	_, cfd := v.dial()
	_, e := v.poll(readSub(1, cfd))
	if e != errRestart || wakes.Load() != 0 {
		t.Fatalf("poll with the pause asked within the hook: %v after %d wake-ups, want the restart after none", e, wakes.Load())
	}
	v.d.ClearPause()
	// The pause's wake-up was consumed: a wait for a clock sleeps to it.
	v.d.onIdle = nil
	t0 := time.Now()
	evs, e := v.poll(readSub(1, cfd), clockSub(2, ClockMonotonic, 50*time.Millisecond, 0))
	if el := time.Since(t0); e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 2 || el < 50*time.Millisecond || wakes.Load() != 1 {
		t.Fatalf("poll after the pause: %+v %v after %v and %d wake-ups, want its clock after 50ms and one", evs, e, el, wakes.Load())
	}
}

func TestPollIdlePause(t *testing.T) {
	// Long enough for the pausing goroutine to run on any machine.
	defer func(d time.Duration) { idleYield = d }(idleYield)
	idleYield = 5 * time.Second
	testAfterPauseFlag = func() { time.Sleep(50 * time.Microsecond) }
	defer func() { testAfterPauseFlag = nil }()
	var v *sockVM
	var calls, wakes atomic.Int32
	var requestPause atomic.Bool
	v = newSockVM(t, Config{OnWake: func() { wakes.Add(1) }, OnIdle: func() bool {
		calls.Add(1)
		if !requestPause.Load() {
			return true // asked, but no pause comes
		}
		go v.d.RequestPause() // as the Remus loop does, from its goroutine
		return true
	}})
	_, cfd := v.dial()

	// Nothing ready, no clock: only the pause can end this wait.
	requestPause.Store(true)
	done := make(chan Errno, 1)
	go func() {
		_, e := v.poll(readSub(1, cfd))
		done <- e
	}()
	select {
	case e := <-done:
		if e != errRestart || calls.Load() != 1 {
			t.Fatalf("poll with a pause asked at idle: %v after %d OnIdle calls, want the restart after 1", e, calls.Load())
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the pause asked when the guest went idle never ended its wait")
	}
	v.d.ClearPause()

	if wakes.Load() != 0 {
		t.Fatalf("the guest slept and was woken for the pause (%d wake-ups)", wakes.Load())
	}

	// The restarted call sleeps until its clock: the pause's wake-up was
	// consumed (one wake-up: the clock's), and a hook that asks for
	// nothing more is waited out.
	idleYield = time.Millisecond
	requestPause.Store(false)
	t0 := time.Now()
	evs, e := v.poll(readSub(1, cfd), clockSub(2, ClockMonotonic, 100*time.Millisecond, 0))
	if el := time.Since(t0); e != ESUCCESS || len(evs) != 1 || evs[0].userdata != 2 || el < 100*time.Millisecond {
		t.Fatalf("poll after the pause: %+v %v after %v, want its clock after 100ms", evs, e, el)
	}
	if wakes.Load() != 1 {
		t.Fatalf("%d wake-ups for a wait that ends at its clock, want 1", wakes.Load())
	}
}
