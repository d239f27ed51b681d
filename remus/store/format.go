package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strconv"
	"strings"

	"github.com/ftvm/ftvm/snapshot"
)

// The slot's own small files. Each is
//
//	magic (8) | u32 version | u32 body length | body | u32 crc32c(all before)
//
// little-endian, written whole to a temporary name, fsynced, renamed over
// its name and the directory fsynced. A reader checks the magic, version,
// exact length and checksum before it believes a byte of the body.
const (
	commitMagic   = "FTVMCMT\x00"
	appliedMagic  = "FTVMAPL\x00"
	opsMagic      = "FTVMOPS\x00"
	treeMagic     = "FTVMTRE\x00"
	fileVersion   = 1
	frameOverhead = 8 + 4 + 4 + 4
	// commitVersionExit is COMMIT's version when it records the guest's
	// exit (commitRec.ExitSeq): a build that predates it then names the
	// version it cannot read rather than calling the file corrupt. A
	// COMMIT without an exit is still written as fileVersion.
	commitVersionExit = 2
)

var (
	// ErrCorrupt: a slot file (COMMIT, APPLIED, an ops file, a tree
	// marker) is damaged or truncated, or the files contradict each other.
	// Snapshot files report snapshot.ErrCorrupt or snapshot.ErrTruncated.
	ErrCorrupt = errors.New("corrupt slot file")
	// ErrInvalid: the primary sent something the slot refuses (a path
	// that leaves its directory, an unknown root, a negative size, a
	// snapshot that does not follow the committed one...). Nothing was
	// written.
	ErrInvalid = errors.New("invalid checkpoint")
	// ErrDiverged: an fs op could not be applied to the replica (its file
	// is missing, a directory is not empty...): the replica no longer
	// mirrors the primary's directories. The checkpoint's memory state is
	// committed; the slot refuses incrementals until a CommitFull.
	ErrDiverged = errors.New("replica diverged from the primary")
	// ErrCompact: the checkpoint is committed, only the automatic
	// compaction that followed failed. What is durable is a valid slot
	// (the longer chain, or the compacted one); the error also wraps
	// ErrBroken if the Slot must be reopened to find out which.
	ErrCompact = errors.New("compaction failed")
	// ErrBroken: a write from COMMIT's rename on, or of the replica after
	// it, failed, so what is durable is unknown (an fsync error, ENOSPC
	// while applying ops): the slot refuses further commits and must be
	// closed and reopened, which recovers whatever is durable (and
	// finishes applying the ops). Failures before the commit point leave
	// the slot as it was and do not wrap ErrBroken.
	ErrBroken = errors.New("slot needs reopening")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

var le = binary.LittleEndian

func corrupt(path string, format string, args ...any) error {
	return fmt.Errorf("store: %s: %w: %s", path, ErrCorrupt, fmt.Sprintf(format, args...))
}

func frame(magic string, body []byte) []byte { return frameVersion(magic, fileVersion, body) }

func frameVersion(magic string, version uint32, body []byte) []byte {
	b := make([]byte, 0, frameOverhead+len(body))
	b = append(b, magic...)
	b = le.AppendUint32(b, version)
	b = le.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	return le.AppendUint32(b, crc(b))
}

// unframe checks a whole file of version fileVersion and returns its body.
func unframe(path, magic string, b []byte) ([]byte, error) {
	body, _, err := unframeUpTo(path, magic, fileVersion, b)
	return body, err
}

// unframeUpTo checks a whole file of a version from fileVersion to newest
// and returns its body and version.
func unframeUpTo(path, magic string, newest uint32, b []byte) ([]byte, uint32, error) {
	if len(b) < frameOverhead {
		return nil, 0, corrupt(path, "truncated: %d bytes", len(b))
	}
	if string(b[:8]) != magic {
		return nil, 0, corrupt(path, "bad magic %q", b[:8])
	}
	n := uint64(le.Uint32(b[12:]))
	if uint64(len(b)) != frameOverhead+n {
		if uint64(len(b)) < frameOverhead+n {
			return nil, 0, corrupt(path, "truncated: %d bytes of %d", len(b), frameOverhead+n)
		}
		return nil, 0, corrupt(path, "%d bytes after the end", uint64(len(b))-frameOverhead-n)
	}
	if got, want := crc(b[:len(b)-4]), le.Uint32(b[len(b)-4:]); got != want {
		return nil, 0, corrupt(path, "checksum mismatch")
	}
	v := le.Uint32(b[8:])
	if v < fileVersion || v > newest {
		if newest == fileVersion {
			return nil, 0, corrupt(path, "format version %d, this build reads %d", v, fileVersion)
		}
		return nil, 0, corrupt(path, "format version %d, this build reads %d to %d", v, fileVersion, newest)
	}
	return b[16 : len(b)-4], v, nil
}

// reader reads a body, remembering the first overrun.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n < 0 || n > len(r.b) {
		r.bad = true
		return make([]byte, max(n, 0))
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}
func (r *reader) u8() uint8   { return r.take(1)[0] }
func (r *reader) u32() uint32 { return le.Uint32(r.take(4)) }
func (r *reader) u64() uint64 { return le.Uint64(r.take(8)) }
func (r *reader) hash() (h snapshot.Hash) {
	copy(h[:], r.take(32))
	return h
}

