package store

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/wasi"
)

// The replica trees: disk/<i>/ mirrors preopen i. The primary is an
// untrusted peer and the guest plants whatever symlinks it likes in its
// directories, so every path an op or a tree entry names is resolved by the
// kernel with openat2(2) beneath the replica's root descriptor
// (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): "..", absolute symlinks and
// symlink chains cannot leave it, and there is no window between check and
// use. Calls that act on a final name (mkdir, unlink, rename, symlink,
// link) resolve its parent that way and act on the one plain name relative
// to the parent's descriptor, where the kernel follows no symlink. A full
// sync's entries are resolved with RESOLVE_NO_SYMLINKS as well: a tree is
// built from canonical names, never through a link.

const (
	resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS
	resolveTree    = resolveBeneath | unix.RESOLVE_NO_SYMLINKS
	// maxTouched bounds the descriptors a segment keeps open for its
	// barrier; beyond it they are fsynced early (more durability, never
	// less).
	maxTouched = 256
)

// disk carries the test hooks of the replica operations.
type disk struct {
	// hook, if set, runs before every mutating replica operation; an
	// error stops the operation there (a test's injected crash).
	hook func(op string) error
	// noSync skips the real fsyncs (tests, whose crash model for the
	// replica is a process crash, which loses nothing the kernel has).
	noSync bool
}

func (d *disk) step(op string) error {
	if d.hook != nil {
		return d.hook(op)
	}
	return nil
}

// Hook results that a test uses to model a replica that lost effects
// (power loss): errSkip leaves an op's effect out, errHalf writes half of
// a write's data. Only an op's own mutation honours them.
var (
	errSkip = errors.New("store test: skip this effect")
	errHalf = errors.New("store test: write half")
)

// effect runs the hook before an op's mutation: skip says to leave it out.
func (d *disk) effect(op string) (skip bool, err error) {
	switch err := d.step(op); err {
	case nil:
		return false, nil
	case errSkip, errHalf:
		return true, nil
	default:
		return false, err
	}
}

func (d *disk) fsync(fd int) error {
	if err := d.step("fsync"); err != nil {
		return err
	}
	if d.noSync {
		return nil
	}
	return unix.Fsync(fd)
}

func (d *disk) syncfs(fd int) error {
	if err := d.step("syncfs"); err != nil {
		return err
	}
	if d.noSync {
		return nil
	}
	return unix.Syncfs(fd)
}

// openat2 opens p relative to dirfd with the given resolve flags.
func openat2(dirfd int, p string, flags int, mode uint32, resolve uint64) (int, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: resolve}
	if flags&unix.O_CREAT != 0 {
		how.Mode = uint64(mode)
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dirfd, p, &how)
		if err == nil {
			return fd, nil
		}
		// EAGAIN: a concurrent rename raced a ".." step; retry.
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 16 {
			continue
		}
		return -1, err
	}
}

// divergence is an op the replica cannot apply: its own state says no
// (missing file, non-empty directory, a path that would leave the root).
type divergence struct{ err error }

func (d *divergence) Error() string   { return d.err.Error() }
func (d *divergence) Unwrap() []error { return []error{ErrDiverged, d.err} }

// classify turns the errors that are about the replica's state into a
// divergence; the rest (EIO, ENOSPC, EMFILE, an injected crash) are the
// host's and stop the apply, to be retried by recovery.
func classify(err error) error {
	switch err {
	case unix.ENOENT, unix.ENOTDIR, unix.EISDIR, unix.EEXIST, unix.ENOTEMPTY, unix.EXDEV, unix.ELOOP,
		unix.EINVAL, unix.EPERM, unix.EACCES, unix.EMLINK, unix.ENAMETOOLONG, unix.EFBIG, unix.ETXTBSY,
		unix.EBUSY, unix.ENXIO:
		return &divergence{err}
	}
	return err
}

// gone reports whether a path failed to resolve because a component is
// missing.
func gone(err error) bool { return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) }

func isDivergence(err error) bool {
	var d *divergence
	return errors.As(err, &d)
}

// OpError says which op of a checkpoint failed and why.
type OpError struct {
	Seq   uint64 // the checkpoint
	Index int    // the op's index in it
	Op    string // the op, for messages
	Err   error
}

