package wasi

import (
	"math"
	"slices"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Filesystem calls on preopened directories, and the fd calls on files.
//
// Paths are resolved by path.go and never leave the directory they start
// from. Every mutation goes through the output gate as an EffectFs naming the
// preopen and the path, so that a mode can mirror it; the gate must perform
// (or fail) a filesystem effect before Output returns, since the guest needs
// its result at once. Every host-dependent result that is not the outcome of
// an effect (bytes read, metadata, directory listings, link targets, whether
// an open succeeded) flows through the input tap.
//
// Regular files are read and written positionally at FD.Pos, which the device
// layer keeps itself: fd_seek and fd_tell need no system call, and a file's
// offset is plain data for snapshots. Other non-directory objects (FIFOs,
// devices) use the kernel's offset.

// seekable reports whether the descriptor's offset is kept in FD.Pos.
func seekable(f *FD) bool { return f.Kind == KindFile && f.Filetype == FiletypeRegularFile }

// fileRead reads a file (fd_read) at its offset.
func fileRead(d *Devices, f *FD, iovs [][]byte) (uint32, Errno) {
	if !seekable(f) {
		// A FIFO or device: its host descriptor is non-blocking, and a
		// guest that asked for blocking reads waits here, where a pause
		// or a stop can end the wait.
		for {
			n, err := rwv(unix.SYS_READV, f.Host, iovs, 0)
			if err == unix.EAGAIN && blockingStream(f) {
				if errno := d.waitFd(f.Host, unix.POLLIN, true); errno != ESUCCESS {
					return 0, errno
				}
				continue
			}
			if err != nil {
				return 0, errnoOf(err)
			}
			return uint32(n), ESUCCESS
		}
	}
	n, err := rwv(unix.SYS_PREADV, f.Host, iovs, f.Pos)
	if err != nil {
		return 0, errnoOf(err)
	}
	f.Pos += int64(n)
	return uint32(n), ESUCCESS
}

// fileWrite writes a file (fd_write) at its offset, or at its end in append
// mode, as an FsWrite effect.
func fileWrite(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno) {
	off := f.Pos
	if f.Flags&FdflagAppend != 0 || !seekable(f) {
		off = -1
	}
	n, errno := d.writeFile(CallFdWrite, fd, f, iovs, off)
	if errno == ESUCCESS && seekable(f) && f.pending.result >= 0 {
		f.Pos = f.pending.result
	}
	return n, errno
}

// writeFile writes iovs at off (-1: at the end, or the kernel's offset for a
// stream) through the output gate. Without a gate the buffers go to the
// kernel as they are, with no copy; a gate gets them gathered into one.
func (d *Devices) writeFile(c Call, fd uint32, f *FD, iovs [][]byte, off int64) (uint32, Errno) {
	stream := blockingStream(f)
	if f.perform == nil {
		f.perform = func(data []byte) (uint32, Errno) {
			if blockingStream(f) {
				var one [1][]byte
				one[0] = data
				return d.writeStream(f, one[:])
			}
			return f.writeData(data)
		}
	}
	if stream {
		// A blocking write to a FIFO or device waits for room before it
		// becomes an effect, while a pause can still take the call back.
		if errno := d.waitFd(f.Host, unix.POLLOUT, true); errno != ESUCCESS {
			return 0, errno
		}
	}
	f.pending = writeArgs{off: off, result: off}
	if d.gate == nil {
		d.counters.Effects.Add(1)
		if stream {
			return d.writeStream(f, iovs)
		}
		return f.writeIovs(iovs)
	}
	data := gatherScratch(f, iovs)
	return d.output(Effect{Kind: EffectFs, Call: c, Fd: int32(fd), Op: FsWrite, Root: f.Root, Path: f.Path,
		Offset: off, Size: int64(len(data)), Data: data}, f.perform)
}

// blockingStream reports whether f is a FIFO or device the guest uses for
// blocking I/O: its host descriptor is non-blocking all the same, and the
// device layer does the waiting.
func blockingStream(f *FD) bool { return !seekable(f) && f.Flags&FdflagNonblock == 0 }

// writeStream is a blocking guest's write to a FIFO or device, whose host
// descriptor is non-blocking: if the room waited for is gone (another
// writer took it), it waits again. Only a stop ends that wait, for the
// write is an effect under way by then.
func (d *Devices) writeStream(f *FD, iovs [][]byte) (uint32, Errno) {
	for {
		n, errno := f.writeIovs(iovs)
		if errno != EAGAIN {
			return n, errno
		}
		if errno := d.waitFd(f.Host, unix.POLLOUT, false); errno != ESUCCESS {
			return 0, errno
		}
	}
}

func (f *FD) writeData(data []byte) (uint32, Errno) {
	var one [1][]byte
	one[0] = data
	return f.writeIovs(one[:])
}

func (f *FD) writeIovs(iovs [][]byte) (uint32, Errno) {
	off := f.pending.off
	var n int
	var err error
	if off >= 0 {
		n, err = rwv(unix.SYS_PWRITEV, f.Host, iovs, off)
		f.pending.result = off + int64(n)
	} else {
		n, err = rwv(unix.SYS_WRITEV, f.Host, iovs, 0)
		if err == nil && seekable(f) {
			// An append leaves the kernel's offset at the end it wrote to,
			// which is where WASI says the descriptor's offset now is.
			f.pending.result, err = unix.Seek(f.Host, 0, unix.SEEK_CUR)
		}
	}
	if err != nil && n == 0 {
		return 0, errnoOf(err)
	}
	return uint32(n), ESUCCESS
}

// rwv is readv/writev/preadv/pwritev without allocation: up to 16 buffers'
// iovecs live on the stack.
func rwv(sysno uintptr, fd int, iovs [][]byte, off int64) (int, error) {
	var stack [16]unix.Iovec
	vec := stack[:0]
	if len(iovs) > len(stack) {
		vec = make([]unix.Iovec, 0, len(iovs))
	}
	for _, b := range iovs {
		if len(b) > 0 {
			vec = append(vec, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
		}
	}
	if len(vec) == 0 {
		return 0, nil
	}
	for {
		r, _, e := unix.Syscall6(sysno, uintptr(fd), uintptr(unsafe.Pointer(&vec[0])), uintptr(len(vec)),
			uintptr(off), uintptr(uint64(off)>>32), 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(r), nil
	}
}

// fileOf returns the descriptor fd if it holds rights, with the errno WASI
// hosts give otherwise.
func (d *Devices) fileOf(fd uint32, rights uint64) (*FD, Errno) {
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return nil, errno
	}
	if !f.can(rights) {
		return nil, ENOTCAPABLE
	}
	return f, ESUCCESS
}

// dirOf returns the directory descriptor fd if it holds rights.
func (d *Devices) dirOf(fd uint32, rights uint64) (*FD, Errno) {
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return nil, errno
	}
	if f.Kind != KindDir {
		return nil, ENOTDIR
	}
	if !f.can(rights) {
		return nil, ENOTCAPABLE
	}
	return f, ESUCCESS
}

// dirPath resolves the directory descriptor and the guest path of a path_*
// call, in that order (so that the errno the guest sees does not change).
func (d *Devices) dirPath(m Mem, fd uint32, rights uint64, ptr, n uint32) (*FD, string, Errno) {
	dir, errno := d.dirOf(fd, rights)
	if errno != ESUCCESS {
		return nil, "", errno
	}
	name, errno := guestPath(m, ptr, n)
	if errno != ESUCCESS {
		return nil, "", errno
	}
	return dir, name, ESUCCESS
}

func fdAdvise(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.fileOf(uint32(p[0]), RightFdAdvise)
	if errno != ESUCCESS {
		return errno
	}
	off, n, advice := p[1], p[2], uint8(p[3])
	if advice > AdviceNoReuse || off > math.MaxInt64 || n > math.MaxInt64 {
		return EINVAL
	}
	switch f.Kind {
	case KindFile:
	case KindDir:
		return ESUCCESS // advice is a hint; there is nothing to advise on
	default:
		return ESPIPE
	}
	// WASI numbers sequential and random the other way round from Linux.
	host := [...]int{unix.FADV_NORMAL, unix.FADV_SEQUENTIAL, unix.FADV_RANDOM, unix.FADV_WILLNEED,
		unix.FADV_DONTNEED, unix.FADV_NOREUSE}[advice]
	return errnoOf(unix.Fadvise(f.Host, int64(off), int64(n), host))
}

func fdAllocate(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	f, errno := d.fileOf(fd, RightFdAllocate)
	if errno != ESUCCESS {
		return errno
	}
	off, n := p[1], p[2]
	switch {
	case f.Kind == KindDir:
		return EISDIR
	case f.Kind != KindFile:
		return ESPIPE
	case n == 0:
		return EINVAL
	case off > math.MaxInt64 || n > math.MaxInt64-off:
		return EFBIG
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallFdAllocate, Fd: int32(fd), Op: FsAllocate,
		Root: f.Root, Path: f.Path, Offset: int64(off), Size: int64(n)},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Fallocate(f.Host, 0, int64(off), int64(n))) })
	return errno
}

