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
		if f.Flags&FdflagNonblock != 0 {
			fds := []unix.PollFd{{Fd: int32(f.Host), Events: unix.POLLIN}}
			if n, _ := unix.Poll(fds, 0); n == 0 {
				return 0, EAGAIN
			}
		} else if errno := d.waitFd(f.Host, unix.POLLIN); errno != ESUCCESS {
			return 0, errno
		}
		n, err := unix.Readv(f.Host, iovs)
		if err != nil {
			return 0, errnoOf(err)
		}
		return uint32(n), ESUCCESS
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

// stdioWrite sends bytes to stdout or stderr through the output gate.
func (d *Devices) stdioWrite(fd uint32, f *FD, iovs [][]byte) (uint32, Errno) {
	w := d.stdout
	if f.Stdio == 2 {
		w = d.stderr
	}
	data := gather(iovs)
	if len(data) == 0 {
		return 0, ESUCCESS
	}
	return d.output(Effect{Kind: EffectWrite, Call: CallFdWrite, Fd: int32(fd), Data: data},
		func(data []byte) (uint32, Errno) {
			n, err := w.Write(data)
			if err != nil && n == 0 {
				if errors.Is(err, syscall.EPIPE) {
					return 0, EPIPE
				}
				return 0, EIO
			}
			return uint32(n), ESUCCESS
		})
}
