package machine

import (
	"testing"
	"unsafe"

	"github.com/ftvm/ftvm/internal/procmaps"
)

// mapped reports whether addr lies in a mapping of this process.
func mapped(t *testing.T, addr uintptr) bool {
	t.Helper()
	_, found, err := procmaps.Mapping(addr)
	if err != nil {
		t.Skip(err)
	}
	return found
}

// TestMemoryReservationsAreReleased: a VM's memory and a memory image
// start on a 2 MiB boundary (so an image's huge pages move whole into the
// VM), and every byte of their reservations is given back: when the VM's
// memory is freed, when an image is closed, and, once an image's pages
// moved into a VM, the rest of the image's reservation. (unix.Munmap
// unmaps only slices exactly as unix.Mmap made them; the rest of a moved
// image's 4 GiB reservation once stayed mapped.)
func TestMemoryReservationsAreReleased(t *testing.T) {
	const size = 64 << 20
	vm := newLinearMemory(size, 0)
	if vm.failed != nil {
		t.Fatal(vm.failed)
	}
	vmAt := uintptr(unsafe.Pointer(&vm.region[0]))
	im, err := NewMemoryImage(size)
	if err != nil {
		t.Fatal(err)
	}
	imAt := uintptr(unsafe.Pointer(&im.region[0]))
	for _, a := range []uintptr{vmAt, imAt} {
		if a%hugePage != 0 {
			t.Fatalf("reservation at %#x is not 2 MiB-aligned", a)
		}
		if !mapped(t, a) || !mapped(t, a+size-1) {
			t.Fatalf("reservation at %#x is not mapped", a)
		}
	}

	mem := im.Resize(8<<20, false)
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = byte(i >> 12)
	}
	if err := im.moveInto(vm.region); err != nil {
		t.Fatal(err)
	}
	if mapped(t, imAt+size-1) {
		t.Fatal("the rest of a moved image's reservation is still mapped")
	}
	for i := 0; i < 8<<20; i += 4096 {
		if vm.region[i] != byte(i>>12) {
			t.Fatalf("page %d did not move", i>>12)
		}
	}
	vm.Free()
	if mapped(t, vmAt) || mapped(t, vmAt+size-1) {
		t.Fatal("a freed VM memory is still mapped")
	}

	im2, err := NewMemoryImage(size)
	if err != nil {
		t.Fatal(err)
	}
	at := uintptr(unsafe.Pointer(&im2.region[0]))
	im2.Close()
	if mapped(t, at) {
		t.Fatal("a closed memory image is still mapped")
	}
}
