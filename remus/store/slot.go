package store

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ftvm/ftvm/snapshot"
)

// Options configure a slot. The zero value is usable.
type Options struct {
	// FS is where the journal lives (nil: the OS). disk/ is always on the
	// OS, in the same directory.
	FS FS
	// Roots is the number of the guest's preopened directories. 0 on a
	// slot with a checkpoint takes the committed value; another value
	// must match it.
	Roots int
	// MaxRecords and MaxRecordBytes trigger a compaction after an
	// incremental commit whose records exceed them (0: the defaults
	// below; negative: never).
	MaxRecords     int
	MaxRecordBytes int64
	// MaxFileSize bounds every offset and size an op may reach (0:
	// DefaultMaxFileSize).
	MaxFileSize int64
	// EncodeWorkerInit runs first on each goroutine that compresses a
	// snapshot the slot encodes (a compaction's base, a record re-encoded
	// after one) in parallel (snapshot.Options.WorkerInit): a backup whose
	// persister runs at a low priority lowers theirs too, or its commits
	// would take normal-priority threads from the guests it shares cores
	// with.
	EncodeWorkerInit func()

	// Test hooks: see disk.
	diskHook   func(op string) error
	noDiskSync bool
}

// Defaults of Options.
const (
	DefaultMaxRecords     = 256
	DefaultMaxRecordBytes = 1 << 30
)

// Slot is the backup's durable state for one protected VM. Its methods
// are safe for concurrent use (they serialize).
type Slot struct {
	mu    sync.Mutex
	dir   string
	fs    FS
	opts  Options
	d     disk
	lock  io.Closer
	roots uint32

	c        *commitRec // nil: nothing committed
	applied  appliedRec
	recs     []recInfo
	recBytes int64
	// localTip is the ID of the last snapshot file of the chain; peerTip
	// the primary's ID of the committed checkpoint, which its next
	// incremental names as parent. They differ after a compaction.
	localTip, peerTip snapshot.Hash
	diverged          bool
	broken            error
	closed            bool
}

type recInfo struct {
	seq   uint64
	bytes int64
}

// Open opens the slot in dir, creating it if needed. On a slot with a
// checkpoint it recovers: it finishes an interrupted full commit's switch
// of disk trees, verifies the journal it keeps (COMMIT, APPLIED, every
// snapshot and ops file of the chain: checksums, IDs, chain links),
// finishes applying the fs ops of committed records to disk/, and removes
// uncommitted and partial files. A damaged file it needs is an error that
// names it; nothing is repaired by guessing.
func Open(dir string, opts Options) (*Slot, error) {
	if opts.FS == nil {
		opts.FS = OS()
	}
	if opts.MaxRecords == 0 {
		opts.MaxRecords = DefaultMaxRecords
	}
	if opts.MaxRecordBytes == 0 {
		opts.MaxRecordBytes = DefaultMaxRecordBytes
	}
	if opts.MaxFileSize <= 0 {
		opts.MaxFileSize = DefaultMaxFileSize
	}
	if opts.Roots < 0 || opts.Roots > maxRoots {
		return nil, fmt.Errorf("store: %d roots", opts.Roots)
	}
	if err := opts.FS.MkdirAll(dir); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	lock, err := opts.FS.Lock(filepath.Join(dir, lockName))
	if err != nil {
		return nil, err
	}
	s := &Slot{dir: dir, fs: opts.FS, opts: opts, lock: lock, roots: uint32(opts.Roots),
		d: disk{hook: opts.diskHook, noSync: opts.noDiskSync}}
	if err := s.recover(); err != nil {
		lock.Close()
		return nil, err
	}
	return s, nil
}

func (s *Slot) path(name string) string { return filepath.Join(s.dir, name) }

func notExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

