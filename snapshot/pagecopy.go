package snapshot

import (
	"sync"
	"sync/atomic"
	"time"
)

// pageCopier copies 4 KiB pages out of a memory one at a time (add), and
// takes another road while the ordinary one is slow.
//
// On this project's machines (a VM with shadow paging), reading guest
// pages that the dirty tracker write-protected inside transparent huge
// pages is, in stretches, 15-20 times slower than it should be: groups of
// 16 pages took 4.5-5.5 µs a page against 0.25-0.5 µs, in about 6% of the
// groups of a checkpoint of 7,650 random pages, so about one such
// checkpoint in seven spent 10-40 ms copying what takes 2.3 ms otherwise.
// The same copy from a region tracked alike but in 4 KiB pages, or not
// tracked, never does it; nor does the kernel's own read of those pages
// (process_vm_readv of this process, through the kernel's mapping of
// memory rather than the process's page tables), which costs about twice
// a fast memcpy (docs/MEASUREMENTS.md, "Pauses at 10,000 pages written per
// round"). So the copier memcpys, timing each group of probeEvery pages;
// after two groups in a row slower than slowPerPage a page (one alone is
// an interrupt or a lost core: single groups of 44-92 µs show up in any
// run), it sends the next kernelRun pages through the kernel, then tries
// memcpy again, going back to the kernel at the first slow group, for
// twice as many pages each time (up to maxKernelRun) while the stretch
// lasts, so that the probing costs little in a long one. Where
// the kernel's road is closed (a seccomp filter, say) it stays with
// memcpy. The kernel road's buffers come from a free list, so that only
// the process's first switch allocates.
type pageCopier struct {
	mem []byte
	// memcpy: pages copied in the group being timed, since start; slow
	// groups in a row, and how many make a switch.
	n        int
	start    time.Time
	slow     int
	slowNeed int
	// kernel: pages still to send that way, the length of the next run,
	// and the batch gathered.
	kernelLeft int
	run        int
	batch      *kernelBatch
}

const (
	probeEvery   = 16
	slowPerPage  = 2 * time.Microsecond
	kernelRun    = 256
	maxKernelRun = 4096
)

// pageClock is the copier's clock (tests replace it).
var pageClock = time.Now

// kernelCopied counts the pages copied through the kernel.
var kernelCopied atomic.Uint64

// KernelCopiedPages returns how many pages this process's stagers copied
// through the kernel because memcpy had turned slow.
func KernelCopiedPages() uint64 { return kernelCopied.Load() }

func newPageCopier(mem []byte) pageCopier {
	return pageCopier{mem: mem, start: pageClock(), slowNeed: 2, run: kernelRun}
}

// add copies page x of the memory into dst (PageSize bytes), now or by
// the next flush.
func (c *pageCopier) add(dst []byte, x uint32) {
	src := c.mem[int(x)*PageSize : int(x+1)*PageSize]
	if c.kernelLeft > 0 {
		c.kernelLeft--
		if c.batch.add(dst, src) {
			c.send()
		}
		if c.kernelLeft == 0 {
			c.flush()
			c.n, c.start, c.slow, c.slowNeed = 0, pageClock(), 0, 1
			c.run = min(2*c.run, maxKernelRun)
		}
		return
	}
	copy(dst, src)
	if c.n++; c.n == probeEvery {
		now := pageClock()
		if now.Sub(c.start) <= probeEvery*slowPerPage {
			c.slow, c.slowNeed, c.run = 0, 2, kernelRun
		} else if c.slow++; c.slow >= c.slowNeed && kernelCopyWorks() {
			c.kernelLeft, c.batch = c.run, getKernelBatch()
		}
		c.n, c.start = 0, now
	}
}

// send makes the kernel copies gathered so far.
func (c *pageCopier) send() {
	if c.batch.len() == 0 {
		return
	}
	done := c.batch.copy()
	kernelCopied.Add(uint64(done))
	c.batch.finishByHand(done)
	c.batch.reset()
}

// flush completes the copies added so far, ending a run through the
// kernel if one is on (its buffers go back to the free list).
func (c *pageCopier) flush() {
	if c.batch == nil {
		return
	}
	c.send()
	putKernelBatch(c.batch)
	c.batch, c.kernelLeft = nil, 0
}

// kernelBatches is the free list of the kernel road's buffers.
var kernelBatches struct {
	sync.Mutex
	free []*kernelBatch
}

func getKernelBatch() *kernelBatch {
	kernelBatches.Lock()
	defer kernelBatches.Unlock()
	if n := len(kernelBatches.free); n > 0 {
		b := kernelBatches.free[n-1]
		kernelBatches.free = kernelBatches.free[:n-1]
		return b
	}
	return newKernelBatch()
}

func putKernelBatch(b *kernelBatch) {
	kernelBatches.Lock()
	defer kernelBatches.Unlock()
	kernelBatches.free = append(kernelBatches.free, b)
}
