package machine

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ftvm/ftvm/snapshot"
)

// SnapshotOptions say what kind of snapshot to take.
type SnapshotOptions struct {
	// Incremental writes only the pages dirtied since this VM's previous
	// snapshot (a full one is written when there is none).
	Incremental bool
	// Stop ends the VM at the safe point once the snapshot is safely on disk.
	Stop bool
	// Reason is recorded in the snapshot's metadata.
	Reason string
	// Mappable writes a full snapshot's memory so that a restore maps it
	// copy-on-write instead of reading it (snapshot.Options.Mappable).
	Mappable bool
}

// snapshotter is the machine's snapshot bookkeeping.
type snapshotter struct {
	// mu serialises snapshots: the stager's chunks are reused.
	mu     sync.Mutex
	stager snapshot.Stager
	pool   snapshot.StagePool
	dirty  []uint32
	// ahead says the stager holds pages stageAhead copied for the
	// snapshot about to be captured (capturePaused adds to them);
	// aheadPages are those pages.
	ahead      bool
	aheadPages []uint32
	// collected says capturePaused collected dirty (sn.dirty) for the
	// snapshot under way.
	collected bool
	lastID    snapshot.Hash
	seq       uint64
}

// unconsumed hands the pages collected for a snapshot that did not become
// the chain's tip (it failed, or was only captured: Capture) back to the
// snapshots' view: they were protected again, so the kernel no longer
// reports them, and the next incremental, built on the same parent, must
// hold them.
func (m *Machine) unconsumed() {
	sn := &m.snaps
	m.viewsMu.Lock()
	v := &m.views[viewSnapshots]
	for _, p := range sn.aheadPages {
		v.carry = setBit(v.carry, p)
	}
	if sn.collected {
		for _, p := range sn.dirty {
			v.carry = setBit(v.carry, p)
		}
	}
	m.viewsMu.Unlock()
	sn.aheadPages, sn.collected = sn.aheadPages[:0], false
}

// Capture stops the guest at its next safe point and returns its state as a
// snapshot (not yet encoded: Encode or WriteFile sets its ID). Pages are
// copied while the guest is paused; it runs again before Capture returns.
func (m *Machine) Capture(ctx context.Context, opt SnapshotOptions) (*snapshot.Snapshot, error) {
	m.snaps.mu.Lock()
	defer m.snaps.mu.Unlock()
	var s *snapshot.Snapshot
	m.stageAhead(opt)
	err := m.WithPaused(ctx, func(p *Paused) error {
		var err error
		s, err = m.capturePaused(p, opt)
		return err
	})
	// Not written, so not the chain's tip: the next incremental builds
	// on the same parent.
	m.unconsumed()
	if err == nil {
		m.snaps.pool.Refill() // the guest runs: staging memory for the next pause
	}
	return s, err
}

// stageAhead prepares a snapshot's pause, with the snapshot lock held: for
// an incremental, it copies the pages written since the last snapshot into
// the stager while the guest runs (collectAhead), so that the pause copies
// only those written after; otherwise it warms the page tables for the
// pause's walk.
func (m *Machine) stageAhead(opt SnapshotOptions) {
	sn := &m.snaps
	sn.stager.Pool = &sn.pool
	sn.stager.Release()
	sn.ahead, sn.aheadPages, sn.collected = false, sn.aheadPages[:0], false
	if parent, _ := m.parent(); !opt.Incremental || parent.IsZero() {
		m.WarmDirty()
		return
	}
	var stageErr error
	sn.aheadPages, sn.ahead, _ = m.collectAhead(viewSnapshots, sn.aheadPages[:0], func(mem []byte, pages []uint32) error {
		_, stageErr = sn.stager.Stage(mem, pages)
		return stageErr
	})
	if stageErr != nil {
		sn.stager.Release() // reported again by the pause's collection
		sn.ahead = false
	}
}

func (m *Machine) capturePaused(p *Paused, opt SnapshotOptions) (*snapshot.Snapshot, error) {
	sn := &m.snaps
	defer func() { sn.ahead = false }()
	mem := p.Memory()
	// Always collect, so the next incremental is relative to this snapshot.
	dirtyPages, derr := p.DirtyPages(sn.dirty[:0])
	sn.dirty, sn.collected = dirtyPages, derr == nil
	parentID, parentSeq := m.parent()
	incremental := opt.Incremental && !parentID.IsZero() && derr == nil
	idx := dirtyPages
	if !incremental {
		idx = p.NonZeroPages()
	}
	var pages []snapshot.Page
	var err error
	if incremental && sn.ahead {
		pages, err = sn.stager.Add(mem, idx) // to the pages staged ahead
	} else {
		pages, err = sn.stager.Stage(mem, idx)
	}
	if err != nil {
		return nil, err
	}
	if incremental {
		sn.pool.Expect(pages, uint64(len(mem)))
	}
	return m.snapshotOf(p, opt, pages, incremental, parentID, parentSeq)
}