func (s *Slot) recover() error {
	b, err := readAll(s.fs, s.path(commitName))
	if notExist(err) {
		// No checkpoint yet, or an interrupted first full commit. A
		// disk tree or an APPLIED exist only after a COMMIT did.
		_, aerr := readAll(s.fs, s.path(appliedName))
		if _, derr := os.Lstat(s.path(diskName)); derr == nil || !notExist(aerr) {
			return corrupt(s.path(commitName), "missing, but the slot has a disk tree or an APPLIED file")
		}
		s.cleanup()
		return nil
	}
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	c, err := decodeCommit(s.path(commitName), b)
	if err != nil {
		return err
	}
	if s.opts.Roots != 0 && uint32(s.opts.Roots) != c.Roots {
		return fmt.Errorf("store: the slot in %s has %d roots, not %d", s.dir, c.Roots, s.opts.Roots)
	}
	s.roots = c.Roots
	if err := s.recoverTree(c); err != nil {
		return err
	}

	// How far the records' ops reached disk/.
	a := &appliedRec{Gen: c.Gen, Seq: c.TreeSeq}
	fresh := true // no APPLIED of this generation yet
	ab, err := readAll(s.fs, s.path(appliedName))
	switch {
	case err == nil:
		got, err := decodeApplied(s.path(appliedName), ab)
		if err != nil {
			return err
		}
		if got.Gen == c.Gen {
			a, fresh = got, false
		}
	case !notExist(err):
		return fmt.Errorf("store: %w", err)
	}
	switch {
	case fresh && c.tip() != c.TreeSeq:
		// A full commit writes APPLIED before it returns, and nothing
		// commits on top of it before that.
		return corrupt(s.path(appliedName), "missing for generation %d, committed %d..%d", c.Gen, c.BaseSeq, c.tip())
	case a.Seq < c.BaseSeq || a.Seq > c.tip() || (a.Op > 0 && a.Seq == c.tip()):
		// Compaction drops only applied records.
		return corrupt(s.path(appliedName), "applied to %d (op %d), committed %d..%d", a.Seq, a.Op, c.BaseSeq, c.tip())
	}
	s.c, s.applied, s.diverged = c, *a, a.Diverged

	pending, err := s.loadChain(c, a.Seq)
	if err != nil {
		return err
	}
	if len(pending) > 0 {
		ap, err := newApplier(&s.d, s.path(diskName), s.roots, s.opts.MaxFileSize)
		if err != nil {
			return err
		}
		defer ap.close()
		for i, o := range pending {
			var resume *appliedRec
			if i == 0 && a.Op > 0 {
				if int(a.SegEnd) > len(o.Ops) {
					return corrupt(s.path(appliedName), "segment end %d beyond the %d ops of record %d", a.SegEnd, len(o.Ops), o.Seq)
				}
				resume = a
			}
			if err := s.applyRecord(ap, o, resume); err != nil && !isDivergence(err) {
				return err
			}
		}
	} else if fresh {
		if err := s.writeApplied(&appliedRec{Gen: c.Gen, Seq: c.tip(), Diverged: s.diverged}); err != nil {
			return err
		}
	}
	s.cleanup()
	return nil
}

// recoverTree makes disk/ the tree of c's generation, finishing a full
// commit's switch of trees if a crash interrupted it.
func (s *Slot) recoverTree(c *commitRec) error {
	if t, ok := readTree(s.path(diskName)); ok && t.Gen == c.Gen {
		if err := s.d.step("remove leftover trees"); err != nil {
			return err
		}
		removeAll(s.path(diskNewName))
		removeAll(s.path(diskOldName))
		return nil
	}
	if t, ok := readTree(s.path(diskNewName)); ok && t.Gen == c.Gen {
		return s.swapTree()
	}
	return corrupt(filepath.Join(s.path(diskName), treeName), "the disk tree of generation %d is missing", c.Gen)
}

// swapTree makes disk.new (complete and durable) the slot's disk/.
func (s *Slot) swapTree() error {
	disk, next, old := s.path(diskName), s.path(diskNewName), s.path(diskOldName)
	steps := []struct {
		name string
		fn   func() error
	}{
		{"remove old tree", func() error { return removeAll(old) }},
		{"rename disk", func() error {
			if err := os.Rename(disk, old); err != nil && !notExist(err) {
				return err
			}
			return nil
		}},
		{"rename disk.new", func() error { return os.Rename(next, disk) }},
		{"fsync slot dir", func() error {
			if s.d.noSync {
				return nil
			}
			return osFS{}.SyncDir(s.dir)
		}},
		{"remove old tree", func() error { return removeAll(old) }},
	}
	for _, st := range steps {
		if err := s.d.step(st.name); err != nil {
			return err
		}
		if err := st.fn(); err != nil {
			return fmt.Errorf("store: switching disk trees: %w", err)
		}
	}
	return nil
}

