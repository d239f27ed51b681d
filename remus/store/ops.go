package store

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ftvm/ftvm/wasi"
)

// FsOp is one filesystem mutation the guest made during an epoch, as the
// device layer described it in a wasi.Effect of kind EffectFs. Op is a
// wasi.FsOp; paths are relative to preopen Root (Root2 for the second path
// of a rename or link).
//
//	FsWrite     Data at Offset of Path; Offset -1 appends (Size is len(Data) or 0)
//	FsTruncate  Path truncated or extended to Size
//	FsAllocate  Path allocated to at least Offset+Size
//	FsSetTimes  Path's times: Offset = atim ns, Size = mtim ns, Flags = WASI fstflags
//	FsCreate    Path opened with WASI oflags Flags (CREAT, DIRECTORY, EXCL, TRUNC):
//	            created if missing, truncated if TRUNC
//	FsMkdir     directory Path created
//	FsRmdir     empty directory Path removed
//	FsUnlink    non-directory Path removed
//	FsRename    Path renamed to Root2/Path2
//	FsSymlink   symlink Path created with target text Path2
//	FsLink      hard link Root2/Path2 created to the existing Path
//	FsSync      Path fsynced (nothing to do on the replica: every commit
//	            makes what it applied durable)
//
// Paths name what they name on the primary: a symbolic link in a path is
// followed, beneath the preopen, except in the final component of the
// calls that act on a name (mkdir, rmdir, unlink, rename, symlink, link).
type FsOp struct {
	Op     uint8
	Root   uint32
	Path   string
	Root2  uint32
	Path2  string
	Offset int64
	Size   int64
	Flags  uint32
	Data   []byte
}

func (o *FsOp) String() string {
	s := fmt.Sprintf("%s %d:%q", wasi.FsOp(o.Op), o.Root, o.Path)
	switch wasi.FsOp(o.Op) {
	case wasi.FsRename, wasi.FsLink:
		s += fmt.Sprintf(" -> %d:%q", o.Root2, o.Path2)
	case wasi.FsSymlink:
		s += fmt.Sprintf(" -> %q", o.Path2)
	case wasi.FsWrite:
		s += fmt.Sprintf(" [%d, +%d)", o.Offset, len(o.Data))
	}
	return s
}

// Tree entry kinds.
const (
	KindFile    uint8 = 1
	KindDir     uint8 = 2
	KindSymlink uint8 = 3
)

// TreeEntry is one object of a full sync of the preopens: a regular file
// (Data), a directory or a symbolic link (Target), at Path beneath preopen
// Root. Path "." with KindDir gives the preopen's own mode. Parents need
// not come first (CommitFull sorts) but must be listed. Mode's permission
// bits are kept (directories always get rwx for the owner, so that the
// backup can manage them; set-id and sticky bits are dropped). Hard links
// are not represented: each name becomes its own file.
type TreeEntry struct {
	Root   uint32
	Path   string
	Kind   uint8
	Mode   uint32
	Data   []byte
	Target string
}

const (
	maxRoots = 1 << 16
	maxPath  = 4095 // Linux's PATH_MAX less the NUL, as the device layer
	// DefaultMaxFileSize is the default Options.MaxFileSize.
	DefaultMaxFileSize = 1 << 40
)

