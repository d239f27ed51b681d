package wasi

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sockVM is a device layer with one preopened loopback listener at fd 3 and
// a flat guest memory, for calling the socket and poll handlers directly.
type sockVM struct {
	t    testing.TB
	d    *Devices
	mem  []byte
	m    Mem
	addr string
}

// Guest memory layout of the tests.
const (
	tRes    = 0x100  // u32 results
	tRes2   = 0x108  // u16 ro_flags
	tIovs   = 0x200  // iovec array
	tBuf    = 0x1000 // data buffers
	tSubs   = 0x8000 // subscriptions
	tEvents = 0xc000 // events
	tMemLen = 1 << 20
)

func newSockVM(t testing.TB, cfg Config) *sockVM {
	t.Helper()
	if cfg.Listen == nil {
		cfg.Listen = []Listener{{Fd: 3, Addr: "127.0.0.1:0"}}
	}
	if cfg.Stdin == nil {
		cfg.Stdin = strings.NewReader("")
	}
	if cfg.Stdout == nil {
		cfg.Stdout = io.Discard
	}
	if cfg.Stderr == nil {
		cfg.Stderr = io.Discard
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	v := &sockVM{t: t, d: d, mem: make([]byte, tMemLen), addr: d.ListenerAddrs()[3]}
	v.m = NewMem(v.mem)
	return v
}

func (v *sockVM) call(c Call, args ...uint64) Errno {
	return handlers[c](v.d, v.m, args)
}

func (v *sockVM) u32(ptr uint32) uint32 { return binary.LittleEndian.Uint32(v.mem[ptr:]) }

// setIovs lays out buffers of the given sizes at tBuf and their iovecs at tIovs.
func (v *sockVM) setIovs(sizes ...int) uint64 {
	off := uint32(tBuf)
	for i, n := range sizes {
		binary.LittleEndian.PutUint32(v.mem[tIovs+8*i:], off)
		binary.LittleEndian.PutUint32(v.mem[tIovs+8*i+4:], uint32(n))
		off += uint32(n)
	}
	return uint64(len(sizes))
}

// dial connects a client and accepts it in the guest, returning both ends.
func (v *sockVM) dial() (net.Conn, uint32) {
	v.t.Helper()
	c, err := net.Dial("tcp", v.addr)
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { c.Close() })
	if e := v.call(CallSockAccept, 3, 0, tRes); e != ESUCCESS {
		v.t.Fatalf("sock_accept: %v", e)
	}
	return c, v.u32(tRes)
}

// recv calls sock_recv into one buffer of size n and returns the bytes.
func (v *sockVM) recv(fd uint32, n int, riflags uint16) ([]byte, Errno) {
	iovs := v.setIovs(n)
	e := v.call(CallSockRecv, uint64(fd), tIovs, iovs, uint64(riflags), tRes, tRes2)
	if e != ESUCCESS {
		return nil, e
	}
	return append([]byte(nil), v.mem[tBuf:tBuf+v.u32(tRes)]...), e
}

// send calls sock_send with data.
func (v *sockVM) send(fd uint32, data []byte) (uint32, Errno) {
	copy(v.mem[tBuf:], data)
	iovs := v.setIovs(len(data))
	e := v.call(CallSockSend, uint64(fd), tIovs, iovs, 0, tRes)
	return v.u32(tRes), e
}

func (v *sockVM) setNonblock(fd uint32) {
	if e := v.call(CallFdFdstatSetFlags, uint64(fd), uint64(FdflagNonblock)); e != ESUCCESS {
		v.t.Fatalf("fd_fdstat_set_flags: %v", e)
	}
}

// recordTap keeps every input.
type recordTap struct {
	mu  sync.Mutex
	ins []Input
}

func (r *recordTap) Input(in Input) {
	r.mu.Lock()
	in.Data = append([]byte(nil), in.Data...)
	r.ins = append(r.ins, in)
	r.mu.Unlock()
}

func (r *recordTap) kinds(k InputKind) []Input {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Input
	for _, in := range r.ins {
		if in.Kind == k {
			out = append(out, in)
		}
	}
	return out
}