// commitRec is the COMMIT file: the durable checkpoint.
type commitRec struct {
	Roots   uint32
	Gen     uint64 // incremented by each CommitFull; names its files and its disk tree
	BaseSeq uint64 // the base snapshot's seq
	Seq     uint64 // the committed checkpoint: records BaseSeq+1..Seq follow the base
	TreeSeq uint64 // the seq the disk tree of Gen was built at (the CommitFull's)
	Module  snapshot.Hash
	BaseID  snapshot.Hash // ID of the base file
	// BasePeer is the primary's ID of checkpoint BaseSeq: the base's own
	// ID unless the base is a compaction (see Slot.Compact).
	BasePeer snapshot.Hash
	// ExitSeq, if not 0, is Seq+1: the guest exited, with ExitCode, and
	// record ExitSeq holds only the fs ops of the epoch it ended in (an
	// ops file, no snapshot: nothing will resume that epoch). Version
	// commitVersionExit.
	ExitSeq  uint64
	ExitCode uint32
}

// tip is the last record whose ops reach disk/: the exit's, if any.
func (c *commitRec) tip() uint64 {
	if c.ExitSeq != 0 {
		return c.ExitSeq
	}
	return c.Seq
}

func (c *commitRec) encode() []byte {
	b := le.AppendUint32(nil, c.Roots)
	b = le.AppendUint32(b, 0)
	for _, v := range []uint64{c.Gen, c.BaseSeq, c.Seq, c.TreeSeq} {
		b = le.AppendUint64(b, v)
	}
	b = append(b, c.Module[:]...)
	b = append(b, c.BaseID[:]...)
	b = append(b, c.BasePeer[:]...)
	if c.ExitSeq == 0 {
		return frame(commitMagic, b)
	}
	b = le.AppendUint64(b, c.ExitSeq)
	b = le.AppendUint32(b, c.ExitCode)
	return frameVersion(commitMagic, commitVersionExit, b)
}

func decodeCommit(path string, b []byte) (*commitRec, error) {
	body, v, err := unframeUpTo(path, commitMagic, commitVersionExit, b)
	if err != nil {
		return nil, err
	}
	r := &reader{b: body}
	c := &commitRec{Roots: r.u32()}
	pad := r.u32()
	c.Gen, c.BaseSeq, c.Seq, c.TreeSeq = r.u64(), r.u64(), r.u64(), r.u64()
	c.Module, c.BaseID, c.BasePeer = r.hash(), r.hash(), r.hash()
	if v == commitVersionExit {
		c.ExitSeq, c.ExitCode = r.u64(), r.u32()
	}
	switch {
	case r.bad || len(r.b) != 0:
		return nil, corrupt(path, "body of %d bytes", len(body))
	case pad != 0 || c.Gen == 0 || c.BaseSeq == 0 || c.Seq < c.BaseSeq || c.TreeSeq > c.BaseSeq ||
		c.TreeSeq == 0 || c.Roots > maxRoots || (v == commitVersionExit && c.ExitSeq != c.Seq+1):
		return nil, corrupt(path, "impossible values %+v", *c)
	}
	return c, nil
}

