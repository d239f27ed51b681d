package wasi

import "golang.org/x/sys/unix"

// Calls that apply to every kind of descriptor: read, write, close, fdstat,
// renumber, prestat. Each dispatches on the descriptor's Kind to the device
// area that owns it (stdio.go, fs.go, sock.go).

func fdRead(d *Devices, m Mem, p []uint64) Errno {
	fd, iovs, n, resPtr := uint32(p[0]), uint32(p[1]), uint32(p[2]), uint32(p[3])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	if d.iovs, errno = m.Iovecs(d.iovs[:0], iovs, n); errno != ESUCCESS {
		return errno
	}
	var nread uint32
	switch f.Kind {
	case KindStdio:
		if f.Stdio != 0 {
			return EBADF
		}
		nread, errno = d.stdinRead(f, d.iovs)
	case KindFile:
		if !f.can(RightFdRead) {
			return EBADF
		}
		nread, errno = fileRead(d, f, d.iovs)
	case KindConn:
		nread, errno = connRead(d, fd, f, d.iovs)
	case KindDir:
		return EISDIR
	default:
		return EBADF
	}
	d.counters.BytesIn.Add(uint64(nread))
	d.tapRead(CallFdRead, fd, errno, nread, d.iovs)
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(resPtr, nread)
	return ESUCCESS
}

// tapRead reports bytes read into iovs to the input tap.
func (d *Devices) tapRead(c Call, fd uint32, errno Errno, n uint32, iovs [][]byte) {
	if d.tap == nil || errno == errRestart {
		return
	}
	var data []byte
	if len(iovs) == 1 {
		data = iovs[0][:n]
	} else {
		data = make([]byte, 0, n)
		for _, b := range iovs {
			take := min(uint32(len(b)), n-uint32(len(data)))
			data = append(data, b[:take]...)
		}
	}
	d.tap.Input(Input{Kind: InputRead, Call: c, Fd: int32(fd), Errno: errno, Value: uint64(n), Data: data})
}

func fdWrite(d *Devices, m Mem, p []uint64) Errno {
	fd, iovs, n, resPtr := uint32(p[0]), uint32(p[1]), uint32(p[2]), uint32(p[3])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	if d.iovs, errno = m.Iovecs(d.iovs[:0], iovs, n); errno != ESUCCESS {
		return errno
	}
	var written uint32
	switch f.Kind {
	case KindStdio:
		if f.Stdio == 0 {
			return EBADF
		}
		written, errno = d.stdioWrite(fd, f, d.iovs)
	case KindFile:
		if !f.can(RightFdWrite) {
			return EBADF
		}
		written, errno = fileWrite(d, fd, f, d.iovs)
	case KindConn:
		written, errno = connWrite(d, fd, f, d.iovs)
	case KindDir:
		return EISDIR
	default:
		return EBADF
	}
	d.counters.BytesOut.Add(uint64(written))
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(resPtr, written)
	return ESUCCESS
}

// gather returns the bytes of iovs as one slice, copying only when there is
// more than one non-empty buffer.
func gather(iovs [][]byte) []byte {
	var one []byte
	count := 0
	total := 0
	for _, b := range iovs {
		if len(b) > 0 {
			one = b
			count++
			total += len(b)
		}
	}
	if count <= 1 {
		return one
	}
	out := make([]byte, 0, total)
	for _, b := range iovs {
		out = append(out, b...)
	}
	return out
}

// maxScratch bounds the gather buffer a descriptor keeps between writes.
const maxScratch = 64 << 10

// gatherScratch is gather into the descriptor's reusable buffer. The result
// is valid until the next write on f; gates copy what they keep.
func gatherScratch(f *FD, iovs [][]byte) []byte {
	count, total := 0, 0
	var one []byte
	for _, b := range iovs {
		if len(b) > 0 {
			one = b
			count++
			total += len(b)
		}
	}
	if count <= 1 {
		return one
	}
	out := f.scratch[:0]
	if total > cap(out) {
		out = make([]byte, 0, total)
		if total <= maxScratch {
			f.scratch = out
		}
	}
	for _, b := range iovs {
		out = append(out, b...)
	}
	return out
}