func TestSockAccept(t *testing.T) {
	tap := &recordTap{}
	v := newSockVM(t, Config{Tap: tap})
	// A NONBLOCK listener has nothing to accept yet.
	v.setNonblock(3)
	if e := v.call(CallSockAccept, 3, 0, tRes); e != EAGAIN {
		t.Fatalf("accept on a NONBLOCK listener: %v, want EAGAIN", e)
	}
	if e := v.call(CallFdFdstatSetFlags, 3, 0); e != ESUCCESS {
		t.Fatal(e)
	}
	// A blocking accept waits for the client that connects later.
	clientc := make(chan net.Conn, 1)
	go func() {
		time.Sleep(50 * time.Millisecond)
		c, err := net.Dial("tcp", v.addr)
		if err != nil {
			t.Error(err)
		}
		clientc <- c
	}()
	t0 := time.Now()
	if e := v.call(CallSockAccept, 3, 0, tRes); e != ESUCCESS {
		t.Fatalf("blocking accept: %v", e)
	}
	if el := time.Since(t0); el < 40*time.Millisecond {
		t.Fatalf("accept returned after %v, before the client connected", el)
	}
	client := <-clientc
	if client == nil {
		t.FailNow()
	}
	defer client.Close()
	fd := v.u32(tRes)
	if fd != 4 {
		t.Fatalf("new fd %d, want 4", fd)
	}
	f, _ := v.d.fds.Get(fd)
	if f.Kind != KindConn || f.Filetype != FiletypeSocketStream || f.RightsBase != RightsSocket {
		t.Fatalf("new fd: %+v", f)
	}
	if f.Addr != client.LocalAddr().String() {
		t.Fatalf("peer %q, want %q", f.Addr, client.LocalAddr())
	}
	if nd, err := unix.GetsockoptInt(f.Host, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || nd == 0 {
		t.Fatalf("TCP_NODELAY not set: %d %v", nd, err)
	}
	if e := v.call(CallFdFdstatGet, uint64(fd), tBuf); e != ESUCCESS || v.mem[tBuf] != byte(FiletypeSocketStream) {
		t.Fatalf("fdstat: %v type %d", e, v.mem[tBuf])
	}
	if n := v.d.counters.Accepted.Load(); n != 1 {
		t.Fatalf("Accepted = %d", n)
	}
	acc := tap.kinds(InputAccept)
	if len(acc) != 1 || acc[0].Value != uint64(fd) || acc[0].Fd != 3 || string(acc[0].Data) != f.Addr {
		t.Fatalf("tap accepts: %+v", acc)
	}
	// Accept with the NONBLOCK flag gives a non-blocking connection.
	c2, err := net.Dial("tcp", v.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if e := v.call(CallSockAccept, 3, uint64(FdflagNonblock), tRes); e != ESUCCESS {
		t.Fatal(e)
	}
	f2, _ := v.d.fds.Get(v.u32(tRes))
	if f2.Flags != FdflagNonblock {
		t.Fatalf("flags %x", f2.Flags)
	}
	// Errors.
	for _, tc := range []struct {
		fd, flags uint64
		ptr       uint64
		want      Errno
	}{
		{99, 0, tRes, EBADF},
		{0, 0, tRes, ENOTSOCK},
		{uint64(fd), 0, tRes, EINVAL},
		{3, 0x1, tRes, EINVAL},
		{3, 0, tMemLen - 2, EFAULT},
	} {
		if e := v.call(CallSockAccept, tc.fd, tc.flags, tc.ptr); e != tc.want {
			t.Errorf("sock_accept(%d, %d, %#x) = %v, want %v", tc.fd, tc.flags, tc.ptr, e, tc.want)
		}
	}
}

func TestSockRecvSend(t *testing.T) {
	tap := &recordTap{}
	v := newSockVM(t, Config{Tap: tap})
	c, fd := v.dial()
	if _, err := c.Write([]byte("hello world")); err != nil {
		t.Fatal(err)
	}
	// PEEK leaves the data in place.
	got, e := v.recv(fd, 5, RiflagRecvPeek)
	if e != ESUCCESS || string(got) != "hello" {
		t.Fatalf("peek: %q %v", got, e)
	}
	got, e = v.recv(fd, 5, 0)
	if e != ESUCCESS || string(got) != "hello" {
		t.Fatalf("recv: %q %v", got, e)
	}
	if binary.LittleEndian.Uint16(v.mem[tRes2:]) != 0 {
		t.Fatal("ro_flags set")
	}
	// fd_read over two iovecs.
	iovs := v.setIovs(3, 10)
	if e := v.call(CallFdRead, uint64(fd), tIovs, iovs, tRes); e != ESUCCESS || v.u32(tRes) != 6 {
		t.Fatalf("fd_read: %v n=%d", e, v.u32(tRes))
	}
	if s := string(v.mem[tBuf : tBuf+6]); s != " world" {
		t.Fatalf("fd_read got %q", s)
	}
	reads := tap.kinds(InputRead)
	// The peek is an input too: the guest saw those bytes.
	if len(reads) != 3 || string(reads[0].Data) != "hello" || string(reads[1].Data) != "hello" ||
		string(reads[2].Data) != " world" || reads[0].Call != CallSockRecv || reads[2].Call != CallFdRead {
		t.Fatalf("tap reads: %+v", reads)
	}
	if n := v.d.counters.BytesIn.Load(); n != 11 {
		t.Fatalf("BytesIn = %d", n)
	}
	// Send, and fd_write with two iovecs.
	if n, e := v.send(fd, []byte("pong")); e != ESUCCESS || n != 4 {
		t.Fatalf("sock_send: %d %v", n, e)
	}
	copy(v.mem[tBuf:], "ab-cd")
	iovs = v.setIovs(2, 3)
	if e := v.call(CallFdWrite, uint64(fd), tIovs, iovs, tRes); e != ESUCCESS || v.u32(tRes) != 5 {
		t.Fatalf("fd_write: %v %d", e, v.u32(tRes))
	}
	buf := make([]byte, 9)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pongab-cd" {
		t.Fatalf("client got %q %v", buf, err)
	}
	if n := v.d.counters.Effects.Load(); n != 2 {
		t.Fatalf("Effects = %d", n)
	}
	// Non-blocking recv without data.
	v.setNonblock(fd)
	if _, e := v.recv(fd, 4, 0); e != EAGAIN {
		t.Fatalf("empty non-blocking recv: %v", e)
	}
	// Errors.
	if e := v.call(CallSockRecv, uint64(fd), tIovs, 1, 4, tRes, tRes2); e != EINVAL {
		t.Fatalf("bad riflags: %v", e)
	}
	if e := v.call(CallSockRecv, 3, tIovs, 1, 0, tRes, tRes2); e != ENOTCONN {
		t.Fatalf("recv on listener: %v", e)
	}
	if e := v.call(CallSockSend, 1, tIovs, 1, 0, tRes); e != ENOTSOCK {
		t.Fatalf("send on stdout: %v", e)
	}
	if e := v.call(CallSockRecv, uint64(fd), tIovs, 1, 0, tMemLen, tRes2); e != EFAULT {
		t.Fatalf("bad result pointer: %v", e)
	}
}

func TestSockRecvBlockingWaitall(t *testing.T) {
	v := newSockVM(t, Config{})
	c, fd := v.dial()
	go func() {
		c.Write([]byte("ab"))
		time.Sleep(30 * time.Millisecond)
		c.Write([]byte("cd"))
		time.Sleep(30 * time.Millisecond)
		c.Write([]byte("ef"))
	}()
	// A blocking recv waits and returns what is there.
	got, e := v.recv(fd, 4, 0)
	if e != ESUCCESS || string(got) != "ab" {
		t.Fatalf("blocking recv: %q %v", got, e)
	}
	// WAITALL fills the whole buffer across segments.
	got, e = v.recv(fd, 4, RiflagRecvWaitall)
	if e != ESUCCESS || string(got) != "cdef" {
		t.Fatalf("waitall: %q %v", got, e)
	}
	if v.d.counters.PollWaits.Load() == 0 {
		t.Fatal("no waits counted")
	}
}

func TestSockEOFAndReset(t *testing.T) {
	v := newSockVM(t, Config{})
	c, fd := v.dial()
	c.Write([]byte("x"))
	c.Close()
	if got, e := v.recv(fd, 4, 0); e != ESUCCESS || string(got) != "x" {
		t.Fatalf("recv: %q %v", got, e)
	}
	for i := 0; i < 2; i++ {
		if got, e := v.recv(fd, 4, 0); e != ESUCCESS || len(got) != 0 {
			t.Fatalf("recv at EOF: %q %v", got, e)
		}
	}
	// Writing to a closed peer: the first send may succeed, then RST makes
	// it EPIPE or ECONNRESET, never a SIGPIPE.
	var e Errno
	for i := 0; i < 50 && e == ESUCCESS; i++ {
		_, e = v.send(fd, []byte("data"))
		time.Sleep(2 * time.Millisecond)
	}
	if e != EPIPE && e != ECONNRESET {
		t.Fatalf("send to closed peer: %v", e)
	}

	// An abortive close (RST) is ECONNRESET on recv.
	c2, fd2 := v.dial()
	c2.(*net.TCPConn).SetLinger(0)
	c2.Close()
	time.Sleep(20 * time.Millisecond)
	if _, e := v.recv(fd2, 4, 0); e != ECONNRESET {
		t.Fatalf("recv after RST: %v", e)
	}
}

func TestSockShutdown(t *testing.T) {
	v := newSockVM(t, Config{})
	c, fd := v.dial()
	if e := v.call(CallSockShutdown, uint64(fd), 0); e != EINVAL {
		t.Fatalf("how=0: %v", e)
	}
	if e := v.call(CallSockShutdown, uint64(fd), 4); e != EINVAL {
		t.Fatalf("how=4: %v", e)
	}
	if e := v.call(CallSockShutdown, 3, uint64(SdflagWr)); e != ENOTCONN {
		t.Fatalf("listener: %v", e)
	}
	if e := v.call(CallSockShutdown, 0, uint64(SdflagWr)); e != ENOTSOCK {
		t.Fatalf("stdin: %v", e)
	}
	v.send(fd, []byte("bye"))
	effects := v.d.counters.Effects.Load()
	if e := v.call(CallSockShutdown, uint64(fd), uint64(SdflagWr)); e != ESUCCESS {
		t.Fatal(e)
	}
	if v.d.counters.Effects.Load() != effects+1 {
		t.Fatal("shutdown did not go through the gate")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye" {
		t.Fatalf("client read %q %v, want bye then EOF", b, err)
	}
	// The read side still works after SHUT_WR.
	c.Write([]byte("late"))
	if got, e := v.recv(fd, 8, 0); e != ESUCCESS || string(got) != "late" {
		t.Fatalf("recv after SHUT_WR: %q %v", got, e)
	}
	if e := v.call(CallSockShutdown, uint64(fd), uint64(SdflagRd)); e != ESUCCESS {
		t.Fatal(e)
	}
	if got, e := v.recv(fd, 8, 0); e != ESUCCESS || len(got) != 0 {
		t.Fatalf("recv after SHUT_RD: %q %v", got, e)
	}
	f, _ := v.d.fds.Get(fd)
	if f.conn.shut != SdflagRd|SdflagWr {
		t.Fatalf("shut = %d", f.conn.shut)
	}
}

func TestSockSendLarge(t *testing.T) {
	v := newSockVM(t, Config{})
	c, fd := v.dial()
	const size = 8 << 20
	data := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	big := make([]byte, 16<<20)
	v2 := *v
	v2.mem = big
	v2.m = NewMem(big)

	// Non-blocking: nobody reads, so the kernel buffers fill: short count,
	// then EAGAIN.
	v.setNonblock(fd)
	n, e := v2.send(fd, data)
	if e != ESUCCESS || n == 0 || n >= size {
		t.Fatalf("non-blocking big send: n=%d %v", n, e)
	}
	// The kernel may grow the send buffer (autotuning) after the first
	// send filled it: keep sending until it is full for good.
	sent := append([]byte(nil), data[:n]...)
	for i := 0; ; i++ {
		n2, e := v2.send(fd, data)
		if e == EAGAIN {
			break
		}
		if e != ESUCCESS || n2 >= size || i == 100 {
			t.Fatalf("non-blocking send %d: n=%d %v", i+2, n2, e)
		}
		sent = append(sent, data[:n2]...)
	}
	first := len(sent)
	// Blocking: everything goes once the client reads.
	if e := v.call(CallFdFdstatSetFlags, uint64(fd), 0); e != ESUCCESS {
		t.Fatal(e)
	}
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(c, int64(first)+size))
		done <- b
	}()
	n, e = v2.send(fd, data)
	if e != ESUCCESS || n != size {
		t.Fatalf("blocking big send: n=%d %v", n, e)
	}
	got := <-done
	if !bytes.Equal(got[:first], sent) || !bytes.Equal(got[first:], data) {
		t.Fatal("data corrupted")
	}
}