// loadChain verifies the base and every record of c and returns the ops of
// the records after applied, which are still to be applied to disk/.
func (s *Slot) loadChain(c *commitRec, applied uint64) ([]*opsRec, error) {
	base, _, err := s.readSnap(baseName(c.BaseSeq, c.Gen), c.Module)
	if err != nil {
		return nil, err
	}
	if base.Kind != snapshot.Full || base.Seq != c.BaseSeq || base.ID != c.BaseID {
		return nil, corrupt(s.path(baseName(c.BaseSeq, c.Gen)), "a %s snapshot %s at seq %d, COMMIT names full %s at %d",
			base.Kind, base.ID.Short(), base.Seq, c.BaseID.Short(), c.BaseSeq)
	}
	prevID, prevSize := base.ID, base.MemorySize
	s.recs, s.recBytes = nil, 0
	s.peerTip = c.BasePeer
	var pending []*opsRec
	for seq := c.BaseSeq + 1; seq <= c.Seq; seq++ {
		o, on, err := s.readOps(seq, c.Gen)
		if err != nil {
			return nil, err
		}
		r, rn, err := s.readSnap(recName(seq, c.Gen), c.Module)
		if err != nil {
			return nil, err
		}
		p := s.path(recName(seq, c.Gen))
		switch {
		case r.Kind != snapshot.Incremental || r.Seq != seq:
			return nil, corrupt(p, "a %s snapshot at seq %d, not an incremental at %d", r.Kind, r.Seq, seq)
		case r.Parent != prevID:
			return nil, corrupt(p, "follows %s, not the chain's %s", r.Parent.Short(), prevID.Short())
		case r.ID != o.Snap:
			return nil, corrupt(p, "is snapshot %s, its ops file names %s", r.ID.Short(), o.Snap.Short())
		case r.MemorySize < prevSize:
			return nil, corrupt(p, "memory shrinks from %d to %d", prevSize, r.MemorySize)
		}
		prevID, prevSize = r.ID, r.MemorySize
		s.recs = append(s.recs, recInfo{seq: seq, bytes: rn + on})
		s.recBytes += rn + on
		s.peerTip = o.Peer
		if seq > applied {
			pending = append(pending, o)
		}
	}
	s.localTip = prevID
	if c.ExitSeq != 0 {
		o, _, err := s.readOps(c.ExitSeq, c.Gen)
		if err != nil {
			return nil, err
		}
		if !o.Snap.IsZero() || !o.Peer.IsZero() {
			return nil, corrupt(s.path(opsName(c.ExitSeq, c.Gen)), "the exit's record names snapshot %s", o.Snap.Short())
		}
		if c.ExitSeq > applied {
			pending = append(pending, o)
		}
	}
	return pending, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// readSnap reads and verifies one snapshot file of the journal.
func (s *Slot) readSnap(name string, module snapshot.Hash) (*snapshot.Snapshot, int64, error) {
	p := s.path(name)
	f, err := s.fs.Open(p)
	if err != nil {
		return nil, 0, fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	cr := &countingReader{r: f}
	br := bufio.NewReaderSize(cr, 1<<20)
	sn, err := snapshot.DecodeFor(br, module)
	if err != nil {
		var se *snapshot.Error
		if errors.As(err, &se) && se.Path == "" {
			se.Path = p
		}
		return nil, 0, fmt.Errorf("store: %w", err)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		return nil, 0, corrupt(p, "data after the end of the snapshot")
	}
	return sn, cr.n, nil
}

func (s *Slot) readOps(seq, gen uint64) (*opsRec, int64, error) {
	p := s.path(opsName(seq, gen))
	b, err := readAll(s.fs, p)
	if err != nil {
		return nil, 0, fmt.Errorf("store: %w", err)
	}
	o, err := decodeOps(p, b)
	if err != nil {
		return nil, 0, err
	}
	if o.Seq != seq || o.Gen != gen {
		return nil, 0, corrupt(p, "holds record %d of generation %d", o.Seq, o.Gen)
	}
	for i := range o.Ops {
		// What was checked before it was written is checked again: the
		// file is ours, but a damaged disk must not make it an attack.
		n, err := normalize(o.Ops[i], s.roots, s.opts.MaxFileSize, time.Time{})
		if err != nil || !sameOp(&n, &o.Ops[i]) {
			return nil, 0, corrupt(p, "op %d is invalid: %v", i, err)
		}
	}
	return o, int64(len(b)), nil
}

// sameOp compares normalize's output with a stored op (normalized when it
// was written, so normalizing again changes nothing).
func sameOp(a, b *FsOp) bool {
	return a.Op == b.Op && a.Root == b.Root && a.Path == b.Path && a.Root2 == b.Root2 && a.Path2 == b.Path2 &&
		a.Offset == b.Offset && a.Size == b.Size && a.Flags == b.Flags && bytes.Equal(a.Data, b.Data)
}

// cleanup removes what no COMMIT names: temporary files, uncommitted
// records, files of older generations and compacted-away chains, leftover
// trees. It is best effort: what survives a crash is removed next time.
func (s *Slot) cleanup() {
	names, err := s.fs.ReadDir(s.dir)
	if err != nil {
		return
	}
	for _, n := range names {
		if strings.HasPrefix(n, ".") && strings.HasSuffix(n, tmpSuffix) {
			s.fs.Remove(s.path(n))
			continue
		}
		kind, seq, gen, ok := parseName(n)
		if !ok {
			continue
		}
		keep := false
		if c := s.c; c != nil && gen == c.Gen {
			switch kind {
			case "base":
				keep = seq == c.BaseSeq
			case "ops":
				keep = seq > c.BaseSeq && seq <= c.tip()
			default:
				keep = seq > c.BaseSeq && seq <= c.Seq
			}
		}
		if !keep {
			s.fs.Remove(s.path(n))
		}
	}
	if s.c == nil {
		removeAll(s.path(diskNewName))
		removeAll(s.path(diskOldName))
	}
}

// usable says why the slot cannot take a commit.
func (s *Slot) usable() error {
	switch {
	case s.closed:
		return errors.New("store: the slot is closed")
	case s.broken != nil:
		return fmt.Errorf("store: %w: %w", ErrBroken, s.broken)
	}
	return nil
}

// fail marks the slot broken: what is durable is known only to recovery.
func (s *Slot) fail(err error) error {
	if s.broken == nil {
		s.broken = err
	}
	if errors.Is(err, ErrBroken) {
		return err
	}
	return fmt.Errorf("store: %w (%w)", err, ErrBroken)
}

// writeFiles writes each file under its temporary name and fsyncs it, then
// renames them all and fsyncs the directory: each name holds its old
// content or all of its new content, whatever crashes when. A failure
// removes the temporary files it leaves: on a full disk they would hold
// the space the next try needs, and only the slot's next Open removed them.
func (s *Slot) writeFiles(files ...journalFile) error {
	for i, f := range files {
		if err := s.writeTemp(f); err != nil {
			s.removeTemps(files[:i])
			return err
		}
	}
	for i, f := range files {
		if err := s.fs.Rename(s.path(tmpName(f.name)), s.path(f.name)); err != nil {
			s.removeTemps(files[i:])
			return fmt.Errorf("store: %w", err)
		}
	}
	if err := s.fs.SyncDir(s.dir); err != nil {
		return fmt.Errorf("store: fsync %s: %w", s.dir, err)
	}
	return nil
}

type journalFile struct {
	name  string
	data  []byte
	write func(io.Writer) error // instead of data
}

// removeTemps removes the temporary files of files, best effort (what
// stays is removed at the next Open).
func (s *Slot) removeTemps(files []journalFile) {
	for _, f := range files {
		s.fs.Remove(s.path(tmpName(f.name)))
	}
}

// writeTemp writes jf under its temporary name and fsyncs it; on failure
// the temporary file is gone.
func (s *Slot) writeTemp(jf journalFile) (err error) {
	tmp := s.path(tmpName(jf.name))
	f, err := s.fs.Create(tmp)
	if err != nil {
		s.fs.Remove(tmp) // a create that failed half-way may leave it
		return fmt.Errorf("store: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			s.fs.Remove(tmp)
		}
	}()
	if jf.write != nil {
		bw := bufio.NewWriterSize(f, 1<<20)
		if err = jf.write(bw); err == nil {
			err = bw.Flush()
		}
	} else {
		_, err = f.Write(jf.data)
	}
	if err != nil {
		return fmt.Errorf("store: writing %s: %w", tmp, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("store: fsync %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

func (s *Slot) writeCommit(c *commitRec) error {
	if err := s.writeFiles(journalFile{name: commitName, data: c.encode()}); err != nil {
		return err
	}
	s.c = c
	return nil
}

func (s *Slot) writeApplied(a *appliedRec) error {
	if err := s.writeFiles(journalFile{name: appliedName, data: a.encode()}); err != nil {
		return err
	}
	s.applied = *a
	return nil
}

// Committed is the seq of the durable checkpoint, 0 if there is none.
func (s *Slot) Committed() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return 0
	}
	return s.c.Seq
}

// Exited reports whether the slot's VM exited on its primary (CommitExit),
// and its exit code. A CommitFull clears it.
func (s *Slot) Exited() (code uint32, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil || s.c.ExitSeq == 0 {
		return 0, false
	}
	return s.c.ExitCode, true
}

// CommitExit records that the VM exited with code after the committed
// checkpoint, and applies ops, the fs mutations of the epoch it ended in,
// to the replica: a guest that writes its result and exits leaves that
// result on its backup too. That epoch has no snapshot (nothing will
// resume it): the memory state stays the committed checkpoint's, which
// Image, Paths and Committed still give. The ops go into a record of
// their own that COMMIT names (the commit point), then are applied as a
// checkpoint's are; recovery finishes applying them after a crash. The
// slot then takes only a CommitFull (a new run).
func (s *Slot) CommitExit(code uint32, ops []FsOp) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	switch {
	case s.c == nil:
		return invalid("an exit on an empty slot")
	case s.c.ExitSeq != 0:
		return invalid("the VM already exited (code %d)", s.c.ExitCode)
	case s.diverged:
		return fmt.Errorf("store: exit: %w: the replica no longer mirrors the primary's files", ErrDiverged)
	}
	seq := s.c.Seq + 1
	nops, end, ap, err := s.planOps(ops)
	if err != nil {
		return err
	}
	defer ap.close()
	o := &opsRec{Seq: seq, Gen: s.c.Gen, Seg0End: uint32(end), Ops: nops}
	if err := s.writeFiles(journalFile{name: opsName(seq, s.c.Gen), data: o.encode()}); err != nil {
		return err
	}
	c := *s.c
	c.ExitSeq, c.ExitCode = seq, code
	if err := s.writeCommit(&c); err != nil {
		return s.fail(err)
	}
	if err := s.applyRecord(ap, o, nil); err != nil {
		if isDivergence(err) {
			return err
		}
		return s.fail(err)
	}
	return nil
}

// Diverged reports whether an fs op could not be applied to the replica
// (see ErrDiverged); a CommitFull clears it.
func (s *Slot) Diverged() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.diverged
}

// CommitFull makes checkpoint seq, given whole, the slot's state: snap is
// its encoded full snapshot, tree the contents of the preopens it was
// taken with and ops the fs mutations of the epoch after that. Everything
// is replaced. The new disk tree is built in disk.new/ and made durable,
// the base file written, and only then COMMIT names them; until that
// rename is durable the old state stays the one recovery finds.
func (s *Slot) CommitFull(seq uint64, snap []byte, tree []TreeEntry, ops []FsOp) error {
	return s.commitFull(seq, snap, nil, tree, ops)
}

// CommitFullDecoded is CommitFull for a caller that decoded snap itself
// (a Remus backup decodes every checkpoint to apply it): sn is what
// snapshot.DecodeBytes returned for snap, and snap is not decoded again —
// for a full sync of a large memory that is seconds of CPU. sn is not
// modified.
func (s *Slot) CommitFullDecoded(seq uint64, snap []byte, sn *snapshot.Snapshot, tree []TreeEntry, ops []FsOp) error {
	if sn == nil {
		return invalid("checkpoint %d: no decoded snapshot", seq)
	}
	return s.commitFull(seq, snap, sn, tree, ops)
}

func (s *Slot) commitFull(seq uint64, snap []byte, sn *snapshot.Snapshot, tree []TreeEntry, ops []FsOp) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	if seq == 0 {
		return invalid("checkpoint 0")
	}
	if sn == nil {
		var err error
		if sn, err = snapshot.DecodeBytes(snap, nil); err != nil {
			return fmt.Errorf("store: %w: %w", ErrInvalid, err)
		}
	}
	if sn.Kind != snapshot.Full || sn.Seq != seq {
		return invalid("a %s snapshot at seq %d for full checkpoint %d", sn.Kind, sn.Seq, seq)
	}
	if err := checkTree(tree, s.roots, s.opts.MaxFileSize); err != nil {
		return err
	}
	nops, err := normalizeOps(ops, s.roots, s.opts.MaxFileSize)
	if err != nil {
		return err
	}
	gen := uint64(1)
	if s.c != nil {
		gen = s.c.Gen + 1
	}
	// Until COMMIT's rename, a failure leaves only files no COMMIT names:
	// the slot is as it was.
	if err := buildStaging(&s.d, s.path(diskNewName), s.roots, gen, seq, tree, nops, s.opts.MaxFileSize); err != nil {
		removeAll(s.path(diskNewName)) // no COMMIT names it; recovery would remove it too
		return err
	}
	if err := s.writeFiles(journalFile{name: baseName(seq, gen), data: snap}); err != nil {
		return err
	}
	c := &commitRec{Roots: s.roots, Gen: gen, BaseSeq: seq, Seq: seq, TreeSeq: seq, Module: sn.Module,
		BaseID: sn.ID, BasePeer: sn.ID}
	if err := s.writeCommit(c); err != nil {
		return s.fail(err)
	}
	s.recs, s.recBytes, s.localTip, s.peerTip, s.diverged = nil, 0, sn.ID, sn.ID, false
	if err := s.swapTree(); err != nil {
		return s.fail(err)
	}
	if err := s.writeApplied(&appliedRec{Gen: gen, Seq: seq}); err != nil {
		return s.fail(err)
	}
	s.cleanup()
	return nil
}

// CommitIncremental commits checkpoint seq = Committed()+1: snap is its
// encoded incremental snapshot (whose parent is the committed checkpoint)
// and ops the fs mutations of its epoch. The record (snapshot file and ops
// file) is made durable, then COMMIT names it (the commit point: the
// caller may ack when this returns nil, or an error wrapping ErrDiverged
// or ErrCompact), then the ops are applied to disk/ and APPLIED says so.
// An error wrapping ErrInvalid committed nothing; one wrapping ErrBroken
// means the slot must be reopened to learn what is durable.
func (s *Slot) CommitIncremental(seq uint64, snap []byte, ops []FsOp) error {
	return s.commitIncremental(seq, snap, nil, ops)
}

// CommitIncrementalDecoded is CommitIncremental for a caller that decoded
// snap itself (a Remus backup decodes every checkpoint to apply it): sn is
// what snapshot.DecodeBytes returned for snap, and snap is not decoded
// again — for a large checkpoint that second decoding cost the backup as
// much CPU as the first. sn is not modified.
func (s *Slot) CommitIncrementalDecoded(seq uint64, snap []byte, sn *snapshot.Snapshot, ops []FsOp) error {
	if sn == nil {
		return invalid("checkpoint %d: no decoded snapshot", seq)
	}
	return s.commitIncremental(seq, snap, sn, ops)
}

func (s *Slot) commitIncremental(seq uint64, snap []byte, decoded *snapshot.Snapshot, ops []FsOp) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	switch {
	case s.c == nil:
		return invalid("incremental checkpoint %d on an empty slot", seq)
	case s.c.ExitSeq != 0:
		return invalid("incremental checkpoint %d: the VM exited (code %d)", seq, s.c.ExitCode)
	case s.diverged:
		return fmt.Errorf("store: incremental checkpoint %d: %w: the slot needs a full checkpoint", seq, ErrDiverged)
	case seq != s.c.Seq+1:
		return invalid("checkpoint %d after %d", seq, s.c.Seq)
	}
	sn := decoded
	if sn == nil {
		var err error
		if sn, err = snapshot.DecodeBytes(snap, &s.c.Module); err != nil {
			return fmt.Errorf("store: %w: %w", ErrInvalid, err)
		}
	} else if sn.Module != s.c.Module {
		return fmt.Errorf("store: %w: %w: checkpoint %d is of module %s, the slot of %s", ErrInvalid,
			snapshot.ErrModuleMismatch, seq, sn.Module.Short(), s.c.Module.Short())
	}
	// Its parent names the committed checkpoint as the primary does, or
	// as the slot's files do (Tip: a record its caller merged and encoded
	// onto them, which needs no re-encoding).
	if sn.Kind != snapshot.Incremental || sn.Seq != seq || (sn.Parent != s.peerTip && sn.Parent != s.localTip) {
		return fmt.Errorf("store: %w: %w: a %s snapshot at seq %d after %s, for checkpoint %d after %s", ErrInvalid,
			snapshot.ErrChain, sn.Kind, sn.Seq, sn.Parent.Short(), seq, s.peerTip.Short())
	}
	nops, end, ap, err := s.planOps(ops)
	if err != nil {
		return err
	}
	defer ap.close()
	peer, local := sn.ID, sn.ID
	data := snap
	if sn.Parent != s.localTip {
		// After a compaction the chain's files have their own IDs: the
		// record is re-encoded to follow them (same content and nonce).
		re := *sn // the caller's is not ours to change
		re.Parent = s.localTip
		var buf bytes.Buffer
		if err := re.EncodeOptions(&buf, s.encodeOptions()); err != nil {
			return fmt.Errorf("store: re-encoding checkpoint %d: %w", seq, err)
		}
		data, local = buf.Bytes(), re.ID
	}
	o := &opsRec{Seq: seq, Gen: s.c.Gen, Snap: local, Peer: peer, Seg0End: uint32(end), Ops: nops}
	ob := o.encode()
	if err := s.writeFiles(journalFile{name: recName(seq, s.c.Gen), data: data},
		journalFile{name: opsName(seq, s.c.Gen), data: ob}); err != nil {
		return err // nothing names these files: not committed, the slot is as it was
	}
	c := *s.c
	c.Seq = seq
	if err := s.writeCommit(&c); err != nil {
		return s.fail(err)
	}
	s.recs = append(s.recs, recInfo{seq: seq, bytes: int64(len(data) + len(ob))})
	s.recBytes += int64(len(data) + len(ob))
	s.localTip, s.peerTip = local, peer

	if err := s.applyRecord(ap, o, nil); err != nil {
		if isDivergence(err) {
			return err
		}
		return s.fail(err)
	}
	if (s.opts.MaxRecords > 0 && len(s.recs) > s.opts.MaxRecords) ||
		(s.opts.MaxRecordBytes > 0 && s.recBytes > s.opts.MaxRecordBytes) {
		img, err := s.image()
		if err == nil {
			err = s.compact(img)
		}
		if err != nil {
			return fmt.Errorf("store: checkpoint %d is committed: %w: %w", seq, ErrCompact, err)
		}
	}
	return nil
}

