package wasi

import (
	"errors"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// stdinRead reads the VM's stdin. A host descriptor is waited on first, so a
// blocking read stays interruptible and a non-blocking one never blocks.
func (d *Devices) stdinRead(f *FD, iovs [][]byte) (uint32, Errno) {
	if f.Host >= 0 {
		// Non-blocking reads, which may find nothing: a description of
		// ftvm's own, or a socket read with MSG_DONTWAIT.
		own := f.Host == d.stdinOwn || f.Host == d.stdinSock
		for {
			if f.Flags&FdflagNonblock != 0 {
				// A descriptor ftvm was given stays blocking (it may be
				// shared, a terminal say), so the read happens only once
				// it is ready. A signal interrupting the check (Go
				// preempts with SIGURG) is not readiness: taken for it,
				// the read blocked for good.
				if !own {
					if errno := readyNow(f.Host, unix.POLLIN); errno != ESUCCESS {
						return 0, errno
					}
				}
			} else if errno := d.waitFd(f.Host, unix.POLLIN, true); errno != ESUCCESS {
				return 0, errno
			}
			var n int
			var err error
			if f.Host == d.stdinSock {
				n, _, _, _, err = unix.RecvmsgBuffers(f.Host, iovs, nil, unix.MSG_DONTWAIT)
			} else {
				n, err = rwv(unix.SYS_READV, f.Host, iovs, 0)
			}
			if err == unix.EAGAIN && own && f.Flags&FdflagNonblock == 0 {
				continue // another reader took what woke the wait
			}
			if err != nil {
				return 0, errnoOf(err)
			}
			return uint32(n), ESUCCESS
		}
	}
	total := uint32(0)
	for _, b := range iovs {
		if len(b) == 0 {
			continue
		}
		n, err := d.stdin.Read(b)
		total += uint32(n)
		if err == io.EOF || n < len(b) {
			break
		}
		if err != nil {
			if total > 0 {
				break
			}
			return 0, EIO
		}
	}
	return total, ESUCCESS
}

// stdioWrite sends bytes to stdout or stderr through the output gate. The
// perform closure is made once per descriptor so that a write allocates
// nothing.
func (d *Devices) stdioWrite(fd uint32, f *FD, iovs [][]byte) (uint32, Errno) {
	data := gatherScratch(f, iovs)
	if len(data) == 0 {
		return 0, ESUCCESS
	}
	if f.perform == nil {
		f.perform = func(data []byte) (uint32, Errno) { return d.writeStdio(f.Stdio, data) }
	}
	return d.output(Effect{Kind: EffectWrite, Call: CallFdWrite, Fd: int32(fd), Data: data}, f.perform)
}

func (d *Devices) writeStdio(stdio int, data []byte) (uint32, Errno) {
	w := d.stdout
	if stdio == 2 {
		w = d.stderr
	}
	n, err := w.Write(data)
	if err != nil && n == 0 {
		if errors.Is(err, syscall.EPIPE) {
			return 0, EPIPE
		}
		return 0, EIO
	}
	return uint32(n), ESUCCESS
}

// readyNow reports at once whether host has one of events (or a hangup or
// error, which the operation itself then reports): ESUCCESS if so, EAGAIN
// if not.
func readyNow(host int, events int16) Errno {
	fds := [1]unix.PollFd{{Fd: int32(host), Events: events}}
	for {
		n, err := unix.Poll(fds[:], 0)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return errnoOf(err)
		case n == 0:
			return EAGAIN
		}
		return readyErrno(fds[0].Revents)
	}
}
