package machine

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/ftvm/ftvm/machine/dirty"
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
	// beforeFree runs before the region is unmapped: it closes the dirty
	// tracker, which another goroutine may be using to read the region
	// (Machine.RearmDirty) when the guest exits.
	beforeFree func()
	// onGrow, if set, is told of every growth (Machine.OnMemoryGrow).
	onGrow *atomic.Pointer[func(oldBytes, newBytes uint64)]
	// fileBacked is how many bytes at the start are a private mapping of
	// a snapshot file (a mappable restore), for the dirty tracker.
	fileBacked uint64
}

func newLinearMemory(max, limit uint64) *linearMemory {
	if limit > 0 && limit < max {
		max = limit
	}
	m := &linearMemory{limit: limit}
	if max == 0 {
		return m
	}
	region, err := reserve(int(max))
	if err != nil {
		m.failed = err
		return m
	}
	m.region = region
	// Transparent huge pages where the kernel grants them and they keep
	// the dirty tracker's 4 KiB granularity (a write to a protected huge
	// page splits it): on a VM with shadow paging a guest's first touch of
	// its memory costs 7-14 µs a 4 KiB page in small pages, about 0.3 in
	// huge ones (256 MiB: 31 ms instead of 143), and a checkpoint's walk
	// of the page tables passes a huge page nobody wrote since the last
	// one in one step instead of 512 (256 MiB with one page written: 34
	// µs instead of 174).
	if !dirty.HugePagesCoarsen() {
		_ = unix.Madvise(region, unix.MADV_HUGEPAGE)
	}
	return m
}

// reserve maps n bytes of private anonymous memory, reserved only (pages
// cost nothing until written), starting on a 2 MiB boundary: a memory
// image and the VM memory it is moved into (MemoryImage.moveInto) then
// share their alignment, so mremap(2) can move an image's huge pages whole.
//
// Its mappings are released with unmap, not unix.Munmap, which unmaps only
// a slice exactly as unix.Mmap returned it (and otherwise fails, leaving
// the mapping in place).
func reserve(n int) ([]byte, error) {
	p, err := unix.MmapPtr(-1, 0, nil, uintptr(n+hugePage), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, err
	}
	raw := unsafe.Slice((*byte)(p), n+hugePage)
	off := (hugePage - int(uintptr(p)%hugePage)) % hugePage
	unmap(raw[:off])
	unmap(raw[off+n:])
	return raw[off : off+n : off+n], nil
}

// unmap releases the pages of b, a part of a mapping made by reserve.
func unmap(b []byte) {
	if len(b) > 0 {
		_ = unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b)))
	}
}

// hugePage is the transparent huge page (x86-64, arm64 with 4 KiB pages).
const hugePage = 2 << 20

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
	old := m.size.Swap(size)
	if m.onGrow != nil && size > old {
		if f := m.onGrow.Load(); f != nil {
			(*f)(old, size)
		}
	}
	return m.region[:size:size]
}

// Free implements experimental.LinearMemory.
func (m *linearMemory) Free() {
	if m.beforeFree != nil {
		m.beforeFree()
	}
	if m.region != nil {
		unmap(m.region)
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
	mem    atomic.Pointer[linearMemory]
	onGrow atomic.Pointer[func(oldBytes, newBytes uint64)]
}

func (a *allocator) Allocate(cap, max uint64) experimental.LinearMemory {
	m := newLinearMemory(max, a.limit)
	m.onGrow = &a.onGrow
	a.mem.Store(m)
	return m
}

// memory is the guest's linear memory, nil before instantiation.
func (a *allocator) memory() *linearMemory { return a.mem.Load() }

// MemoryImage is guest memory kept outside any VM, in a reservation of the
// same kind as a VM's linear memory, so that a VM restored from it takes its
// pages over with mremap(2) — moving page tables, not bytes — instead of
// copying them. A Remus backup keeps the last committed checkpoint's memory
// in one, so failover costs no bulk copy.
type MemoryImage struct {
	region []byte
	size   int
	// mapped is how many bytes at the start of the region are a private
	// mapping of a snapshot file (MapFile) rather than anonymous memory.
	mapped int
}

// NewMemoryImage reserves room for max bytes (0: the wasm limit, 4 GiB).
// Pages cost nothing until written.
func NewMemoryImage(max uint64) (*MemoryImage, error) {
	if max == 0 {
		max = 1 << 32
	}
	region, err := reserve(int(max))
	if err != nil {
		return nil, fmt.Errorf("reserving %s for a memory image: %w", FormatSize(max), err)
	}
	// Transparent huge pages where the kernel grants them (THP in
	// "madvise" mode): a restore decodes a whole memory into the image and
	// a Remus backup applies every checkpoint to it, and on a VM with
	// shadow paging a fresh 4 KiB page costs 7-14 µs to fault in, a huge
	// one about 0.3 µs per 4 KiB of it (a 64 MiB compressed restore took
	// 74-78 ms instead of 193-214). The VM that takes the pages over still
	// tracks them 4 KiB at a time: a write after write-protection splits
	// the huge page it falls in.
	_ = unix.Madvise(region, unix.MADV_HUGEPAGE)
	return &MemoryImage{region: region}, nil
}

// Resize makes the image n bytes long and returns it. With fresh, every
// byte is zero afterwards (a full snapshot replaces the memory); otherwise
// the first bytes are kept and growth reads as zeros. It returns nil if n
// is beyond the reservation or the image was taken over.
func (im *MemoryImage) Resize(n int, fresh bool) []byte {
	if im.region == nil || n < 0 || n > len(im.region) {
		return nil
	}
	if fresh {
		im.discard(0, im.size)
	} else if n < im.size {
		im.discard(n, im.size)
	}
	im.size = n
	return im.region[:n:n]
}

// discard zeroes [from, to), giving whole pages back to the kernel. Bytes
// beyond the image's size are always zero, so rounding to up pages is safe.
// Pages of a mapped file are replaced by anonymous ones (dropping them
// would bring the file's contents back, not zeros).
func (im *MemoryImage) discard(from, to int) {
	const page = 4096
	head := min((from+page-1)&^(page-1), to)
	clear(im.region[from:head])
	if to <= head {
		return
	}
	if im.mapped > head {
		end := im.mapped
		if err := anonymousAt(im.region[head:end]); err != nil {
			clear(im.region[head:end]) // still correct, only not given back
		} else {
			im.mapped = head
		}
	}
	if err := unix.Madvise(im.region[head:to], unix.MADV_DONTNEED); err != nil {
		clear(im.region[head:to])
	}
}

// anonymousAt replaces the pages of b with fresh anonymous (zero) ones.
func anonymousAt(b []byte) error {
	_, _, errno := unix.Syscall6(unix.SYS_MMAP, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE|unix.MAP_FIXED, ^uintptr(0), 0)
	if errno != 0 {
		return errno
	}
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE) // as the rest of the image
	return nil
}

