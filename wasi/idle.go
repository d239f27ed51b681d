package wasi

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// idleWaiter lets poll_oneoff sleep in Go's network poller instead of in a
// blocking ppoll(2). A goroutine blocked in a system call keeps its P until
// the runtime's monitor thread takes it away, which it checks for every
// 20 µs while any such call is outstanding: a guest that went idle hundreds
// of times a second (a replicated server between epochs) kept that thread
// waking 50 000 times a second, an eighth of the process's CPU. Here the
// guest's descriptors are watched by an epoll instance of our own, whose
// descriptor the runtime's poller watches in turn (epoll nests): the
// goroutine parks like any network read, and wakes when one of them is
// ready, the wake eventfd is written, or the deadline passes. Which
// subscriptions fired is still read with a ppoll that does not wait.
type idleWaiter struct {
	ep int
	f  *os.File
	rc syscall.RawConn
	// reg is what is registered: host fd -> epoll events. forget runs
	// on other goroutines (a close the output gate performs).
	mu   sync.Mutex
	reg  map[int32]uint32
	want map[int32]uint32 // watch's working set, reused
	evs  [4]unix.EpollEvent
}

// newIdleWaiter returns a waiter watching wake, or nil where the runtime
// cannot poll an epoll descriptor (then poll_oneoff blocks in ppoll).
func newIdleWaiter(wake int) *idleWaiter {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil
	}
	if unix.SetNonblock(ep, true) != nil ||
		unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}) != nil {
		unix.Close(ep)
		return nil
	}
	f := os.NewFile(uintptr(ep), "ftvm-idle-epoll")
	// A file the poller does not watch has no deadlines.
	if f.SetReadDeadline(time.Time{}) != nil {
		f.Close()
		return nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil
	}
	return &idleWaiter{ep: ep, f: f, rc: rc, reg: map[int32]uint32{}, want: map[int32]uint32{}}
}

func (w *idleWaiter) close() { w.f.Close() }

// forget drops host descriptor fd, about to be closed (which removes it
// from the epoll set by itself): a descriptor opened later under the same
// number is registered afresh.
func (w *idleWaiter) forget(fd int) {
	w.mu.Lock()
	delete(w.reg, int32(fd))
	w.mu.Unlock()
}

// wait sleeps until a descriptor in pfds (after pfds[0], the wake
// eventfd, always watched) may have one of its events, or timeout ns pass
// (never, if infinite). It returns false if it could not watch them all
// (a descriptor epoll refuses): the caller then waits in ppoll.
func (w *idleWaiter) wait(pfds []unix.PollFd, ns int64, infinite bool) bool {
	if !w.watch(pfds[1:]) {
		return false
	}
	deadline := time.Time{}
	if !infinite {
		deadline = time.Now().Add(time.Duration(ns))
	}
	if w.f.SetReadDeadline(deadline) != nil {
		return false
	}
	err := w.rc.Read(func(uintptr) bool {
		n, err := unix.EpollWait(w.ep, w.evs[:], 0)
		return n > 0 || (err != nil && err != unix.EINTR)
	})
	return err == nil || errors.Is(err, os.ErrDeadlineExceeded)
}

// watch makes the registered set exactly pfds' descriptors and events.
// Descriptors are few and change rarely, so this is usually no system
// call at all.
func (w *idleWaiter) watch(pfds []unix.PollFd) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	want := w.want
	clear(want)
	for _, p := range pfds {
		var ev uint32
		if p.Events&unix.POLLIN != 0 {
			ev |= unix.EPOLLIN | unix.EPOLLRDHUP
		}
		if p.Events&unix.POLLOUT != 0 {
			ev |= unix.EPOLLOUT
		}
		want[p.Fd] |= ev
	}
	for fd := range w.reg {
		if _, ok := want[fd]; !ok {
			unix.EpollCtl(w.ep, unix.EPOLL_CTL_DEL, int(fd), nil)
			delete(w.reg, fd)
		}
	}
	for fd, ev := range want {
		have, ok := w.reg[fd]
		if ok && have == ev {
			continue
		}
		e := unix.EpollEvent{Events: ev, Fd: fd}
		op := unix.EPOLL_CTL_ADD
		if ok {
			op = unix.EPOLL_CTL_MOD
		}
		err := unix.EpollCtl(w.ep, op, int(fd), &e)
		// Registered sets may disagree with ours after an error, or a
		// close that removed a descriptor from the set by itself.
		switch {
		case err == unix.ENOENT:
			err = unix.EpollCtl(w.ep, unix.EPOLL_CTL_ADD, int(fd), &e)
		case err == unix.EEXIST:
			err = unix.EpollCtl(w.ep, unix.EPOLL_CTL_MOD, int(fd), &e)
		}
		if err != nil {
			delete(w.reg, fd)
			return false
		}
		w.reg[fd] = ev
	}
	return true
}