// planOps checks and normalizes a record's ops and plans its first
// segment now, on disk/ as it is: exactly the state before these ops. Its
// appends become writes at offsets; end is where it ends. The caller
// closes the applier, which applies the record once it is committed.
func (s *Slot) planOps(ops []FsOp) (nops []FsOp, end int, ap *applier, err error) {
	if nops, err = normalizeOps(ops, s.roots, s.opts.MaxFileSize); err != nil {
		return nil, 0, nil, err
	}
	if ap, err = newApplier(&s.d, s.path(diskName), s.roots, s.opts.MaxFileSize); err != nil {
		return nil, 0, nil, err
	}
	end, offs, err := ap.plan(nops, 0)
	if err != nil {
		ap.close()
		return nil, 0, nil, err
	}
	for _, o := range offs {
		nops[o.Op].Offset = o.Offset
	}
	return nops, end, ap, nil
}

// applyRecord applies a committed record's ops to disk/ segment by
// segment (doc.go), from the start or from where resume says an earlier
// attempt got to, and records in APPLIED that it is done. A divergence is
// recorded and returned after the rest was applied.
func (s *Slot) applyRecord(ap *applier, o *opsRec, resume *appliedRec) error {
	ops := o.Ops
	j, end := 0, int(o.Seg0End)
	var offs []segOffset
	if resume != nil {
		j, end, offs = int(resume.Op), int(resume.SegEnd), resume.Offsets
	}
	planned := true // the first segment's plan is in the ops file or in resume
	var first error
	for j < len(ops) {
		if !planned {
			var err error
			if end, offs, err = ap.plan(ops, j); err != nil {
				return err
			}
			if err := s.writeApplied(&appliedRec{Gen: s.c.Gen, Seq: o.Seq - 1, Op: uint32(j), SegEnd: uint32(end),
				Offsets: offs, Diverged: s.diverged}); err != nil {
				return err
			}
		}
		planned = false
		for i := j; i < end; i++ {
			op := ops[i]
			for _, so := range offs {
				if int(so.Op) == i {
					op.Offset = so.Offset
				}
			}
			if err := ap.apply(&op); err != nil {
				if !isDivergence(err) {
					return &OpError{Seq: o.Seq, Index: i, Op: op.String(), Err: err}
				}
				s.diverged = true
				if first == nil {
					first = &OpError{Seq: o.Seq, Index: i, Op: op.String(), Err: err}
				}
			}
		}
		if err := ap.barrier(); err != nil {
			return err
		}
		j = end
	}
	if err := s.writeApplied(&appliedRec{Gen: s.c.Gen, Seq: o.Seq, Diverged: s.diverged}); err != nil {
		return err
	}
	return first
}