// appliedRec is the APPLIED file: how far the committed records' fs ops
// have been applied to disk/ (and made durable there).
type appliedRec struct {
	Gen uint64
	Seq uint64 // records up to Seq are applied
	// Op > 0: record Seq+1's ops before Op are applied too, and the
	// segment [Op, SegEnd) is being applied with Offsets as the resolved
	// offsets of its appends (see doc.go).
	Op       uint32
	SegEnd   uint32
	Offsets  []segOffset
	Diverged bool
}

type segOffset struct {
	Op     uint32
	Offset int64
}

func (a *appliedRec) encode() []byte {
	b := le.AppendUint64(nil, a.Gen)
	b = le.AppendUint64(b, a.Seq)
	var flags uint32
	if a.Diverged {
		flags |= 1
	}
	b = le.AppendUint32(b, flags)
	b = le.AppendUint32(b, a.Op)
	b = le.AppendUint32(b, a.SegEnd)
	b = le.AppendUint32(b, uint32(len(a.Offsets)))
	for _, o := range a.Offsets {
		b = le.AppendUint32(b, o.Op)
		b = le.AppendUint64(b, uint64(o.Offset))
	}
	return frame(appliedMagic, b)
}

func decodeApplied(path string, b []byte) (*appliedRec, error) {
	body, err := unframe(path, appliedMagic, b)
	if err != nil {
		return nil, err
	}
	r := &reader{b: body}
	a := &appliedRec{Gen: r.u64(), Seq: r.u64()}
	flags := r.u32()
	a.Diverged = flags&1 != 0
	a.Op, a.SegEnd = r.u32(), r.u32()
	n := r.u32()
	if uint64(n)*12 != uint64(len(r.b)) || flags&^1 != 0 {
		return nil, corrupt(path, "body of %d bytes with %d offsets", len(body), n)
	}
	for range n {
		o := segOffset{Op: r.u32(), Offset: int64(r.u64())}
		if o.Op < a.Op || o.Op >= a.SegEnd || o.Offset < 0 {
			return nil, corrupt(path, "offset %+v outside segment [%d, %d)", o, a.Op, a.SegEnd)
		}
		a.Offsets = append(a.Offsets, o)
	}
	if a.Gen == 0 || (a.Op == 0) != (a.SegEnd == 0) || a.Op > a.SegEnd {
		return nil, corrupt(path, "impossible values gen %d op %d segment end %d", a.Gen, a.Op, a.SegEnd)
	}
	return a, nil
}

// opsRec is a record's ops file.
type opsRec struct {
	Seq  uint64
	Gen  uint64
	Snap snapshot.Hash // ID of the record's snapshot file
	Peer snapshot.Hash // the primary's ID of this checkpoint
	// Seg0End is where the first segment ends; its appends' offsets are
	// already resolved in Ops (see doc.go).
	Seg0End uint32
	Ops     []FsOp
}

func (o *opsRec) encode() []byte {
	n := 8 + 8 + 64 + 8
	for i := range o.Ops {
		n += opFixed + len(o.Ops[i].Path) + len(o.Ops[i].Path2) + len(o.Ops[i].Data)
	}
	b := make([]byte, 0, n)
	b = le.AppendUint64(b, o.Seq)
	b = le.AppendUint64(b, o.Gen)
	b = append(b, o.Snap[:]...)
	b = append(b, o.Peer[:]...)
	b = le.AppendUint32(b, o.Seg0End)
	b = le.AppendUint32(b, uint32(len(o.Ops)))
	for i := range o.Ops {
		op := &o.Ops[i]
		b = append(b, op.Op)
		b = le.AppendUint32(b, op.Root)
		b = le.AppendUint32(b, op.Root2)
		b = le.AppendUint64(b, uint64(op.Offset))
		b = le.AppendUint64(b, uint64(op.Size))
		b = le.AppendUint32(b, op.Flags)
		b = le.AppendUint32(b, uint32(len(op.Path)))
		b = append(b, op.Path...)
		b = le.AppendUint32(b, uint32(len(op.Path2)))
		b = append(b, op.Path2...)
		b = le.AppendUint32(b, uint32(len(op.Data)))
		b = append(b, op.Data...)
	}
	return frame(opsMagic, b)
}

