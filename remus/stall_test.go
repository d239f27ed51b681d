package remus

import (
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/wasi"
)

// TestStallEndsForACheckpointAskedBefore: a back-pressure stall lets the
// guest go on while a capture is queued and not begun, one queued before
// the stall began included: that capture may be queued behind the stall,
// and a stall that waited for a later one kept the guest stopped for ever
// (TestRemusBackPressure hung under load). A checkpoint asked for but not
// queued yet does not end it: take may collect pages ahead for a
// millisecond first, and the guest wrote on unstalled meanwhile
// (TestRemusBackPressure held 1.2 MB at a limit of 256 KiB).
func TestStallEndsForACheckpointAskedBefore(t *testing.T) {
	p := heldOverLimit(t)
	state := func(s engine.PrimaryState) {
		p.mu.Lock()
		p.status.State = s.String()
		p.mu.Unlock()
	}
	state(engine.Protected)
	if p.stallOver() {
		t.Fatal("the stall ended with 200 bytes held over a limit of 100, protected, no checkpoint asked for")
	}
	p.requests.Add(1) // take counted a checkpoint; its capture is not queued yet
	if p.stallOver() {
		t.Fatal("the stall ended for a checkpoint asked for but not queued: the guest would write on until take queues it")
	}
	p.queued.Add(1) // queued on the machine: the next safe point takes it
	if !p.stallOver() {
		t.Fatal("the stall goes on while a capture queued before it is not begun")
	}
	p.captures.Add(1)
	if p.stallOver() {
		t.Fatal("the stall ended once that checkpoint was captured, output still held over the limit")
	}
	// A capture that begins before take has counted it as queued
	// (captures ahead of queued for a moment) does not end it either.
	p.requests.Add(1)
	p.captures.Add(1)
	if p.stallOver() {
		t.Fatal("the stall ended for a capture that had begun, counted as queued only after")
	}
	p.queued.Add(1)
	if p.stallOver() {
		t.Fatal("the stall ended once that capture was counted, output still held over the limit")
	}
	state(engine.Unprotected)
	if !p.stallOver() {
		t.Fatal("the stall goes on with protection given up")
	}
}

// TestStallGivesWayToANewCheckpoint: a pause stalled for back-pressure
// (held output over the limit, acks awaited) ends when another checkpoint
// is asked for: its capture is the next pause, queued behind this one. A
// backup that restarted within the timeout asked for a full checkpoint,
// whose ack is what would release the output: the stall waited for ever.
func TestStallGivesWayToANewCheckpoint(t *testing.T) {
	p := heldOverLimit(t)
	p.gate.endEpoch() // checkpointed, not acknowledged
	p.requests.Add(1)
	p.queued.Add(1)
	p.captures.Add(1) // this pause's capture
	done := make(chan struct{})
	go func() {
		p.gate.waitBelow(p.stop, func() bool { return p.queued.Load() > p.captures.Load() })
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("the stall ended with 200 bytes held over a limit of 100 and no checkpoint asked for")
	case <-time.After(50 * time.Millisecond):
	}
	p.requests.Add(1) // as take does
	p.queued.Add(1)
	p.gate.nudge()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stall went on with another checkpoint asked for")
	}
}

// heldOverLimit is a primary holding 200 bytes of output over a hold
// limit of 100, its gate telling no driver.
func heldOverLimit(t *testing.T) *Primary {
	t.Helper()
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1", HoldLimit: 100})
	if err != nil {
		t.Fatal(err)
	}
	p.gate.onOutput, p.gate.onOverLimit = nil, nil
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 3, Data: make([]byte, 200)},
		func([]byte) (uint32, wasi.Errno) { return 200, wasi.ESUCCESS })
	return p
}
