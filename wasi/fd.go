package wasi

import (
	"golang.org/x/sys/unix"
)

// Kind says what a guest descriptor refers to on the host.
type Kind uint8

const (
	KindStdio    Kind = iota + 1 // stdin, stdout or stderr of the VM
	KindDir                      // a directory (preopened or opened beneath one)
	KindFile                     // a regular file, or another non-directory object opened by path
	KindListener                 // a preopened listening TCP socket
	KindConn                     // an accepted TCP connection
)

// FD is one entry of the guest's descriptor table. It is plain data (plus a
// host descriptor) so that device state can be captured and re-created: a
// file is re-opened from Root/Path with Flags and its offset, a listener is
// re-bound to Addr.
type FD struct {
	Kind     Kind
	Filetype Filetype
	// Host is the host descriptor, or -1 for stdio backed by Go readers/writers.
	Host int
	// Flags are the guest-visible fdflags (APPEND, NONBLOCK, ...). Host
	// descriptors of sockets are always non-blocking; a blocking guest call is
	// emulated with an interruptible wait.
	Flags            uint16
	RightsBase       uint64
	RightsInheriting uint64
	// Preopen is the guest name of a preopened directory, "" otherwise.
	Preopen string
	// Root is the index of the preopen this descriptor lives under (-1 for
	// none) and Path its path relative to that preopen's host directory.
	Root int
	Path string
	// Readable/Writable record the access mode the file was opened with.
	Readable, Writable bool
	// Follow: the guest opened it following a symlink at the end of Path
	// (a restore re-opens it the same way).
	Follow bool
	// dev and ino identify a file's host object (ghost.go).
	dev, ino uint64
	// Pos is the file offset of a regular file. The device layer keeps it
	// (reads and writes are positional) so that it is plain data a snapshot
	// can carry, and so that fd_seek and fd_tell need no system call.
	Pos int64
	// Addr is the bound address of a listener, or the peer of a connection.
	Addr string
	// Stdio is 0, 1 or 2 for KindStdio.
	Stdio int

	// dir caches a directory listing for fd_readdir (rebuilt on demand).
	dir *dirCache
	// perform is this descriptor's write effect, made once so that a write
	// does not allocate a closure (fs.go, stdio.go).
	perform Perform
	// pending is the argument of perform for the write in progress.
	pending writeArgs
	// scratch is reused to gather a write's buffers for the output gate
	// (which copies what it keeps), so that writes do not allocate.
	scratch []byte
	// conn holds the state of a connection (sock.go).
	conn *connState
}

// dirCache holds a snapshot of a directory's entries so that fd_readdir
// cookies stay stable across calls: the cookie of an entry is its index
// plus one, and a listing is re-read only when the guest starts over at
// cookie 0.
type dirCache struct {
	entries []dirEntry
	bytes   int // what entries hold, counted in Devices.dirBytes
}

// maxDirBytes bounds the directory listings all of a VM's descriptors
// keep at once (fd_readdir's cookies index them). Past it the others' are
// dropped, and re-read, the same (sorted), when next asked for: a guest
// opening one directory thousands of times and reading one entry of each
// kept that many copies of its listing.
const maxDirBytes = 16 << 20

// dropDir forgets f's cached listing.
func (d *Devices) dropDir(f *FD) {
	if f.dir != nil {
		d.dirBytes -= f.dir.bytes
		f.dir = nil
	}
}

// writeArgs carries a write's parameters to the descriptor's perform closure.
type writeArgs struct {
	off    int64 // -1: append at the end
	result int64 // the offset after the write, set by perform
}

type dirEntry struct {
	name string
	ino  uint64
	typ  Filetype
}

// can reports whether the descriptor holds all the given rights.
func (f *FD) can(rights uint64) bool { return f.RightsBase&rights == rights }

// Table is the guest's descriptor table. Descriptors are numbered from 0 and
// a new one takes the lowest free number, as POSIX does.
type Table struct {
	fds []*FD
}

// Get returns the descriptor numbered fd, or EBADF.
func (t *Table) Get(fd uint32) (*FD, Errno) {
	if uint64(fd) >= uint64(len(t.fds)) || t.fds[fd] == nil {
		return nil, EBADF
	}
	return t.fds[fd], ESUCCESS
}

// Add inserts f at the lowest free number.
func (t *Table) Add(f *FD) (uint32, Errno) {
	for i, e := range t.fds {
		if e == nil {
			t.fds[i] = f
			return uint32(i), ESUCCESS
		}
	}
	if len(t.fds) >= maxFds {
		return 0, EMFILE
	}
	t.fds = append(t.fds, f)
	return uint32(len(t.fds) - 1), ESUCCESS
}

// Set places f at number fd (used for preopens and fd_renumber).
func (t *Table) Set(fd uint32, f *FD) {
	for uint64(len(t.fds)) <= uint64(fd) {
		t.fds = append(t.fds, nil)
	}
	t.fds[fd] = f
}

