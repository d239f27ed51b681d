package remus

import (
	"context"
	"net"
	"slices"
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

// TestWaitSessionWaitsForRun: with the session started before the machine
// (Start), protection can be given up (no backup within the timeout) while
// the machine is still being built. The guest must still not start before
// Run has the machine: Run registers the hooks its pauses and its memory's
// growth report to, and reading the device state for the Hello (Run
// without Start) must not race with a running guest.
func TestWaitSessionWaitsForRun(t *testing.T) {
	const timeout = 100 * time.Millisecond
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1", Engine: engine.Config{Timeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p.Start(ctx, Guest{Name: "no backup"})
	for deadline := time.Now().Add(10 * time.Second); p.Status().State != engine.Unprotected.String(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("protection not given up without a backup: %+v", p.Status())
		}
	}
	done := make(chan struct{})
	go func() {
		p.WaitSession(ctx)
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("WaitSession returned before Run had the machine")
	case <-time.After(3 * timeout):
	}
	close(p.attached) // what Run does once it has the machine
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WaitSession did not return once Run had the machine")
	}
}

// TestRedialsWithinTheBackupsGrace: a backup that stood still (a stopped
// process: the kernel still completes connections to it, and nothing
// answers) and wakes gives its primary one timeout to reach it before it
// fails over. The primary's tries must come closer together than that, or
// a woken backup resumed an old checkpoint beside the live primary, which
// its next try found fenced (backoff grew to a second, plus the
// handshake's wait; seen with a backup stopped for 8 s under load).
func TestRedialsWithinTheBackupsGrace(t *testing.T) {
	const timeout = 400 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type try struct{ from, to time.Time }
	tries := make(chan try, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // a stopped backup: nothing is read, nothing answered
				from := time.Now()
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				var b [1]byte
				for {
					if _, err := c.Read(b[:]); err != nil {
						break
					}
				}
				tries <- try{from, time.Now()}
				c.Close()
			}()
		}
	}()
	p, err := NewPrimary(PrimaryConfig{Backup: ln.Addr().String(), Engine: engine.Config{Timeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() {
		cancel()
		<-p.loopDone
	}()
	p.Start(ctx, Guest{Name: "stopped backup"})
	var got []try
	for deadline := time.After(6 * time.Second); ; {
		select {
		case tr := <-tries:
			got = append(got, tr)
			continue
		case <-deadline:
		}
		break
	}
	slices.SortFunc(got, func(a, b try) int { return a.from.Compare(b.from) })
	if len(got) < 5 {
		t.Fatalf("%d tries in 6 s", len(got))
	}
	// One late try is the machine's (the fake backup's goroutines are
	// timed, not the primary); more are the primary's pace.
	var late []time.Duration
	for i := 1; i < len(got); i++ {
		if gap := got[i].from.Sub(got[i-1].to); gap >= timeout {
			late = append(late, gap)
		}
	}
	if len(late) > 1 {
		t.Errorf("%d of %d tries came %v after the one before ended: a backup waking in between waits only %s",
			len(late), len(got), late, timeout)
	}
	if m := p.redialMax(); m > timeout/4 {
		t.Errorf("redialMax %s, want at most a quarter of the timeout %s", m, timeout)
	}
}