// Image rebuilds the committed state from the base and records, verifying
// every file (for recovery and `ftvm restore`).
func (s *Slot) Image() (*snapshot.Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("store: the slot is closed")
	}
	return s.image()
}

func (s *Slot) image() (*snapshot.Image, error) {
	if s.c == nil {
		return nil, errors.New("store: nothing is committed")
	}
	names := []string{baseName(s.c.BaseSeq, s.c.Gen)}
	for _, r := range s.recs {
		names = append(names, recName(r.seq, s.c.Gen))
	}
	img := &snapshot.Image{}
	for i, n := range names {
		sn, _, err := s.readSnap(n, s.c.Module)
		if err != nil {
			return nil, err
		}
		if i == 0 && sn.Kind != snapshot.Full {
			return nil, corrupt(s.path(n), "the base is not a full snapshot")
		}
		if err := snapshot.Apply(img, sn); err != nil {
			var se *snapshot.Error
			if errors.As(err, &se) && se.Path == "" {
				se.Path = s.path(n)
			}
			return nil, fmt.Errorf("store: %w", err)
		}
	}
	return img, nil
}

// Tip is the ID of the committed checkpoint as the slot's files name it:
// an incremental checkpoint whose parent it is is stored as it comes,
// while one naming the primary's ID of the committed checkpoint is
// re-encoded onto it after a compaction (which gives the chain's files
// their own IDs). A caller that encodes records itself (a Remus backup
// merging checkpoints) encodes them onto Tip, once.
func (s *Slot) Tip() snapshot.Hash {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.localTip
}

