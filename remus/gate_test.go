package remus

import (
	"context"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/wasi"
)

// TestGateOutputCommit drives the gate with random outputs, epoch ends and
// releases, and checks output commit: an output of epoch E is performed
// only once E is released, all outputs leave in the order the guest made
// them, the guest is told every write succeeded in full, and filesystem
// effects happen at once and are journaled into their own epoch.
func TestGateOutputCommit(t *testing.T) {
	for seed := int64(1); seed <= 200; seed++ {
		rng := rand.New(rand.NewSource(seed))
		g := newHoldGate(0)
		var performed []string
		var released uint64
		epochOf := map[string]uint64{}
		made := []string{}
		fsDone, fsMade := 0, 0
		var journaled [][]string
		var current []string
		for step := 0; step < 300; step++ {
			switch r := rng.Intn(10); {
			case r < 5:
				data := fmt.Sprintf("out-%d-%d", seed, step)
				epochOf[data] = g.epoch
				made = append(made, data)
				n, errno := g.Output(wasi.Effect{Kind: wasi.EffectWrite, Data: []byte(data)}, func(b []byte) (uint32, wasi.Errno) {
					got := string(b)
					if epochOf[got] > released {
						t.Fatalf("seed %d: output of epoch %d performed with only %d released", seed, epochOf[got], released)
					}
					performed = append(performed, got)
					return uint32(len(b)), wasi.ESUCCESS
				})
				if n != uint32(len(data)) || errno != wasi.ESUCCESS {
					t.Fatalf("held write told the guest %d, %v", n, errno)
				}
			case r < 6:
				path := fmt.Sprintf("f%d", step)
				fsMade++
				g.Output(wasi.Effect{Kind: wasi.EffectFs, Op: wasi.FsWrite, Path: path, Data: []byte("x")},
					func(b []byte) (uint32, wasi.Errno) { fsDone++; return uint32(len(b)), wasi.ESUCCESS })
				if fsDone != fsMade {
					t.Fatalf("seed %d: a filesystem effect was not performed during its call", seed)
				}
				current = append(current, path)
			case r < 8:
				_, ops := g.endEpoch()
				var paths []string
				for _, o := range ops {
					paths = append(paths, o.Path)
				}
				if fmt.Sprint(paths) != fmt.Sprint(current) {
					t.Fatalf("seed %d: epoch journal %v, want %v", seed, paths, current)
				}
				journaled = append(journaled, paths)
				current = nil
			default:
				if released+1 < g.epoch {
					released += uint64(1 + rng.Intn(int(g.epoch-released-1)))
				}
				g.drain(released, false)
			}
		}
		// Everything released at the end leaves, in order.
		released = g.epoch
		g.drain(0, true)
		if fmt.Sprint(performed) != fmt.Sprint(made) {
			t.Fatalf("seed %d: performed %d outputs out of order or lost (made %d)", seed, len(performed), len(made))
		}
		var njournaled int
		for _, j := range journaled {
			njournaled += len(j)
		}
		if njournaled+len(current) != fsMade {
			t.Fatalf("seed %d: %d filesystem effects journaled, %d made", seed, njournaled+len(current), fsMade)
		}
	}
}

// TestGatePassThrough: unprotected, outputs leave at once, but never
// ahead of output still held from before.
func TestGatePassThrough(t *testing.T) {
	g := newHoldGate(0)
	var order []string
	perf := func(b []byte) (uint32, wasi.Errno) { order = append(order, string(b)); return uint32(len(b)), 0 }
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Data: []byte("held")}, perf)
	g.setPass(true)
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Data: []byte("queued behind")}, perf)
	if len(order) != 0 {
		t.Fatalf("output overtook held output: %v", order)
	}
	g.drain(0, true)
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Data: []byte("direct")}, perf)
	if fmt.Sprint(order) != "[held queued behind direct]" {
		t.Fatalf("order %v", order)
	}
}

// TestGateNoJournalUnprotected: while the primary runs unprotected
// (pass-through) the next checkpoint is a session's first, full one, so
// filesystem effects are performed but not journaled, and what the
// journal held is dropped: it grew with every byte the guest wrote for as
// long as the backup was away (a guest appending to a log, unprotected
// for an hour, kept the whole hour's writes in memory).
func TestGateNoJournalUnprotected(t *testing.T) {
	g := newHoldGate(0)
	performed := 0
	perf := func(b []byte) (uint32, wasi.Errno) { performed++; return uint32(len(b)), 0 }
	write := func() {
		g.Output(wasi.Effect{Kind: wasi.EffectFs, Op: wasi.FsWrite, Path: "log", Data: make([]byte, 4096)}, perf)
	}
	write()
	if len(g.ops) != 1 {
		t.Fatalf("protected: %d ops journaled, want 1", len(g.ops))
	}
	g.setPass(true)
	for range 1000 {
		write()
	}
	if performed != 1001 || len(g.ops) != 0 || g.journalBytes() != 0 {
		t.Fatalf("unprotected: %d performed, %d ops (%d bytes) journaled; want 1001, none", performed, len(g.ops), g.journalBytes())
	}
	g.setPass(false) // a new session: journaled again
	write()
	if _, ops := g.endEpoch(); len(ops) != 1 {
		t.Fatalf("protected again: %d ops journaled, want 1", len(ops))
	}
}

