package snapshot

import (
	"slices"
	"testing"
)

// NonZeroPagesBut skips the ranges it is given, and finds the same pages as
// NonZeroPages where they hold zeros.
func TestNonZeroPagesBut(t *testing.T) {
	mem := make([]byte, 64*PageSize)
	for _, p := range []int{0, 3, 9, 10, 40, 63} {
		mem[p*PageSize+5] = 1
	}
	all := NonZeroPages(mem)
	if want := []uint32{0, 3, 9, 10, 40, 63}; !slices.Equal(all, want) {
		t.Fatalf("NonZeroPages: %v, want %v", all, want)
	}
	if got := NonZeroPagesBut(mem, [][2]uint32{{1, 3}, {4, 9}, {11, 40}, {41, 63}}); !slices.Equal(got, all) {
		t.Fatalf("skipping zero ranges: %v, want %v", got, all)
	}
	if got := NonZeroPagesBut(mem, [][2]uint32{{0, 4}, {60, 64}}); !slices.Equal(got, []uint32{9, 10, 40}) {
		t.Fatalf("skipping pages with data: %v, want them left out", got)
	}
}
