package snapshot

import (
	"os"
	"strings"
	"testing"
	"unsafe"

	"github.com/ftvm/ftvm/internal/procmaps"
)

// TestHugeBufferIsEligibleForHugePages: staging chunks and large decoded
// batches are whole 2 MiB-aligned huge pages of a mapping the kernel may
// back with transparent huge pages (where THP is not off), and exactly as
// long as asked.
func TestHugeBufferIsEligibleForHugePages(t *testing.T) {
	mode, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil || strings.Contains(string(mode), "[never]") {
		t.Skip("transparent huge pages are off here")
	}
	b := new(StagePool).newChunk(stageChunkBytes, false).b
	if len(b) != stageChunkBytes || cap(b) != stageChunkBytes {
		t.Fatalf("len %d cap %d, want %d", len(b), cap(b), stageChunkBytes)
	}
	addr := uintptr(unsafe.Pointer(&b[0]))
	if addr%hugeSize != 0 {
		t.Fatalf("chunk at %#x is not 2 MiB-aligned", addr)
	}
	if !thpEligible(t, addr) {
		t.Fatalf("the mapping holding the chunk at %#x is not THP-eligible", addr)
	}
	if small := HugeBuffer(PageSize * 16); len(small) != PageSize*16 {
		t.Fatalf("a small buffer has %d bytes", len(small))
	}
}

// thpEligible reads the THPeligible line of the mapping containing addr in
// /proc/self/smaps.
func thpEligible(t *testing.T, addr uintptr) bool {
	lines, found, err := procmaps.Mapping(addr)
	if err != nil {
		t.Skip(err)
	}
	if !found {
		t.Fatalf("no mapping holds %#x", addr)
	}
	return procmaps.Attr(lines, "THPeligible") == "1"
}
