package wasi

import (
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNonblockingStdinNeverBlocks reads an empty stdin pipe that the guest
// made non-blocking (Go's wasip1 runtime does so at start) while the
// reading thread is hit by a storm of SIGURG, the signal Go preempts
// goroutines with: every read must give EAGAIN at once. A signal that
// interrupted the readiness check used to let the read go on into the
// host's blocking readv, where the guest then hung for good (the machine
// package's tests hung in CI that way).
func TestNonblockingStdinNeverBlocks(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	d, err := newBase(Config{Stdin: r, Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	f, errno := d.fds.Get(0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	f.Flags |= FdflagNonblock

	const reads = 200000
	tid := make(chan int)
	done := make(chan Errno, 1)
	var progress atomic.Int64
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tid <- unix.Gettid()
		buf := make([]byte, 16)
		for i := 0; i < reads; i++ {
			progress.Add(1)
			if n, errno := d.stdinRead(f, [][]byte{buf}); errno != EAGAIN {
				if errno == ESUCCESS && n == 1 {
					errno = EINTR // woken by the watchdog's byte below
				}
				done <- errno
				return
			}
		}
		done <- EAGAIN
	}()
	reader := <-tid
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		pid := unix.Getpid()
		for {
			select {
			case <-stop:
				return
			default:
				unix.Tgkill(pid, reader, unix.SIGURG)
			}
		}
	}()
	// A read that makes no progress for seconds is stuck in the host.
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	last := int64(-1)
	for {
		select {
		case errno := <-done:
			if errno != EAGAIN {
				t.Fatalf("a non-blocking read of an empty stdin gave %v, want EAGAIN", errno)
			}
			return
		case <-tick.C:
			if p := progress.Load(); p != last {
				last = p
				continue
			}
			w.Write([]byte("x")) // let the stuck read return
			t.Fatalf("a non-blocking read of an empty stdin blocked in the host (after %d reads)", last)
		}
	}
}
