package snapshot

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// HugeBuffer returns n bytes in transparent huge pages where the kernel
// grants them (THP in "madvise" mode, as on Debian), not faulted in: its
// caller populates them (populate) or lets its writes fault them in. On a
// VM with shadow paging a fresh 4 KiB page costs 7–14 µs to fault in,
// populated or touched, while a 2 MiB page costs about 0.25 µs per 4 KiB of
// it (measured on this project's machine, 64 MiB each way): staging a
// heap's growth, or decoding it on a backup, is dominated by those faults
// otherwise. The memory is an ordinary Go allocation, aligned inside a
// larger one and marked MADV_HUGEPAGE, so the garbage collector still owns
// it; memory the heap reuses is resident already and is not faulted at
// all. Below hugeMin it is an ordinary slice.
func HugeBuffer(n int) []byte {
	if n < hugeMin {
		return make([]byte, n)
	}
	raw := make([]byte, n+hugeSize)
	off := (hugeSize - int(uintptr(unsafe.Pointer(&raw[0]))%hugeSize)) % hugeSize
	b := raw[off : off+n : off+n]
	_ = unix.Madvise(b[:n&^(hugeSize-1)], unix.MADV_HUGEPAGE)
	return b
}

// hugeSize is the transparent huge page of x86-64 and arm64 (4 KiB base
// pages).
const hugeSize = 2 << 20

// hugeMin is the least HugeBuffer puts in huge pages: one whole huge page.
const hugeMin = hugeSize
