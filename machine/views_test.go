package machine

import (
	"bytes"
	"context"
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