func fdDatasync(d *Devices, m Mem, p []uint64) Errno {
	return d.sync(CallFdDatasync, uint32(p[0]), RightFdDatasync, unix.Fdatasync)
}

func fdSync(d *Devices, m Mem, p []uint64) Errno {
	return d.sync(CallFdSync, uint32(p[0]), RightFdSync, unix.Fsync)
}

func (d *Devices) sync(c Call, fd uint32, right uint64, fn func(int) error) Errno {
	f, errno := d.fileOf(fd, right)
	if errno != ESUCCESS {
		return errno
	}
	if f.Host < 0 {
		return EINVAL
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: c, Fd: int32(fd), Op: FsSync, Root: f.Root, Path: f.Path},
		func([]byte) (uint32, Errno) { return 0, errnoOf(fn(f.Host)) })
	return errno
}

// putFilestat encodes a host stat as a WASI filestat.
func putFilestat(b []byte, st *unix.Stat_t) {
	clear(b[:sizeFilestat])
	le64(b, 0, uint64(st.Dev))
	le64(b, 8, st.Ino)
	b[16] = byte(filetypeOfMode(st.Mode))
	le64(b, 24, uint64(st.Nlink))
	le64(b, 32, uint64(st.Size))
	le64(b, 40, uint64(st.Atim.Nano()))
	le64(b, 48, uint64(st.Mtim.Nano()))
	le64(b, 56, uint64(st.Ctim.Nano()))
}