func (e *OpError) Error() string {
	return fmt.Sprintf("store: checkpoint %d op %d (%s): %v", e.Seq, e.Index, e.Op, e.Err)
}
func (e *OpError) Unwrap() error { return e.Err }

type fileKey struct{ dev, ino uint64 }

func keyOf(st *unix.Stat_t) fileKey { return fileKey{uint64(st.Dev), st.Ino} }

// applier applies ops to a set of replica roots.
type applier struct {
	d       *disk
	roots   []int // O_RDONLY|O_DIRECTORY descriptors of disk/<i>
	maxSize int64
	// touched holds a descriptor of every file and directory an op changed
	// since the last barrier, by identity.
	touched map[fileKey]int
	extra   []int // more descriptors of touched objects, to close
	syncAll bool  // a barrier must syncfs: an effect not pinned to a descriptor
	// fresh: ops apply once, in order, to a tree that nothing else can see
	// until it is durable (CommitFull's staging tree); appends resolve
	// against the file as it is.
	fresh bool
}

func openRoots(dir string, n uint32) ([]int, error) {
	roots := make([]int, 0, n)
	for i := range n {
		fd, err := unix.Open(filepath.Join(dir, strconv.Itoa(int(i))), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			for _, r := range roots {
				unix.Close(r)
			}
			return nil, fmt.Errorf("store: replica root %d in %s: %w", i, dir, err)
		}
		roots = append(roots, fd)
	}
	return roots, nil
}

func newApplier(d *disk, dir string, n uint32, maxSize int64) (*applier, error) {
	roots, err := openRoots(dir, n)
	if err != nil {
		return nil, err
	}
	return &applier{d: d, roots: roots, maxSize: maxSize, touched: map[fileKey]int{}}, nil
}

func (a *applier) close() {
	a.closeTouched()
	for _, fd := range a.roots {
		unix.Close(fd)
	}
	a.roots = nil
}

// track keeps fd until the next barrier, which fsyncs one descriptor per
// object and closes them all. The caller goes on using fd (access modes
// differ: a descriptor of the same object from an earlier op may not be
// writable).
func (a *applier) track(fd int) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	k := keyOf(&st)
	if _, ok := a.touched[k]; ok {
		a.extra = append(a.extra, fd)
	} else {
		a.touched[k] = fd
	}
	return fd, nil
}

func (a *applier) closeTouched() {
	for _, fd := range a.touched {
		unix.Close(fd)
	}
	clear(a.touched)
	for _, fd := range a.extra {
		unix.Close(fd)
	}
	a.extra = a.extra[:0]
}

// barrier makes every change since the last barrier durable.
func (a *applier) barrier() error {
	keys := make([]fileKey, 0, len(a.touched))
	for k := range a.touched {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(x, y fileKey) int { return cmp.Or(cmp.Compare(x.dev, y.dev), cmp.Compare(x.ino, y.ino)) })
	var first error
	for _, k := range keys {
		fd := a.touched[k]
		if first == nil {
			first = a.d.fsync(fd)
		}
		unix.Close(fd)
		delete(a.touched, k)
	}
	a.closeTouched()
	if first == nil && a.syncAll && len(a.roots) > 0 {
		first = a.d.syncfs(a.roots[0])
	}
	a.syncAll = false
	if first != nil {
		return fmt.Errorf("store: making the replica durable: %w", first)
	}
	return nil
}

// parent resolves the directory holding p's final name beneath root and
// returns a tracked descriptor of it and the name.
func (a *applier) parent(root int, p string) (int, string, error) {
	t := strings.TrimRight(p, "/")
	dir, name := ".", t
	if i := strings.LastIndexByte(t, '/'); i >= 0 {
		dir, name = t[:i+1], t[i+1:]
	}
	fd, err := openat2(root, dir, unix.O_RDONLY|unix.O_DIRECTORY, 0, resolveBeneath)
	if err != nil {
		return -1, "", classify(err)
	}
	fd, err = a.track(fd)
	return fd, name, err
}

// openReg opens the regular file p names beneath root (following symlinks,
// beneath) and tracks it.
func (a *applier) openReg(root int, p string, flags int) (int, *unix.Stat_t, error) {
	fd, err := openat2(root, p, flags|unix.O_NONBLOCK|unix.O_NOCTTY, 0o666, resolveBeneath)
	if err != nil {
		return -1, nil, classify(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return -1, nil, &divergence{unix.EISDIR}
		}
		return -1, nil, &divergence{unix.EINVAL}
	}
	fd, err = a.track(fd)
	return fd, &st, err
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// utimens sets the times of what fd refers to.
func utimens(fd int, ts []unix.Timespec) error {
	return unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH)
}