// Remove takes fd out of the table without closing its host descriptor.
func (t *Table) Remove(fd uint32) {
	if uint64(fd) < uint64(len(t.fds)) {
		t.fds[fd] = nil
	}
	for len(t.fds) > 0 && t.fds[len(t.fds)-1] == nil {
		t.fds = t.fds[:len(t.fds)-1]
	}
}

// Each calls fn for every open descriptor in numeric order.
func (t *Table) Each(fn func(fd uint32, f *FD)) {
	for i, f := range t.fds {
		if f != nil {
			fn(uint32(i), f)
		}
	}
}

// Len is the number of open descriptors.
func (t *Table) Len() int {
	n := 0
	for _, f := range t.fds {
		if f != nil {
			n++
		}
	}
	return n
}

// maxFds bounds the guest's descriptor table.
const maxFds = 1 << 16

// closeHost closes the host side of a descriptor.
func (d *Devices) closeHost(f *FD) error {
	if f.Host < 0 || f.Kind == KindStdio {
		return nil
	}
	// Before the number can be reused: the idle waiter must not take a
	// new descriptor for the one it watched.
	if d.idle != nil {
		d.idle.forget(f.Host)
	}
	err := unix.Close(f.Host)
	f.Host = -1
	return err
}

// errnoOf maps a host error to a WASI errno.
func errnoOf(err error) Errno {
	if err == nil {
		return ESUCCESS
	}
	if e, ok := err.(unix.Errno); ok {
		if w, ok := hostErrnos[e]; ok {
			return w
		}
		return EIO
	}
	if e, ok := err.(Errno); ok {
		return e
	}
	return EIO
}

var hostErrnos = map[unix.Errno]Errno{
	unix.E2BIG: E2BIG, unix.EACCES: EACCES, unix.EADDRINUSE: EADDRINUSE, unix.EADDRNOTAVAIL: EADDRNOTAVAIL,
	unix.EAFNOSUPPORT: EAFNOSUPPORT, unix.EAGAIN: EAGAIN, unix.EALREADY: EALREADY, unix.EBADF: EBADF,
	unix.EBADMSG: EBADMSG, unix.EBUSY: EBUSY, unix.ECANCELED: ECANCELED, unix.ECHILD: ECHILD,
	unix.ECONNABORTED: ECONNABORTED, unix.ECONNREFUSED: ECONNREFUSED, unix.ECONNRESET: ECONNRESET,
	unix.EDEADLK: EDEADLK, unix.EDESTADDRREQ: EDESTADDRREQ, unix.EDOM: EDOM, unix.EDQUOT: EDQUOT,
	unix.EEXIST: EEXIST, unix.EFAULT: EFAULT, unix.EFBIG: EFBIG, unix.EHOSTUNREACH: EHOSTUNREACH,
	unix.EIDRM: EIDRM, unix.EILSEQ: EILSEQ, unix.EINPROGRESS: EINPROGRESS, unix.EINTR: EINTR,
	unix.EINVAL: EINVAL, unix.EIO: EIO, unix.EISCONN: EISCONN, unix.EISDIR: EISDIR, unix.ELOOP: ELOOP,
	unix.EMFILE: EMFILE, unix.EMLINK: EMLINK, unix.EMSGSIZE: EMSGSIZE, unix.EMULTIHOP: EMULTIHOP,
	unix.ENAMETOOLONG: ENAMETOOLONG, unix.ENETDOWN: ENETDOWN, unix.ENETRESET: ENETRESET,
	unix.ENETUNREACH: ENETUNREACH, unix.ENFILE: ENFILE, unix.ENOBUFS: ENOBUFS, unix.ENODEV: ENODEV,
	unix.ENOENT: ENOENT, unix.ENOEXEC: ENOEXEC, unix.ENOLCK: ENOLCK, unix.ENOLINK: ENOLINK,
	unix.ENOMEM: ENOMEM, unix.ENOMSG: ENOMSG, unix.ENOPROTOOPT: ENOPROTOOPT, unix.ENOSPC: ENOSPC,
	unix.ENOSYS: ENOSYS, unix.ENOTCONN: ENOTCONN, unix.ENOTDIR: ENOTDIR, unix.ENOTEMPTY: ENOTEMPTY,
	unix.ENOTRECOVERABLE: ENOTRECOVERABLE, unix.ENOTSOCK: ENOTSOCK, unix.ENOTSUP: ENOTSUP,
	unix.ENOTTY: ENOTTY, unix.ENXIO: ENXIO, unix.EOVERFLOW: EOVERFLOW, unix.EOWNERDEAD: EOWNERDEAD,
	unix.EPERM: EPERM, unix.EPIPE: EPIPE, unix.EPROTO: EPROTO, unix.EPROTONOSUPPORT: EPROTONOSUPPORT,
	unix.EPROTOTYPE: EPROTOTYPE, unix.ERANGE: ERANGE, unix.EROFS: EROFS, unix.ESPIPE: ESPIPE,
	unix.ESRCH: ESRCH, unix.ESTALE: ESTALE, unix.ETIMEDOUT: ETIMEDOUT, unix.ETXTBSY: ETXTBSY,
	unix.EXDEV: EXDEV,
}
