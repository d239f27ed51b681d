// Package rusage reads this process's CPU time, for tests that check that
// a wait waits instead of spinning.
package rusage

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// CPU is this process's user and system time so far; a failure to read it
// fails tb.
func CPU(tb testing.TB) time.Duration {
	tb.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