func fdFilestatGet(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	f, errno := d.fileOf(fd, RightFdFilestatGet)
	if errno != ESUCCESS {
		return errno
	}
	buf, ok := m.Slice(uint32(p[1]), sizeFilestat)
	if !ok {
		return EFAULT
	}
	if f.Host < 0 {
		// Stdio backed by Go readers and writers: a character device with
		// nothing else to say.
		clear(buf)
		buf[16] = byte(FiletypeCharacterDevice)
		return ESUCCESS
	}
	var st unix.Stat_t
	if err := unix.Fstat(f.Host, &st); err != nil {
		errno = errnoOf(err)
	} else {
		putFilestat(buf, &st)
	}
	d.tapStat(CallFdFilestatGet, fd, errno, buf)
	return errno
}

// tapStat reports host metadata the guest receives (or the error it gets).
func (d *Devices) tapStat(c Call, fd uint32, errno Errno, data []byte) {
	if d.tap == nil {
		return
	}
	if errno != ESUCCESS {
		data = nil
	}
	d.tap.Input(Input{Kind: InputStat, Call: c, Fd: int32(fd), Errno: errno, Value: uint64(len(data)), Data: data})
}

func fdFilestatSetSize(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	f, errno := d.fileOf(fd, RightFdFilestatSetSize)
	if errno != ESUCCESS {
		return errno
	}
	size := p[1]
	switch {
	case f.Kind == KindDir:
		return EISDIR
	case f.Kind != KindFile:
		return EINVAL
	case size > math.MaxInt64:
		return EFBIG
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallFdFilestatSetSize, Fd: int32(fd), Op: FsTruncate,
		Root: f.Root, Path: f.Path, Size: int64(size)},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Ftruncate(f.Host, int64(size))) })
	return errno
}

// timespecs turns the arguments of the *_set_times calls into utimensat's.
func timespecs(atim, mtim uint64, flags uint16) ([2]unix.Timespec, Errno) {
	var ts [2]unix.Timespec
	if flags&^(FstflagAtim|FstflagAtimNow|FstflagMtim|FstflagMtimNow) != 0 ||
		flags&(FstflagAtim|FstflagAtimNow) == FstflagAtim|FstflagAtimNow ||
		flags&(FstflagMtim|FstflagMtimNow) == FstflagMtim|FstflagMtimNow {
		return ts, EINVAL
	}
	one := func(t uint64, set, now bool) (unix.Timespec, Errno) {
		switch {
		case now:
			return unix.Timespec{Nsec: unix.UTIME_NOW}, ESUCCESS
		case set:
			if t > math.MaxInt64 {
				return unix.Timespec{}, EINVAL
			}
			return unix.NsecToTimespec(int64(t)), ESUCCESS
		}
		return unix.Timespec{Nsec: unix.UTIME_OMIT}, ESUCCESS
	}
	var errno Errno
	if ts[0], errno = one(atim, flags&FstflagAtim != 0, flags&FstflagAtimNow != 0); errno != ESUCCESS {
		return ts, errno
	}
	ts[1], errno = one(mtim, flags&FstflagMtim != 0, flags&FstflagMtimNow != 0)
	return ts, errno
}

// utimens sets the times of what fd refers to (an O_PATH descriptor too,
// which is how a symlink's own times are set without a path).
func utimens(fd int, ts *[2]unix.Timespec) error {
	empty := [1]byte{}
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), uintptr(unsafe.Pointer(&empty[0])),
		uintptr(unsafe.Pointer(ts)), unix.AT_EMPTY_PATH, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func fdFilestatSetTimes(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	f, errno := d.fileOf(fd, RightFdFilestatSetTimes)
	if errno != ESUCCESS {
		return errno
	}
	flags := uint16(p[3])
	ts, errno := timespecs(p[1], p[2], flags)
	if errno != ESUCCESS {
		return errno
	}
	if f.Host < 0 {
		return EINVAL
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallFdFilestatSetTimes, Fd: int32(fd), Op: FsSetTimes,
		Root: f.Root, Path: f.Path, Offset: int64(p[1]), Size: int64(p[2]), Flags: uint32(flags)},
		func([]byte) (uint32, Errno) { return 0, errnoOf(utimens(f.Host, &ts)) })
	return errno
}

