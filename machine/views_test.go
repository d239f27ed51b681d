package machine

import (
	"bytes"
	"context"
	"encoding/binary"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/snapshot"
)

// TestDirtyViewsOfTwoConsumers: snapshots (DirtyPages) and a checkpoint
// stream (DirtyPagesDeferred, re-armed after the pause) collect from the
// one tracker in turn, and each keeps an exact image of the memory from
// the pages it is given — a snapshot taken of a protected primary must not
// take pages away from its backup's next checkpoint, nor the reverse.
func TestDirtyViewsOfTwoConsumers(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "40", "0", "1000")
	go m.Run(ctx)
	time.Sleep(100 * time.Millisecond)
	var images [2][]byte // snapshots, stream
	var stager snapshot.Stager
	for i := 0; i < 60; i++ {
		time.Sleep(3 * time.Millisecond)
		view := viewStream
		if i%3 == 0 {
			view = viewSnapshots
		}
		var gen uint64
		var staged []snapshot.Page
		err := m.WithPaused(ctx, func(p *Paused) error {
			var pages []uint32
			var err error
			if view == viewSnapshots {
				pages, err = p.DirtyPages(nil)
			} else {
				pages, gen, err = p.DirtyPagesDeferred(nil)
			}
			if err != nil {
				return err
			}
			mem := p.Memory()
			img := &images[view]
			if *img == nil {
				*img = bytes.Clone(mem) // the consumer's first, full copy
			}
			*img = append(*img, make([]byte, len(mem)-len(*img))...)
			if staged, err = stager.Stage(mem, pages); err != nil {
				return err
			}
			for _, pg := range staged {
				copy((*img)[int(pg.Index)*dirty.PageSize:], pg.Data)
			}
			if !bytes.Equal(*img, mem) {
				for o := 0; o < len(mem); o += dirty.PageSize {
					if !bytes.Equal((*img)[o:o+dirty.PageSize], mem[o:o+dirty.PageSize]) {
						t.Errorf("pause %d, view %d: page %d changed but was not reported", i, view, o/dirty.PageSize)
						break
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if t.Failed() {
			return
		}
		if view == viewStream {
			err = m.RearmDirty(gen, func(idx uint32) []byte { return snapshot.PageData(staged, idx) })
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// pageOf is page p of b.
func pageOf(b []byte, p uint32) []byte { return b[int(p)*dirty.PageSize : int(p+1)*dirty.PageSize] }

// TestCarriedHotPageCollectedInThePause: a hot page (written at every
// collection, so left writable and compared by content) that a snapshot
// collected is carried to the checkpoint stream's view; the stream's
// CollectAhead, while the guest runs, must leave it to the pause. A copy
// taken while the guest runs, with the guest then putting back the bytes
// the page held at the snapshot's collection, was never reported again:
// the backup kept the bytes of the moment of the copy.
func TestCarriedHotPageCollectedInThePause(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "0", "0", "1000") // writes nothing itself
	go m.Run(ctx)
	defer m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil })
	time.Sleep(50 * time.Millisecond)
	var stream []byte
	var gen uint64
	var page uint32
	if err := m.WithPaused(ctx, func(p *Paused) error {
		stream = bytes.Clone(p.Memory())
		page = uint32(len(stream) / dirty.PageSize / 2)
		var err error
		if _, gen, err = p.DirtyPagesDeferred(nil); err != nil {
			return err
		}
		_, err = p.DirtyPages(nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := m.RearmDirty(gen, func(p uint32) []byte { return pageOf(stream, p) }); err != nil {
		t.Fatal(err)
	}
	// The guest's writes, made from here while it runs.
	mem := m.alloc.memory().Bytes()
	write := func(v uint64) { binary.LittleEndian.PutUint64(pageOf(mem, page), v) }
	snapshotPause := func() {
		t.Helper()
		if err := m.WithPaused(ctx, func(p *Paused) error { _, err := p.DirtyPages(nil); return err }); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 6 { // written between six collections in a row: hot
		write(uint64(100 + i))
		snapshotPause()
	}
	write(1000)
	snapshotPause() // carries the page to the stream
	write(2000)
	if _, ok, err := m.CollectAhead(nil, func(mem []byte, pages []uint32) error {
		for _, p := range pages {
			copy(pageOf(stream, p), pageOf(mem, p))
		}
		return nil
	}); err != nil || !ok {
		t.Fatalf("CollectAhead: ok %v, %v", ok, err)
	}
	write(1000) // back to what the snapshot's collection saw
	if err := m.WithPaused(ctx, func(p *Paused) error {
		pages, _, err := p.DirtyPagesDeferred(nil)
		for _, q := range pages {
			copy(pageOf(stream, q), pageOf(p.Memory(), q))
		}
		if !bytes.Equal(pageOf(stream, page), pageOf(p.Memory(), page)) {
			t.Errorf("the stream's copy of hot page %d holds %x, the memory %x (pages of the pause: %v)",
				page, pageOf(stream, page)[:8], pageOf(p.Memory(), page)[:8], pages)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// TestFailedSnapshotKeepsItsPages: the pages collected for an incremental
// snapshot that does not become the chain's tip — its file could not be
// written, its caller gave up before the pause, or it was only captured
// (Capture) — are in the next incremental, which builds on the same
// parent: they were protected again, so the kernel reports them no more.
func TestFailedSnapshotKeepsItsPages(t *testing.T) {
	for _, how := range []string{"write fails", "caller gives up", "captured only"} {
		t.Run(how, func(t *testing.T) {
			ctx := context.Background()
			m := newDirtier(t, "8", "0", "0", "1000") // writes nothing itself
			go m.Run(ctx)
			defer m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil })
			time.Sleep(50 * time.Millisecond)
			dir := t.TempDir()
			base, err := m.Snapshot(ctx, filepath.Join(dir, "0.snap"), SnapshotOptions{})
			if err != nil {
				t.Fatal(err)
			}
			img := make([]byte, base.MemorySize)
			for _, pg := range base.Pages {
				copy(img[int(pg.Index)*dirty.PageSize:], pg.Data)
			}
			mem := m.alloc.memory().Bytes()
			page := uint32(len(mem) / dirty.PageSize / 2)
			binary.LittleEndian.PutUint64(pageOf(mem, page), 0xfeedface)
			inc := SnapshotOptions{Incremental: true}
			switch how {
			case "write fails":
				if _, err := m.Snapshot(ctx, filepath.Join(dir, "no such dir", "1.snap"), inc); err == nil {
					t.Fatal("a snapshot into a missing directory was written")
				}
			case "caller gives up":
				// Until the caller's end wins over the pause (the page
				// was collected ahead either way).
				for {
					c, cancel := context.WithCancel(ctx)
					cancel()
					if _, err := m.Snapshot(c, filepath.Join(dir, "1.snap"), inc); err != nil {
						break
					}
					m.snaps.lastID = base.ID // it was written: build on the base again
					binary.LittleEndian.PutUint64(pageOf(mem, page), uint64(time.Now().UnixNano()))
				}
			case "captured only":
				s, err := m.Capture(ctx, inc)
				if err != nil || s.Parent != base.ID {
					t.Fatalf("Capture: %v, parent %v", err, s.Parent)
				}
			}
			next, err := m.Snapshot(ctx, filepath.Join(dir, "2.snap"), inc)
			if err != nil {
				t.Fatal(err)
			}
			if next.Parent != base.ID {
				t.Fatalf("the incremental builds on %v, not on the base %v", next.Parent, base.ID)
			}
			for _, pg := range next.Pages {
				copy(img[int(pg.Index)*dirty.PageSize:], pg.Data)
			}
			if !bytes.Equal(pageOf(img, page), pageOf(mem, page)) {
				t.Errorf("base + incremental (%d pages) restore page %d as %x, the memory holds %x",
					len(next.Pages), page, pageOf(img, page)[:8], pageOf(mem, page)[:8])
			}
		})
	}
}
