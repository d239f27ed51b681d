package wasi

import (
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestIdleWaiterLosesNoWakeup drives the idle waiter as poll_oneoff does
// under a server's load: 32 connections, each sending a byte and waiting
// for its echo; a guest loop that sleeps with no deadline on all of them,
// then echoes what is ready; and, for the first half, pause requests on the
// wake eventfd at random moments (they make the loop look at every
// connection, so in the second half nothing but the waiter wakes it). A
// wake-up lost anywhere leaves a client without its echo.
func TestIdleWaiterLosesNoWakeup(t *testing.T) {
	wake, w := newTestWaiter(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const n = 32
	var hosts [n]int
	var clients [n]net.Conn
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		f, err := s.(*net.TCPConn).File()
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		fd, err := unix.Dup(int(f.Fd()))
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		syscall.SetNonblock(fd, true)
		hosts[i] = fd
		clients[i] = c
	}
	stop := make(chan struct{})
	var served atomic.Int64
	guestDone := make(chan struct{})
	go func() { // the guest
		defer close(guestDone)
		buf := make([]byte, 4096)
		for {
			select {
			case <-stop:
				return
			default:
			}
			pfds := []unix.PollFd{{Fd: int32(wake), Events: unix.POLLIN}}
			for _, h := range hosts {
				pfds = append(pfds, unix.PollFd{Fd: int32(h), Events: unix.POLLIN})
			}
			if !w.wait(pfds, 0, true) {
				t.Error("the waiter declined a TCP socket")
				return
			}
			var zero unix.Timespec
			unix.Ppoll(pfds, &zero, nil)
			if pfds[0].Revents != 0 {
				var b [8]byte
				unix.Read(wake, b[:])
			}
			for i, p := range pfds[1:] {
				if p.Revents != 0 {
					if k, _ := unix.Read(hosts[i], buf); k > 0 {
						unix.Write(hosts[i], buf[:k])
						served.Add(1)
					}
				}
			}
		}
	}()
	quiet := time.Now().Add(1500 * time.Millisecond)
	pauserDone := make(chan struct{})
	go func() { // pause requests
		defer close(pauserDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
			if time.Now().After(quiet) {
				continue // the second half: nothing else wakes the loop
			}
			unix.Write(wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}
	}()
	var wg sync.WaitGroup
	var lost atomic.Int64
	ping := func(c net.Conn) bool {
		b := make([]byte, 1)
		c.Write([]byte{7})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		t0 := time.Now()
		if _, err := c.Read(b); err != nil {
			lost.Add(1)
			t.Errorf("no echo after %v: %v", time.Since(t0), err)
			return false
		}
		return true
	}
	// All at once, with pause requests.
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(c net.Conn) {
			defer wg.Done()
			for time.Now().Before(quiet) && ping(c) {
				time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
			}
		}(clients[i])
	}
	wg.Wait()
	// One at a time, nothing else to wake the loop.
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		if !ping(clients[rand.IntN(n)]) {
			break
		}
	}
	close(stop)
	unix.Write(wake, []byte{1, 0, 0, 0, 0, 0, 0, 0}) // the guest loop sleeps with no deadline
	<-guestDone
	<-pauserDone
	t.Logf("%d echoes; lost wake-ups: %d", served.Load(), lost.Load())
}
