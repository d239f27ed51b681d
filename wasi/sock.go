package wasi

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Sockets: accept on preopened listeners, send/recv/shutdown on accepted
// connections. Host sockets are always non-blocking; a guest descriptor
// without FDFLAGS_NONBLOCK gets blocking behaviour from interruptible waits
// (waitFd), so a stopping VM never hangs in a socket call.

// connState is per-connection state kept beside the descriptor.
type connState struct {
	// shut records the sdflags the guest has shut down, for capture.
	shut uint8
	// reset marks a connection that did not survive a restore: the guest
	// keeps its descriptor, and every read or write fails ECONNRESET.
	reset bool
}

// connRead is fd_read on a connection (fd_read reports it to the tap).
func connRead(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno) {
	if !f.can(RightFdRead) {
		return 0, EBADF
	}
	return d.recv(f, iovs, 0)
}

// connWrite is fd_write on a connection.
func connWrite(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno) {
	if !f.can(RightFdWrite) {
		return 0, EBADF
	}
	return d.send(CallFdWrite, fd, f, gather(iovs))
}

func sockAccept(d *Devices, m Mem, p []uint64) Errno {
	fd, flags, resPtr := uint32(p[0]), uint16(p[1]), uint32(p[2])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	switch f.Kind {
	case KindListener:
	case KindConn:
		return EINVAL // as accept(2) on a socket that is not listening
	default:
		return ENOTSOCK
	}
	if !f.can(RightSockAccept) {
		return ENOTCAPABLE
	}
	if flags&^FdflagNonblock != 0 {
		return EINVAL
	}
	// Check the result pointer first: a connection taken from the kernel
	// and then dropped on EFAULT would be lost to the guest.
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	var nfd int
	var sa unix.Sockaddr
	for {
		var err error
		nfd, sa, err = unix.Accept4(f.Host, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err == nil {
			break
		}
		if err == unix.EINTR {
			continue
		}
		if err != unix.EAGAIN || f.Flags&FdflagNonblock != 0 {
			return errnoOf(err)
		}
		if errno := d.waitFd(f.Host, unix.POLLIN, true); errno != ESUCCESS {
			return errno
		}
	}
	// Request/response guests write small replies; Nagle would hold each
	// one for the peer's delayed ACK.
	_ = unix.SetsockoptInt(nfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	c := &FD{Kind: KindConn, Filetype: FiletypeSocketStream, Host: nfd, Root: -1, Flags: flags,
		RightsBase: RightsSocket, Readable: true, Writable: true, Addr: sockaddrString(sa),
		conn: &connState{}}
	newfd, errno := d.fds.Add(c)
	if errno != ESUCCESS {
		unix.Close(nfd)
		return errno
	}
	d.counters.Accepted.Add(1)
	m.PutU32(resPtr, newfd)
	d.input(Input{Kind: InputAccept, Call: CallSockAccept, Fd: int32(fd), Value: uint64(newfd), Data: []byte(c.Addr)})
	return ESUCCESS
}

func sockRecv(d *Devices, m Mem, p []uint64) Errno {
	fd, iovs, n, riflags := uint32(p[0]), uint32(p[1]), uint32(p[2]), uint16(p[3])
	lenPtr, flagsPtr := uint32(p[4]), uint32(p[5])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if errno := connOnly(f); errno != ESUCCESS {
		return errno
	}
	if !f.can(RightFdRead) {
		return ENOTCAPABLE
	}
	if riflags&^(RiflagRecvPeek|RiflagRecvWaitall) != 0 {
		return EINVAL
	}
	if _, ok := m.Slice(lenPtr, 4); !ok {
		return EFAULT
	}
	if _, ok := m.Slice(flagsPtr, 2); !ok {
		return EFAULT
	}
	if d.iovs, errno = m.Iovecs(d.iovs[:0], iovs, n); errno != ESUCCESS {
		return errno
	}
	nread, errno := d.recv(f, d.iovs, riflags)
	if riflags&RiflagRecvPeek == 0 {
		d.counters.BytesIn.Add(uint64(nread))
	}
	d.tapRead(CallSockRecv, fd, errno, nread, d.iovs)
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(lenPtr, nread)
	m.PutU16(flagsPtr, 0) // data is never truncated on a stream socket
	return ESUCCESS
}

func sockSend(d *Devices, m Mem, p []uint64) Errno {
	fd, iovs, n, resPtr := uint32(p[0]), uint32(p[1]), uint32(p[2]), uint32(p[4])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if errno := connOnly(f); errno != ESUCCESS {
		return errno
	}
	if !f.can(RightFdWrite) {
		return ENOTCAPABLE
	}
	// si_flags (p[3]) has no flags defined in preview1; like other hosts we
	// ignore it.
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	if d.iovs, errno = m.Iovecs(d.iovs[:0], iovs, n); errno != ESUCCESS {
		return errno
	}
	written, errno := d.send(CallSockSend, fd, f, gather(d.iovs))
	d.counters.BytesOut.Add(uint64(written))
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(resPtr, written)
	return ESUCCESS
}

func sockShutdown(d *Devices, m Mem, p []uint64) Errno {
	fd, how := uint32(p[0]), uint8(p[1])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if errno := connOnly(f); errno != ESUCCESS {
		return errno
	}
	if !f.can(RightSockShutdown) {
		return ENOTCAPABLE
	}
	var sh int
	switch how {
	case SdflagRd:
		sh = unix.SHUT_RD
	case SdflagWr:
		sh = unix.SHUT_WR
	case SdflagRd | SdflagWr:
		sh = unix.SHUT_RDWR
	default:
		return EINVAL
	}
	f.conn.shut |= how
	host := f.Host
	_, errno = d.output(Effect{Kind: EffectShutdown, Call: CallSockShutdown, Fd: int32(fd), Size: int64(how)},
		func([]byte) (uint32, Errno) {
			// Held, it may be performed after the devices were released:
			// the number may be another socket's by then.
			d.detached.RLock()
			defer d.detached.RUnlock()
			if d.released.Load() {
				return 0, EBADF
			}
			return 0, errnoOf(unix.Shutdown(host, sh))
		})
	return errno
}

// connOnly admits connections to the data calls: a listener is a socket
// without a peer, anything else is not a socket.
func connOnly(f *FD) Errno {
	switch f.Kind {
	case KindConn:
		if f.conn == nil {
			f.conn = &connState{}
		}
		return ESUCCESS
	case KindListener:
		return ENOTCONN
	}
	return ENOTSOCK
}

// recv reads from a connection into iovs. A blocking guest descriptor waits
// for data (interruptibly); WAITALL keeps reading until iovs are full, EOF or
// an error. WAITALL is ignored with PEEK, which cannot make progress.
func (d *Devices) recv(f *FD, iovs [][]byte, riflags uint16) (uint32, Errno) {
	if f.conn != nil && f.conn.reset {
		return 0, ECONNRESET
	}
	blocking := f.Flags&FdflagNonblock == 0
	flags := 0
	if riflags&RiflagRecvPeek != 0 {
		flags = unix.MSG_PEEK
	}
	waitall := riflags&RiflagRecvWaitall != 0 && flags == 0
	want := 0
	for _, b := range iovs {
		want += len(b)
	}
	got := 0
	for {
		n, err := d.recvmsg(f.Host, iovs, got, flags)
		switch err {
		case 0:
			got += n
			if n == 0 || !waitall || got >= want {
				return uint32(got), ESUCCESS
			}
		case unix.EAGAIN:
			if !blocking {
				if got > 0 {
					return uint32(got), ESUCCESS
				}
				return 0, EAGAIN
			}
			if errno := d.waitFd(f.Host, unix.POLLIN|unix.POLLRDHUP, got == 0); errno != ESUCCESS {
				if got > 0 {
					return uint32(got), ESUCCESS
				}
				return 0, errno
			}
		default:
			// Bytes already taken are the guest's; the error shows again
			// (or as EOF) on its next call.
			if got > 0 {
				return uint32(got), ESUCCESS
			}
			return 0, errnoOf(err)
		}
	}
}

// recvmsg is one non-blocking recvmsg(2) into iovs minus their first skip
// bytes, through the reused vector scratch so that it does not allocate.
func (d *Devices) recvmsg(host int, iovs [][]byte, skip, flags int) (int, unix.Errno) {
	s := &d.pollScratch
	s.iov = s.iov[:0]
	for _, b := range iovs {
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		b = b[skip:]
		skip = 0
		var v unix.Iovec
		v.Base = &b[0]
		v.SetLen(len(b))
		s.iov = append(s.iov, v)
	}
	if len(s.iov) == 0 {
		return 0, 0
	}
	var msg unix.Msghdr
	msg.Iov = &s.iov[0]
	msg.SetIovlen(len(s.iov))
	for {
		n, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(host), uintptr(unsafe.Pointer(&msg)),
			uintptr(flags|unix.MSG_DONTWAIT))
		if e == unix.EINTR {
			continue
		}
		// Drop the pointers into guest memory: the scratch must not keep an
		// old memory alive after the guest grows it.
		clear(s.iov)
		if e != 0 {
			return 0, e
		}
		return int(n), 0
	}
}

// sendOnce is one non-blocking send(2). MSG_NOSIGNAL turns a closed peer into
// EPIPE instead of a SIGPIPE to the host.
func sendOnce(host int, b []byte) (int, unix.Errno) {
	if len(b) == 0 {
		return 0, 0
	}
	for {
		n, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(host), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
			unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(n), 0
	}
}

// send hands data for a connection to the output gate. If the gate performs
// it during the call, the guest's view applies: a blocking descriptor waits
// until everything is sent, a non-blocking one gets EAGAIN or a short count.
// If the gate holds it and performs it later, the guest has already been
// told it was written, so all of it is sent (sendDetached). A result other
// than "everything written" is an input the guest sees, so it is tapped.
func (d *Devices) send(c Call, fd uint32, f *FD, data []byte) (uint32, Errno) {
	if len(data) == 0 {
		return 0, ESUCCESS
	}
	if f.conn == nil {
		f.conn = &connState{}
	}
	if f.conn.reset {
		return 0, ECONNRESET
	}
	host := f.Host
	blocking := f.Flags&FdflagNonblock == 0
	n, errno := d.output(Effect{Kind: EffectWrite, Call: c, Fd: int32(fd), Data: data,
		Later: func(data []byte) (uint32, Errno) { return d.sendDetached(host, data) }},
		func(data []byte) (uint32, Errno) { return d.sendNow(host, data, blocking) })
	if errno != ESUCCESS || n != uint32(len(data)) {
		d.input(Input{Kind: InputResult, Call: c, Fd: int32(fd), Errno: errno, Value: uint64(n)})
	}
	return n, errno
}

// sendNow sends on the guest's behalf during its call.
func (d *Devices) sendNow(host int, data []byte, blocking bool) (uint32, Errno) {
	sent := 0
	for {
		n, err := sendOnce(host, data[sent:])
		switch err {
		case 0:
			sent += n
			if sent == len(data) || !blocking {
				return uint32(sent), ESUCCESS
			}
		case unix.EAGAIN:
			if sent > 0 && !blocking {
				return uint32(sent), ESUCCESS
			}
			if !blocking {
				return 0, EAGAIN
			}
			if errno := d.waitFd(host, unix.POLLOUT, false); errno != ESUCCESS {
				if sent > 0 {
					return uint32(sent), ESUCCESS
				}
				return 0, errno
			}
		default:
			if sent > 0 {
				return uint32(sent), ESUCCESS
			}
			return 0, errnoOf(err)
		}
	}
}

// sendDetached sends a released held output in full from the gate's
// goroutine. It must not touch the wake eventfd (that belongs to the guest's
// waits), so it polls with a timeout and gives up once the VM is released.
func (d *Devices) sendDetached(host int, data []byte) (uint32, Errno) {
	sent := 0
	for sent < len(data) {
		// Once the devices are released the descriptor number may belong
		// to something else: never write to it (detached holds Close off
		// between the check and the write).
		d.detached.RLock()
		if d.released.Load() {
			d.detached.RUnlock()
			return uint32(sent), EBADF
		}
		n, err := sendOnce(host, data[sent:])
		d.detached.RUnlock()
		switch err {
		case 0:
			sent += n
		case unix.EAGAIN:
			fds := [1]unix.PollFd{{Fd: int32(host), Events: unix.POLLOUT}}
			unix.Poll(fds[:], 100)
		default:
			return uint32(sent), errnoOf(err)
		}
	}
	return uint32(sent), ESUCCESS
}