// apply applies one op, ensuring its outcome: an op whose effect is already
// there (a create of an existing file, a mkdir of an existing directory, an
// unlink of a missing name, a rename whose source is gone and destination
// present) succeeds without doing it again. Errors are divergences (the
// replica's state refuses the op; nothing was changed) or host errors.
func (a *applier) apply(op *FsOp) error {
	if len(a.touched)+len(a.extra) >= maxTouched {
		if err := a.barrier(); err != nil {
			return err
		}
	}
	root := a.roots[op.Root]
	switch wasi.FsOp(op.Op) {
	case wasi.FsWrite:
		if op.Offset < 0 && !a.fresh {
			// An append whose offset its segment's plan could not
			// resolve: its file did not exist when the segment began.
			return &divergence{fmt.Errorf("append to %q: %w", op.Path, unix.ENOENT)}
		}
		fd, st, err := a.openReg(root, op.Path, unix.O_WRONLY)
		if err != nil {
			return err
		}
		off := op.Offset
		if off < 0 {
			off = st.Size
		}
		if off > a.maxSize-int64(len(op.Data)) {
			return &divergence{unix.EFBIG}
		}
		data := op.Data
		switch err := a.d.step("pwrite"); err {
		case nil:
		case errSkip:
			return nil
		case errHalf:
			data = data[:len(data)/2]
		default:
			return err
		}
		return classify(pwriteAll(fd, data, off))

	case wasi.FsTruncate:
		fd, _, err := a.openReg(root, op.Path, unix.O_WRONLY)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("ftruncate"); skip || err != nil {
			return err
		}
		return classify(unix.Ftruncate(fd, op.Size))

	case wasi.FsAllocate:
		fd, st, err := a.openReg(root, op.Path, unix.O_WRONLY)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("fallocate"); skip || err != nil {
			return err
		}
		err = unix.Fallocate(fd, 0, op.Offset, op.Size)
		if err == unix.EOPNOTSUPP && st.Size < op.Offset+op.Size {
			err = unix.Ftruncate(fd, op.Offset+op.Size)
		} else if err == unix.EOPNOTSUPP {
			err = nil
		}
		return classify(err)

	case wasi.FsSetTimes:
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if op.Flags&uint32(wasi.FstflagAtim) != 0 {
			ts[0] = unix.NsecToTimespec(op.Offset)
		}
		if op.Flags&uint32(wasi.FstflagMtim) != 0 {
			ts[1] = unix.NsecToTimespec(op.Size)
		}
		// A readable descriptor can be fsynced at the barrier; times of
		// an object we may not read are set through O_PATH, best effort.
		fd, err := openat2(root, op.Path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0, resolveBeneath)
		tracked := err == nil
		if err == unix.EACCES {
			fd, err = openat2(root, op.Path, unix.O_PATH, 0, resolveBeneath)
		}
		if err == unix.ENOENT || err == unix.ELOOP {
			// The effect does not say whether the guest followed a
			// final symlink (path_filestat_set_times may not): a link
			// that leads nowhere gets its own times.
			fd, err = openat2(root, op.Path, unix.O_PATH|unix.O_NOFOLLOW, 0, resolveBeneath)
		}
		if err != nil {
			return classify(err)
		}
		if tracked {
			if fd, err = a.track(fd); err != nil {
				return err
			}
		} else {
			defer unix.Close(fd)
		}
		if skip, err := a.d.effect("utimens"); skip || err != nil {
			return err
		}
		return classify(utimens(fd, ts))

	case wasi.FsCreate:
		if op.Flags&uint32(wasi.OflagDirectory) != 0 {
			// Opening a directory creates nothing: it must be there.
			fd, err := openat2(root, op.Path, unix.O_RDONLY|unix.O_DIRECTORY, 0, resolveBeneath)
			if err != nil {
				return classify(err)
			}
			unix.Close(fd)
			return nil
		}
		pfd, name, err := a.parent(root, op.Path)
		if err != nil {
			return err
		}
		var lst unix.Stat_t
		if unix.Fstatat(pfd, name, &lst, unix.AT_SYMLINK_NOFOLLOW) == nil && lst.Mode&unix.S_IFMT == unix.S_IFLNK {
			// Created through a final symlink: the new entry is in a
			// directory we do not hold.
			a.syncAll = true
		}
		flags := unix.O_RDONLY
		if op.Flags&uint32(wasi.OflagTrunc) != 0 {
			flags = unix.O_WRONLY | unix.O_TRUNC
		}
		if op.Flags&uint32(wasi.OflagCreat) != 0 {
			flags |= unix.O_CREAT // never O_EXCL: the file may be ours, from an interrupted apply
		}
		if skip, err := a.d.effect("create"); skip || err != nil {
			return err
		}
		_, _, err = a.openReg(root, op.Path, flags)
		return err

	case wasi.FsMkdir:
		pfd, name, err := a.parent(root, op.Path)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("mkdir"); skip || err != nil {
			return err
		}
		if err := unix.Mkdirat(pfd, name, 0o777); err == unix.EEXIST {
			var st unix.Stat_t
			if unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
				return &divergence{unix.EEXIST}
			}
		} else if err != nil {
			return classify(err)
		}
		fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return classify(err)
		}
		_, err = a.track(fd)
		return err

	case wasi.FsRmdir, wasi.FsUnlink:
		pfd, name, err := a.parent(root, op.Path)
		if gone(err) {
			return nil // alone in its segment: this is the state after it
		}
		if err != nil {
			return err
		}
		flags, what := 0, "unlink"
		if wasi.FsOp(op.Op) == wasi.FsRmdir {
			flags, what = unix.AT_REMOVEDIR, "rmdir"
		}
		if skip, err := a.d.effect(what); skip || err != nil {
			return err
		}
		if err := unix.Unlinkat(pfd, name, flags); err != nil && err != unix.ENOENT {
			return classify(err)
		}
		return nil

	case wasi.FsRename:
		// The segment holds this rename alone, so the replica is in the
		// state before it, where the source exists (it did on the
		// primary), or after it, where it is gone or its path no longer
		// resolves (the rename moved a symlink or directory the path
		// went through: "rename l l/e" with l a link to a directory).
		pa, na, err := a.parent(root, op.Path)
		if gone(err) {
			return nil
		}
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if unix.Fstatat(pa, na, &st, unix.AT_SYMLINK_NOFOLLOW) == unix.ENOENT {
			return nil
		}
		pb, nb, err := a.parent(a.roots[op.Root2], op.Path2)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("rename"); skip || err != nil {
			return err
		}
		return classify(unix.Renameat(pa, na, pb, nb))

	case wasi.FsSymlink:
		pfd, name, err := a.parent(root, op.Path)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("symlink"); skip || err != nil {
			return err
		}
		err = unix.Symlinkat(op.Path2, pfd, name)
		if err == unix.EEXIST {
			buf := make([]byte, maxPath+1)
			if n, rerr := unix.Readlinkat(pfd, name, buf); rerr == nil && string(buf[:n]) == op.Path2 {
				return nil
			}
		}
		return classify(err)

	case wasi.FsLink:
		pa, na, err := a.parent(root, op.Path)
		if err != nil {
			return err
		}
		pb, nb, err := a.parent(a.roots[op.Root2], op.Path2)
		if err != nil {
			return err
		}
		if skip, err := a.d.effect("link"); skip || err != nil {
			return err
		}
		err = unix.Linkat(pa, na, pb, nb, 0)
		if err == unix.EEXIST {
			var s1, s2 unix.Stat_t
			if unix.Fstatat(pa, na, &s1, unix.AT_SYMLINK_NOFOLLOW) == nil &&
				unix.Fstatat(pb, nb, &s2, unix.AT_SYMLINK_NOFOLLOW) == nil && keyOf(&s1) == keyOf(&s2) {
				return nil
			}
		}
		return classify(err)

	case wasi.FsSync:
		return nil // the barrier at the segment's end fsyncs what was applied
	}
	return &divergence{fmt.Errorf("unknown fs op %d", op.Op)}
}

