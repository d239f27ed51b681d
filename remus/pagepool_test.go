package remus

import (
	"strings"
	"testing"

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
