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
	r, w := testPipe(t)
	d, f := stdinDevices(t, r)
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

// TestStdinSharedWithAnotherReader: ftvm's stdin may be a pipe (or a
// socket) another process reads too. Its bytes can go to that reader
// between the guest's wait for stdin and its read, and a read of the
// shared, blocking description then slept in the kernel until more came,
// where no pause or stop could reach it. The guest reads a pipe through a
// description of its own, opened non-blocking, and a socket with
// MSG_DONTWAIT, so a lost race means waiting again, pausably; the shared
// description is left as it was.
func TestStdinSharedWithAnotherReader(t *testing.T) {
	t.Run("pipe", func(t *testing.T) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		testStdinShared(t, r, w, true)
	})
	t.Run("socket", func(t *testing.T) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		testStdinShared(t, os.NewFile(uintptr(fds[0]), "stdin"), os.NewFile(uintptr(fds[1]), "peer"), false)
	})
}

// stdinDevices is a device layer whose stdin is file, closed when t ends,
// and its stdin descriptor.
// testPipe returns a pipe's read and write ends, closed when the test ends
// (after the devices of stdinDevices, registered later, are).
func testPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

func stdinDevices(t *testing.T, file *os.File) (*Devices, *FD) {
	t.Helper()
	d, err := newBase(Config{Stdin: file, Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	f, errno := d.fds.Get(0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	return d, f
}

// testStdinShared races the guest's blocking reads of stdin r against
// another reader of the same description, one byte written to w at a time.
// reopened says whether the guest must read a description of its own.
func testStdinShared(t *testing.T, r, w *os.File, reopened bool) {
	defer r.Close()
	defer w.Close()
	d, f := stdinDevices(t, r)
	if (f.Host != int(r.Fd())) != reopened {
		t.Fatalf("the guest reads host descriptor %d, stdin is %d: reopened should be %v", f.Host, r.Fd(), reopened)
	}
	if fl, err := unix.FcntlInt(r.Fd(), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("the shared description's flags changed: %#x %v", fl, err)
	}
	// The other reader: blocking reads of a byte, on the same description.
	other, err := unix.Dup(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	var taken atomic.Int64
	go func() {
		b := make([]byte, 1)
		for {
			if n, err := unix.Read(other, b); n <= 0 || err != nil {
				return
			}
			taken.Add(1)
		}
	}()
	lost := 0
	for i := 0; i < 40; i++ {
		done := make(chan Errno, 1)
		go func() {
			_, errno := d.stdinRead(f, [][]byte{make([]byte, 1)})
			done <- errno
		}()
		time.Sleep(5 * time.Millisecond) // both waiting by now, most likely
		before := taken.Load()
		w.Write([]byte{'x'})
		// Whoever got the byte: the guest's read returns with it, or
		// the other reader counts it.
		got := false
		for deadline := time.Now().Add(5 * time.Second); !got && taken.Load() == before; {
			select {
			case errno := <-done:
				if errno != ESUCCESS {
					t.Fatalf("read %d: %v", i, errno)
				}
				got = true
			case <-time.After(time.Millisecond):
			}
			if !got && time.Now().After(deadline) {
				t.Fatalf("read %d: neither reader got the byte", i)
			}
		}
		if got {
			continue
		}
		lost++
		// The other reader took it: the guest's read must still give way
		// to a pause.
		d.RequestPause()
		select {
		case errno := <-done:
			if errno != errRestart {
				t.Fatalf("read %d, paused: %v, want errRestart", i, errno)
			}
		case <-time.After(5 * time.Second):
			w.Write(make([]byte, 64)) // let a stuck read return
			t.Fatalf("read %d: blocked in the host after another reader took its byte", i)
		}
		d.ClearPause()
	}
	t.Logf("the other reader won %d of 40 races", lost)
	if lost == 0 {
		t.Skip("the other reader never won a race: nothing was tested")
	}
}

// TestStdinWriteEndNotReopened: a stdin that is a pipe's write end (a
// mistake of the caller's) is not reopened for reading, which would let the
// guest read what is written into that pipe.
func TestStdinWriteEndNotReopened(t *testing.T) {
	_, w := testPipe(t)
	d, f := stdinDevices(t, w)
	if f.Host != int(w.Fd()) || d.stdinOwn != -1 {
		t.Fatalf("the write end was reopened: host %d, own %d", f.Host, d.stdinOwn)
	}
	w.Write([]byte("not for the guest"))
	f.Flags |= FdflagNonblock
	if n, errno := d.stdinRead(f, [][]byte{make([]byte, 32)}); errno == ESUCCESS && n > 0 {
		t.Fatalf("the guest read %d bytes written into the pipe", n)
	}
}
