package wasi

import (
	"crypto/rand"
	"encoding/hex"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// Files the guest holds open but unlinks, or renames another file over,
// live on without a name. A snapshot re-opens files by path, and Remus
// replays the guest's writes on its backup by path: such a file was
// re-opened as whatever took its name (or not at all: a failover that
// failed), and writes to it landed on the backup in the file that
// replaced it. So before the name goes, the device layer links the file
// into a hidden directory of its preopen (ghostDir), as one more
// filesystem effect (Remus journals it, and its backup does the same),
// and the guest's descriptors of it take that path; the last one closed
// removes it. The name ghostDir is reserved: no guest path may name it.
const ghostDir = ".ftvm-ghosts"

// reservedPath says whether a guest path names the hidden directory (any
// component equal to it).
func reservedPath(p string) bool {
	if !strings.Contains(p, ghostDir) {
		return false
	}
	for c := range strings.SplitSeq(p, "/") {
		if c == ghostDir {
			return true
		}
	}
	return false
}

// keepOpenFiles is called before t's name is removed or replaced (an
// unlink, a rename over it): if the guest holds the file it names open,
// the file is linked as a ghost and those descriptors take its path.
func (d *Devices) keepOpenFiles(c Call, fd uint32, root int, t *target) Errno {
	var st unix.Stat_t
	if err := unix.Fstatat(t.dir, t.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return ESUCCESS // nothing there: nothing to keep (the call says why)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return ESUCCESS
	}
	var held []*FD
	d.fds.Each(func(_ uint32, f *FD) {
		if f.Kind == KindFile && f.Host >= 0 && f.dev == uint64(st.Dev) && f.ino == st.Ino {
			held = append(held, f)
		}
	})
	if len(held) == 0 {
		return ESUCCESS
	}
	rootFd, errno := d.rootDir(root)
	if errno != ESUCCESS {
		return errno
	}
	defer unix.Close(rootFd)
	var id [8]byte
	rand.Read(id[:])
	name := path.Join(ghostDir, hex.EncodeToString(id[:]))
	if err := unix.Fstatat(rootFd, ghostDir, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		_, errno = d.output(Effect{Kind: EffectFs, Call: c, Fd: int32(fd), Op: FsMkdir, Root: root, Path: ghostDir},
			func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Mkdirat(rootFd, ghostDir, 0o700)) })
		if errno != ESUCCESS && errno != EEXIST {
			return errno
		}
	}
	_, errno = d.output(Effect{Kind: EffectFs, Call: c, Fd: int32(fd), Op: FsLink, Root: root, Path: t.rel,
		Root2: root, Path2: name},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Linkat(t.dir, t.name, rootFd, name, 0)) })
	if errno != ESUCCESS {
		return errno
	}
	for _, f := range held {
		f.Root, f.Path, f.Follow = root, name, false
	}
	return ESUCCESS
}

// dropGhost removes the ghost f named, once no other descriptor names it
// (f was just closed).
func (d *Devices) dropGhost(fd uint32, f *FD) {
	if f.Kind != KindFile || !strings.HasPrefix(f.Path, ghostDir+"/") {
		return
	}
	still := false
	d.fds.Each(func(_ uint32, o *FD) {
		still = still || o != f && o.Kind == KindFile && o.Root == f.Root && o.Path == f.Path
	})
	if still {
		return
	}
	rootFd, errno := d.rootDir(f.Root)
	if errno != ESUCCESS {
		return
	}
	defer unix.Close(rootFd)
	d.output(Effect{Kind: EffectFs, Call: CallFdClose, Fd: int32(fd), Op: FsUnlink, Root: f.Root, Path: f.Path},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Unlinkat(rootFd, f.Path, 0)) })
	// The directory too, once empty (it fails, and is not journaled,
	// while other ghosts live).
	d.output(Effect{Kind: EffectFs, Call: CallFdClose, Fd: int32(fd), Op: FsRmdir, Root: f.Root, Path: ghostDir},
		func([]byte) (uint32, Errno) { return 0, errnoOf(unix.Unlinkat(rootFd, ghostDir, unix.AT_REMOVEDIR)) })
}

// rootDir opens preopen root's host directory (O_PATH; the caller closes
// it).
func (d *Devices) rootDir(root int) (int, Errno) {
	if root < 0 || root >= len(d.preopens) {
		return -1, EBADF
	}
	fd, err := unix.Open(d.preopens[root].HostPath, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	return fd, errnoOf(err)
}
