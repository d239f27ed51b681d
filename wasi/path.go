package wasi

import (
	"path"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Guest path resolution: the sandbox of the filesystem calls.
//
// The guest is hostile. Every path it names is resolved by the kernel with
// openat2(2) and RESOLVE_BENEATH, relative to the directory descriptor the
// guest passed: "..", absolute paths and symbolic links (existing ones, ones
// the guest creates, absolute or relative, chains of any length) cannot leave
// that directory, and because the kernel checks during the walk there is no
// window between check and use. RESOLVE_NO_MAGICLINKS keeps /proc-style links
// out of reach too.
//
// Calls that act on a final name rather than on an object (mkdir, unlink,
// rename, symlink, link) resolve the parent this way and then act on one plain
// name relative to the parent's descriptor; the kernel never follows a symlink
// in that last position for those calls. Calls that act on an object but must
// not follow a final symlink (stat, utimes, readlink) open it with
// O_PATH|O_NOFOLLOW beneath the directory and act on that descriptor, because
// a trailing slash would make the *at variants follow the link unchecked.

// resolveFlags confine every guest lookup beneath its starting directory.
const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS

// maxPath bounds a guest path (Linux's PATH_MAX, less the NUL).
const maxPath = 4095

// guestPath reads a path argument and rejects what can never resolve inside
// a preopen: empty paths, absolute paths, embedded NULs, invalid UTF-8.
func guestPath(m Mem, ptr, n uint32) (string, Errno) {
	if n > maxPath {
		return "", ENAMETOOLONG
	}
	s, ok := m.String(ptr, n)
	if !ok {
		return "", EFAULT
	}
	return s, checkPath(s)
}

func checkPath(s string) Errno {
	switch {
	case s == "":
		return ENOENT
	case s[0] == '/':
		return ENOTCAPABLE
	case strings.IndexByte(s, 0) >= 0:
		return EINVAL
	case !utf8.ValidString(s):
		return EILSEQ
	case reservedPath(s):
		return ENOENT // the device layer's own (ghost.go)
	}
	return ESUCCESS
}

// resolveErrno maps an error of a beneath-resolution: EXDEV is the kernel
// saying the path tried to leave the directory.
func resolveErrno(err error) Errno {
	if err == unix.EXDEV {
		return ENOTCAPABLE
	}
	return errnoOf(err)
}

// openBeneath opens p relative to dirfd without ever leaving dirfd.
func openBeneath(dirfd int, p string, flags int, mode uint32) (int, Errno) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: resolveFlags}
	if flags&unix.O_CREAT != 0 {
		how.Mode = uint64(mode)
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dirfd, p, &how)
		if err == nil {
			return fd, ESUCCESS
		}
		// EAGAIN: a concurrent rename raced a ".." step; the kernel asks
		// for a retry rather than risk a wrong answer.
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 16 {
			continue
		}
		return -1, resolveErrno(err)
	}
}

// target is a final name to act on, relative to an already resolved parent.
type target struct {
	dir   int    // parent directory descriptor
	owned bool   // dir was opened for this call and must be closed
	name  string // last component, without slashes
	slash bool   // the guest path ended in one or more slashes
	rel   string // the whole path relative to the preopen, for effects
}

// arg is the name to pass to a *at call that acts on the name itself; a
// trailing slash is kept so that the kernel applies its directory rules.
func (t *target) arg() string {
	if t.slash {
		return t.name + "/"
	}
	return t.name
}

func (t *target) dot() bool { return t.name == "." || t.name == ".." }

func (t *target) close() {
	if t.owned {
		unix.Close(t.dir)
		t.owned = false
	}
}

// resolveParent splits a checked guest path p into its parent, resolved
// beneath the directory f, and its last name.
func resolveParent(f *FD, p string) (target, Errno) {
	trimmed := strings.TrimRight(p, "/")
	t := target{dir: f.Host, name: trimmed, slash: len(trimmed) < len(p)}
	if i := strings.LastIndexByte(trimmed, '/'); i >= 0 {
		fd, errno := openBeneath(f.Host, trimmed[:i+1], unix.O_PATH|unix.O_DIRECTORY, 0)
		if errno != ESUCCESS {
			return t, errno
		}
		t.dir, t.owned, t.name = fd, true, trimmed[i+1:]
	}
	if t.dot() {
		// The kernel refuses to create, remove or rename "." and "..", but
		// "p/.." may still name something outside: check that the whole
		// path stays beneath before letting the kernel give its errno.
		fd, errno := openBeneath(f.Host, trimmed, unix.O_PATH|unix.O_DIRECTORY, 0)
		if errno != ESUCCESS {
			t.close()
			return t, errno
		}
		unix.Close(fd)
	}
	t.rel = joinRel(f.Path, trimmed)
	return t, ESUCCESS
}

// openObject opens what p names beneath f with O_PATH, following a final
// symlink only if follow is set (a trailing slash always follows, beneath).
func openObject(f *FD, p string, follow bool) (int, Errno) {
	flags := unix.O_PATH
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	return openBeneath(f.Host, p, flags, 0)
}

// joinRel is the path of p (relative to a descriptor whose own path is base)
// relative to the preopen. Without ".." components it is cleaned lexically,
// which is exact; with them it is kept as given, which is still exact for
// anyone who resolves it beneath the same preopen, as replicas do (lexical
// cleaning would be wrong where a symlink precedes the "..").
func joinRel(base, p string) string {
	r := p
	if base != "" && base != "." {
		r = base + "/" + p
	}
	if hasDotDot(r) {
		return strings.TrimRight(r, "/")
	}
	return path.Clean(r)
}

func hasDotDot(p string) bool {
	for len(p) > 0 {
		i := strings.IndexByte(p, '/')
		if i < 0 {
			return p == ".."
		}
		if p[:i] == ".." {
			return true
		}
		p = p[i+1:]
	}
	return false
}

// renamePaths keeps the recorded paths of open descriptors right after a
// rename, so that a snapshot can re-open them where they now are.
func (d *Devices) renamePaths(root int, from string, root2 int, to string) {
	if from == "." || to == "." {
		return
	}
	d.fds.Each(func(_ uint32, f *FD) {
		if f.Root != root || f.Kind == KindStdio {
			return
		}
		switch {
		case f.Path == from:
			f.Root, f.Path = root2, to
		case strings.HasPrefix(f.Path, from) && f.Path[len(from)] == '/':
			f.Root, f.Path = root2, to+f.Path[len(from):]
		}
	})
}