// snapshotOf makes the snapshot of paused VM p with pages (its memory's,
// copied or aliased): an incremental one on the given parent, or a full one.
func (m *Machine) snapshotOf(p *Paused, opt SnapshotOptions, pages []snapshot.Page, incremental bool,
	parentID snapshot.Hash, parentSeq uint64) (*snapshot.Snapshot, error) {
	mem := p.Memory()
	devs, err := json.Marshal(p.Devices())
	if err != nil {
		return nil, fmt.Errorf("device state: %w", err)
	}
	addr, blob := p.Stack()
	host, _ := os.Hostname()
	s := &snapshot.Snapshot{Kind: snapshot.Full, Module: p.ModuleHash(), MemorySize: uint64(len(mem)),
		Pages: pages, Globals: p.Globals(), StackAddr: addr, Stack: bytes.Clone(blob), Devices: devs,
		Meta: snapshot.Meta{Created: time.Now().UTC(), Host: host, Version: Version, Reason: pauseReason(opt.Reason, p)}}
	if incremental {
		s.Kind, s.Parent, s.Seq = snapshot.Incremental, parentID, parentSeq+1
	} else {
		// A full snapshot carries its module, so it restores anywhere.
		s.ModuleCode, s.ModuleName = m.cfg.Module, m.cfg.Name
	}
	return s, nil
}

// pauseReason is the snapshot's recorded reason, with the safe point it
// was taken at.
func pauseReason(reason string, p *Paused) string {
	if reason == "" {
		return "at " + p.At()
	}
	return reason + ", at " + p.At()
}

// parent is the snapshot an incremental builds on: the last one this VM
// wrote or, before that, the one it was restored from (dirty tracking
// starts from the restored memory, so the chain simply goes on).
func (m *Machine) parent() (snapshot.Hash, uint64) {
	if !m.snaps.lastID.IsZero() {
		return m.snaps.lastID, m.snaps.seq
	}
	if r := m.cfg.Restore; r != nil {
		return r.ID, r.Seq
	}
	return snapshot.Hash{}, 0
}

// Snapshot captures the VM at its next safe point and writes it to path
// (temp file, fsync, rename). With opt.Stop the VM ends at that safe point,
// but only once the file is safely written: a failed write leaves it running.
func (m *Machine) Snapshot(ctx context.Context, path string, opt SnapshotOptions) (*snapshot.Snapshot, error) {
	if err := m.outsideGuestDirs(path); err != nil {
		return nil, err
	}
	m.snaps.mu.Lock()
	defer m.snaps.mu.Unlock()
	var s *snapshot.Snapshot
	m.stageAhead(opt)
	err := m.WithPaused(ctx, func(p *Paused) error {
		var err error
		if s, err = m.capturePaused(p, opt); err != nil {
			return err
		}
		if !opt.Stop {
			return nil
		}
		// Nothing may run after the snapshot, so write it now.
		if err := snapshot.WriteFileOptions(path, s, snapshot.Options{Mappable: opt.Mappable}); err != nil {
			return err
		}
		p.Stop()
		return nil
	})
	if err != nil {
		m.unconsumed()
		return nil, err
	}
	if !opt.Stop {
		m.snaps.pool.Refill() // the guest runs: staging memory for the next pause
		// The guest runs on; the pages are copies, so encoding happens
		// off the pause.
		if err := snapshot.WriteFileOptions(path, s, snapshot.Options{Mappable: opt.Mappable}); err != nil {
			m.unconsumed()
			return nil, err
		}
	}
	m.snaps.lastID, m.snaps.seq = s.ID, s.Seq
	m.snaps.aheadPages, m.snaps.collected = m.snaps.aheadPages[:0], false
	return s, nil
}

// outsideGuestDirs refuses a snapshot path inside a directory the guest
// was given (--dir): the file would appear among the guest's files, which
// the guest did not write (nor would a Remus backup's replica of them
// hold it), and its rename could replace a file the guest holds open (its
// log, say), whose later writes would then go to a file nobody can open.
func (m *Machine) outsideGuestDirs(path string) error {
	if m.dev == nil {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return nil // the write reports the missing directory
	}
	for _, host := range m.dev.PreopenHostPaths() {
		root, err := filepath.EvalSymlinks(host)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(root, dir); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return fmt.Errorf("snapshot: %s is in %s, a directory the guest was given (--dir): its files are the guest's; "+
				"write the snapshot elsewhere", path, host)
		}
	}
	return nil
}

// Version is ftvm's version, recorded in snapshots.
var Version = "dev"

// writeAutoSnapshot writes SnapshotAtCall's snapshot, a full one; the
// guest is stopped for good. It runs on the guest goroutine without the
// snapshots' lock, which an API snapshot may hold while it waits for a
// pause this stop ends, so it touches none of their state (their staging,
// their dirty-page view: no incremental follows a VM that ends here). It
// used capturePaused's, and a snapshot asked for through the API while the
// guest ran to that host call staged its pages into the same stager.
func (m *Machine) writeAutoSnapshot() error {
	if err := m.outsideGuestDirs(m.cfg.SnapshotPath); err != nil {
		return err
	}
	p := &Paused{m: m}
	mem := p.Memory()
	// The memory stays as it is until the VM is closed: its pages are
	// taken as they are, not copied.
	var pages []snapshot.Page
	for _, i := range p.NonZeroPages() {
		off := int(i) * snapshot.PageSize
		pages = append(pages, snapshot.Page{Index: i, Data: mem[off : off+snapshot.PageSize : off+snapshot.PageSize]})
	}
	s, err := m.snapshotOf(p, SnapshotOptions{Reason: fmt.Sprintf("host call %d", m.calls)}, pages, false, snapshot.Hash{}, 0)
	if err != nil {
		return err
	}
	return snapshot.WriteFile(m.cfg.SnapshotPath, s)
}