// holdGate holds every write and performs it later from another goroutine,
// as output commit does.
type holdGate struct {
	mu   sync.Mutex
	held []func()
}

func (g *holdGate) Output(e Effect, perform Perform) (uint32, Errno) {
	data := append([]byte(nil), e.Data...)
	if e.Later != nil {
		perform = e.Later
	}
	g.mu.Lock()
	g.held = append(g.held, func() { perform(data) })
	g.mu.Unlock()
	return uint32(len(data)), ESUCCESS
}

func (g *holdGate) release() {
	g.mu.Lock()
	held := g.held
	g.held = nil
	g.mu.Unlock()
	for _, p := range held {
		p()
	}
}

func TestSockHeldOutput(t *testing.T) {
	g := &holdGate{}
	v := newSockVM(t, Config{Gate: g})
	c, fd := v.dial()
	v.setNonblock(fd)
	const size = 4 << 20
	data := bytes.Repeat([]byte("held"), size/4)
	big := make([]byte, 8<<20)
	v2 := *v
	v2.mem = big
	v2.m = NewMem(big)
	if n, e := v2.send(fd, data); e != ESUCCESS || n != size {
		t.Fatalf("held send: %d %v", n, e)
	}
	if e := v.call(CallSockShutdown, uint64(fd), uint64(SdflagWr)); e != ESUCCESS {
		t.Fatal(e)
	}
	// Nothing has left yet.
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Fatal("held output leaked")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	go g.release() // a released send larger than the socket buffers must complete in full
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("released %d bytes, %v", len(got), err)
	}
}