func fdClose(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	d.fds.Remove(fd)
	switch f.Kind {
	case KindConn, KindListener:
		// Closing a socket is visible to its peer: it goes through the gate,
		// and the host descriptor stays open until the gate performs it.
		_, errno = d.output(Effect{Kind: EffectClose, Call: CallFdClose, Fd: int32(fd)},
			func([]byte) (uint32, Errno) { return 0, errnoOf(d.closeHost(f)) })
		return errno
	case KindStdio:
		// The VM's own stdio stays open; the guest just loses its descriptor.
		return ESUCCESS
	}
	errno = errnoOf(d.closeHost(f))
	d.dropDir(f)
	d.dropGhost(fd, f)
	return errno
}

func fdFdstatGet(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return errno
	}
	buf, ok := m.Slice(uint32(p[1]), sizeFdstat)
	if !ok {
		return EFAULT
	}
	clear(buf)
	buf[0] = byte(f.Filetype)
	le16(buf, 2, f.Flags)
	le64(buf, 8, f.RightsBase)
	le64(buf, 16, f.RightsInheriting)
	return ESUCCESS
}

func fdFdstatSetFlags(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return errno
	}
	flags := uint16(p[1])
	if !f.can(RightFdFdstatSetFlags) {
		return ENOTCAPABLE
	}
	if flags&^(FdflagAppend|FdflagDsync|FdflagNonblock|FdflagRsync|FdflagSync) != 0 {
		return EINVAL
	}
	// Linux cannot change the synchronous-I/O flags of an open file.
	if (flags^f.Flags)&(FdflagDsync|FdflagRsync|FdflagSync) != 0 {
		return ENOTSUP
	}
	if f.Kind == KindFile && (flags^f.Flags)&FdflagAppend != 0 {
		fl, err := unix.FcntlInt(uintptr(f.Host), unix.F_GETFL, 0)
		if err != nil {
			return errnoOf(err)
		}
		if flags&FdflagAppend != 0 {
			fl |= unix.O_APPEND
		} else {
			fl &^= unix.O_APPEND
		}
		if _, err := unix.FcntlInt(uintptr(f.Host), unix.F_SETFL, fl); err != nil {
			return errnoOf(err)
		}
	}
	// NONBLOCK is the guest's view only: host sockets are always
	// non-blocking, and blocking calls are emulated with interruptible waits.
	f.Flags = flags
	return ESUCCESS
}

func fdFdstatSetRights(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return errno
	}
	base, inheriting := p[1], p[2]
	// Rights can only be dropped, never gained.
	if base&^f.RightsBase != 0 || inheriting&^f.RightsInheriting != 0 {
		return ENOTCAPABLE
	}
	f.RightsBase, f.RightsInheriting = base, inheriting
	return ESUCCESS
}

func fdRenumber(d *Devices, m Mem, p []uint64) Errno {
	from, to := uint32(p[0]), uint32(p[1])
	f, errno := d.fds.Get(from)
	if errno != ESUCCESS {
		return errno
	}
	old, errno := d.fds.Get(to)
	if errno != ESUCCESS {
		return errno
	}
	if from == to {
		return ESUCCESS
	}
	if old.Kind == KindConn || old.Kind == KindListener {
		d.output(Effect{Kind: EffectClose, Call: CallFdRenumber, Fd: int32(to)},
			func([]byte) (uint32, Errno) { return 0, errnoOf(d.closeHost(old)) })
	} else {
		d.closeHost(old)
	}
	d.fds.Set(to, f)
	d.fds.Remove(from)
	d.dropDir(old)
	d.dropGhost(to, old)
	return ESUCCESS
}

func fdPrestatGet(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return errno
	}
	if f.Kind != KindDir || f.Preopen == "" {
		return EBADF
	}
	buf, ok := m.Slice(uint32(p[1]), sizePrestat)
	if !ok {
		return EFAULT
	}
	clear(buf)
	le32(buf, 4, uint32(len(f.Preopen)))
	return ESUCCESS
}

func fdPrestatDirName(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return errno
	}
	if f.Kind != KindDir || f.Preopen == "" {
		return EBADF
	}
	if uint32(p[2]) < uint32(len(f.Preopen)) {
		return ENAMETOOLONG
	}
	if !m.Write(uint32(p[1]), []byte(f.Preopen)) {
		return EFAULT
	}
	return ESUCCESS
}