func invalid(format string, args ...any) error {
	return fmt.Errorf("store: %w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// checkPath refuses what can never name something beneath a preopen:
// empty, absolute, NUL, invalid UTF-8, overlong, and paths whose ".."
// components climb above the preopen lexically. A ".." that stays beneath
// ("a/../b", which the device layer keeps as the guest wrote it, see
// wasi.joinRel) is left to the kernel, which resolves it beneath the
// preopen like every symlink (openat2 RESOLVE_BENEATH).
func checkPath(p string) error {
	switch {
	case p == "":
		return invalid("empty path")
	case len(p) > maxPath:
		return invalid("path of %d bytes", len(p))
	case p[0] == '/':
		return invalid("absolute path %q", p)
	case strings.IndexByte(p, 0) >= 0:
		return invalid("path %q contains NUL", p)
	case !utf8.ValidString(p):
		return invalid("path %q is not UTF-8", p)
	}
	depth := 0
	for c := range strings.SplitSeq(p, "/") {
		switch c {
		case "", ".":
		case "..":
			if depth--; depth < 0 {
				return invalid("path %q leaves its directory", p)
			}
		default:
			depth++
		}
	}
	return nil
}

// checkName is checkPath for a path whose last component is the name an
// operation acts on, which must be a real name.
func checkName(p string) error {
	if err := checkPath(p); err != nil {
		return err
	}
	t := strings.TrimRight(p, "/")
	if n := t[strings.LastIndexByte(t, '/')+1:]; n == "." || n == ".." {
		return invalid("path %q does not end in a name", p)
	}
	return nil
}

// checkTarget checks a symlink's target text. It is only text: every
// resolution through the link is confined beneath the preopen anyway; an
// absolute target could never resolve there (the device layer refuses it).
func checkTarget(t string) error {
	switch {
	case t == "" || len(t) > maxPath:
		return invalid("symlink target of %d bytes", len(t))
	case t[0] == '/':
		return invalid("absolute symlink target %q", t)
	case strings.IndexByte(t, 0) >= 0 || !utf8.ValidString(t):
		return invalid("symlink target %q has NUL or is not UTF-8", t)
	}
	return nil
}

const (
	fstAll  = uint32(wasi.FstflagAtim | wasi.FstflagAtimNow | wasi.FstflagMtim | wasi.FstflagMtimNow)
	oflAll  = uint32(wasi.OflagCreat | wasi.OflagDirectory | wasi.OflagExcl | wasi.OflagTrunc)
	appendO = -1
)

// normalize checks op against the slot's roots and limits and returns its
// absolute form: times "now" become the backup's clock reading, so that
// replaying the op gives the same result.
func normalize(op FsOp, roots uint32, maxSize int64, now time.Time) (FsOp, error) {
	bad := func(format string, args ...any) error {
		return invalid("%s: %s", op.String(), fmt.Sprintf(format, args...))
	}
	if op.Root >= roots {
		return op, bad("unknown root %d (the slot has %d)", op.Root, roots)
	}
	name := false // the op acts on Path's final name
	two := false  // Root2/Path2 name a second object
	noData := true
	switch wasi.FsOp(op.Op) {
	case wasi.FsWrite:
		noData = false
		if len(op.Data) > maxOpData {
			return op, bad("%d bytes of data in one op (at most %d)", len(op.Data), maxOpData)
		}
		if op.Size != 0 && op.Size != int64(len(op.Data)) {
			return op, bad("size %d for %d bytes of data", op.Size, len(op.Data))
		}
		op.Size = int64(len(op.Data))
		if op.Offset < appendO || op.Offset > maxSize || op.Size > maxSize-max(op.Offset, 0) {
			return op, bad("write at offset %d of %d bytes exceeds the file size limit %d", op.Offset, op.Size, maxSize)
		}
	case wasi.FsTruncate:
		if op.Size < 0 || op.Size > maxSize || op.Offset != 0 {
			return op, bad("size %d (limit %d), offset %d", op.Size, maxSize, op.Offset)
		}
	case wasi.FsAllocate:
		if op.Offset < 0 || op.Size <= 0 || op.Offset > maxSize || op.Size > maxSize-op.Offset {
			return op, bad("allocation [%d, +%d) (limit %d)", op.Offset, op.Size, maxSize)
		}
	case wasi.FsSetTimes:
		f := op.Flags
		if f&^fstAll != 0 ||
			f&uint32(wasi.FstflagAtim|wasi.FstflagAtimNow) == uint32(wasi.FstflagAtim|wasi.FstflagAtimNow) ||
			f&uint32(wasi.FstflagMtim|wasi.FstflagMtimNow) == uint32(wasi.FstflagMtim|wasi.FstflagMtimNow) {
			return op, bad("fstflags %#x", f)
		}
		ns := now.UnixNano()
		if f&uint32(wasi.FstflagAtimNow) != 0 {
			op.Offset, f = ns, f&^uint32(wasi.FstflagAtimNow)|uint32(wasi.FstflagAtim)
		} else if f&uint32(wasi.FstflagAtim) == 0 {
			op.Offset = 0
		}
		if f&uint32(wasi.FstflagMtimNow) != 0 {
			op.Size, f = ns, f&^uint32(wasi.FstflagMtimNow)|uint32(wasi.FstflagMtim)
		} else if f&uint32(wasi.FstflagMtim) == 0 {
			op.Size = 0
		}
		op.Flags = f
		if op.Offset < 0 || op.Size < 0 {
			return op, bad("negative time")
		}
	case wasi.FsCreate:
		if op.Flags&^oflAll != 0 {
			return op, bad("oflags %#x", op.Flags)
		}
		if op.Offset != 0 || op.Size != 0 {
			return op, bad("offset or size on a create")
		}
	case wasi.FsMkdir, wasi.FsRmdir, wasi.FsUnlink:
		name = true
	case wasi.FsRename, wasi.FsLink:
		name, two = true, true
	case wasi.FsSymlink:
		name = true
		if err := checkTarget(op.Path2); err != nil {
			return op, err
		}
	case wasi.FsSync:
	default:
		return op, invalid("unknown fs op %d", op.Op)
	}
	if err := checkPath(op.Path); err != nil {
		return op, err
	}
	if name {
		if err := checkName(op.Path); err != nil {
			return op, err
		}
	}
	if two {
		if op.Root2 >= roots {
			return op, bad("unknown root %d (the slot has %d)", op.Root2, roots)
		}
		if err := checkName(op.Path2); err != nil {
			return op, err
		}
	} else if op.Root2 != 0 || (op.Path2 != "" && wasi.FsOp(op.Op) != wasi.FsSymlink) {
		return op, bad("a second path on a one-path op")
	}
	if noData && len(op.Data) > 0 {
		return op, bad("data on a %s", wasi.FsOp(op.Op))
	}
	switch wasi.FsOp(op.Op) {
	case wasi.FsSetTimes, wasi.FsCreate:
	default:
		if op.Flags != 0 {
			return op, bad("flags %#x", op.Flags)
		}
	}
	switch wasi.FsOp(op.Op) {
	case wasi.FsWrite, wasi.FsTruncate, wasi.FsAllocate, wasi.FsSetTimes:
	default:
		if op.Offset != 0 || op.Size != 0 {
			return op, bad("offset or size on a %s", wasi.FsOp(op.Op))
		}
	}
	return op, nil
}

// Caps on one checkpoint's ops (the ops file's lengths are 32-bit).
const (
	maxOps    = 1 << 24
	maxOpData = 1 << 30
)

func normalizeOps(ops []FsOp, roots uint32, maxSize int64) ([]FsOp, error) {
	if len(ops) > maxOps {
		return nil, invalid("%d ops in one checkpoint (at most %d)", len(ops), maxOps)
	}
	now := time.Now()
	out := make([]FsOp, len(ops))
	for i, op := range ops {
		n, err := normalize(op, roots, maxSize, now)
		if err != nil {
			return nil, fmt.Errorf("op %d: %w", i, err)
		}
		out[i] = n
	}
	return out, nil
}

// checkTreePath is stricter than checkPath: a full sync names every object
// canonically, so no ".", ".." or empty components (except "." alone for
// the preopen itself).
func checkTreePath(p string) error {
	if p == "." {
		return nil
	}
	if err := checkPath(p); err != nil {
		return err
	}
	for c := range strings.SplitSeq(p, "/") {
		if c == "" || c == "." || c == ".." {
			return invalid("tree path %q is not canonical", p)
		}
	}
	return nil
}

func checkTree(tree []TreeEntry, roots uint32, maxSize int64) error {
	for i := range tree {
		e := &tree[i]
		bad := func(format string, args ...any) error {
			return invalid("tree entry %d:%q: %s", e.Root, e.Path, fmt.Sprintf(format, args...))
		}
		if e.Root >= roots {
			return bad("unknown root (the slot has %d)", roots)
		}
		if err := checkTreePath(e.Path); err != nil {
			return err
		}
		if e.Mode&^0o7777 != 0 {
			return bad("mode %#o", e.Mode)
		}
		switch e.Kind {
		case KindFile:
			if int64(len(e.Data)) > maxSize || e.Target != "" {
				return bad("file of %d bytes with a target", len(e.Data))
			}
		case KindDir:
			if len(e.Data) > 0 || e.Target != "" {
				return bad("directory with data or a target")
			}
		case KindSymlink:
			if len(e.Data) > 0 {
				return bad("symlink with data")
			}
			if err := checkTarget(e.Target); err != nil {
				return err
			}
		default:
			return bad("unknown kind %d", e.Kind)
		}
		if e.Path == "." && e.Kind != KindDir {
			return bad("the preopen itself must be a directory")
		}
	}
	return nil
}

// Validate checks a checkpoint's disk changes (a full checkpoint's tree, or
// an incremental's or an exit's ops) as a slot opened with opts would when
// it commits them, without a slot: a backup checks them before it
// acknowledges the checkpoint, so that its commit to disk cannot refuse
// them after the ack. (Whether ops fit the files on disk, a replica that
// diverged, is known only at the commit.)
func Validate(tree []TreeEntry, ops []FsOp, opts Options) error {
	if opts.Roots < 0 || opts.Roots > maxRoots {
		return invalid("%d roots", opts.Roots)
	}
	if opts.MaxFileSize <= 0 {
		opts.MaxFileSize = DefaultMaxFileSize
	}
	if err := checkTree(tree, uint32(opts.Roots), opts.MaxFileSize); err != nil {
		return err
	}
	_, err := normalizeOps(ops, uint32(opts.Roots), opts.MaxFileSize)
	return err
}
