// Package gctest checks machine.CollectAtSafePoints in a test binary of its
// own: it changes how the whole process collects garbage.
package gctest

import (
	"context"
	"io"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
)

var sink []byte

// cGuest builds a C guest from one source file and returns its module.
func cGuest(t *testing.T, name, src string) []byte {
	t.Helper()
	wasm, err := guest.C(name, []string{src})
	if err != nil {
		t.Fatal(err)
	}
	mod, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	return mod
}

// runGuest runs m's guest on a goroutine of its own; the channel closes
// when it ends.
func runGuest(t *testing.T, ctx context.Context, m *machine.Machine) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := m.Run(ctx); err != nil {
			t.Error(err)
		}
	}()
	return done
}

// allocateUntil makes 128 MB/s of garbage, 256 KiB every 2 ms, until done
// is closed, and returns the longest time it was kept from going on.
func allocateUntil(done <-chan struct{}) (worst time.Duration) {
	last := time.Now()
	for running := true; running; {
		select {
		case <-done:
			running = false
		case <-time.After(2 * time.Millisecond):
		}
		sink = make([]byte, 256<<10)
		now := time.Now()
		worst = max(worst, now.Sub(last))
		last = now
	}
	return worst
}

// TestCollectionDoesNotWaitForAComputingGuest: while a guest computes for
// hundreds of milliseconds between host calls and another goroutine
// allocates fast, that goroutine is never stopped for long. Without
// CollectAtSafePoints each collection's stop-the-world waited for the
// guest's next host call, and everything else in the process stood still
// (a Remus primary's heartbeats: the backup failed over a live primary).
func TestCollectionDoesNotWaitForAComputingGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a CPU-bound guest for about a second")
	}
	machine.CollectAtSafePoints()
	mod := cGuest(t, "cpu", "testdata/guests/c/cpu.c")
	ctx := context.Background()
	var out strings.Builder
	// Scale 40: four phases of a few hundred milliseconds each, with a
	// host call (a printed line) only between them.
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "cpu", Args: []string{"40"}, Instrument: true,
		Stdout: &out, Stderr: io.Discard, Stdin: strings.NewReader("")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	cycles := machine.GCCycles()

	done := runGuest(t, ctx, m)
	t0 := time.Now()
	worst := allocateUntil(done)
	elapsed := time.Since(t0)
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("guest ran %v; %d collections, %d at a guest's host call; longest stop of the allocating goroutine %v",
		elapsed, after.NumGC-before.NumGC, machine.GCCycles()-cycles, worst)
	if !strings.Contains(out.String(), "sieve:") {
		t.Fatalf("the guest did not finish its work: %q", out.String())
	}
	if after.NumGC == before.NumGC {
		t.Fatal("no collection ran: the test proves nothing")
	}
	if elapsed < 500*time.Millisecond {
		t.Fatalf("the guest ran only %v: too short to tell", elapsed)
	}
	if worst > 150*time.Millisecond {
		t.Errorf("the allocating goroutine was stopped for %v while the guest computed (want under 150ms)", worst)
	}
}

// TestCollectionWhileGuestSleeps: a guest blocked in poll_oneoff makes no
// host call to collect at; the steward wakes its wait, which collects and
// waits on. Garbage allocated meanwhile is collected, on the guest's
// goroutine, and nobody is stopped for long.
func TestCollectionWhileGuestSleeps(t *testing.T) {
	machine.CollectAtSafePoints()
	mod := cGuest(t, "dirtier", "testdata/guests/dirtier/dirtier.c")
	ctx := context.Background()
	// 1 MiB, one page per round, 4 rounds of 250 ms sleeps.
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier", Args: []string{"1", "1", "4", "250000"},
		Instrument: true, Stdout: io.Discard, Stderr: io.Discard, Stdin: strings.NewReader("")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	cycles := machine.GCCycles()
	done := runGuest(t, ctx, m)
	worst := allocateUntil(done)
	got := machine.GCCycles() - cycles
	t.Logf("%d collections on the guest's goroutine; longest stop of the allocating goroutine %v", got, worst)
	if got < 10 {
		t.Errorf("%d collections on the sleeping guest's goroutine, want at least 10 (128 MB/s of garbage for a second, a cycle due every few tens of milliseconds)", got)
	}
	if worst > 150*time.Millisecond {
		t.Errorf("the allocating goroutine was stopped for %v (want under 150ms)", worst)
	}
}
