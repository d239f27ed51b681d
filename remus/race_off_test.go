//go:build !race

package remus

const raceEnabled = false