// positional checks the arguments shared by fd_pread and fd_pwrite.
func (d *Devices) positional(m Mem, p []uint64, right uint64) (*FD, Errno) {
	f, errno := d.fds.Get(uint32(p[0]))
	if errno != ESUCCESS {
		return nil, errno
	}
	if f.Kind == KindDir {
		return nil, EISDIR
	}
	if !f.can(right) {
		return nil, EBADF
	}
	if !f.can(RightFdSeek) {
		return nil, ENOTCAPABLE
	}
	if !seekable(f) {
		return nil, ESPIPE
	}
	if p[3] > math.MaxInt64 {
		return nil, EINVAL
	}
	if _, ok := m.Slice(uint32(p[4]), 4); !ok {
		return nil, EFAULT
	}
	if d.iovs, errno = m.Iovecs(d.iovs[:0], uint32(p[1]), uint32(p[2])); errno != ESUCCESS {
		return nil, errno
	}
	return f, ESUCCESS
}

func fdPread(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.positional(m, p, RightFdRead)
	if errno != ESUCCESS {
		return errno
	}
	fd := uint32(p[0])
	n, err := rwv(unix.SYS_PREADV, f.Host, d.iovs, int64(p[3]))
	errno = errnoOf(err)
	d.counters.BytesIn.Add(uint64(n))
	d.tapRead(CallFdPread, fd, errno, uint32(n), d.iovs)
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(uint32(p[4]), uint32(n))
	return ESUCCESS
}

func fdPwrite(d *Devices, m Mem, p []uint64) Errno {
	f, errno := d.positional(m, p, RightFdWrite)
	if errno != ESUCCESS {
		return errno
	}
	off := int64(p[3])
	if f.Flags&FdflagAppend != 0 {
		off = -1 // Linux appends a pwrite to an O_APPEND file, whatever the offset
	}
	n, errno := d.writeFile(CallFdPwrite, uint32(p[0]), f, d.iovs, off)
	d.counters.BytesOut.Add(uint64(n))
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(uint32(p[4]), n)
	return ESUCCESS
}

func fdSeek(d *Devices, m Mem, p []uint64) Errno {
	fd, off, whence, resPtr := uint32(p[0]), int64(p[1]), uint8(p[2]), uint32(p[3])
	right := RightFdSeek
	if off == 0 && whence == WhenceCur {
		right = RightFdTell // a pure query of the offset is fd_tell
	}
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if !f.can(right) && !f.can(RightFdSeek) {
		return ENOTCAPABLE
	}
	if _, ok := m.Slice(resPtr, 8); !ok {
		return EFAULT
	}
	if whence > WhenceEnd {
		return EINVAL
	}
	switch {
	case f.Kind == KindDir:
		return EISDIR
	case f.Kind != KindFile:
		return ESPIPE
	case !seekable(f):
		pos, err := unix.Seek(f.Host, off, int(whence))
		if err != nil {
			return errnoOf(err)
		}
		m.PutU64(resPtr, uint64(pos))
		return ESUCCESS
	}
	base := f.Pos
	if whence == WhenceSet {
		base = 0
	} else if whence == WhenceEnd {
		var st unix.Stat_t
		if err := unix.Fstat(f.Host, &st); err != nil {
			return errnoOf(err)
		}
		base = st.Size
	}
	pos := base + off
	if (off > 0 && pos < base) || pos < 0 {
		return EINVAL
	}
	f.Pos = pos
	if whence == WhenceEnd && d.tap != nil {
		// The result depends on the file's size on the host.
		d.tap.Input(Input{Kind: InputStat, Call: CallFdSeek, Fd: int32(fd), Value: uint64(pos)})
	}
	m.PutU64(resPtr, uint64(pos))
	return ESUCCESS
}

func fdTell(d *Devices, m Mem, p []uint64) Errno {
	fd, resPtr := uint32(p[0]), uint32(p[1])
	f, errno := d.fileOf(fd, RightFdTell)
	if errno != ESUCCESS {
		return errno
	}
	if _, ok := m.Slice(resPtr, 8); !ok {
		return EFAULT
	}
	switch {
	case f.Kind == KindDir:
		return EISDIR
	case f.Kind != KindFile:
		return ESPIPE
	case !seekable(f):
		pos, err := unix.Seek(f.Host, 0, unix.SEEK_CUR)
		if err != nil {
			return errnoOf(err)
		}
		m.PutU64(resPtr, uint64(pos))
		return ESUCCESS
	}
	m.PutU64(resPtr, uint64(f.Pos))
	return ESUCCESS
}