// MapFile makes the image n bytes long with, as its contents, the n bytes
// of f at off, mapped copy-on-write (MAP_PRIVATE): nothing is read or
// copied until the memory is used, and writes never reach the file. It is
// snapshot.Image.Map for a restore from a mappable snapshot. The file must
// not be truncated while the memory is in use (a page beyond its end
// would fault with SIGBUS); replacing or renaming it is harmless. off and n
// must be multiples of the page size.
func (im *MemoryImage) MapFile(f *os.File, off int64, n int) ([]byte, error) {
	const page = 4096
	if im.region == nil || n < 0 || n > len(im.region) || n%page != 0 || off%page != 0 {
		return nil, fmt.Errorf("cannot map %d bytes at file offset %d into a memory image of %s", n, off, FormatSize(uint64(len(im.region))))
	}
	im.discard(0, im.size)
	im.size = 0
	if n > 0 {
		_, _, errno := unix.Syscall6(unix.SYS_MMAP, uintptr(unsafe.Pointer(&im.region[0])), uintptr(n),
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED, f.Fd(), uintptr(off))
		if errno != 0 {
			return nil, fmt.Errorf("mapping %s of %s: %w", FormatSize(uint64(n)), f.Name(), errno)
		}
	}
	im.size, im.mapped = n, n
	return im.region[:n:n], nil
}

// Bytes is the image's memory, aliased.
func (im *MemoryImage) Bytes() []byte {
	if im.region == nil {
		return nil
	}
	return im.region[:im.size:im.size]
}

// Close releases the image.
func (im *MemoryImage) Close() {
	if im.region != nil {
		unmap(im.region)
		im.region = nil
	}
}

// moveInto moves the image's pages onto dst (which must be at least as
// long, page aligned, an anonymous private mapping) in place of dst's own.
// The image is empty and unusable afterwards.
func (im *MemoryImage) moveInto(dst []byte) error {
	n := im.size
	if im.region == nil || n > len(dst) {
		return errors.New("the memory image is gone or larger than the VM's memory")
	}
	// mremap moves one mapping at a time: a mapped file's part, then the
	// anonymous rest.
	parts := [][2]int{{0, n}}
	if m := min(im.mapped, n); m > 0 && m < n {
		parts = [][2]int{{0, m}, {m, n}}
	}
	for _, p := range parts {
		if p[1] == p[0] {
			continue
		}
		_, _, errno := unix.Syscall6(unix.SYS_MREMAP, uintptr(unsafe.Pointer(&im.region[p[0]])), uintptr(p[1]-p[0]), uintptr(p[1]-p[0]),
			unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(unsafe.Pointer(&dst[p[0]])), 0)
		if errno != 0 {
			return fmt.Errorf("mremap of %s of memory: %w", FormatSize(uint64(p[1]-p[0])), errno)
		}
	}
	// The first n bytes are gone from the reservation; release the rest.
	unmap(im.region[n:])
	im.region, im.size, im.mapped = nil, 0, 0
	return nil
}
