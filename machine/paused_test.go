package machine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/internal/rusage"
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

// dirtierModule is the dirtier test guest's module.
func dirtierModule(t *testing.T) []byte {
	t.Helper()
	mod, err := os.ReadFile(guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"}))
	if err != nil {
		t.Fatal(err)
	}
	return mod
}

// newDirtier is an instrumented VM of the dirtier test guest with args,
// its output discarded, closed when the test ends; not started.
func newDirtier(t *testing.T, args ...string) *Machine {
	t.Helper()
	mod := dirtierModule(t)
	m, err := New(context.Background(), Config{Module: mod, Name: "dirtier", Args: args, Stdout: io.Discard,
		Stderr: io.Discard, Stdin: strings.NewReader(""), CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(context.Background()) })
	return m
}

// TestCollectAheadKeepsEveryViewExact: a checkpoint stream that collects
// most pages ahead of each pause, while the guest writes, and the rest in
// the pause, holds an exact image of the memory after every pause; so does
// a snapshot consumer collecting now and then from the same tracker, which
// must be told of the pages collected ahead (they are write-protected
// again, so the kernel no longer reports them to anyone).
func TestCollectAheadKeepsEveryViewExact(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "300", "0", "1000")
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	var stream, snap []byte
	grow := func(img []byte, n int) []byte {
		if len(img) < n {
			img = append(img, make([]byte, n-len(img))...)
		}
		return img
	}
	copyPages := func(img, mem []byte, pages []uint32) {
		for _, p := range pages {
			o := int(p) * 4096
			copy(img[o:o+4096], mem[o:])
		}
	}
	same := func(what string, img, mem []byte) error {
		for o := 0; o < len(mem); o += 4096 {
			if string(img[o:o+4096]) != string(mem[o:o+4096]) {
				return fmt.Errorf("%s: page %d stale", what, o/4096)
			}
		}
		return nil
	}
	// The baseline: a full copy for both, and each view's first collection.
	if err := m.WithPaused(ctx, func(p *Paused) error {
		mem := p.Memory()
		stream, snap = bytes.Clone(mem), bytes.Clone(mem)
		if _, _, err := p.DirtyPagesDeferred(nil); err != nil {
			return err
		}
		_, err := p.DirtyPages(nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	aheadPages := 0
	for i := range 40 {
		time.Sleep(5 * time.Millisecond)
		got, ok, err := m.CollectAhead(nil, func(mem []byte, pages []uint32) error {
			stream = grow(stream, len(mem))
			copyPages(stream, mem, pages)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			aheadPages += len(got)
		}
		var gen uint64
		if err := m.WithPaused(ctx, func(p *Paused) error {
			mem := p.Memory()
			pages, g, err := p.DirtyPagesDeferred(nil)
			if err != nil {
				return err
			}
			gen = g
			stream = grow(stream, len(mem))
			copyPages(stream, mem, pages)
			if err := same(fmt.Sprintf("pause %d, stream", i), stream, mem); err != nil {
				return err
			}
			if i%3 != 2 {
				return nil
			}
			if pages, err = p.DirtyPages(nil); err != nil {
				return err
			}
			snap = grow(snap, len(mem))
			copyPages(snap, mem, pages)
			return same(fmt.Sprintf("pause %d, snapshots", i), snap, mem)
		}); err != nil {
			t.Fatal(err)
		}
		if err := m.RearmDirty(gen, func(p uint32) []byte { return stream[int(p)*4096 : int(p+1)*4096] }); err != nil {
			t.Fatal(err)
		}
	}
	if aheadPages < 40*100 {
		t.Fatalf("only %d pages collected ahead in 40 rounds of about 300 written", aheadPages)
	}
	m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil })
	if err := <-done; err != nil && !errors.Is(err, ErrStopped) {
		t.Fatal(err)
	}
}

// TestPauseFlagNotLeftRaised: many goroutines asking for pauses of a guest
// blocked reading its stdin. The device's pause flag was raised after the
// request was queued, outside the lock, so a pause could take the job
// first and the flag stayed up with nothing to pause for: the blocked
// guest woke, restarted its read and woke again, at 100% of a core.
func TestPauseFlagNotLeftRaised(t *testing.T) {
	mod, err := os.ReadFile(guest.MustGo(t, "testdata/guests/hello"))
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(context.Background(), Config{Module: mod, Name: "hello", Args: []string{"stdin"}, Stdout: io.Discard,
		Stderr: io.Discard, Stdin: r, CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	defer func() { w.Write([]byte("x\n")); w.Close(); <-done; m.Close(context.Background()); r.Close() }()
	for deadline := time.Now().Add(time.Minute); !m.dev.Waiting(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the guest never waited on its stdin")
		}
	}
	for round := range 60 {
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var chs []<-chan error
				for range 200 {
					chs = append(chs, m.PauseAsync(func(*Paused) error { return nil }))
				}
				for _, c := range chs {
					<-c
				}
			}()
		}
		wg.Wait()
		time.Sleep(2 * time.Millisecond)
		if m.ctl.want.Load() == 0 && m.dev.PauseRequested() {
			before := rusage.CPU(t)
			time.Sleep(100 * time.Millisecond)
			t.Fatalf("round %d: the pause flag is up with no pause wanted; the blocked guest used %v of CPU in 100 ms",
				round, rusage.CPU(t)-before)
		}
	}
}

// TestPauseJobThatPanics: work done in a pause that panics fails the VM,
// and its caller, and those of the other work queued in that pause, are
// answered with an error instead of waiting for ever (a WithPaused whose
// job was taken waits for it whatever its context says; an API snapshot
// held the snapshot lock meanwhile, and every later one hung too).
func TestPauseJobThatPanics(t *testing.T) {
	ctx := context.Background()
	m := newDirtier(t, "8", "1", "100000", "100")
	ran := make(chan error, 1)
	go func() { _, err := m.Run(ctx); ran <- err }()
	if err := m.WithPaused(ctx, func(*Paused) error { return nil }); err != nil {
		t.Fatal(err)
	}
	after := m.PauseAsync(func(*Paused) error { return nil })
	answered := make(chan error, 1)
	go func() { answered <- m.WithPaused(ctx, func(*Paused) error { panic("boom") }) }()
	select {
	case err := <-answered:
		if err == nil {
			t.Fatal("the panicking job's caller was told it succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the panicking job's caller was never answered")
	}
	select {
	case <-after:
	case <-time.After(10 * time.Second):
		t.Fatal("a job queued beside it was never answered")
	}
	select {
	case err := <-ran:
		if err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("the VM ended with %v, want the panic", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the VM went on after its pause's work panicked")
	}
}

// TestPauseTooDeepIsNamed: a guest paused under a wasm call stack deeper
// than the region Asyncify saves it in (the top 256 KiB of its memory) is
// lost: the unwind runs off the end of the memory. The error says it was
// ftvm's pause, where, and how much room there was, not that the guest
// trapped. A stack that fits pauses, and the guest runs on.
func TestPauseTooDeepIsNamed(t *testing.T) {
	// An 8 MiB C stack (wasm-ld's default, 64 KiB, overflows first).
	wasm := guest.MustC(t, "deepstack", []string{"testdata/guests/c/deepstack.c"}, "-Wl,-z,stack-size=8388608")
	mod, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	run := func(depth string) (stack int, runErr error) {
		m, err := New(context.Background(), Config{Module: mod, Name: "deepstack", Args: []string{depth, "1000000000"},
			Stdout: io.Discard, Stderr: io.Discard, Stdin: strings.NewReader(""), CacheDir: t.TempDir(), Instrument: true})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close(context.Background())
		done := make(chan error, 1)
		go func() { _, err := m.Run(context.Background()); done <- err }()
		time.Sleep(100 * time.Millisecond) // deep down by now, reading the clock
		for range 2 {
			if err := m.WithPaused(context.Background(), func(p *Paused) error {
				_, blob := p.Stack()
				stack = len(blob)
				return nil
			}); err != nil {
				return stack, <-done
			}
		}
		m.WithPaused(context.Background(), func(p *Paused) error { p.Stop(); return nil })
		return stack, <-done
	}
	if stack, err := run("1000"); !errors.Is(err, ErrStopped) || stack < 20000 {
		t.Fatalf("1,000 calls deep: stack %d bytes, run ended with %v; want it paused twice, then stopped", stack, err)
	}
	_, err = run("20000")
	var te *TrapError
	if !errors.As(err, &te) || te.PausedAt != "clock_time_get" || te.Borrowed != scratchSize ||
		!strings.Contains(err.Error(), "deeper than the "+FormatSize(scratchSize)) {
		t.Fatalf("20,000 calls deep: %v (%#v); want the pause named as what lost the VM", err, te)
	}
	t.Log(err)
}