func fdReaddir(d *Devices, m Mem, p []uint64) Errno {
	fd, bufPtr, bufLen, cookie, resPtr := uint32(p[0]), uint32(p[1]), uint32(p[2]), p[3], uint32(p[4])
	f, errno := d.fds.Get(fd)
	if errno != ESUCCESS {
		return errno
	}
	if !f.can(RightFdReaddir) {
		return ENOTCAPABLE
	}
	if f.Kind != KindDir {
		return ENOTDIR
	}
	buf, ok := m.Slice(bufPtr, bufLen)
	if !ok {
		return EFAULT
	}
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	if cookie == 0 || f.dir == nil {
		if errno := d.loadDir(f); errno != ESUCCESS {
			d.tapStat(CallFdReaddir, fd, errno, nil)
			return errno
		}
	}
	used := 0
	for i := cookie; i < uint64(len(f.dir.entries)) && used < len(buf); i++ {
		e := &f.dir.entries[i]
		var hdr [sizeDirent]byte
		le64(hdr[:], 0, i+1)
		le64(hdr[:], 8, e.ino)
		le32(hdr[:], 16, uint32(len(e.name)))
		hdr[20] = byte(e.typ)
		// The last entry is cut off where the buffer ends, as the spec asks:
		// the guest sees a full buffer and asks again from the last cookie.
		used += copy(buf[used:], hdr[:])
		used += copy(buf[used:], e.name)
	}
	d.tapStat(CallFdReaddir, fd, ESUCCESS, buf[:used])
	m.PutU32(resPtr, uint32(used))
	return ESUCCESS
}

// loadDir snapshots the directory's entries: "." and ".." first, then the
// rest sorted by name, so that the listing (and so every cookie) is the same
// on any host holding the same tree.
func (d *Devices) loadDir(f *FD) Errno {
	if _, err := unix.Seek(f.Host, 0, unix.SEEK_SET); err != nil {
		return errnoOf(err)
	}
	var self unix.Stat_t
	if err := unix.Fstat(f.Host, &self); err != nil {
		return errnoOf(err)
	}
	atRoot := d.isRoot(f, &self)
	if f.dir == nil {
		f.dir = &dirCache{}
	}
	entries := f.dir.entries[:0]
	dotdot := dirEntry{name: "..", typ: FiletypeDirectory}
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(f.Host, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return errnoOf(err)
		}
		if n <= 0 {
			break
		}
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(b[16]) | int(b[17])<<8
			if reclen < 19 || reclen > len(b) {
				return EIO
			}
			rec := b[:reclen]
			b = b[reclen:]
			name := rec[19:]
			if i := slices.Index(name, 0); i >= 0 {
				name = name[:i]
			}
			e := dirEntry{name: string(name), ino: le64get(rec, 0), typ: direntType(rec[18])}
			switch e.name {
			case ".":
				continue
			case "..":
				dotdot.ino = e.ino
				continue
			}
			if e.name == ghostDir && atRoot {
				continue // files the guest let go of while it held them (ghost.go)
			}
			if e.typ == FiletypeUnknown && rec[18] == unix.DT_UNKNOWN {
				var st unix.Stat_t
				if unix.Fstatat(f.Host, e.name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
					e.typ = filetypeOfMode(st.Mode)
				}
			}
			entries = append(entries, e)
		}
	}
	if atRoot {
		// The parent of a preopen is outside: the guest learns nothing of
		// it. (Told by the directory itself, not its path: "sub/.." is
		// the root too.)
		dotdot.ino = self.Ino
	}
	slices.SortFunc(entries, func(a, b dirEntry) int { return strings.Compare(a.name, b.name) })
	entries = slices.Insert(entries, 0, dirEntry{name: ".", ino: self.Ino, typ: FiletypeDirectory}, dotdot)
	f.dir.entries = entries
	n := 0
	for _, e := range entries {
		n += len(e.name) + int(unsafe.Sizeof(e))
	}
	d.dirBytes += n - f.dir.bytes
	f.dir.bytes = n
	if d.dirBytes > maxDirBytes {
		d.fds.Each(func(_ uint32, o *FD) {
			if o != f {
				d.dropDir(o)
			}
		})
	}
	return ESUCCESS
}

// isRoot says whether the directory of f, whose status is self, is its
// preopen's host directory.
func (d *Devices) isRoot(f *FD, self *unix.Stat_t) bool {
	if f.Path == "." {
		return true
	}
	if f.Root < 0 || f.Root >= len(d.preopens) {
		return false
	}
	var root unix.Stat_t
	if err := unix.Stat(d.preopens[f.Root].HostPath, &root); err != nil {
		return true // unknown: hide the parent
	}
	return root.Dev == self.Dev && root.Ino == self.Ino
}

func le64get(b []byte, off int) uint64 {
	_ = b[off+7]
	return uint64(b[off]) | uint64(b[off+1])<<8 | uint64(b[off+2])<<16 | uint64(b[off+3])<<24 |
		uint64(b[off+4])<<32 | uint64(b[off+5])<<40 | uint64(b[off+6])<<48 | uint64(b[off+7])<<56
}

func direntType(t uint8) Filetype {
	switch t {
	case unix.DT_REG:
		return FiletypeRegularFile
	case unix.DT_DIR:
		return FiletypeDirectory
	case unix.DT_LNK:
		return FiletypeSymbolicLink
	case unix.DT_CHR:
		return FiletypeCharacterDevice
	case unix.DT_BLK:
		return FiletypeBlockDevice
	case unix.DT_SOCK:
		return FiletypeSocketStream
	}
	return FiletypeUnknown
}

