package remus

import (
	"testing"

	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/wasi"
)

// TestStallEndsForACheckpointAskedBefore: a back-pressure stall lets the
// guest go on while a checkpoint is asked for and not captured yet, one
// asked for before the stall began included: that capture may be queued
// behind the stall, and a stall that waited for a later request kept the
// guest stopped for ever (TestRemusBackPressure hung under load).
func TestStallEndsForACheckpointAskedBefore(t *testing.T) {
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1", HoldLimit: 100})
	if err != nil {
		t.Fatal(err)
	}
	p.gate.onOutput, p.gate.onOverLimit = nil, nil
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 3, Data: make([]byte, 200)},
		func([]byte) (uint32, wasi.Errno) { return 200, wasi.ESUCCESS })
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
	if !p.stallOver() {
		t.Fatal("the stall goes on while a checkpoint asked for before it is not captured")
	}
	p.captures.Add(1)
	if p.stallOver() {
		t.Fatal("the stall ended once that checkpoint was captured, output still held over the limit")
	}
	state(engine.Unprotected)
	if !p.stallOver() {
		t.Fatal("the stall goes on with protection given up")
	}
}