// alone reports whether op must form a segment of its own (doc.go).
func alone(op *FsOp) bool {
	switch wasi.FsOp(op.Op) {
	case wasi.FsUnlink, wasi.FsRmdir, wasi.FsRename, wasi.FsLink:
		return true
	}
	return false
}

// plan finds the segment that starts at ops[j] on the replica as it is now
// (exactly the state before ops[j]) and resolves its appends: it returns
// the segment's end and the offset each append in it writes at. See doc.go
// for why this makes the segment's replay idempotent.
func (a *applier) plan(ops []FsOp, j int) (int, []segOffset, error) {
	type obj struct {
		key  fileKey
		size int64
		ok   bool
	}
	resolved := map[[2]string]obj{}
	resolve := func(op *FsOp) (obj, error) {
		k := [2]string{strconv.Itoa(int(op.Root)), op.Path}
		if o, ok := resolved[k]; ok {
			return o, nil
		}
		var o obj
		fd, err := openat2(a.roots[op.Root], op.Path, unix.O_PATH, 0, resolveBeneath)
		if err == nil {
			var st unix.Stat_t
			err = unix.Fstat(fd, &st)
			unix.Close(fd)
			if err != nil {
				return o, err
			}
			if st.Mode&unix.S_IFMT == unix.S_IFREG {
				o = obj{key: keyOf(&st), size: st.Size, ok: true}
			}
		} else if !isDivergence(classify(err)) {
			return o, err
		}
		resolved[k] = o
		return o, nil
	}
	sizes := map[fileKey]int64{}
	size := func(o obj) int64 {
		if s, ok := sizes[o.key]; ok {
			return s
		}
		return o.size
	}
	var offs []segOffset
	for i := j; i < len(ops); i++ {
		op := &ops[i]
		if alone(op) {
			if i == j {
				return i + 1, nil, nil
			}
			return i, offs, nil
		}
		switch wasi.FsOp(op.Op) {
		case wasi.FsSymlink:
			return i + 1, offs, nil // a new link may alias an existing file: the segment ends
		case wasi.FsWrite, wasi.FsTruncate, wasi.FsAllocate, wasi.FsCreate:
		default:
			continue
		}
		o, err := resolve(op)
		if err != nil {
			return 0, nil, err
		}
		switch wasi.FsOp(op.Op) {
		case wasi.FsWrite:
			n := int64(len(op.Data))
			if op.Offset < 0 {
				if !o.ok {
					// Its file appears within the segment: resolve it
					// at the start of the next one.
					if i == j {
						return i + 1, nil, nil // it is not there at all: apply diverges
					}
					return i, offs, nil
				}
				cur := size(o)
				offs = append(offs, segOffset{Op: uint32(i), Offset: cur})
				sizes[o.key] = cur + n
			} else if o.ok {
				sizes[o.key] = max(size(o), op.Offset+n)
			}
		case wasi.FsTruncate:
			if o.ok {
				sizes[o.key] = op.Size
			}
		case wasi.FsAllocate:
			if o.ok {
				sizes[o.key] = max(size(o), op.Offset+op.Size)
			}
		case wasi.FsCreate:
			if o.ok && op.Flags&uint32(wasi.OflagTrunc) != 0 {
				sizes[o.key] = 0
			}
		}
	}
	return len(ops), offs, nil
}

