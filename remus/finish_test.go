package remus

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/rusage"
	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/transport"
	"github.com/ftvm/ftvm/wasi"
)

// finishRig is a primary whose guest ended with output held, protected by
// a session whose messages the test reads: Finish runs against it.
type finishRig struct {
	p        *Primary
	released atomic.Bool
	finished chan struct{}
}

func newFinishRig(t *testing.T, timeout time.Duration) *finishRig {
	t.Helper()
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1",
		Engine: engine.Config{Timeout: timeout, AckTimeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	r := &finishRig{p: p, finished: make(chan struct{})}
	p.gate.onOutput, p.gate.onOverLimit, p.gate.onQueued = nil, nil, nil
	p.gate.Output(wasi.Effect{Kind: wasi.EffectWrite, Fd: 1, Data: []byte("last line\n")},
		func([]byte) (uint32, wasi.Errno) { r.released.Store(true); return 10, wasi.ESUCCESS })
	r.state(engine.Protected)
	return r
}

func (r *finishRig) state(s engine.PrimaryState) {
	r.p.mu.Lock()
	r.p.status.State = s.String()
	r.p.mu.Unlock()
	select {
	case r.p.published <- struct{}{}:
	default:
	}
}

func (r *finishRig) session(id uint64) *session {
	s := &session{id: id, queue: make(chan any, 8), done: make(chan struct{})}
	s.whole.Store(1) // as if a checkpoint with disk operations were queued: the Exit goes through the queue, read here
	r.p.mu.Lock()
	r.p.sess = s
	r.p.mu.Unlock()
	return s
}

func (r *finishRig) start() { go func() { r.p.Finish(0); close(r.finished) }() }

// exitTold waits for the Exit Finish queues on s.
func exitTold(t *testing.T, s *session) *exitItem {
	t.Helper()
	select {
	case it := <-s.queue:
		return it.(*exitItem)
	case <-time.After(10 * time.Second):
		t.Fatal("no Exit sent")
		return nil
	}
}

// ackReleases acknowledges the Exit told to s, as its backup does, and
// checks that Finish then returns and releases the held output.
func (r *finishRig) ackReleases(t *testing.T, s *session) {
	t.Helper()
	close(*s.exitDone.Load())
	select {
	case <-r.finished:
	case <-time.After(10 * time.Second):
		t.Fatal("Finish did not return after the ack")
	}
	if !r.released.Load() {
		t.Fatal("the held output was not released after the backup acknowledged the exit")
	}
}

func (r *finishRig) quiet(t *testing.T, what string) {
	t.Helper()
	time.Sleep(50 * time.Millisecond)
	if r.released.Load() {
		t.Fatalf("the held output was released %s", what)
	}
}

// TestFinishReleasesOnlyWhatTheBackupCannotResume: after the guest's exit
// the output still held leaves only once the backup acknowledged the exit
// (it will never resume the VM) or was given up (no backup). A session
// lost before the ack is not a verdict: the Exit goes to the next session,
// and only its ack releases. Until 7 December the output left when the
// session ended, and a backup that never heard of the exit resumed its last
// checkpoint after clients had seen what came after it.
func TestFinishReleasesOnlyWhatTheBackupCannotResume(t *testing.T) {
	t.Run("acknowledged after a lost session", func(t *testing.T) {
		r := newFinishRig(t, time.Minute)
		s1 := r.session(1)
		r.start()
		x := exitTold(t, s1)
		close(s1.done) // lost before the ack
		r.quiet(t, "when the session was lost before acknowledging the exit")
		s2 := r.session(2)
		r.state(engine.Syncing) // a new session is up
		if y := exitTold(t, s2); y.exit.Seq != x.exit.Seq {
			t.Fatalf("the Exit told to the next session is %d, the first %d", y.exit.Seq, x.exit.Seq)
		}
		r.quiet(t, "before the next session acknowledged the exit")
		r.ackReleases(t, s2)
	})
	t.Run("given up", func(t *testing.T) {
		r := newFinishRig(t, time.Minute)
		s1 := r.session(1)
		r.start()
		exitTold(t, s1)
		close(s1.done)
		r.p.mu.Lock()
		r.p.sess = nil
		r.p.mu.Unlock()
		r.state(engine.Connecting)
		// Waiting for the verdict, not spinning: a closed channel of the
		// lost session kept waking the loop (a core at 100% for up to
		// twice the timeout and the ack timeout).
		before := rusage.CPU(t)
		r.quiet(t, "while connecting")
		time.Sleep(250 * time.Millisecond)
		if used := rusage.CPU(t) - before; used > 150*time.Millisecond {
			t.Fatalf("Finish used %v of CPU in 300 ms of waiting for a verdict", used)
		}
		r.state(engine.Unprotected) // the backup not heard for the timeout
		<-r.finished
		if !r.released.Load() {
			t.Fatal("an unprotected primary kept its output held after the guest's exit")
		}
	})
	t.Run("no verdict", func(t *testing.T) {
		r := newFinishRig(t, 20*time.Millisecond)
		s1 := r.session(1)
		r.start()
		exitTold(t, s1)
		close(s1.done)
		select {
		case <-r.finished:
		case <-time.After(10 * time.Second):
			t.Fatal("Finish did not give up")
		}
		if r.released.Load() {
			t.Fatal("output released without the backup's ack or its being given up")
		}
	})
}

// fakeBackup accepts connections until the test ends, reads each one's
// Hello and hands it to serve; it returns its address.
func fakeBackup(t *testing.T, serve func(c *transport.Conn, h *wire.Hello)) string {
	t.Helper()
	ln, err := transport.Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			c := transport.NewConn(nc, transport.Options{})
			if m, err := wire.Recv(c); err == nil {
				if h, ok := m.(*wire.Hello); ok {
					serve(c, h)
				}
			}
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// startDialer runs a primary's dialer against the backup at addr, the
// driver's end of its events drained. stop does what the end of Run does
// and says whether the dialer then returned.
func startDialer(t *testing.T, addr string, timeout time.Duration) (p *Primary, stop func() bool) {
	t.Helper()
	p, err := NewPrimary(PrimaryConfig{Backup: addr, Engine: engine.Config{Timeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	p.hello = wire.Hello{Version: wire.Version, VM: p.cfg.VM, Term: 1, Timeout: timeout}
	ctx, cancel := context.WithCancel(context.Background())
	dialed := make(chan struct{})
	go func() { p.dialer(ctx, nil, "fake"); close(dialed) }()
	go func() {
		for {
			select {
			case <-p.events:
			case <-dialed:
				return
			}
		}
	}()
	return p, func() bool {
		cancel()
		close(p.stop)
		select {
		case <-dialed:
			return true
		case <-time.After(5 * time.Second):
			return false
		}
	}
}

// TestStoppedPrimaryEndsItsSession: when Run stops, the backup session
// ends with it. Its receiver waited on the connection, and the sender and
// heartbeater with it, for as long as the backup kept the connection open
// (for ever, for a backup or proxy that does).
func TestStoppedPrimaryEndsItsSession(t *testing.T) {
	ended := make(chan error, 1)
	addr := fakeBackup(t, func(c *transport.Conn, _ *wire.Hello) {
		wire.SendFlush(c, &wire.Welcome{Session: 1, Timeout: time.Minute})
		for { // then only reads, keeping the connection open
			if _, err := wire.Recv(c); err != nil {
				ended <- err
				return
			}
		}
	})
	p, stop := startDialer(t, addr, time.Minute)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		p.mu.Lock()
		up := p.sess != nil
		p.mu.Unlock()
		if up {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no session")
		}
	}
	stopped := stop()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the backup's connection stayed open after the primary stopped")
	}
	if !stopped {
		t.Fatal("the dialer went on after the primary stopped")
	}
}

// TestFlappingBackupIsRedialedWithinItsGrace: a backup that welcomes the
// primary and drops it at once, again and again, is redialed within a
// quarter of the timeout each time: it may hold the checkpoints of an
// earlier session, and waits of up to twice the timeout (as before) let it
// fail over while the primary, not hearing it either, released output.
// Such a backup is given up by the engine instead (Ready.GiveUp): the
// dialer's next Hello says so, the backup's RejectReleased is stepped as
// engine.Released, and only then, the backup holding nothing to resume,
// does the dialer wait long (a second, doubling) before trying again.
func TestFlappingBackupIsRedialedWithinItsGrace(t *testing.T) {
	const timeout = 400 * time.Millisecond
	var mu sync.Mutex
	var welcomed, released []time.Time
	addr := fakeBackup(t, func(c *transport.Conn, h *wire.Hello) {
		mu.Lock()
		defer mu.Unlock()
		if h.GiveUp {
			released = append(released, time.Now())
			wire.SendFlush(c, &wire.Reject{Reason: "let go", Code: wire.RejectReleased})
		} else {
			welcomed = append(welcomed, time.Now())
			wire.SendFlush(c, &wire.Welcome{Session: 1, Timeout: timeout})
		}
	})
	p, err := NewPrimary(PrimaryConfig{Backup: addr, Engine: engine.Config{Timeout: timeout}})
	if err != nil {
		t.Fatal(err)
	}
	p.hello = wire.Hello{Version: wire.Version, VM: p.cfg.VM, Term: 1, Timeout: timeout}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dialed := make(chan struct{})
	go func() { p.dialer(ctx, nil, "fake"); close(dialed) }()
	gotReleased := make(chan engine.Released, 1)
	go func() {
		for {
			select {
			case ev := <-p.events:
				if r, ok := ev.(engine.Released); ok {
					p.giveUp.Store(false) // as the engine, Unprotected now
					gotReleased <- r
				}
			case <-dialed:
				return
			}
		}
	}()
	time.Sleep(1500 * time.Millisecond)
	mu.Lock()
	gaps := 0 * time.Second
	for i := 1; i < len(welcomed); i++ {
		gaps = max(gaps, welcomed[i].Sub(welcomed[i-1]))
	}
	n := len(welcomed)
	mu.Unlock()
	// redialMax is 100 ms here; a handshake and a busy machine add to
	// it, but a gap of the timeout is what a backup takes for a failure
	// (before, the waits doubled to 800 ms: 400 ms within 1.5 s).
	if n < 5 || gaps >= timeout {
		t.Fatalf("%d sessions in 1.5 s, the longest gap between them %v (timeout %v)", n, gaps, timeout)
	}
	p.giveUp.Store(true)
	var r engine.Released
	select {
	case r = <-gotReleased:
	case <-time.After(5 * time.Second):
		t.Fatal("the dialer gave the backup up, but did not step Released")
	}
	if r.Reason != "let go" {
		t.Fatalf("Released %+v", r)
	}
	mu.Lock()
	at := released[0]
	mu.Unlock()
	time.Sleep(700 * time.Millisecond)
	mu.Lock()
	var after []time.Time
	for _, w := range welcomed {
		if w.After(at) {
			after = append(after, w)
		}
	}
	mu.Unlock()
	if len(after) != 0 {
		t.Fatalf("redialed %v after the backup let the VM go", after[0].Sub(at))
	}
	cancel()
	close(p.stop)
	<-dialed
	t.Logf("%d sessions in 1.5 s, longest gap %v", n, gaps)
}
