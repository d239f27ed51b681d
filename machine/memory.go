package machine

import (
	"sync/atomic"

	"github.com/tetratelabs/wazero/experimental"
	"golang.org/x/sys/unix"
)

// linearMemory backs a guest's linear memory with our own anonymous mapping,
// reserved once at its maximum size so that the buffer never moves: the
// machine can hand its address to the kernel for dirty tracking and copy
// pages from it while the guest is paused. Pages cost nothing until touched.
type linearMemory struct {
	region []byte
	size   atomic.Uint64
	// limit is the --memory-limit in bytes; growth beyond it is refused.
	limit uint64
	// refused records the size of the largest growth refused by the limit.
	refused atomic.Uint64
	failed  error
}

func newLinearMemory(max, limit uint64) *linearMemory {
	if limit > 0 && limit < max {
		max = limit
	}
	m := &linearMemory{limit: limit}
	if max == 0 {
		return m
	}
	region, err := unix.Mmap(-1, 0, int(max), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		m.failed = err
		return m
	}
	m.region = region
	return m
}

// Reallocate implements experimental.LinearMemory. Returning nil makes the
// guest's memory.grow fail with -1, as a real allocation failure would.
func (m *linearMemory) Reallocate(size uint64) []byte {
	if m.limit > 0 && size > m.limit {
		for {
			old := m.refused.Load()
			if size <= old || m.refused.CompareAndSwap(old, size) {
				break
			}
		}
		return nil
	}
	if size > uint64(len(m.region)) {
		return nil
	}
	m.size.Store(size)
	return m.region[:size:size]
}

// Free implements experimental.LinearMemory.
func (m *linearMemory) Free() {
	if m.region != nil {
		unix.Munmap(m.region)
		m.region = nil
	}
}

// Bytes is the memory's current contents, aliased.
func (m *linearMemory) Bytes() []byte { return m.region[:m.size.Load()] }

// allocator hands out linearMemory and remembers the last one: a WASI
// command module has exactly one memory.
type allocator struct {
	limit uint64
	// mem is set on the guest goroutine and read by Info on others.
	mem atomic.Pointer[linearMemory]
}

func (a *allocator) Allocate(cap, max uint64) experimental.LinearMemory {
	m := newLinearMemory(max, a.limit)
	a.mem.Store(m)
	return m
}

// memory is the guest's linear memory, nil before instantiation.
func (a *allocator) memory() *linearMemory { return a.mem.Load() }