// opFixed is an encoded op's size without its strings and data.
const opFixed = 1 + 4 + 4 + 8 + 8 + 4 + 4 + 4 + 4

func decodeOps(path string, b []byte) (*opsRec, error) {
	body, err := unframe(path, opsMagic, b)
	if err != nil {
		return nil, err
	}
	r := &reader{b: body}
	o := &opsRec{Seq: r.u64(), Gen: r.u64(), Snap: r.hash(), Peer: r.hash(), Seg0End: r.u32()}
	n := r.u32()
	if r.bad || uint64(n)*opFixed > uint64(len(r.b)) || o.Seg0End > n {
		return nil, corrupt(path, "%d ops do not fit %d bytes (first segment ends at %d)", n, len(r.b), o.Seg0End)
	}
	o.Ops = make([]FsOp, n)
	for i := range o.Ops {
		op := &o.Ops[i]
		op.Op = r.u8()
		op.Root, op.Root2 = r.u32(), r.u32()
		op.Offset, op.Size = int64(r.u64()), int64(r.u64())
		op.Flags = r.u32()
		op.Path = string(r.take(int(r.u32())))
		op.Path2 = string(r.take(int(r.u32())))
		if d := r.take(int(r.u32())); len(d) > 0 {
			op.Data = d
		}
		if r.bad {
			return nil, corrupt(path, "op %d runs past the end", i)
		}
	}
	if len(r.b) != 0 {
		return nil, corrupt(path, "%d bytes after the last op", len(r.b))
	}
	return o, nil
}

// treeRec is disk/TREE: which generation a disk tree is.
type treeRec struct {
	Gen uint64
	Seq uint64
}

func (t *treeRec) encode() []byte {
	return frame(treeMagic, le.AppendUint64(le.AppendUint64(nil, t.Gen), t.Seq))
}

func decodeTree(path string, b []byte) (*treeRec, error) {
	body, err := unframe(path, treeMagic, b)
	if err != nil {
		return nil, err
	}
	if len(body) != 16 {
		return nil, corrupt(path, "body of %d bytes", len(body))
	}
	return &treeRec{Gen: le.Uint64(body), Seq: le.Uint64(body[8:])}, nil
}

// File names in the slot directory.
const (
	commitName  = "COMMIT"
	appliedName = "APPLIED"
	lockName    = "LOCK"
	diskName    = "disk"
	diskNewName = "disk.new"
	diskOldName = "disk.old"
	treeName    = "TREE"
	tmpSuffix   = ".tmp"
)

func baseName(seq, gen uint64) string { return fmt.Sprintf("base-%020d-g%d.snap", seq, gen) }
func recName(seq, gen uint64) string  { return fmt.Sprintf("rec-%020d-g%d.snap", seq, gen) }
func opsName(seq, gen uint64) string  { return fmt.Sprintf("rec-%020d-g%d.ops", seq, gen) }
func tmpName(name string) string      { return "." + name + tmpSuffix }

// parseName reads a journal file name: kind "base", "rec" or "ops".
func parseName(name string) (kind string, seq, gen uint64, ok bool) {
	var rest string
	switch {
	case strings.HasPrefix(name, "base-") && strings.HasSuffix(name, ".snap"):
		kind, rest = "base", name[5:len(name)-5]
	case strings.HasPrefix(name, "rec-") && strings.HasSuffix(name, ".snap"):
		kind, rest = "rec", name[4:len(name)-5]
	case strings.HasPrefix(name, "rec-") && strings.HasSuffix(name, ".ops"):
		kind, rest = "ops", name[4:len(name)-4]
	default:
		return "", 0, 0, false
	}
	s, g, found := strings.Cut(rest, "-g")
	if !found {
		return "", 0, 0, false
	}
	seq, err1 := strconv.ParseUint(s, 10, 64)
	gen, err2 := strconv.ParseUint(g, 10, 64)
	return kind, seq, gen, err1 == nil && err2 == nil
}

// readAll reads a whole journal file.
func readAll(fs FS, path string) ([]byte, error) {
	f, err := fs.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}