// Roots is the number of preopened directories the slot keeps a replica
// of (Options.Roots, or the committed value where that was 0).
func (s *Slot) Roots() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return int(s.roots)
}

// DiskDir is the replica of preopen root: what a restored guest gets as
// that preopen. It is "" for a root the slot does not have.
func (s *Slot) DiskDir(root int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if root < 0 || uint32(root) >= s.roots {
		return ""
	}
	return filepath.Join(s.dir, diskName, strconv.Itoa(root))
}

// Paths are the snapshot files of the committed chain, in order: `ftvm
// restore BASE RECORD...`, or snapshot.Restore. Empty if nothing is
// committed. They stay valid until the next commit or compaction.
func (s *Slot) Paths() (base string, records []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return "", nil
	}
	for _, r := range s.recs {
		records = append(records, s.path(recName(r.seq, s.c.Gen)))
	}
	return s.path(baseName(s.c.BaseSeq, s.c.Gen)), records
}

// Compact writes img, which must be the committed checkpoint (from Image,
// or the backup's own image built from the primary's stream), as the new
// base and drops the records. The base is a new full snapshot with its own
// ID, so later records are re-encoded to name it as parent (the slot keeps
// the primary's ID of the tip to check the next incremental against).
func (s *Slot) Compact(img *snapshot.Image) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.compact(img)
}