// TestGateJournalBackPressure: the running epoch's disk journal counts
// against the limit like held output: past it the gate calls onOverLimit
// (the primary ends the epoch and stalls the guest until a checkpoint can
// take the journal), and a checkpoint's end empties it.
func TestGateJournalBackPressure(t *testing.T) {
	g := newHoldGate(64 << 10)
	over := 0
	g.onOverLimit = func() { over++ }
	perf := func(b []byte) (uint32, wasi.Errno) { return uint32(len(b)), 0 }
	for range 15 { // 15 × 4 KiB: under 64 KiB
		g.Output(wasi.Effect{Kind: wasi.EffectFs, Op: wasi.FsWrite, Path: "log", Data: make([]byte, 4096)}, perf)
	}
	if over != 0 || g.journalBytes() == 0 || g.journalBytes() > 64<<10 {
		t.Fatalf("under the limit: %d calls, journal %d bytes", over, g.journalBytes())
	}
	g.Output(wasi.Effect{Kind: wasi.EffectFs, Op: wasi.FsWrite, Path: "log", Data: make([]byte, 4096)}, perf)
	if over != 1 {
		t.Fatalf("past the limit (journal %d bytes): onOverLimit called %d times, want 1", g.journalBytes(), over)
	}
	if _, ops := g.endEpoch(); len(ops) != 16 || g.journalBytes() != 0 {
		t.Fatalf("after the epoch's end: %d ops taken, journal %d bytes", len(ops), g.journalBytes())
	}
}

// TestGateBackPressure: over the limit with output of a checkpointed
// epoch held, the guest stalls until that output is released.
func TestGateBackPressure(t *testing.T) {
	g := newHoldGate(10)
	nop := func(b []byte) (uint32, wasi.Errno) { return uint32(len(b)), 0 }
	over := 0
	g.onOverLimit = func() { over++ }
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Data: make([]byte, 20)}, nop)
	if over != 1 {
		t.Fatalf("over-limit callbacks %d", over)
	}
	if g.overLimitOld() {
		t.Fatal("the running epoch's own output must not stall the guest")
	}
	g.endEpoch()
	if !g.overLimitOld() {
		t.Fatal("a checkpointed epoch's output over the limit should stall the guest")
	}
	done := make(chan struct{})
	go func() { g.waitBelow(nil, nil); close(done) }()
	select {
	case <-done:
		t.Fatal("waitBelow returned while over the limit")
	default:
	}
	g.drain(1, false)
	<-done
}

// TestGatePassThroughQueuesBehindADrain: output the guest makes while a
// drain is still performing released output — the backup just given up,
// a held reply still going out to a slow client — waits its turn even in
// pass-through. Sent at once on the guest's goroutine it overtook the
// reply, and its close cut the reply short (or, the descriptor's number
// reused by an accept, sent the rest of it to another client).
func TestGatePassThroughQueuesBehindADrain(t *testing.T) {
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	p.gate.onOutput, p.gate.onOverLimit = nil, nil
	var mu sync.Mutex
	var order []string
	record := func(s string) { mu.Lock(); order = append(order, s); mu.Unlock() }
	sending, unblock, sent := make(chan struct{}), make(chan struct{}), make(chan struct{})
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 5, Data: []byte("A")}, func([]byte) (uint32, wasi.Errno) {
		close(sending)
		<-unblock // the client reads slowly
		record("A")
		return 1, wasi.ESUCCESS
	})
	// Unprotected: pass-through, everything held released.
	p.gate.setPass(true)
	p.mu.Lock()
	p.relAll = true
	p.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go p.releaser(ctx)
	p.release <- struct{}{}
	<-sending
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 5, Data: []byte("B")}, func([]byte) (uint32, wasi.Errno) {
		record("B")
		close(sent)
		return 1, wasi.ESUCCESS
	})
	p.gate.Output(wasi.Effect{Kind: wasi.EffectClose, Fd: 5}, func([]byte) (uint32, wasi.Errno) { record("close"); return 0, wasi.ESUCCESS })
	close(unblock)
	select {
	case <-sent:
	case <-time.After(10 * time.Second):
		t.Fatal("the output queued behind the drain never left")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		got := fmt.Sprint(order)
		mu.Unlock()
		if got == "[A B close]" {
			break
		}
		if len(got) > len("[A B close]") || time.Now().After(deadline) {
			t.Fatalf("performed %s, the guest made [A B close]", got)
		}
		time.Sleep(time.Millisecond)
	}
	// Drained: pass-through performs at once again.
	now := false
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 6, Data: []byte("C")}, func([]byte) (uint32, wasi.Errno) { now = true; return 1, wasi.ESUCCESS })
	if !now {
		t.Fatal("with nothing held or draining, pass-through output was not performed at once")
	}
}

// TestGateHeldOutputIsPerformedLater: a held output is performed with the
// effect's Later (a socket write sends all of it, polling, off the guest's
// call), never with the in-call perform, even when a drain takes it
// before Output has returned (pass-through, older output still held).
// The in-call send from the releaser's goroutine sent what the socket took
// and dropped the rest, the guest already told all of it went.
func TestGateHeldOutputIsPerformedLater(t *testing.T) {
	g := newHoldGate(1)
	g.onOutput = nil
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 5, Data: []byte("A")}, func([]byte) (uint32, wasi.Errno) { return 1, wasi.ESUCCESS })
	g.setPass(true)                             // unprotected, the releaser not yet at work
	g.onOverLimit = func() { g.drain(0, true) } // it is now, before Output returns
	var how []string
	g.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 5, Data: []byte("BB"),
		Later: func([]byte) (uint32, wasi.Errno) { how = append(how, "later"); return 2, wasi.ESUCCESS }},
		func([]byte) (uint32, wasi.Errno) { how = append(how, "in call"); return 2, wasi.ESUCCESS })
	if fmt.Sprint(how) != "[later]" {
		t.Fatalf("the held write was performed %v, want [later]", how)
	}
}