func pathCreateDirectory(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[0])
	dir, name, errno := d.dirPath(m, fd, RightPathCreateDirectory, uint32(p[1]), uint32(p[2]))
	if errno != ESUCCESS {
		return errno
	}
	t, errno := resolveParent(dir, name)
	if errno != ESUCCESS {
		return errno
	}
	defer t.close()
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathCreateDirectory, Fd: int32(fd), Op: FsMkdir,
		Root: dir.Root, Path: t.rel},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Mkdirat(t.dir, t.arg(), 0o777)) })
	return errno
}

func pathFilestatGet(d *Devices, m Mem, p []uint64) Errno {
	fd, lookup := uint32(p[0]), uint32(p[1])
	dir, name, errno := d.dirPath(m, fd, RightPathFilestatGet, uint32(p[2]), uint32(p[3]))
	if errno != ESUCCESS {
		return errno
	}
	buf, ok := m.Slice(uint32(p[4]), sizeFilestat)
	if !ok {
		return EFAULT
	}
	obj, errno := openObject(dir, name, lookup&LookupSymlinkFollow != 0)
	if errno == ESUCCESS {
		var st unix.Stat_t
		if err := unix.Fstat(obj, &st); err != nil {
			errno = errnoOf(err)
		} else {
			putFilestat(buf, &st)
		}
		unix.Close(obj)
	}
	d.tapStat(CallPathFilestatGet, fd, errno, buf)
	return errno
}

func pathFilestatSetTimes(d *Devices, m Mem, p []uint64) Errno {
	fd, lookup := uint32(p[0]), uint32(p[1])
	dir, name, errno := d.dirPath(m, fd, RightPathFilestatSetTimes, uint32(p[2]), uint32(p[3]))
	if errno != ESUCCESS {
		return errno
	}
	flags := uint16(p[6])
	ts, errno := timespecs(p[4], p[5], flags)
	if errno != ESUCCESS {
		return errno
	}
	obj, errno := openObject(dir, name, lookup&LookupSymlinkFollow != 0)
	if errno != ESUCCESS {
		return errno
	}
	defer unix.Close(obj)
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathFilestatSetTimes, Fd: int32(fd), Op: FsSetTimes,
		Root: dir.Root, Path: joinRel(dir.Path, strings.TrimRight(name, "/")), Offset: int64(p[4]),
		Size: int64(p[5]), Flags: uint32(flags)},
		func([]byte) (uint32, Errno) { return 0, errnoOf(utimens(obj, &ts)) })
	return errno
}

func pathLink(d *Devices, m Mem, p []uint64) Errno {
	oldFd, lookup, newFd := uint32(p[0]), uint32(p[1]), uint32(p[4])
	oldDir, errno := d.dirOf(oldFd, RightPathLinkSource)
	if errno != ESUCCESS {
		return errno
	}
	newDir, errno := d.dirOf(newFd, RightPathLinkTarget)
	if errno != ESUCCESS {
		return errno
	}
	oldName, errno := guestPath(m, uint32(p[2]), uint32(p[3]))
	if errno != ESUCCESS {
		return errno
	}
	newName, errno := guestPath(m, uint32(p[5]), uint32(p[6]))
	if errno != ESUCCESS {
		return errno
	}
	src, errno := resolveParent(oldDir, oldName)
	if errno != ESUCCESS {
		return errno
	}
	defer src.close()
	// What the link will point to: the object itself when following a
	// final symlink (held open, and linked through its /proc descriptor,
	// which the host resolves, not the guest), else the name in its parent.
	srcDir, srcName, flags := src.dir, src.name, 0
	if lookup&LookupSymlinkFollow != 0 || src.slash || src.dot() {
		obj, errno := openObject(oldDir, oldName, true)
		if errno != ESUCCESS {
			return errno
		}
		defer unix.Close(obj)
		var st unix.Stat_t
		if err := unix.Fstat(obj, &st); err != nil {
			return errnoOf(err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return EPERM // no hard links to directories
		}
		if src.slash {
			return ENOTDIR
		}
		srcDir, srcName, flags = unix.AT_FDCWD, "/proc/self/fd/"+itoa(obj), unix.AT_SYMLINK_FOLLOW
	}
	dst, errno := resolveParent(newDir, newName)
	if errno != ESUCCESS {
		return errno
	}
	defer dst.close()
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathLink, Fd: int32(oldFd), Op: FsLink,
		Root: oldDir.Root, Path: src.rel, Root2: newDir.Root, Path2: dst.rel},
		func([]byte) (uint32, Errno) {
			return 0, errnoOf(unix.Linkat(srcDir, srcName, dst.dir, dst.arg(), flags))
		})
	return errno
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