func TestSockStopWakesBlockedRecv(t *testing.T) {
	v := newSockVM(t, Config{})
	_, fd := v.dial()
	// A plain Interrupt is not a failure of the call: it keeps waiting.
	res := make(chan Errno, 1)
	go func() {
		_, e := v.recv(fd, 4, 0)
		res <- e
	}()
	time.Sleep(30 * time.Millisecond)
	v.d.Interrupt()
	select {
	case e := <-res:
		t.Fatalf("recv returned %v on Interrupt", e)
	case <-time.After(50 * time.Millisecond):
	}
	t0 := time.Now()
	v.d.Stop()
	select {
	case e := <-res:
		if e != EINTR {
			t.Fatalf("recv after Stop: %v", e)
		}
		t.Logf("recv woke %v after Stop", time.Since(t0))
	case <-time.After(2 * time.Second):
		t.Fatal("Stop did not wake a blocked recv")
	}
}

func TestSockRecvAllocs(t *testing.T) {
	v := newSockVM(t, Config{})
	c, fd := v.dial()
	v.setNonblock(fd)
	// Write from a raw descriptor so that the client side allocates nothing.
	cf, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer cf.Close()
	raw := int(cf.Fd())
	msg := []byte("0123456789")
	params := []uint64{uint64(fd), tIovs, 1, 0, tRes, tRes2}
	v.setIovs(64)
	recv := handlers[CallSockRecv]
	n := testing.AllocsPerRun(200, func() {
		unix.Write(raw, msg)
		for recv(v.d, v.m, params) == EAGAIN {
		}
		recv(v.d, v.m, params) // EAGAIN
	})
	if n != 0 {
		t.Fatalf("sock_recv allocates %v times per call", n)
	}
}

// TestHeldShutdownAfterRelease: a shutdown held by the gate and performed
// once the devices are released (the VM ended first) must not reach the
// socket its descriptor number belongs to by then: it shut down whatever
// the host had opened under that number since.
func TestHeldShutdownAfterRelease(t *testing.T) {
	g := &holdGate{}
	v := newSockVM(t, Config{Gate: g})
	_, fd := v.dial()
	if e := v.call(CallSockShutdown, uint64(fd), uint64(SdflagWr)); e != ESUCCESS {
		t.Fatal(e)
	}
	f, _ := v.d.fds.Get(fd)
	host := f.Host
	v.d.Close()
	// The host's next socket likely takes the freed number; make sure.
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[0])
	defer unix.Close(pair[1])
	if pair[0] != host {
		if err := unix.Dup2(pair[0], host); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(host)
	}
	g.release()
	if _, err := unix.Write(host, []byte("x")); err != nil {
		t.Fatalf("the socket now numbered %d was shut down by the VM's held shutdown: %v", host, err)
	}
}
