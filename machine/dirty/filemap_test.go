package dirty

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A restored VM's memory may be a private (copy-on-write) mapping of a
// snapshot file, moved into the guest's reservation with mremap: the
// kernel tracker must report exactly the pages written there too, and
// never the ones only read.
func TestUffdTracksPrivateFileMapping(t *testing.T) {
	if err := Probe(); err != nil {
		t.Skip(err)
	}
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "mem")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	region, err := unix.Mmap(-1, 0, 4*size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(region)
	// Map the file over the start of a reservation, then move it into
	// another one, as a restore does.
	staging, err := unix.Mmap(-1, 0, 4*size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(staging)
	if _, _, e := unix.Syscall6(unix.SYS_MMAP, uintptr(unsafe.Pointer(&staging[0])), size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_FIXED, f.Fd(), 0); e != 0 {
		t.Fatal(e)
	}
	_ = staging[4096*3] // populate one page before the move
	if _, _, e := unix.Syscall6(unix.SYS_MREMAP, uintptr(unsafe.Pointer(&staging[0])), size, size,
		unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(unsafe.Pointer(&region[0])), 0); e != 0 {
		t.Fatal(e)
	}
	tr, err := New(region, Options{Used: size, FileBacked: size})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Kind() != KindUffd {
		t.Fatalf("fell back: %s", tr.Reason())
	}
	var sum byte
	for i := 0; i < size; i += 4096 * 3 {
		sum += region[i]
	}
	if !slices.Equal(region[:size], data) {
		t.Fatal("mapped memory differs from the file")
	}
	writes := []uint32{0, 5, 77, 1500, 2047, 2048 + 10}
	for _, p := range writes {
		region[int(p)*4096+100]++
	}
	got, err := tr.Collect(nil, 2*size)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, writes) {
		t.Fatalf("written %v, reported %v", writes, got)
	}
	region[4096*9]++
	region[4096*5]++
	got, _ = tr.Collect(nil, 2*size)
	if !slices.Equal(got, []uint32{5, 9}) {
		t.Fatalf("second round reported %v", got)
	}
	// The file itself is untouched.
	back, _ := os.ReadFile(path)
	if !slices.Equal(back, data) {
		t.Fatal("writes reached the file")
	}
	_ = sum
}
