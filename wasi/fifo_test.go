package wasi

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFifoWaitsArePausable opens FIFOs in the sandbox for blocking I/O. A
// read with nothing to read and a write with no room must wait as the guest
// asked, yet give way to a pause request (errRestart: the call starts again
// at its safe point, with no effect) and to a stop, as every other wait of
// the device layer does. A read or write blocking in the host kernel would
// leave the guest impossible to checkpoint or stop for as long as the
// FIFO's other end is idle.
func TestFifoWaitsArePausable(t *testing.T) {
	t.Run("direct", func(t *testing.T) { testFifoWaits(t, nil) })
	// Through an output gate, as Remus has: a write is an effect.
	t.Run("gated", func(t *testing.T) { testFifoWaits(t, &recorder{}) })
}

func testFifoWaits(t *testing.T, hooks *recorder) {
	sandbox := t.TempDir()
	for _, name := range []string{"in", "out"} {
		if err := unix.Mkfifo(filepath.Join(sandbox, name), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	g := newGuest(t, sandbox, hooks)
	in, errno := g.open(preopenFd, 0, "in", 0, RightFdRead|RightFdFdstatSetFlags, 0)
	if errno != ESUCCESS {
		t.Fatalf("open in: %v", errno)
	}
	writer, err := os.OpenFile(filepath.Join(sandbox, "in"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	rescue := writer

	// call runs one guest call, and fails the test if it is still blocked
	// once unblock (which must end its wait) has run.
	call := func(what string, fn func() Errno, unblock func()) Errno {
		t.Helper()
		done := make(chan Errno, 1)
		go func() { done <- fn() }()
		time.Sleep(20 * time.Millisecond) // most likely waiting by now
		unblock()
		select {
		case errno := <-done:
			return errno
		case <-time.After(10 * time.Second):
			rescue.Write([]byte("x")) // let a stuck read return
			t.Fatalf("%s: still blocked in the host", what)
			return 0
		}
	}
	if errno := call("read, then a pause request", func() Errno { _, e := g.read(in, 16); return e }, g.d.RequestPause); errno != errRestart {
		t.Fatalf("a waiting read of an empty FIFO, paused: %v, want errRestart", errno)
	}
	g.d.ClearPause()
	var got string
	if errno := call("read, then data", func() Errno { var e Errno; got, e = g.read(in, 16); return e },
		func() { writer.Write([]byte("hello")) }); errno != ESUCCESS || got != "hello" {
		t.Fatalf("a waiting read, then data: %q, %v", got, errno)
	}
	// Non-blocking at the guest's request: EAGAIN at once, and back.
	setFlags := func(flags uint16) {
		if errno := g.call(fdFdstatSetFlags, uint64(in), uint64(flags)); errno != ESUCCESS {
			t.Fatalf("fd_fdstat_set_flags: %v", errno)
		}
	}
	setFlags(FdflagNonblock)
	if _, errno := g.read(in, 16); errno != EAGAIN {
		t.Fatalf("a non-blocking read of an empty FIFO: %v, want EAGAIN", errno)
	}
	setFlags(0)

	// Writing: fill the FIFO from the guest's side until the host says
	// it is full, then a blocking write must wait, and give way.
	reader, err := unix.Open(filepath.Join(sandbox, "out"), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(reader)
	out, errno := g.open(preopenFd, 0, "out", 0, RightFdWrite|RightFdFdstatSetFlags, 0)
	if errno != ESUCCESS {
		t.Fatalf("open out: %v", errno)
	}
	chunk := strings.Repeat("y", 4096)
	g.call(fdFdstatSetFlags, uint64(out), uint64(FdflagNonblock))
	for {
		n, errno := g.write(out, chunk)
		if errno == EAGAIN || (errno == ESUCCESS && n < uint32(len(chunk))) {
			break
		}
		if errno != ESUCCESS {
			t.Fatalf("filling the FIFO: %v", errno)
		}
	}
	g.call(fdFdstatSetFlags, uint64(out), 0)
	if errno := call("write, then a pause request", func() Errno { _, e := g.write(out, chunk); return e }, g.d.RequestPause); errno != errRestart {
		t.Fatalf("a waiting write to a full FIFO, paused: %v, want errRestart", errno)
	}
	g.d.ClearPause()
	drain := func() {
		buf := make([]byte, 1<<20)
		for {
			if n, _ := unix.Read(reader, buf); n <= 0 {
				return
			}
		}
	}
	var n uint32
	if errno := call("write, then room", func() Errno { var e Errno; n, e = g.write(out, chunk); return e }, drain); errno != ESUCCESS || n == 0 {
		t.Fatalf("a waiting write, then room: %d bytes, %v", n, errno)
	}
	// A stop ends a wait for good.
	if errno := call("read, then a stop", func() Errno { _, e := g.read(in, 16); return e }, g.d.Stop); errno != EINTR {
		t.Fatalf("a waiting read, stopped: %v, want EINTR", errno)
	}
	// Restored elsewhere with no writer at the FIFO: the restore does not
	// wait for one (a blocking open would, for ever), and the restored
	// descriptor's blocking read is a wait that a pause ends.
	if hooks != nil {
		return
	}
	writer.Close()
	st := g.d.Capture()
	restored := make(chan error, 1)
	var d2 *Devices
	go func() {
		var err error
		d2, err = Restore(Config{Preopens: []Preopen{{HostPath: sandbox, GuestPath: "/"}},
			Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard}, st)
		restored <- err
	}()
	select {
	case err := <-restored:
		if err != nil {
			t.Fatalf("restore: %v", err)
		}
	case <-time.After(10 * time.Second):
		w, _ := os.OpenFile(filepath.Join(sandbox, "in"), os.O_WRONLY, 0)
		defer w.Close()
		t.Fatal("restoring a descriptor of a FIFO waited for a writer")
	}
	defer d2.Close()
	if rescue, err = os.OpenFile(filepath.Join(sandbox, "in"), os.O_WRONLY, 0); err != nil {
		t.Fatal(err)
	}
	defer rescue.Close()
	g2 := &guest{t: t, d: d2, mem: make([]byte, 1<<16), top: 64}
	if errno := call("the restored FIFO's read, then a pause request", func() Errno { _, e := g2.read(in, 16); return e },
		d2.RequestPause); errno != errRestart {
		t.Fatalf("the restored FIFO's waiting read, paused: %v, want errRestart", errno)
	}
}
