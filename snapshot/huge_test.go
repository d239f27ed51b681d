package snapshot

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// TestHugeAllocIsEligibleForHugePages: staging chunks and large decoded
// batches are whole 2 MiB-aligned huge pages of a mapping the kernel may
// back with transparent huge pages (where THP is not off), and exactly as
// long as asked.
func TestHugeAllocIsEligibleForHugePages(t *testing.T) {
	mode, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil || strings.Contains(string(mode), "[never]") {
		t.Skip("transparent huge pages are off here")
	}
	b := hugeAlloc(stageChunkBytes)
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
	if small := hugeAlloc(PageSize * 16); len(small) != PageSize*16 {
		t.Fatalf("a small buffer has %d bytes", len(small))
	}
}

// thpEligible reads the THPeligible line of the mapping containing addr in
// /proc/self/smaps.
func thpEligible(t *testing.T, addr uintptr) bool {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var lo, hi uintptr
		if n, _ := parseRange(line, &lo, &hi); n == 2 {
			in = lo <= addr && addr < hi
			continue
		}
		if in && strings.HasPrefix(line, "THPeligible:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "THPeligible:")) == "1"
		}
	}
	t.Fatalf("no mapping holds %#x", addr)
	return false
}

// parseRange parses a smaps mapping line's "lo-hi" range.
func parseRange(line string, lo, hi *uintptr) (int, error) {
	rng, _, ok := strings.Cut(line, " ")
	if !ok {
		return 0, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, nil
	}
	x, err1 := strconv.ParseUint(a, 16, 64)
	y, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, nil
	}
	*lo, *hi = uintptr(x), uintptr(y)
	return 2, nil
}
