package wasi

// poll_oneoff and the interruptible waits behind blocking calls. (Stubs.)

// waitFd blocks until the host descriptor has one of events ready, or the
// device layer is interrupted (EINTR).
func (d *Devices) waitFd(host int, events int16) Errno { return ENOSYS }

func pollOneoff(d *Devices, m Mem, p []uint64) Errno { return ENOSYS }