func (s *Slot) compact(img *snapshot.Image) error {
	if err := s.usable(); err != nil {
		return err
	}
	switch {
	case s.c == nil:
		return invalid("compaction of an empty slot")
	case s.c.ExitSeq != 0:
		return invalid("compaction of a slot whose VM exited")
	case img.Seq != s.c.Seq || img.Module != s.c.Module || (img.ID != s.localTip && img.ID != s.peerTip):
		return invalid("the image is %s at seq %d of module %s, the committed checkpoint %s at %d of %s",
			img.ID.Short(), img.Seq, img.Module.Short(), s.peerTip.Short(), s.c.Seq, s.c.Module.Short())
	case s.applied.Seq != s.c.Seq:
		return s.fail(errors.New("store: compaction before the committed ops were applied"))
	case len(s.recs) == 0:
		return nil
	}
	meta := img.Meta
	meta.Reason = fmt.Sprintf("remus compaction at %d", img.Seq)
	sn := img.Snapshot(meta)
	name := baseName(img.Seq, s.c.Gen)
	write := func(w io.Writer) error { return sn.EncodeOptions(w, s.encodeOptions()) }
	if err := s.writeFiles(journalFile{name: name, write: write}); err != nil {
		return err // nothing names it yet
	}
	c := *s.c
	c.BaseSeq, c.BaseID, c.BasePeer = img.Seq, sn.ID, s.peerTip
	if err := s.writeCommit(&c); err != nil {
		return s.fail(err)
	}
	s.recs, s.recBytes, s.localTip = nil, 0, sn.ID
	s.cleanup()
	return nil
}

// encodeOptions are the options of the snapshots the slot encodes.
func (s *Slot) encodeOptions() snapshot.Options {
	return snapshot.Options{WorkerInit: s.opts.EncodeWorkerInit}
}

// Close releases the slot. It writes nothing: everything committed is
// already durable.
func (s *Slot) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.lock.Close()
}
