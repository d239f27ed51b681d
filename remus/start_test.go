package remus

import (
	"context"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/engine"
)

// TestStartKeepsTheSessionBeforeTheMachine: Start brings the session up
// before the caller has built the machine, and keeps it up (the driver
// heartbeats) for as long as the machine takes (a first instrumentation
// and compile can take seconds): a session dialed early but left silent
// would be dropped by the backup after its timeout and redialed. The
// engine's first, full, checkpoint waits for the machine: none is taken.
func TestStartKeepsTheSessionBeforeTheMachine(t *testing.T) {
	const timeout = 300 * time.Millisecond
	b := serveBackup(t, timeout)
	module, _ := fakeModule()
	p, err := NewPrimary(PrimaryConfig{Backup: b.Addr().String(), Engine: engine.Config{Timeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.Start(ctx, Guest{Module: module, Name: "early"})
	defer func() {
		cancel()
		select {
		case <-p.loopDone:
		case <-time.After(5 * time.Second):
			t.Error("the driver did not stop with its context")
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for p.Status().State != engine.Syncing.String() {
		if time.Now().After(deadline) {
			t.Fatalf("no session before the machine: %+v", p.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	first := p.Status().Session
	time.Sleep(4 * timeout) // the machine being built
	st := p.Status()
	if st.Session != first || st.State != engine.Syncing.String() {
		t.Fatalf("the session did not last while the machine was built: session %d then %+v", first, st)
	}
	if st.Checkpoints != 0 || p.requests.Load() != 0 {
		t.Fatalf("a checkpoint was taken without a machine: %+v", st)
	}
}
