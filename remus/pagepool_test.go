package remus

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
)

// TestPageMem: a checkpoint's pool memory goes back to the pool only when
// its last holder lets go, and is then what the next checkpoint gets; a
// release too many panics rather than hand memory still in use to another.
func TestPageMem(t *testing.T) {
	var p pagePool
	m := p.newMem()
	a := m.alloc(3 * snapshot.PageSize)
	big := m.alloc((poolMaxPages + 1) * snapshot.PageSize) // not the pool's
	if len(a) != 3*snapshot.PageSize || cap(a) != 4*snapshot.PageSize || len(m.bufs) != 1 {
		t.Fatalf("alloc: len %d cap %d, %d pooled buffers", len(a), cap(a), len(m.bufs))
	}
	if len(big) != (poolMaxPages+1)*snapshot.PageSize {
		t.Fatalf("large alloc: len %d", len(big))
	}
	a[0] = 7
	m.hold() // a pending copy
	m.hold() // a persist job
	m.release()
	m.release()
	if p.bytes != 0 {
		t.Fatalf("memory back in the pool with a holder left: %d bytes", p.bytes)
	}
	if b := p.newMem().alloc(4 * snapshot.PageSize); &b[0] == &a[0] {
		t.Fatal("memory still held was handed out again")
	}
	m.release()
	if p.bytes != 4*snapshot.PageSize {
		t.Fatalf("after the last release the pool holds %d bytes, want %d", p.bytes, 4*snapshot.PageSize)
	}
	if b := p.newMem().alloc(3 * snapshot.PageSize); &b[0] != &a[0] {
		t.Fatal("released memory was not reused for a buffer of its class")
	}
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "too many") {
			t.Fatalf("a release too many: %v", r)
		}
	}()
	m.release()
}

// TestPoolClasses: every size up to poolMaxPages pages gets the smallest
// class that holds it, and the classes grow.
func TestPoolClasses(t *testing.T) {
	prev := 0
	for pages := 1; pages <= poolMaxPages; pages++ {
		c, ok := poolClass(pages * snapshot.PageSize)
		if !ok || c >= poolClasses || classBytes(c) < pages*snapshot.PageSize {
			t.Fatalf("%d pages: class %d (%v) of %d bytes", pages, c, ok, classBytes(c))
		}
		if c > 0 && classBytes(c-1) >= pages*snapshot.PageSize {
			t.Fatalf("%d pages: class %d, but class %d holds them", pages, c, c-1)
		}
		if classBytes(c) < prev {
			t.Fatalf("class sizes shrink at %d pages", pages)
		}
		prev = classBytes(c)
		if back, _ := poolClass(classBytes(c)); back != c {
			t.Fatalf("a buffer of class %d is put back as class %d", c, back)
		}
	}
	if _, ok := poolClass((poolMaxPages + 1) * snapshot.PageSize); ok {
		t.Fatal("a buffer past poolMaxPages is pooled")
	}
}

// TestPagePoolBound: the pool keeps at most poolMaxBytes of free memory.
func TestPagePoolBound(t *testing.T) {
	var p pagePool
	var ms []*pageMem
	for range 2 * poolMaxBytes / (poolMaxPages * snapshot.PageSize) {
		m := p.newMem()
		m.alloc(poolMaxPages * snapshot.PageSize)
		ms = append(ms, m)
	}
	for _, m := range ms {
		m.release()
	}
	if p.bytes > poolMaxBytes {
		t.Fatalf("the pool keeps %d bytes, more than %d", p.bytes, poolMaxBytes)
	}
}

// TestPersistQueueCompacts: checkpoints queued for a disk that has fallen
// behind are merged once they pass persistCompactAt: the queue then holds
// the latest copy of each page (what the persister would have stored) and
// the disk ops of all, in order, and gives the checkpoints' pool memory
// back, so it stays about the size of the pages written, not of every
// checkpoint queued.
func TestPersistQueueCompacts(t *testing.T) {
	defer func(n int) { persistCompactAt = n }(persistCompactAt)
	persistCompactAt = 64 * snapshot.PageSize
	var pool pagePool
	q := newPersistQueue()
	full := &snapshot.Snapshot{Kind: snapshot.Full, MemorySize: 1 << 20}
	q.push(persistJob{seq: 1, full: true, snap: full})
	want := map[uint32]byte{}
	var wantOps []string
	for seq := uint64(2); seq < 200; seq++ {
		mem := pool.newMem()
		const n = 10
		buf := mem.alloc(n * snapshot.PageSize)
		snap := &snapshot.Snapshot{Kind: snapshot.Incremental, Seq: seq, MemorySize: 1 << 20, Stack: []byte{byte(seq)}}
		for i := range n {
			idx := uint32((int(seq)*7 + i*13) % 50) // 50 pages written again and again
			if slices.ContainsFunc(snap.Pages, func(p snapshot.Page) bool { return p.Index == idx }) {
				continue
			}
			d := buf[i*snapshot.PageSize : (i+1)*snapshot.PageSize]
			for k := range d {
				d[k] = byte(seq)
			}
			snap.Pages = append(snap.Pages, snapshot.Page{Index: idx, Data: d})
			want[idx] = byte(seq)
		}
		snapshot.SortPages(snap.Pages)
		op := fmt.Sprintf("op%d", seq)
		wantOps = append(wantOps, op)
		q.push(persistJob{seq: seq, snap: snap, mem: mem, ops: []wire.FsOp{{Path: op}}})
		// At most the threshold, or twice the 50 pages a compaction
		// leaves, and one more checkpoint (in a buffer of 16 pages).
		if bound := max(persistCompactAt, 2*50*snapshot.PageSize) + poolStep*snapshot.PageSize; q.pending > bound {
			t.Fatalf("after checkpoint %d the queue holds %d bytes, more than %d", seq, q.pending, bound)
		}
	}
	// Not at every push: a compacted queue past the threshold doubles
	// before it is compacted again.
	if q.compactions == 0 || q.compactions > 100 {
		t.Fatalf("%d compactions for 198 checkpoints", q.compactions)
	}
	if pool.bytes == 0 {
		t.Fatal("no checkpoint's memory went back to the pool")
	}
	jobs, _ := q.take()
	if len(jobs) < 2 || !jobs[0].full || jobs[0].snap != full {
		t.Fatalf("%d jobs; the full checkpoint first: %v", len(jobs), len(jobs) > 0 && jobs[0].full)
	}
	got := map[uint32]byte{}
	var gotOps []string
	for _, j := range jobs[1:] {
		for _, p := range j.snap.Pages {
			if slices.ContainsFunc(p.Data, func(b byte) bool { return b != p.Data[0] }) {
				t.Fatalf("page %d mixes checkpoints", p.Index)
			}
			got[p.Index] = p.Data[0]
		}
		for _, op := range j.ops {
			gotOps = append(gotOps, op.Path)
		}
	}
	if !maps.Equal(got, want) {
		t.Fatalf("queued pages: got %v, want %v", got, want)
	}
	if !slices.Equal(gotOps, wantOps) {
		t.Fatalf("disk ops: got %d, want %d in order", len(gotOps), len(wantOps))
	}
	if last := jobs[len(jobs)-1]; last.seq != 199 || last.snap.Stack[0] != 199 || jobs[1].first() != 2 {
		t.Fatalf("batch %d-%d with the state of %d, want 2-199 with 199's", jobs[1].first(), last.seq, last.snap.Stack[0])
	}
}
