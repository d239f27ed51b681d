package remus

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

// checkpoint is one epoch's state, staged while the guest was paused: the
// dirty pages (copies, in a stager of its own on the primary's pool), CPU
// and device state, and the epoch's disk journal — or, for a full
// checkpoint, every non-zero page and the whole contents of the preopened
// directories.
type checkpoint struct {
	seq      uint64
	full     bool
	snap     *snapshot.Snapshot // pages alias stager; Parent and ID set when encoded
	stager   *snapshot.Stager
	ops      []wire.FsOp
	tree     []wire.DiskFile
	pause    time.Duration // how long the capture kept the guest stopped
	dirty    int           // pages in the checkpoint
	ahead    int           // of them, copied before the pause (collectAhead)
	devices  *wasi.State   // marshalled into snap.Devices when encoded
	gen      uint64        // the dirty-page collection, for rearm
	enqueued time.Time     // when it was given to the sender
	// counted: enqueue counted it in the session's whole (not
	// abandonable); the sender uncounts it once sent whole.
	counted bool
}

// rearm re-arms dirty tracking for the pages this checkpoint's collection
// reported, with the staged copies (the guest runs meanwhile); it must run
// before the stager is released. A page not staged — a full checkpoint
// stages only non-zero pages — is zero in the copy.
func (cp *checkpoint) rearm(m *machine.Machine) error {
	return m.RearmDirty(cp.gen, func(idx uint32) []byte {
		if d := snapshot.PageData(cp.snap.Pages, idx); d != nil || !cp.full {
			return d
		}
		return zeroPage[:]
	})
}

var zeroPage [snapshot.PageSize]byte

// abandonable reports whether the checkpoint holds nothing but the guest's
// memory and CPU and device state: once the guest has ended, nothing needs
// it (a full checkpoint carries the directories' contents, an incremental
// one its epoch's disk operations).
func (cp *checkpoint) abandonable() bool { return !cp.full && len(cp.ops) == 0 }

// captureCheckpoint runs while the guest is paused. It copies only what
// must be copied now; encoding happens after the guest runs again. st may
// hold pages staged before the pause (collectAhead); the checkpoint adds
// to them.
func captureCheckpoint(p *machine.Paused, seq uint64, full bool, st *snapshot.Stager, dev *wasi.State, dirtyBuf []uint32,
	module []byte, name string) (*checkpoint, []uint32, error) {
	t0 := time.Now()
	mem := p.Memory()
	// Always collect, so the next incremental is relative to this one.
	// Re-arming the pages is left for the sender (rearm), out of the
	// pause.
	dirtyPages, gen, err := p.DirtyPagesDeferred(dirtyBuf[:0])
	if err != nil {
		return nil, dirtyBuf, fmt.Errorf("dirty pages: %w", err)
	}
	idx := dirtyPages
	if full {
		idx = p.NonZeroPages()
	}
	var pages []snapshot.Page
	if st.Len() > 0 && !full {
		// Most pages were staged ahead of the pause (collectAhead):
		// only those written since are copied now.
		pages, err = st.Add(mem, idx)
	} else {
		pages, err = st.Stage(mem, idx)
	}
	if err != nil {
		return nil, dirtyPages, err
	}
	// The device state is a copy (into dev's memory, if not nil); it is
	// turned into JSON after the pause.
	devState := p.DevicesInto(dev)
	addr, blob := p.Stack()
	s := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: p.ModuleHash(), Seq: seq, MemorySize: uint64(len(mem)),
		Pages: pages, Globals: p.Globals(), StackAddr: addr, Stack: bytes.Clone(blob),
		Meta: snapshot.Meta{Created: t0.UTC(), Version: machine.Version, Reason: fmt.Sprintf("remus epoch %d", seq)}}
	cp := &checkpoint{seq: seq, full: full, snap: s, stager: st, dirty: len(pages), devices: devState, gen: gen}
	if full {
		s.Kind = snapshot.Full
		s.ModuleCode, s.ModuleName = module, name
		for i, pre := range devState.Preopens {
			tree, err := readTree(uint32(i), pre.HostPath)
			if err != nil {
				return nil, dirtyPages, err
			}
			cp.tree = append(cp.tree, tree...)
		}
	}
	cp.pause = time.Since(t0)
	return cp, dirtyPages, nil
}

// readTree reads a preopened directory's whole contents for a full sync.
// It runs during the pause of a full checkpoint (the first of every backup
// session), so its cost grows with the directory: fine for the working
// directories guests use, not for bulk data (a block-level disk mirror is
// a later issue).
func readTree(root uint32, dir string) ([]wire.DiskFile, error) {
	var out []wire.DiskFile
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		e := wire.DiskFile{Root: root, Path: filepath.ToSlash(rel), Mode: uint32(info.Mode().Perm())}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			e.Kind = wire.FileSymlink
			if e.Target, err = os.Readlink(path); err != nil {
				return err
			}
		case d.IsDir():
			e.Kind = wire.FileDir
		case d.Type().IsRegular():
			e.Kind = wire.FileRegular
			if e.Data, err = os.ReadFile(path); err != nil {
				return err
			}
		default:
			return nil // sockets, fifos, devices: not guest data
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading preopened directory %s for a full sync: %w", dir, err)
	}
	return out, nil
}