// buildTree creates a full sync's entries in the (empty) roots.
func (a *applier) buildTree(tree []TreeEntry) error {
	es := slices.Clone(tree)
	slices.SortFunc(es, func(x, y TreeEntry) int {
		if c := cmp.Compare(x.Root, y.Root); c != 0 {
			return c
		}
		if (x.Path == ".") != (y.Path == ".") {
			if x.Path == "." {
				return -1
			}
			return 1
		}
		return strings.Compare(x.Path, y.Path)
	})
	for i := 1; i < len(es); i++ {
		if es[i].Root == es[i-1].Root && es[i].Path == es[i-1].Path {
			return invalid("tree entry %d:%q appears twice", es[i].Root, es[i].Path)
		}
	}
	var dirs []*TreeEntry
	for i := range es {
		e := &es[i]
		if e.Path == "." {
			dirs = append(dirs, e)
			continue
		}
		root := a.roots[e.Root]
		dir, name := ".", e.Path
		if k := strings.LastIndexByte(e.Path, '/'); k >= 0 {
			dir, name = e.Path[:k], e.Path[k+1:]
		}
		pfd, err := openat2(root, dir, unix.O_RDONLY|unix.O_DIRECTORY, 0, resolveTree)
		if err != nil {
			if isDivergence(classify(err)) {
				return invalid("tree entry %d:%q: its parent is not a directory of the tree (%v)", e.Root, e.Path, err)
			}
			return err
		}
		err = a.createEntry(pfd, name, e)
		unix.Close(pfd)
		if err != nil {
			if isDivergence(err) {
				return invalid("tree entry %d:%q: %v", e.Root, e.Path, err)
			}
			return err
		}
		if e.Kind == KindDir {
			dirs = append(dirs, e)
		}
	}
	// Directory modes last (children first), so that a read-only
	// directory was still writable while it was filled.
	for i := len(dirs) - 1; i >= 0; i-- {
		e := dirs[i]
		fd, err := openat2(a.roots[e.Root], e.Path, unix.O_RDONLY|unix.O_DIRECTORY, 0, resolveTree)
		if err != nil {
			return err
		}
		if err = a.d.step("chmod"); err == nil {
			err = unix.Fchmod(fd, e.Mode&0o777|0o700)
		}
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

func (a *applier) createEntry(pfd int, name string, e *TreeEntry) error {
	switch e.Kind {
	case KindFile:
		if err := a.d.step("create"); err != nil {
			return err
		}
		fd, err := unix.Openat(pfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return classify(err)
		}
		defer unix.Close(fd)
		if len(e.Data) > 0 {
			if err := a.d.step("pwrite"); err != nil {
				return err
			}
			if err := pwriteAll(fd, e.Data, 0); err != nil {
				return err
			}
		}
		if err := a.d.step("chmod"); err != nil {
			return err
		}
		return unix.Fchmod(fd, e.Mode&0o777)
	case KindDir:
		if err := a.d.step("mkdir"); err != nil {
			return err
		}
		return classify(unix.Mkdirat(pfd, name, 0o700))
	case KindSymlink:
		if err := a.d.step("symlink"); err != nil {
			return err
		}
		return classify(unix.Symlinkat(e.Target, pfd, name))
	}
	return invalid("unknown kind %d", e.Kind)
}

// buildStaging builds the disk tree of a full checkpoint in dir (which it
// first empties): the roots, the tree, the ops on top, the TREE marker,
// everything durable.
func buildStaging(d *disk, dir string, roots uint32, gen, seq uint64, tree []TreeEntry, ops []FsOp, maxSize int64) error {
	if err := d.step("remove staging"); err != nil {
		return err
	}
	if err := removeAll(dir); err != nil {
		return err
	}
	if err := d.step("mkdir staging"); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil { // the slot directory, when the journal is elsewhere
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	for i := range roots {
		if err := d.step("mkdir root"); err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(dir, strconv.Itoa(int(i))), 0o700); err != nil {
			return err
		}
	}
	a, err := newApplier(d, dir, roots, maxSize)
	if err != nil {
		return err
	}
	defer a.close()
	a.fresh = true
	if err := a.buildTree(tree); err != nil {
		return err
	}
	for i := range ops {
		if err := a.apply(&ops[i]); err != nil {
			if isDivergence(err) {
				return fmt.Errorf("store: %w: the full checkpoint's op %d (%s) does not apply to its tree: %w",
					ErrInvalid, i, ops[i].String(), err)
			}
			return err
		}
	}
	if err := d.step("tree marker"); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, treeName), (&treeRec{Gen: gen, Seq: seq}).encode(), 0o600); err != nil {
		return err
	}
	// One syncfs makes the whole new tree durable (its files, its
	// directories and its entry in the slot directory): cheaper than an
	// fsync per object for a tree of any size.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	a.closeTouched() // nothing to fsync one by one
	return d.syncfs(fd)
}

// readTree reads a disk tree's marker; ok is false if it has none that
// parses (a tree being built, or no tree).
func readTree(dir string) (*treeRec, bool) {
	b, err := os.ReadFile(filepath.Join(dir, treeName))
	if err != nil {
		return nil, false
	}
	t, err := decodeTree(filepath.Join(dir, treeName), b)
	return t, err == nil
}

// removeAll removes a replica tree. Directories always have owner rwx
// (TreeEntry), so os.RemoveAll, which never follows a symlink, can.
func removeAll(dir string) error { return os.RemoveAll(dir) }
