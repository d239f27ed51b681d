//go:build linux

package dirty

import (
	"math/rand/v2"
	"testing"
)

// TestRunsAtRandomAreNotHot: a guest that writes, each round, runs of
// consecutive pages from random starts (testdata/guests/dirtier) repeats no
// page in most Collects and a run's worth in a few, when two runs overlap.
// Runs that overlap three rounds in a row are luck, not a working set: no
// page of them may be promoted to hot (each would be compared in every
// Collect until it cooled). Before randomLately, the Collect after two such
// overlaps in a row promoted the run.
func TestRunsAtRandomAreNotHot(t *testing.T) {
	const pages, run = 16384, 333
	size := pages * PageSize
	region, hot := writtenHotTracker(t, pages)
	rng := rand.New(rand.NewPCG(5, 6))
	write := func(start uint32) {
		for i := range uint32(run) {
			stamp(region, (start+i)%pages)
		}
	}
	round := func(what string, r int, starts ...uint32) {
		t.Helper()
		for _, s := range starts {
			write(s)
		}
		for range 3 - len(starts) {
			write(uint32(rng.IntN(pages)))
		}
		collect(t, hot, size)
		if h := hotPagesOf(hot); len(h) != 0 {
			t.Fatalf("%s, round %d: %d pages made hot: %v", what, r, len(h), head(h))
		}
	}
	for r := range 20 {
		round("runs at random", r)
	}
	// One run overlapping the last one's by nearly all of it, three
	// rounds in a row, beside two runs at random each round.
	at := uint32(rng.IntN(pages))
	for r := range 3 {
		round("a run overlapping by chance", r, at+uint32(10*r))
	}
	for r := range 10 {
		round("runs at random again", r)
	}
}