func pathOpen(d *Devices, m Mem, p []uint64) Errno {
	fd, lookup := uint32(p[0]), uint32(p[1])
	oflags, base, inheriting, fdflags, resPtr := uint16(p[4]), p[5], p[6], uint16(p[7]), uint32(p[8])
	dir, errno := d.dirOf(fd, RightPathOpen)
	if errno != ESUCCESS {
		return errno
	}
	if oflags&^(OflagCreat|OflagDirectory|OflagExcl|OflagTrunc) != 0 ||
		fdflags&^(FdflagAppend|FdflagDsync|FdflagNonblock|FdflagRsync|FdflagSync) != 0 {
		return EINVAL
	}
	if (oflags&OflagCreat != 0 && !dir.can(RightPathCreateFile)) ||
		(oflags&OflagTrunc != 0 && !dir.can(RightPathFilestatSetSize)) {
		return ENOTCAPABLE
	}
	name, errno := guestPath(m, uint32(p[2]), uint32(p[3]))
	if errno != ESUCCESS {
		return errno
	}
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	// Rights are what was asked for and the directory may pass on; the
	// access mode follows from them.
	base &= dir.RightsInheriting
	inheriting &= dir.RightsInheriting
	readable := base&(RightFdRead|RightFdReaddir) != 0
	writable := base&(RightFdWrite|RightFdAllocate|RightFdFilestatSetSize|RightFdDatasync) != 0
	// O_NONBLOCK keeps the open itself from blocking on a FIFO, and the
	// descriptor's I/O then (see below); regular files ignore it.
	flags := unix.O_NOCTTY | unix.O_NONBLOCK
	switch {
	case readable && writable:
		flags |= unix.O_RDWR
	case writable:
		flags |= unix.O_WRONLY
	default:
		flags |= unix.O_RDONLY
	}
	if oflags&OflagDirectory != 0 {
		flags |= unix.O_DIRECTORY
	}
	if oflags&OflagCreat != 0 {
		flags |= unix.O_CREAT
	}
	if oflags&OflagExcl != 0 {
		flags |= unix.O_EXCL
	}
	if oflags&OflagTrunc != 0 {
		flags |= unix.O_TRUNC
	}
	if lookup&LookupSymlinkFollow == 0 {
		flags |= unix.O_NOFOLLOW
	}
	if fdflags&FdflagAppend != 0 {
		flags |= unix.O_APPEND
	}
	if fdflags&FdflagDsync != 0 {
		flags |= unix.O_DSYNC
	}
	if fdflags&(FdflagSync|FdflagRsync) != 0 {
		flags |= unix.O_SYNC
	}
	rel := joinRel(dir.Path, strings.TrimRight(name, "/"))
	host := -1
	open := func([]byte) (uint32, Errno) {
		var errno Errno
		host, errno = openBeneath(dir.Host, name, flags, 0o666)
		return 0, errno
	}
	if oflags&(OflagCreat|OflagTrunc) != 0 {
		_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathOpen, Fd: int32(fd), Op: FsCreate,
			Root: dir.Root, Path: rel, Flags: uint32(oflags)}, open)
	} else {
		_, errno = open(nil)
	}
	if errno == ESUCCESS && host < 0 {
		errno = EIO // a gate that did not perform the open
	}
	var newFd uint32
	if errno == ESUCCESS {
		newFd, errno = d.addOpened(host, dir, rel, base, inheriting, fdflags, readable, writable,
			lookup&LookupSymlinkFollow != 0)
	}
	if d.tap != nil {
		d.tap.Input(Input{Kind: InputResult, Call: CallPathOpen, Fd: int32(fd), Errno: errno, Value: uint64(newFd)})
	}
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(resPtr, newFd)
	return ESUCCESS
}

// addOpened makes a host descriptor just opened beneath dir a guest one.
func (d *Devices) addOpened(host int, dir *FD, rel string, base, inheriting uint64, fdflags uint16,
	readable, writable, follow bool) (uint32, Errno) {
	var st unix.Stat_t
	if err := unix.Fstat(host, &st); err != nil {
		unix.Close(host)
		return 0, errnoOf(err)
	}
	f := &FD{Kind: KindFile, Filetype: filetypeOfMode(st.Mode), Host: host, Flags: fdflags, Root: dir.Root,
		Path: rel, Readable: readable, Writable: writable, RightsInheriting: inheriting, Follow: follow,
		dev: uint64(st.Dev), ino: st.Ino}
	switch f.Filetype {
	case FiletypeDirectory:
		f.Kind = KindDir
		f.RightsBase = base & RightsDirectory
	case FiletypeRegularFile:
		f.RightsBase = base & RightsRegularFile
	default:
		// A FIFO or device: a stream, not a file with an offset. Its host
		// descriptor stays non-blocking whatever the guest asked: blocking
		// reads and writes are waits of the device layer (fileRead,
		// writeFile), which a pause or a stop can end, never sleeps in the
		// kernel, which nothing could end while the other side is idle.
		f.RightsBase = base & RightsRegularFile &^ (RightFdSeek | RightFdTell)
	}
	newFd, errno := d.fds.Add(f)
	if errno != ESUCCESS {
		unix.Close(host)
	}
	return newFd, errno
}

