package machine

import (
	"context"
	"errors"
	"io"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
)

// TestWithPausedReturnsOnceResumed: WithPaused wakes its caller only once
// the guest runs again, after what the pause queued with AfterResume, so
// the wake-up is not part of the pause; when it returns, the pause is over
// and counted.
func TestWithPausedReturnsOnceResumed(t *testing.T) {
	wasm := guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	mod, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	m, err := New(ctx, Config{Module: mod, Name: "dirtier", Args: []string{"8", "1", "100000", "100"},
		Stdout: io.Discard, Stderr: io.Discard, CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	for i := 0; i < 20; i++ {
		before := m.PauseStats().Count
		var resumed atomic.Bool
		err := m.WithPaused(ctx, func(p *Paused) error {
			p.AfterResume(func() {
				time.Sleep(2 * time.Millisecond) // a caller woken in the pause would be back by now
				resumed.Store(true)
			})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !resumed.Load() {
			t.Fatalf("pause %d: WithPaused returned before the guest was resumed", i)
		}
		if got := m.PauseStats().Count; got != before+1 {
			t.Fatalf("pause %d: WithPaused returned with %d pauses counted, want %d", i, got, before+1)
		}
	}
	if err := m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil && !errors.Is(err, ErrStopped) {
		t.Fatal(err)
	}
}
