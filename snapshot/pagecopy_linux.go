package snapshot

import (
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// kernelBatch gathers page copies for one process_vm_readv of this
// process: the kernel reads the pages through its own mapping of memory,
// not through this process's page tables.
type kernelBatch struct {
	local    []unix.Iovec
	remote   []unix.RemoteIovec
	dst, src [][]byte
}

// maxIovecs is the kernel's limit of iovecs a call (IOV_MAX).
const maxIovecs = 1024

func newKernelBatch() *kernelBatch {
	return &kernelBatch{local: make([]unix.Iovec, 0, maxIovecs), remote: make([]unix.RemoteIovec, 0, maxIovecs),
		dst: make([][]byte, 0, maxIovecs), src: make([][]byte, 0, maxIovecs)}
}

// add queues a copy of src into dst (both PageSize bytes) and reports
// whether the batch is full.
func (b *kernelBatch) add(dst, src []byte) bool {
	b.local = append(b.local, unix.Iovec{Base: &dst[0], Len: PageSize})
	b.remote = append(b.remote, unix.RemoteIovec{Base: uintptr(unsafe.Pointer(&src[0])), Len: PageSize})
	b.dst, b.src = append(b.dst, dst), append(b.src, src)
	return len(b.local) == maxIovecs
}

func (b *kernelBatch) len() int { return len(b.local) }

// testKernelCap, if positive, bounds the pages a call asks of the kernel
// (tests: the rest is left to finishByHand).
var testKernelCap int

// copy makes the batch's copies through the kernel and returns how many
// of them, from the first, are complete.
func (b *kernelBatch) copy() int {
	local, remote := b.local, b.remote
	if testKernelCap > 0 && len(local) > testKernelCap {
		local, remote = local[:testKernelCap], remote[:testKernelCap]
	}
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err != nil {
		kernelBroken.Store(true)
		return 0
	}
	// The kernel copies in order and stops at the first page it cannot
	// read.
	return n / PageSize
}

// finishByHand copies with memcpy the pages from done on.
func (b *kernelBatch) finishByHand(done int) {
	for i := done; i < len(b.dst); i++ {
		copy(b.dst[i], b.src[i])
	}
}

func (b *kernelBatch) reset() {
	clear(b.dst)
	clear(b.src)
	b.local, b.remote, b.dst, b.src = b.local[:0], b.remote[:0], b.dst[:0], b.src[:0]
}

var (
	pid          = os.Getpid()
	kernelBroken atomic.Bool
	kernelProbe  sync.Once
)

// kernelCopyWorks reports whether process_vm_readv of this process works
// here: tried once, and a failure later turns it off for good.
func kernelCopyWorks() bool {
	kernelProbe.Do(func() {
		a, b := [8]byte{1}, [8]byte{}
		local := []unix.Iovec{{Base: &b[0], Len: uint64(len(b))}}
		remote := []unix.RemoteIovec{{Base: uintptr(unsafe.Pointer(&a[0])), Len: len(a)}}
		if n, err := unix.ProcessVMReadv(pid, local, remote, 0); err != nil || n != len(b) || b[0] != 1 {
			kernelBroken.Store(true)
		}
	})
	return !kernelBroken.Load()
}
