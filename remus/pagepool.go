package remus

import (
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/ftvm/ftvm/snapshot"
)

// pagePool recycles the memory a backup decodes small checkpoints' pages
// into (snapshot.DecodeBytesInto). Measured on a protected KV server's
// checkpoints (about 130 pages, 21 KB encoded): decoding into fresh memory
// took 120 µs, of which the runtime clearing it, the kernel faulting it in
// and the collector freeing it again were most; into recycled memory, 19 µs.
// That time is on the path of every acknowledgement, so of the primary's
// held output.
//
// Buffers hold 1, 2, 4, 8 or 16 pages, then multiples of poolStep pages up
// to poolMaxPages (a checkpoint's 131 pages take a buffer of 144: powers
// of two took 256, and the queue for the disk holds dozens); the pool
// keeps at most poolMaxBytes of free ones.
type pagePool struct {
	mu    sync.Mutex
	free  [poolClasses][][]byte
	bytes int // in free
}

const (
	poolStep     = 16
	poolSmall    = 5 // classes of 1 to 16 pages, powers of two
	poolMaxPages = 256
	poolClasses  = poolSmall + poolMaxPages/poolStep - 1
	poolMaxBytes = 32 << 20
)

// poolClass is the class of a buffer of n bytes (n > 0); ok is false past
// poolMaxPages.
func poolClass(n int) (class int, ok bool) {
	pages := (n + snapshot.PageSize - 1) / snapshot.PageSize
	switch {
	case pages > poolMaxPages:
		return 0, false
	case pages <= poolStep:
		return bits.Len(uint(pages - 1)), true
	}
	return poolSmall - 2 + (pages+poolStep-1)/poolStep, true
}

// classBytes is the size of the buffers of class c.
func classBytes(c int) int {
	if c < poolSmall {
		return snapshot.PageSize << c
	}
	return (c - poolSmall + 2) * poolStep * snapshot.PageSize
}

// get returns n bytes, of any content; pooled reports whether they are the
// pool's (to be put back).
func (p *pagePool) get(n int) (b []byte, pooled bool) {
	c, ok := poolClass(n)
	if !ok {
		return make([]byte, n), false
	}
	p.mu.Lock()
	if k := len(p.free[c]); k > 0 {
		b = p.free[c][k-1]
		p.free[c][k-1] = nil
		p.free[c] = p.free[c][:k-1]
		p.bytes -= cap(b)
	}
	p.mu.Unlock()
	if b == nil {
		b = make([]byte, classBytes(c))
	}
	return b[:n], true
}

// put takes back a buffer get returned as pooled; nothing may use it any
// more.
func (p *pagePool) put(b []byte) {
	c, ok := poolClass(cap(b))
	if !ok || cap(b) != classBytes(c) {
		return
	}
	p.mu.Lock()
	if p.bytes+cap(b) <= poolMaxBytes {
		p.free[c] = append(p.free[c], b[:cap(b)])
		p.bytes += cap(b)
	}
	p.mu.Unlock()
}

// pageMem is the pool's memory one decoded checkpoint's pages are in, and
// how many hold the checkpoint: the staged checkpoint, then its pending
// copy into the image (applying, which deltas resolve against) and its
// persist job. The last to let go gives the memory back. One that never
// does (a checkpoint discarded, a queue closed) only leaves it to the
// collector; giving it back early would let the next checkpoint's pages
// overwrite this one's, so a release too many panics.
type pageMem struct {
	pool *pagePool
	bufs [][]byte
	refs atomic.Int32
}

// newMem starts the memory of one checkpoint, held once (by the staged
// checkpoint).
func (p *pagePool) newMem() *pageMem {
	m := &pageMem{pool: p}
	m.refs.Store(1)
	return m
}

// alloc is the decoder's allocator (one goroutine: the decoder's).
func (m *pageMem) alloc(n int) []byte {
	b, pooled := m.pool.get(n)
	if pooled {
		m.bufs = append(m.bufs, b)
	}
	return b
}

// hold adds a holder; m may be nil (a checkpoint not in pooled memory).
func (m *pageMem) hold() {
	if m != nil {
		m.refs.Add(1)
	}
}

// release drops a holder; the last one returns the memory to the pool.
func (m *pageMem) release() {
	if m == nil {
		return
	}
	switch n := m.refs.Add(-1); {
	case n == 0:
		for _, b := range m.bufs {
			m.pool.put(b)
		}
		m.bufs = nil
	case n < 0:
		panic(fmt.Sprintf("remus: checkpoint page memory released %d times too many", -n))
	}
}
