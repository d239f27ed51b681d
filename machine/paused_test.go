package machine

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
)

// TestPauseIncludesAfterResume: the guest waits for what a pauser queued
// with AfterResume (it runs before the interrupted host call goes on), so
// the pause as measured — PauseStats and OnPaused — includes it.
func TestPauseIncludesAfterResume(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "1", "100000", "100")
	told := make(chan time.Duration, 16)
	m.OnPaused(func(d time.Duration) { told <- d })
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	const slow = 3 * time.Millisecond
	for i := 0; i < 5; i++ {
		err := m.WithPaused(ctx, func(p *Paused) error {
			p.AfterResume(func() { time.Sleep(slow) })
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-told:
			if d < slow {
				t.Fatalf("pause %d: OnPaused said %v, less than the %v its AfterResume took", i, d, slow)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("pause %d: OnPaused was not called", i)
		}
		if last := m.PauseStats().Last; last < slow {
			t.Fatalf("pause %d: PauseStats says %v, less than the %v its AfterResume took", i, last, slow)
		}
	}
	m.OnPaused(nil)
	if err := m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil && !errors.Is(err, ErrStopped) {
		t.Fatal(err)
	}
}

// TestWithPausedReturnsAfterResume: the caller of WithPaused is told once
// the pause is over (waking it is not part of the guest's stop), with fn's
// own error, and the pause is counted by then; a Stop ends the VM.
func TestWithPausedReturnsAfterResume(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "1", "100000", "100")
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	boom := errors.New("the pauser's own error")
	for i := 0; i < 5; i++ {
		before := m.PauseStats().Count
		err := m.WithPaused(ctx, func(p *Paused) error {
			// The pause lasts until this has run: a caller told
			// before that would find the pause not counted yet.
			p.AfterResume(func() { time.Sleep(2 * time.Millisecond) })
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("pause %d: WithPaused returned %v, not fn's error", i, err)
		}
		if got := m.PauseStats().Count; got != before+1 {
			t.Fatalf("pause %d: WithPaused returned with %d pauses counted, want %d (told before the pause was over)", i, got, before+1)
		}
	}
	if err := m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil && !errors.Is(err, ErrStopped) {
		t.Fatal(err)
	}
}

// newDirtier is an instrumented VM of the dirtier test guest with args,
// its output discarded, closed when the test ends; not started.
func newDirtier(t *testing.T, args ...string) *Machine {
	t.Helper()
	wasm := guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	mod, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(context.Background(), Config{Module: mod, Name: "dirtier", Args: args, Stdout: io.Discard,
		Stderr: io.Discard, Stdin: strings.NewReader(""), CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(context.Background()) })
	return m
}
