package wasi

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestIdleWaiter: the poller-based sleep of poll_oneoff wakes for a ready
// descriptor, for the wake eventfd and at its deadline; follows a
// descriptor number closed and reused; and declines descriptors epoll
// cannot watch (regular files), so that the caller falls back to ppoll.
func TestIdleWaiter(t *testing.T) {
	wake, w := newTestWaiter(t)
	pipe := func() (r, wr int) {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			t.Fatal(err)
		}
		return p[0], p[1]
	}
	pfds := func(fd int) []unix.PollFd {
		return []unix.PollFd{{Fd: int32(wake), Events: unix.POLLIN}, {Fd: int32(fd), Events: unix.POLLIN}}
	}
	timed := func(what string, fd int, ns int64, infinite bool, min, max time.Duration) {
		t.Helper()
		t0 := time.Now()
		if !w.wait(pfds(fd), ns, infinite) {
			t.Fatalf("%s: the waiter declined a pipe", what)
		}
		if d := time.Since(t0); d < min || d > max {
			t.Fatalf("%s: woke after %v, want between %v and %v", what, d, min, max)
		}
	}
	r, wr := pipe()
	timed("nothing ready, 30 ms deadline", r, int64(30*time.Millisecond), false, 25*time.Millisecond, 2*time.Second)
	go func() { time.Sleep(20 * time.Millisecond); unix.Write(wr, []byte{1}) }()
	timed("data arrives", r, 0, true, 15*time.Millisecond, 2*time.Second)
	timed("data already there", r, 0, true, 0, time.Second)
	// Closed as Devices.closeHost does, then the same numbers again:
	// the new pipe is watched, not taken for the old one.
	w.forget(r)
	unix.Close(r)
	unix.Close(wr)
	r2, wr2 := pipe()
	defer unix.Close(r2)
	defer unix.Close(wr2)
	if r2 != r {
		t.Logf("pipe fds before %d,%d, after %d,%d: the number was not reused", r, wr, r2, wr2)
	}
	timed("a new pipe, nothing ready", r2, int64(20*time.Millisecond), false, 15*time.Millisecond, 2*time.Second)
	go func() { time.Sleep(20 * time.Millisecond); unix.Write(wr2, []byte{1}) }()
	timed("data arrives in the new pipe", r2, int64(time.Second), false, 15*time.Millisecond, 500*time.Millisecond)
	unix.Read(r2, make([]byte, 8))
	go func() { time.Sleep(20 * time.Millisecond); unix.Write(wake, []byte{1, 0, 0, 0, 0, 0, 0, 0}) }()
	timed("the wake eventfd", r2, 0, true, 15*time.Millisecond, 2*time.Second)
	var buf [8]byte
	unix.Read(wake, buf[:])
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if w.wait(pfds(int(f.Fd())), 0, true) {
		t.Fatal("the waiter accepted a regular file, which epoll cannot watch")
	}
	timed("after a declined file", r2, int64(10*time.Millisecond), false, 5*time.Millisecond, 2*time.Second)
}

// newTestWaiter returns a wake eventfd and an idle waiter watching it,
// both closed when the test ends.
func newTestWaiter(t *testing.T) (wake int, w *idleWaiter) {
	t.Helper()
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(wake) })
	if w = newIdleWaiter(wake); w == nil {
		t.Fatal("no idle waiter: the runtime's poller cannot watch an epoll descriptor here")
	}
	t.Cleanup(w.close)
	return wake, w
}