func pathReadlink(d *Devices, m Mem, p []uint64) Errno {
	fd, bufPtr, bufLen, resPtr := uint32(p[0]), uint32(p[3]), uint32(p[4]), uint32(p[5])
	dir, name, errno := d.dirPath(m, fd, RightPathReadlink, uint32(p[1]), uint32(p[2]))
	if errno != ESUCCESS {
		return errno
	}
	buf, ok := m.Slice(bufPtr, bufLen)
	if !ok {
		return EFAULT
	}
	if _, ok := m.Slice(resPtr, 4); !ok {
		return EFAULT
	}
	obj, errno := openObject(dir, name, false)
	if errno != ESUCCESS {
		return errno
	}
	defer unix.Close(obj)
	// The target goes straight into the guest's buffer; the kernel cuts it
	// off at the buffer's end, as WASI asks.
	var one [1]byte
	dst := buf
	if len(dst) == 0 {
		dst = one[:]
	}
	n, err := unix.Readlinkat(obj, "", dst)
	errno = errnoOf(err)
	if len(buf) == 0 {
		n = 0
	}
	d.tapStat(CallPathReadlink, fd, errno, buf[:max(n, 0)])
	if errno != ESUCCESS {
		return errno
	}
	m.PutU32(resPtr, uint32(n))
	return ESUCCESS
}

func pathRemoveDirectory(d *Devices, m Mem, p []uint64) Errno {
	return d.remove(m, p, CallPathRemoveDirectory, RightPathRemoveDirectory, FsRmdir, unix.AT_REMOVEDIR)
}

func pathUnlinkFile(d *Devices, m Mem, p []uint64) Errno {
	return d.remove(m, p, CallPathUnlinkFile, RightPathUnlinkFile, FsUnlink, 0)
}

func (d *Devices) remove(m Mem, p []uint64, c Call, right uint64, op FsOp, flags int) Errno {
	fd := uint32(p[0])
	dir, name, errno := d.dirPath(m, fd, right, uint32(p[1]), uint32(p[2]))
	if errno != ESUCCESS {
		return errno
	}
	t, errno := resolveParent(dir, name)
	if errno != ESUCCESS {
		return errno
	}
	defer t.close()
	if op == FsUnlink && !t.slash && !t.dot() {
		if errno := d.keepOpenFiles(c, fd, dir.Root, &t); errno != ESUCCESS {
			return errno
		}
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: c, Fd: int32(fd), Op: op, Root: dir.Root, Path: t.rel},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Unlinkat(t.dir, t.arg(), flags)) })
	return errno
}

func pathRename(d *Devices, m Mem, p []uint64) Errno {
	oldFd, newFd := uint32(p[0]), uint32(p[3])
	oldDir, errno := d.dirOf(oldFd, RightPathRenameSource)
	if errno != ESUCCESS {
		return errno
	}
	newDir, errno := d.dirOf(newFd, RightPathRenameTarget)
	if errno != ESUCCESS {
		return errno
	}
	oldName, errno := guestPath(m, uint32(p[1]), uint32(p[2]))
	if errno != ESUCCESS {
		return errno
	}
	newName, errno := guestPath(m, uint32(p[4]), uint32(p[5]))
	if errno != ESUCCESS {
		return errno
	}
	src, errno := resolveParent(oldDir, oldName)
	if errno != ESUCCESS {
		return errno
	}
	defer src.close()
	dst, errno := resolveParent(newDir, newName)
	if errno != ESUCCESS {
		return errno
	}
	defer dst.close()
	if !dst.slash && !dst.dot() {
		if errno := d.keepOpenFiles(CallPathRename, oldFd, newDir.Root, &dst); errno != ESUCCESS {
			return errno
		}
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathRename, Fd: int32(oldFd), Op: FsRename,
		Root: oldDir.Root, Path: src.rel, Root2: newDir.Root, Path2: dst.rel},
		func([]byte) (uint32, Errno) {
			return 0, errnoOf(unix.Renameat(src.dir, src.arg(), dst.dir, dst.arg()))
		})
	if errno == ESUCCESS {
		d.renamePaths(oldDir.Root, src.rel, newDir.Root, dst.rel)
	}
	return errno
}

func pathSymlink(d *Devices, m Mem, p []uint64) Errno {
	fd := uint32(p[2])
	dir, errno := d.dirOf(fd, RightPathSymlink)
	if errno != ESUCCESS {
		return errno
	}
	if uint32(p[1]) > maxPath {
		return ENAMETOOLONG
	}
	// The link's target is only text until someone resolves it, and every
	// resolution here is confined beneath its starting directory; absolute
	// targets are refused anyway, as they can never resolve inside.
	linkTarget, ok := m.String(uint32(p[0]), uint32(p[1]))
	if !ok {
		return EFAULT
	}
	if errno := checkPath(linkTarget); errno != ESUCCESS {
		return errno
	}
	name, errno := guestPath(m, uint32(p[3]), uint32(p[4]))
	if errno != ESUCCESS {
		return errno
	}
	t, errno := resolveParent(dir, name)
	if errno != ESUCCESS {
		return errno
	}
	defer t.close()
	_, errno = d.output(Effect{Kind: EffectFs, Call: CallPathSymlink, Fd: int32(fd), Op: FsSymlink,
		Root: dir.Root, Path: t.rel, Path2: linkTarget},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Symlinkat(linkTarget, t.dir, t.arg())) })
	return errno
}
