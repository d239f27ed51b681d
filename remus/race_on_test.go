//go:build race

package remus

// raceEnabled: the race detector makes sync.Pool drop items at random, so
// tests that count allocations skip.
const raceEnabled = true
