package wasi

import (
	"encoding/binary"
	"io"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestWriteOfOverlappingIovecsIsBounded: iovecs may overlap, so 1,024 of
// them each naming the whole memory asked one fd_write to gather 1,024
// times the guest's memory into a host buffer (a 64 MiB guest: 64 GiB, the
// host killed), and the count returned wrapped at 4 GiB. A call moves at
// most maxIOBytes: a partial write, as POSIX allows.
func TestWriteOfOverlappingIovecsIsBounded(t *testing.T) {
	d, err := New(Config{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	mem := make([]byte, 1<<20)
	for i := range maxIovecs {
		binary.LittleEndian.PutUint32(mem[i*8:], 0)
		binary.LittleEndian.PutUint32(mem[i*8+4:], uint32(len(mem)))
	}
	res := uint32(len(mem) - 4)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if errno := fdWrite(d, NewMem(mem), []uint64{1, 0, maxIovecs, uint64(res)}); errno != ESUCCESS {
		t.Fatalf("fd_write: %v", errno)
	}
	runtime.ReadMemStats(&after)
	written := binary.LittleEndian.Uint32(mem[res:])
	if written != maxIOBytes {
		t.Fatalf("wrote %d bytes of 1,024 iovecs of 1 MiB, want %d (a partial write)", written, maxIOBytes)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 2*maxIOBytes {
		t.Fatalf("the host allocated %d MiB for one write of a 1 MiB guest", grew>>20)
	}
}

// TestPollOfA4GiBMemory: a memory of 65,536 pages is 4 GiB, whose length
// does not fit a uint32: Len said 0, and every poll_oneoff failed EFAULT.
func TestPollOfA4GiBMemory(t *testing.T) {
	b, err := unix.Mmap(-1, 0, 1<<32, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	if err != nil {
		t.Skipf("mapping 4 GiB: %v", err)
	}
	defer unix.Munmap(b)
	d, err := New(Config{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	sub := b[0x1000:0x1030] // a relative clock of 0 ns
	sub[8] = EventtypeClock
	binary.LittleEndian.PutUint32(sub[16:], ClockMonotonic)
	if errno := pollOneoff(d, NewMem(b), []uint64{0x1000, 0x2000, 1, 0x3000}); errno != ESUCCESS {
		t.Fatalf("poll_oneoff in a 4 GiB memory: %v", errno)
	}
	if n := binary.LittleEndian.Uint32(b[0x3000:]); n != 1 {
		t.Fatalf("%d events", n)
	}
}
