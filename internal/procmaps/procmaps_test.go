package procmaps

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestMappingFollowsMmapAndMunmap(t *testing.T) {
	b, err := unix.Mmap(-1, 0, 3*4096, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	addr := uintptr(unsafe.Pointer(&b[0]))
	lines, found, err := Mapping(addr + 4096)
	if err != nil {
		t.Skip(err)
	}
	// Read-only, so that the kernel merges it with no neighbour.
	if !found || Attr(lines, "Size") != "12 kB" || Attr(lines, "Rss") != "0 kB" {
		t.Fatalf("mapping of %#x: found %v, Size %q, Rss %q", addr, found, Attr(lines, "Size"), Attr(lines, "Rss"))
	}
	if err := unix.Munmap(b); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := Mapping(addr); found {
		t.Fatalf("%#x is still mapped after munmap", addr)
	}
}
