// Package remus protects a running VM the way Remus (Cully et al., NSDI'08)
// protects a Xen guest: the primary runs the guest in epochs and, at the end
// of each, pauses it at a safe point, copies the dirty pages and device
// state, resumes it, and streams the checkpoint to a backup while the guest
// runs on. Every external output of an epoch is held until the backup has
// acknowledged that epoch's checkpoint. The backup never runs the guest
// until the primary falls silent; then it resumes the last committed
// checkpoint. The protocol's rules live in remus/engine (pure state
// machines); this package is the driver that does the I/O.
package remus

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/transport"
	"github.com/ftvm/ftvm/wasi"
	"golang.org/x/sys/unix"
)

// PrimaryConfig configures a protected primary.
type PrimaryConfig struct {
	// Backup is the backup's replication address (HOST:PORT).
	Backup string
	// TLS, if set, is the client side of mutual TLS.
	TLS    *tls.Config
	Engine engine.Config
	// VM identifies the protected VM to the backup (one slot per VM); a
	// random one by default. Term orders primaries of the same VM: a
	// backup that failed over rejects a primary of an older or equal term.
	VM   string
	Term uint64
	// HoldLimit bounds the bytes of output held for acks; beyond it the
	// guest is stopped until acks release output (64 MiB).
	HoldLimit int
	// Uncompressed sends pages raw (for fast links, and to measure).
	Uncompressed bool
	Log          *slog.Logger
}

// Primary drives a protected VM: make the gate, give it to the machine's
// Config (Gate), Start the driver (the session with the backup comes up
// meanwhile), create the machine, then Run the driver with it beside
// m.Run, the guest started once WaitSession returns.
type Primary struct {
	cfg  PrimaryConfig
	gate *holdGate
	log  *slog.Logger
	eng  *engine.Primary
	t0   time.Time

	events  chan engine.PrimaryEvent
	release chan struct{} // wakes the releaser
	stop    chan struct{}
	// peerTimeout is the backup's --timeout as its last Welcome said (a
	// time.Duration; 0 until one did): it bounds the redials (redialMax).
	peerTimeout atomic.Int64

	// aheadBuf is the driver's, for collectAhead; lastDirty is the last
	// checkpoint's page count: it decides whether the next is collected
	// ahead.
	aheadBuf  []uint32
	lastDirty atomic.Int64
	// lastWait is how long the last checkpoint's pause came after it was
	// asked for (a time.Duration): long while the guest computes without
	// host calls, and then collecting ahead only costs (aheadMaxWait).
	lastWait atomic.Int64

	// Guest-goroutine state (touched only inside pauses).
	dirtyBuf []uint32
	// pausedSeq is the checkpoint whose pause OnPaused reports next.
	pausedSeq uint64
	// captured is the last checkpoint captured (set in its pause): the
	// guest, once ended, ended in epoch captured+1 (Finish).
	captured atomic.Uint64
	// stage is the staging memory, kept faulted in for the pauses; each
	// checkpoint has a stager of its own on it until it is sent.
	stage snapshot.StagePool
	// stagers are released stagers kept for reuse (getStager), and
	// devStates device states whose encoding is done (getDevState).
	stagersMu sync.Mutex
	stagers   []*snapshot.Stager
	devStates []*wasi.State
	refilling atomic.Bool

	mu       sync.Mutex
	sess     *session // the current session, under mu
	nextSess uint64
	status   PrimaryStatus
	recent   *checkpointLog
	relUpTo  uint64
	relAll   bool
	hello    wire.Hello
	// left and giveUp are what the next Hello says beside hello (the
	// engine's Left and Ready.GiveUp, as of its last Ready); protections
	// counts the engine's entries into Protected (the dialer's backoff
	// after a give-up ends with one).
	left        atomic.Uint64
	giveUp      atomic.Bool
	dials       atomic.Uint64 // Hello.Dial of the last connection
	protections atomic.Uint64
	// stalling: a back-pressure stall is queued or running.
	stalling atomic.Bool
	machine  atomic.Pointer[machine.Machine]
	// idleTakes: the engine, as of its last Ready, would take a
	// checkpoint for a guest going idle (a session, room in flight).
	idleTakes atomic.Bool
	requests  atomic.Uint64 // checkpoints asked of the machine so far
	// queued: of those, captures queued on the machine (PauseAsync), so
	// that the guest's very next safe point takes them. A stall ends for
	// a queued capture, not for a request: between the two the loop
	// walks page tables or collects pages ahead, and waited for the
	// gate's lock, and a guest let go at the request wrote on unstalled
	// meanwhile (TestRemusBackPressure saw 1.3 MB held at a limit of 256
	// KiB, about one run in five under load). Counted after the queueing:
	// captures may be ahead of it for a moment.
	queued   atomic.Uint64
	captures atomic.Uint64 // of those, captures begun (in their pause)
	// startOnce starts the driver (Start); cancel ends it, loopDone is
	// closed once it has ended, with loopErr. attached is closed once Run
	// has the machine; until then the loop keeps the checkpoint the
	// engine asked for in pendingTake. guest describes the guest.
	startOnce   sync.Once
	cancel      context.CancelFunc
	loopDone    chan struct{}
	loopErr     error
	attached    chan struct{}
	pendingTake *engine.CheckpointRequest
	guest       Guest
	// started is closed once a session is up and its first checkpoint
	// requested, or the primary runs unprotected: WaitSession's end.
	started     chan struct{}
	startedOnce sync.Once
	// finished: Finish is done (the backup knows the guest ended, or
	// protection was given up); the dialer stops.
	finished atomic.Bool
	// ending is set once Finish tells the backup the guest ended: the
	// session's end that follows is the run's, not news (do logs the loss
	// of protection then at debug).
	ending atomic.Bool
	// published is signalled (without blocking) whenever the status is
	// updated: Finish waits on it for the last acknowledgement.
	published chan struct{}
	// fenced is closed once the backup said it runs the VM (the engine's
	// Fenced): the guest must stop, its held output with it.
	fenced     chan struct{}
	fencedOnce sync.Once
}

// PrimaryStatus is what `ftvm status` shows of a protected primary.
type PrimaryStatus struct {
	Role            string `json:"role"`
	State           string `json:"state"`
	Backup          string `json:"backup"`
	VM              string `json:"vm"`
	Term            uint64 `json:"term"`
	Session         uint64 `json:"session"`
	Epoch           uint64 `json:"epoch"`
	Acked           uint64 `json:"acked"`
	Released        uint64 `json:"released_epoch"`
	Lag             uint64 `json:"lag_epochs"`
	Inflight        int    `json:"inflight"`
	Checkpoints     uint64 `json:"checkpoints"`
	FullCheckpoints uint64 `json:"full_checkpoints"`
	// FailedCheckpoints counts pauses that could not capture their
	// checkpoint (each logged; the next checkpoint is full).
	FailedCheckpoints uint64  `json:"failed_checkpoints"`
	LastPauseUS       float64 `json:"last_pause_us"`
	LastDirtyPages    int     `json:"last_dirty_pages"`
	LastBytes         int     `json:"last_checkpoint_bytes"`
	BytesSent         uint64  `json:"bytes_replicated"`
	DeltaPages        uint64  `json:"delta_pages"` // pages sent as deltas against the backup's copies
	AheadPages        uint64  `json:"ahead_pages"` // pages copied before their checkpoint's pause (CollectAhead)
	HeldBytes         int     `json:"held_output_bytes"`
	// JournalBytes is the running epoch's disk journal: file writes the
	// guest made since the last checkpoint, counted against --hold-limit
	// with held output.
	JournalBytes  int     `json:"journal_bytes"`
	ReleasedBytes uint64  `json:"released_output_bytes"`
	BackupHealthy bool    `json:"backup_healthy"`
	LastHeardMS   float64 `json:"backup_last_heard_ms"`
	Reason        string  `json:"reason,omitempty"`
	// BackupRefused is why the backup refused this primary's last
	// Hello ("" once a session is up).
	BackupRefused string `json:"backup_refused,omitempty"`
	Stalls        uint64 `json:"stalls"`
	// StoodStill counts the times this primary's loop stood still for
	// most of the timeout (engine StoodStill): a stopped or starved
	// process, whose backup may have failed over meanwhile.
	StoodStill uint64 `json:"stood_still"`
	// GaveUp counts the times this primary gave its backup up through a
	// Hello (engine GiveUp): the backup accepted sessions and acked none
	// for the timeout, and let the VM go before output was released.
	GaveUp uint64 `json:"gave_up_backup"`
}

// NewPrimary prepares a primary; its Gate goes into the machine's Config.
func NewPrimary(cfg PrimaryConfig) (*Primary, error) {
	cfg.Engine = cfg.Engine.WithDefaults()
	if err := cfg.Engine.Validate(); err != nil {
		return nil, err
	}
	if cfg.VM == "" {
		var b [8]byte
		rand.Read(b[:])
		cfg.VM = hex.EncodeToString(b[:])
	}
	if cfg.Term == 0 {
		cfg.Term = 1
	}
	if cfg.HoldLimit == 0 {
		cfg.HoldLimit = 64 << 20
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	p := &Primary{cfg: cfg, gate: newHoldGate(cfg.HoldLimit), log: cfg.Log.With("role", "primary", "vm", cfg.VM),
		events: make(chan engine.PrimaryEvent, 256), release: make(chan struct{}, 1), stop: make(chan struct{}),
		started: make(chan struct{}), loopDone: make(chan struct{}), attached: make(chan struct{}), published: make(chan struct{}, 1), fenced: make(chan struct{})}
	// The clock starts now, not in Run: the guest may produce output
	// (an Output event) before the driver loop runs.
	p.t0 = time.Now()
	p.status = PrimaryStatus{Role: "primary", Backup: cfg.Backup, VM: cfg.VM, Term: cfg.Term}
	p.recent = newCheckpointLog()
	p.gate.onOutput = func() { p.event(engine.Output{Now: p.now()}) }
	p.gate.onOverLimit = p.overLimit
	p.gate.onQueued = p.wakeReleaser
	return p, nil
}

// newRun is a Hello's Run: random and nonzero, one per primary.
func newRun() uint64 {
	for {
		var b [8]byte
		rand.Read(b[:])
		if r := binary.LittleEndian.Uint64(b[:]); r != 0 {
			return r
		}
	}
}

// Gate is the output gate the machine must use.
func (p *Primary) Gate() wasi.OutputGate { return p.gate }

// OnIdle goes into the machine's Config (OnIdle): when the guest goes to
// sleep with output of this epoch held, the epoch ends at once. It reports
// whether the loop, told so, is to ask for the pause: not while a
// checkpoint is being taken, none can be (no session, --max-inflight
// unacknowledged), or the event did not get through.
func (p *Primary) OnIdle() bool {
	if !p.gate.outputWaiting() {
		return false
	}
	sent := p.event(engine.GuestIdle{Now: p.now()})
	return sent && p.idleTakes.Load() && p.requests.Load() == p.captures.Load()
}

func (p *Primary) now() engine.Time { return time.Since(p.t0) }

// event hands an event to the driver loop without ever blocking the guest.
func (p *Primary) event(ev engine.PrimaryEvent) (sent bool) {
	select {
	case p.events <- ev:
		return true
	default:
		// The loop is far behind; a lost Output or Heartbeat only delays
		// an epoch end or refreshes liveness later. Other events are sent
		// from goroutines that may block (see send).
		return false
	}
}

// send hands an event that must not be lost to the driver loop.
func (p *Primary) send(ev engine.PrimaryEvent) {
	select {
	case p.events <- ev:
	case <-p.stop:
	}
}

// Guest describes the guest to the backup, in the session's Hello.
type Guest struct {
	// Module is the module as given to the machine (its hash names it to
	// the backup; the first full checkpoint carries it), Name its name.
	Module []byte
	Name   string
	// Preopens are the guest paths of its preopened directories, in
	// order (the backup keeps a replica of each).
	Preopens []string
	// Listen are its listeners: as bound (GuestOf), or as asked for
	// before the machine binds them (Fd 0: the next free descriptor).
	// The backup does not depend on them (failover binds what the
	// checkpoint's device state holds).
	Listen []wire.Listener
}

// GuestOf describes m's guest (Start's argument, once m exists).
func GuestOf(m *machine.Machine, module []byte, name string) Guest {
	g := Guest{Module: module, Name: name}
	for fd, addr := range m.Info().Listeners {
		g.Listen = append(g.Listen, wire.Listener{Fd: fd, Addr: addr})
	}
	slices.SortFunc(g.Listen, func(a, b wire.Listener) int { return cmp.Compare(a.Fd, b.Fd) })
	for _, pre := range m.Devices().Capture().Preopens {
		g.Preopens = append(g.Preopens, pre.GuestPath)
	}
	return g
}

// Start brings replication up before the machine exists: the driver loop
// runs, and the session with the backup comes up (the backup creates the
// VM's slot: about 3 ms here) while the caller builds the machine (about
// 9 ms: its compiled code loaded, the host modules compiled), which it
// then hands to Run. A checkpoint the engine asks for meanwhile is taken
// once Run has the machine. Start is optional (Run starts what it has
// not); a second call does nothing. ctx bounds the driver, as Run's does.
func (p *Primary) Start(ctx context.Context, g Guest) {
	p.startOnce.Do(func() { p.start(ctx, g) })
}

// start is Start's, once.
func (p *Primary) start(ctx context.Context, g Guest) {
	ctx, cancel := context.WithCancel(ctx)
	p.cancel = cancel
	eng, err := engine.NewPrimary(p.cfg.Engine, p.now())
	if err != nil { // NewPrimary validated the config
		p.loopErr = err
		cancel()
		close(p.loopDone)
		return
	}
	p.eng = eng
	p.guest = g
	p.hello = wire.Hello{Version: wire.Version, VM: p.cfg.VM, Term: p.cfg.Term, Module: snapshot.ModuleHash(g.Module),
		Name: g.Name, Timeout: p.cfg.Engine.Timeout, Listen: g.Listen, Preopens: g.Preopens, Run: newRun()}
	p.hello.Host, _ = os.Hostname()
	go warmDeviceJSON() // while the session comes up
	go func() {
		defer close(p.loopDone)
		defer cancel()
		p.loop(ctx)
	}()
}

// Run drives replication for m until ctx ends or the VM does (the caller
// runs m.Run; Run returns when told by Close). module and name describe
// the guest for the backup, unless Start did already.
func (p *Primary) Run(ctx context.Context, m *machine.Machine, module []byte, name string) error {
	// Described only if Start was not called: GuestOf reads the
	// device state, which the guest, started already, may be changing.
	p.startOnce.Do(func() { p.start(ctx, GuestOf(m, module, name)) })
	stop := context.AfterFunc(ctx, p.cancel)
	defer stop()
	// A heap that grows is staged whole at the next checkpoint: fault the
	// staging memory in now, while the guest runs, not in that pause.
	m.OnMemoryGrow(func(oldBytes, newBytes uint64) {
		p.stage.ExpectGrowth(int((newBytes - oldBytes) / snapshot.PageSize))
		p.refillStagers()
	})
	defer m.OnMemoryGrow(nil)
	m.OnPaused(p.paused)
	defer m.OnPaused(nil)
	p.machine.Store(m)
	p.refillStagers() // buffers ready before the first pause
	close(p.attached)
	<-p.loopDone
	return p.loopErr
}

// loop is the driver: it feeds the engine events and carries out its
// Ready (Start's goroutine).
func (p *Primary) loop(ctx context.Context) {
	defer close(p.stop)
	defer p.gate.close()
	go p.releaser(ctx)
	go p.dialer(ctx, p.guest.Module, p.guest.Name)

	attached := p.attached // nil once Run has the machine
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if attached == nil && p.pendingTake != nil {
			req := *p.pendingTake
			p.pendingTake = nil
			p.take(req, p.guest.Module, p.guest.Name)
		}
		rd := p.eng.Ready()
		p.do(ctx, rd, p.guest.Module, p.guest.Name)
		p.eng.Advance()
		p.publish()
		if rd.Wake != engine.Never {
			timer.Reset(max(rd.Wake-p.now(), 0))
		}
		select {
		case ev := <-p.events:
			p.step(ev)
			p.stepQueued()
		case <-timer.C:
			// Queued events happened before now: a heartbeat among
			// them must count before the timeout is checked.
			p.stepQueued()
			p.step(engine.Tick{Now: p.now()})
		case <-attached:
			attached = nil
		case <-ctx.Done():
			return
		}
	}
}

// stepQueued steps every event already queued, without waiting for more.
func (p *Primary) stepQueued() {
	for {
		select {
		case ev := <-p.events:
			p.step(ev)
		default:
			return
		}
	}
}

func (p *Primary) step(ev engine.PrimaryEvent) {
	if err := p.eng.Step(ev); err != nil {
		p.log.Debug("engine refused event", "event", fmt.Sprintf("%T", ev), "err", err)
	}
}

// do carries out one Ready.
func (p *Primary) do(ctx context.Context, rd engine.PrimaryReady, module []byte, name string) {
	for _, sc := range rd.StateChanges {
		lvl := slog.LevelInfo
		if sc.To == engine.Unprotected {
			lvl = slog.LevelError
		}
		msg := "protection state"
		if sc.To == engine.Unprotected {
			msg = "NOT PROTECTED: running without a backup"
		}
		if p.ending.Load() && (sc.To == engine.Connecting || sc.To == engine.Unprotected) {
			lvl = slog.LevelDebug // the guest ended: its session's end follows
		}
		if sc.To == engine.Fenced { // for good: the state is never left
			lvl, msg = slog.LevelError, "FENCED: the backup runs this VM now; stopping it here, its held output never released"
			p.fencedOnce.Do(func() { close(p.fenced) })
		}
		if sc.To == engine.Protected {
			p.protections.Add(1)
		}
		p.log.Log(ctx, lvl, msg, "from", sc.From.String(), "to", sc.To.String(), "reason", sc.Reason)
		p.mu.Lock()
		p.status.Reason = sc.Reason
		p.mu.Unlock()
	}
	if rd.StoodStill != 0 {
		p.log.Warn("this primary stood still, its heartbeats with it: the backup may have failed over; output stays held until the backup is heard from",
			"for", rd.StoodStill)
		p.mu.Lock()
		p.status.StoodStill++
		p.mu.Unlock()
	}
	for _, d := range rd.DropSession {
		p.mu.Lock()
		s := p.sess
		p.mu.Unlock()
		if s != nil && s.id == d.Session {
			p.log.Warn("dropping backup session", "session", d.Session, "reason", d.Reason)
			s.close()
		}
	}
	if rd.SendHeartbeat != 0 {
		if s := p.session(rd.SendHeartbeat); s != nil {
			s.heartbeat(p.eng.Seq())
		}
	}
	p.gate.setPass(rd.PassThrough)
	p.mu.Lock()
	changed := rd.Release > p.relUpTo || rd.PassThrough != p.relAll
	p.relUpTo, p.relAll = max(p.relUpTo, rd.Release), rd.PassThrough
	p.mu.Unlock()
	if changed {
		p.wakeReleaser()
	}
	// What the next Hello says (the dialer's): see wire.Hello.
	p.left.Store(p.eng.Left())
	p.giveUp.Store(rd.GiveUp)
	if req := rd.TakeCheckpoint; req != nil {
		if p.machine.Load() == nil {
			// Started before the machine (Start): taken once Run has it.
			p.pendingTake = req
		} else {
			p.take(*req, module, name)
		}
	}
}

// Fenced is closed once the backup has said it runs this VM now (it failed
// over while this primary stood still or was cut off from it), or will
// unless an earlier run of the VM comes back. The guest must be stopped;
// its held output is never released.
func (p *Primary) Fenced() <-chan struct{} { return p.fenced }

// IsFenced says whether Fenced is closed.
func (p *Primary) IsFenced() bool {
	select {
	case <-p.fenced:
		return true
	default:
		return false
	}
}

func (p *Primary) session(id uint64) *session {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sess != nil && p.sess.id == id {
		return p.sess
	}
	return nil
}

// take asks the VM to pause at its next safe point and capture checkpoint
// req.Seq. The capture runs on the guest goroutine; the epoch switch of the
// output gate happens there too, so no output can fall between epochs.
func (p *Primary) take(req engine.CheckpointRequest, module []byte, name string) {
	sess := p.session(req.Session)
	p.requests.Add(1)
	m := p.machine.Load()
	st := p.getStager()
	ahead := 0
	if !req.Full && p.lastDirty.Load() >= aheadMinPages && time.Duration(p.lastWait.Load()) <= aheadMaxWait {
		ahead = p.collectAhead(m, st)
	}
	if ahead == 0 {
		// Walked here, while the guest runs, the page tables are cached
		// for the dirty-page walk in the pause (a third off it at 256
		// MiB). (Collecting ahead walked them.)
		m.WarmDirty()
	}
	// Errors are logged by the job itself: nothing waits on PauseAsync's
	// result, so the pause wakes no goroutine for it.
	asked := time.Now()
	m.PauseAsync(func(pp *machine.Paused) error {
		p.captures.Add(1)
		p.captured.Store(req.Seq)
		p.lastWait.Store(int64(time.Since(asked)))
		cp, dirty, err := captureCheckpoint(pp, req.Seq, req.Full, st, p.getDevState(), p.dirtyBuf, module, name)
		p.dirtyBuf = dirty
		if err != nil {
			p.putStager(st)
			p.log.Error("checkpoint failed; the next one is full", "seq", req.Seq, "err", err)
			p.mu.Lock()
			p.status.FailedCheckpoints++
			p.mu.Unlock()
			pp.AfterResume(func() { p.send(engine.CheckpointFailed{Now: p.now(), Seq: req.Seq, Reason: err.Error()}) })
			return err
		}
		if !req.Full {
			p.stage.Expect(cp.snap.Pages, cp.snap.MemorySize)
		}
		cp.ahead = ahead
		p.lastDirty.Store(int64(cp.dirty))
		p.gate.setEpoch(req.Seq)
		_, ops := p.gate.endEpoch()
		if !req.Full {
			cp.ops = ops // a full checkpoint's tree already has them
		}
		// handOff tells the loop the checkpoint was taken (before it can
		// be streamed: the engine must know it was taken before its ack
		// can arrive) and gives it to the sender. Both wake other
		// goroutines — the encoder then competes for the CPU — so unless
		// the guest must wait for acks in this pause, it runs once the
		// guest is rewound, before the host call it stopped at (so before
		// any output of the next epoch).
		handOff := func() {
			p.mu.Lock()
			// The capture's time until OnPaused says how long the
			// whole pause was (paused).
			p.status.LastPauseUS = float64(cp.pause.Nanoseconds()) / 1000
			p.status.LastDirtyPages = cp.dirty
			p.status.AheadPages += uint64(cp.ahead)
			p.status.Checkpoints++
			if req.Full {
				p.status.FullCheckpoints++
			}
			p.recent.add(CheckpointRecord{Seq: req.Seq, Session: req.Session, Full: req.Full, At: time.Now(),
				PauseUS: p.status.LastPauseUS, DirtyPages: cp.dirty, AheadPages: cp.ahead})
			p.mu.Unlock()
			p.pausedSeq = req.Seq
			p.send(engine.CheckpointTaken{Now: p.now(), Seq: req.Seq})
			if sess != nil {
				sess.enqueue(cp)
			} else {
				p.putStager(cp.stager)
			}
			p.refillIfDry()
		}
		// Back-pressure: a slow backup stalls output release, then the
		// guest. Wait until acks bring held output under the limit (or
		// all that is held is this epoch's, which only the next
		// checkpoint can release). A stall queued by overLimit may run
		// in this same pause and wait for this checkpoint's ack: hand
		// it off now then, too.
		if p.gate.overLimitOld() {
			handOff()
			p.mu.Lock()
			p.status.Stalls++
			p.mu.Unlock()
			// Until acks release enough, or another checkpoint is
			// asked for: its capture is a pause queued behind this
			// one (a resync's full checkpoint, say, whose ack is
			// what would release the output; waiting for it here
			// waited for ever).
			p.gate.waitBelow(p.stop, func() bool { return p.queued.Load() > p.captures.Load() })
			return nil
		}
		if p.stalling.Load() {
			handOff()
			return nil
		}
		pp.AfterResume(handOff)
		return nil
	})
	// Counted once queued (its capture may have begun already, hence
	// queued > captures where it is read), then a stalled pause is told:
	// it lets the guest go on to this capture. Nothing may come between
	// the request and the queueing that a stalled guest waits for: the
	// gate's lock, which the nudge takes and the guest's every output
	// too, was 6 ms away once on this VM, and a stall that ended for the
	// request meanwhile let the guest write on (1.3 MB held at a limit of
	// 256 KiB).
	p.queued.Add(1)
	p.gate.nudge()
	if sess != nil {
		// Queued: the guest, started now, stops at its first host call.
		p.markStarted()
	}
}

// aheadMinPages is the least number of pages in the last checkpoint for
// the next to be collected ahead (collectAhead). Below it the pause's copy
// is short (about 0.4–0.7 µs a page on the project's VMs, so under 200
// µs), and collecting ahead would only walk the page tables twice and delay
// the pause, which an epoch ended early for waiting output cannot afford.
const aheadMinPages = 256

// aheadMaxWait is the longest wait between asking for the last checkpoint's
// pause and its start for the next to be collected ahead. A guest that
// went that long without a host call is computing: it would go on writing
// the pages collected ahead long before the pause comes, and each of those
// writes is a fault more (16–18 µs on this project's VM) for a copy the
// pause makes again. (A CPU-bound C guest protected at 25 ms: 257 → 274
// ms, median of 12 interleaved runs, until this rule.)
const aheadMaxWait = 5 * time.Millisecond

// collectAhead copies into st, while the guest runs, the pages it has
// written so far this epoch, and write-protects them (machine.CollectAhead):
// the pause then copies only the pages written after, adding them to st.
// A guest that writes many pages an epoch pays for most of the copying
// while it runs, on another core, instead of stopped. It returns how many
// pages it copied (0: none, and st is untouched).
func (p *Primary) collectAhead(m *machine.Machine, st *snapshot.Stager) int {
	pages, ok, err := m.CollectAhead(p.aheadBuf[:0], func(mem []byte, pages []uint32) error {
		_, err := st.Stage(mem, pages)
		return err
	})
	p.aheadBuf = pages
	if err != nil {
		// Pages not copied are reported by the pause's collection.
		p.log.Error("collecting pages ahead of the pause failed", "err", err)
		st.Release()
		return 0
	}
	if !ok {
		return 0
	}
	return len(pages)
}

// paused learns, on the guest's goroutine, how long a pause stopped the
// guest: the whole of it (unwind, capture, rewind, hand-off, and a
// back-pressure stall), which is what the checkpoint's record and the
// status report, rather than the capture alone.
func (p *Primary) paused(d time.Duration) {
	seq := p.pausedSeq
	if seq == 0 {
		return // not a checkpoint's pause (a snapshot's)
	}
	p.pausedSeq = 0
	us := float64(d.Nanoseconds()) / 1000
	p.mu.Lock()
	p.status.LastPauseUS = us
	p.recent.paused(seq, us)
	p.mu.Unlock()
}

// WaitSession waits (at most the engine's Timeout) until a backup session
// is up, or the primary has given up on it. Starting the guest after it
// makes the first, full checkpoint small (the guest's memory before it ran)
// and protects the guest from its first host call on, also a guest that
// then computes for long without any (it cannot be checkpointed meanwhile).
func (p *Primary) WaitSession(ctx context.Context) {
	// Up means the first checkpoint is already requested: otherwise the
	// guest's first host calls could pass before the request, and its
	// first checkpoint wait for its next host call. Told, not polled: a
	// poll every millisecond started the guest half a millisecond late on
	// average.
	t := time.NewTimer(p.cfg.Engine.Timeout)
	defer t.Stop()
	// Not before Run has the machine: its hooks (memory growth for the
	// staging, the pauses' report) must be in place before the guest
	// starts, and since Start, protection may be given up (started
	// closed) before Run is called.
	select {
	case <-p.attached:
	case <-ctx.Done():
		return
	}
	select {
	case <-p.started:
	case <-t.C:
	case <-ctx.Done():
	}
}

// markStarted ends WaitSession.
func (p *Primary) markStarted() { p.startedOnce.Do(func() { close(p.started) }) }

// Finish is called once the guest has ended by itself (an exit, or a
// trap): it tells the backup the guest ended, so that it never resumes it,
// and once the backup has acknowledged that, releases all output still
// held. Checkpoints taken but not yet acknowledged carry state that no
// failover will ever resume, so those of only memory are abandoned, even
// mid-stream, rather than waited for: a computing guest's last checkpoint
// carries the growth of its heap since the one before (a C guest's 8 MB:
// 20–45 ms of encoding, streaming and decoding between its exit and its
// last line's release). One with disk operations or files is still sent
// first, and the backup commits it before it hears of the exit, unless one
// before it was abandoned: the backup lacks its base then, so its disk
// operations go with the Exit instead. The Exit carries those and the
// disk operations of the epoch the guest ended in, and names the last
// checkpoint sent whole, which they follow; the backup applies them on
// top of that commit, so its copy of the guest's files ends as the
// primary's. An unprotected primary releases at once.
//
// Output held is released only once the backup has acknowledged the exit,
// or protection is given up (the backup not heard for the timeout). A
// session lost before the acknowledgement is waited out: the Exit goes
// again to the next session, if one comes up. Until 7 December the output
// left whenever the session ended or twice the timeout passed: a backup
// that had not heard of the exit then resumed its last checkpoint, after
// clients had seen output of epochs it never had. If no verdict comes
// within twice the timeout and the ack timeout, nothing is released: the
// backup, not hearing from this process any more, resumes the VM from its
// last checkpoint, and its run makes that output again. It must run once
// the guest has ended, on no goroutine that may still run a pause.
func (p *Primary) Finish(code uint32) {
	giveUp := time.NewTimer(2*p.cfg.Engine.Timeout + p.cfg.Engine.AckTimeout)
	defer giveUp.Stop()
	var (
		told     *session // the session the Exit went to last
		toldLost bool     // and it ended before acknowledging it
		ackd     chan struct{}
		seq      uint64
		ops      []wire.FsOp
		epochEnd bool
	)
	for {
		if p.IsFenced() {
			return // the VM is the backup's: nothing of this run leaves
		}
		st := p.Status()
		if st.State == engine.Unprotected.String() || st.State == "" {
			break // no backup to tell: this copy is the only one
		}
		p.mu.Lock()
		s := p.sess
		p.mu.Unlock()
		if s != nil && s != told && (st.State == engine.Syncing.String() || st.State == engine.Protected.String()) {
			// Any backup that follows this VM, even one still syncing,
			// must hear that it ended, or it would resume an older
			// checkpoint later.
			if !epochEnd {
				// The epoch the guest ended in: no checkpoint has its
				// number, so the backup's ack of it is told apart from
				// theirs.
				seq = p.captured.Load() + 1
				_, ops = p.gate.endEpoch()
				epochEnd = true
			}
			done := make(chan struct{})
			s.exitSeq.Store(seq)
			s.exitDone.Store(&done)
			s.exiting.Store(true)
			p.ending.Store(true)
			it := &exitItem{exit: wire.Exit{Seq: seq, Code: code}, ops: ops}
			if s.sendExit(it) {
				told, toldLost, ackd = s, false, done
				p.log.Debug("the guest's exit sent at once, not behind the sender's queue", "seq", seq, "after", it.exit.After)
			} else {
				select {
				case s.queue <- it:
					told, toldLost, ackd = s, false, done
				case <-s.done:
					told, toldLost = s, true // ended already: wait for the next
				}
			}
		}
		var lost <-chan struct{}
		if told != nil && !toldLost {
			lost = told.done // closed for good once it ends: watched once
		}
		select {
		case <-ackd:
			p.log.Info("the backup acknowledged the guest's exit", "session", told.id)
		case <-lost:
			select {
			case <-ackd: // acknowledged just before the session ended
			default:
				ackd, toldLost = nil, true // wait for the verdict, or for a next session to tell
				continue
			}
		case <-p.published:
			continue
		case <-giveUp.C:
			p.log.Error("the backup did not acknowledge the guest's exit and was not given up: the output still held " +
				"is not released (the backup resumes the VM from its last checkpoint)")
			p.finished.Store(true)
			return
		}
		break
	}
	if p.IsFenced() {
		return
	}
	p.gate.setPass(true)
	p.gate.drain(0, true)
	// The backup knows, or protection was given up: a new session now
	// would be a new run of the VM to the backup, one that never sends a
	// checkpoint.
	p.finished.Store(true)
}

// getStager returns a stager drawing on the primary's pool, one released
// before if there is one: its lists keep their room, so that the pause's
// Add allocates nothing (snapshot.Stager.Add).
func (p *Primary) getStager() *snapshot.Stager {
	p.stagersMu.Lock()
	defer p.stagersMu.Unlock()
	if n := len(p.stagers); n > 0 {
		st := p.stagers[n-1]
		p.stagers = p.stagers[:n-1]
		return st
	}
	return &snapshot.Stager{Pool: &p.stage}
}

// putStager gives a sent checkpoint's chunks back to the pool, and keeps
// the stager for the next checkpoint (a few: as many as are in flight).
func (p *Primary) putStager(st *snapshot.Stager) {
	st.Release()
	p.stagersMu.Lock()
	if len(p.stagers) < maxIdleStagers {
		p.stagers = append(p.stagers, st)
	}
	p.stagersMu.Unlock()
	p.refillStagers() // what the pool still lacks with these chunks back
}

// getDevState returns a device state for a pause to capture into: one
// whose encoding is done (putDevState), so that the pause reuses its
// descriptor table rather than allocate one (wasi.CaptureInto); nil, for a
// new one, if there is none.
func (p *Primary) getDevState() *wasi.State {
	p.stagersMu.Lock()
	defer p.stagersMu.Unlock()
	n := len(p.devStates)
	if n == 0 {
		return nil
	}
	st := p.devStates[n-1]
	p.devStates = p.devStates[:n-1]
	return st
}

// putDevState keeps a checkpoint's device state, encoded and no longer
// referred to, for a later pause (as many as stagers).
func (p *Primary) putDevState(st *wasi.State) {
	if st == nil {
		return
	}
	p.stagersMu.Lock()
	defer p.stagersMu.Unlock()
	if len(p.devStates) < maxIdleStagers {
		p.devStates = append(p.devStates, st)
	}
}

// maxIdleStagers bounds the stagers kept for reuse.
const maxIdleStagers = 8

// refillIfDry runs at the end of a pause: it tops the staging pool up only
// if the pause left it dry. Otherwise the chunks the checkpoint took come
// back once it is sent, and putStager tops up then: topping up here,
// before they came back, faulted in a chunk more than the pool keeps
// (4 MiB, 1–9 ms of CPU on this project's VM), at a short run's first
// checkpoint while its guest started.
func (p *Primary) refillIfDry() {
	if p.stage.Dry() {
		p.refillStagers()
	}
}

// refillStagers tops up the staging pool on another goroutine, so that
// pauses do not allocate (snapshot.StagePool.Refill).
func (p *Primary) refillStagers() {
	// Most calls find the pool full: no goroutine to start (and wake).
	if !p.stage.Short() || !p.refilling.CompareAndSwap(false, true) {
		return
	}
	go func() {
		for {
			p.stage.Refill()
			p.refilling.Store(false)
			// A growth announced after Refill's last look, whose
			// refillStagers found this one still running.
			if !p.stage.Short() || !p.refilling.CompareAndSwap(false, true) {
				return
			}
		}
	}()
}

// overLimit runs on the guest goroutine when held output passes the limit:
// end the epoch now, so that what is held can be acknowledged.
//
// That alone does not bound memory: until the checkpoint is taken — and
// with checkpoints in flight at the engine's limit (a slow or frozen
// backup) none comes — the running epoch's output would grow. So the guest
// is also stopped at its very next safe point until held output is back
// under the limit or a checkpoint is queued; that checkpoint's own pause
// then waits for acks (see take).
func (p *Primary) overLimit() {
	p.event(engine.HoldFull{Now: p.now()})
	m := p.machine.Load()
	if m == nil || !p.stalling.CompareAndSwap(false, true) {
		return
	}
	m.PauseAsync(func(*machine.Paused) error {
		defer p.stalling.Store(false)
		counted := false
		for {
			if p.stallOver() {
				return nil
			}
			if !counted {
				counted = true
				p.mu.Lock()
				p.status.Stalls++
				p.mu.Unlock()
			}
			select {
			case <-p.stop:
				return nil
			case <-time.After(time.Millisecond):
			}
		}
	})
}

// stallOver reports whether a back-pressure stall may let the guest go
// on: held output and the running epoch's disk journal are under the
// limit, protection was given up, or a checkpoint's capture is queued and
// not begun. That capture runs at the guest's next safe point (its pause
// waits for acks if need be); it may be queued behind the stall, so
// waiting for it here would wait for ever. A request alone is not enough:
// the loop queues its capture only after walking the page tables or
// collecting pages ahead (take), and a guest let go at the request wrote
// on unstalled meanwhile. (Counting only the captures queued after the
// stall began missed one queued, for the stall's own HoldFull, between
// the two: the guest stayed stopped.)
func (p *Primary) stallOver() bool {
	held, _, _, _ := p.gate.stats()
	st := p.Status()
	return held <= p.cfg.HoldLimit && p.gate.journalBytes() <= p.cfg.HoldLimit ||
		st.State != engine.Protected.String() && st.State != engine.Syncing.String() ||
		p.queued.Load() > p.captures.Load()
}

// wakeReleaser has the releaser drain what may leave now (it was told
// already if a wake is pending).
func (p *Primary) wakeReleaser() {
	select {
	case p.release <- struct{}{}:
	default:
	}
}

// releaser performs released output in order, off the guest goroutine.
func (p *Primary) releaser(ctx context.Context) {
	for {
		select {
		case <-p.release:
		case <-ctx.Done():
			// Whatever is held when the primary stops was never
			// acknowledged: it must not leave.
			return
		}
		p.mu.Lock()
		upTo, all := p.relUpTo, p.relAll
		p.mu.Unlock()
		p.gate.drain(upTo, all)
	}
}

func (p *Primary) publish() {
	held, released, _, _ := p.gate.stats()
	p.mu.Lock()
	defer p.mu.Unlock()
	st := &p.status
	p.idleTakes.Store(p.eng.Session() != 0 && p.eng.Inflight() < p.cfg.Engine.MaxInflight &&
		(p.eng.State() == engine.Protected || p.eng.State() == engine.Syncing))
	st.State = p.eng.State().String()
	if p.eng.State() == engine.Unprotected {
		p.markStarted()
	}
	st.Session = p.eng.Session()
	st.Epoch = p.eng.Seq() + 1
	st.Acked = p.eng.Acked()
	st.Released = p.eng.Release()
	st.Lag = p.eng.Seq() - min(p.eng.Acked(), p.eng.Seq())
	st.Inflight = p.eng.Inflight()
	st.HeldBytes = held
	st.JournalBytes = p.gate.journalBytes()
	st.ReleasedBytes = released
	st.BackupHealthy = p.eng.State() == engine.Protected
	st.LastHeardMS = float64((p.now() - p.eng.LastHeard()).Microseconds()) / 1000
	if p.sess != nil {
		st.BytesSent = p.sess.base + p.sess.conn.Stats().BytesSent
	}
	select {
	case p.published <- struct{}{}:
	default:
	}
}

// Status is a snapshot of the primary's replication state.
func (p *Primary) Status() PrimaryStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

// CheckpointsSince returns the checkpoints taken after seq that the
// primary still keeps (the last 1,024), oldest first, and how many taken
// after seq it no longer keeps.
func (p *Primary) CheckpointsSince(seq uint64) (recs []CheckpointRecord, missed uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.recent.since(seq)
}

// redialMax bounds the pause between two tries to reach the backup: a
// second, so that a dead backup costs little, but under a quarter of the
// shorter of the two timeouts. A backup that stood still (a stopped
// process, a frozen VM) and wakes gives its primary one timeout to come
// back before it fails over: with a try every 1.5 s (the handshake's
// timeout, then a second) the woken backup failed a live primary over,
// and the primary, fenced, lost every write acknowledged since the backup
// stopped.
func (p *Primary) redialMax() time.Duration {
	t := p.cfg.Engine.Timeout
	if pt := time.Duration(p.peerTimeout.Load()); pt > 0 {
		t = min(t, pt)
	}
	return max(min(time.Second, t/4), 10*time.Millisecond)
}

// pause waits d, or until ctx ends (false).
func (p *Primary) pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// dialer keeps a session to the backup: it dials, handshakes, and once a
// session ends, dials again (with a pause, so a dead backup costs little).
func (p *Primary) dialer(ctx context.Context, module []byte, name string) {
	backoff := min(100*time.Millisecond, p.redialMax())
	flaps := 0 // sessions in a row that ended within the timeout
	// After a give-up, the next try waits this long (doubling, up to a
	// minute, until the engine is protected again): the backup holds
	// nothing to resume, and each try holds output while it syncs.
	releasedWait, protections := time.Second, p.protections.Load()
	var sent uint64
	for ctx.Err() == nil && !p.finished.Load() {
		s, err := p.connect(ctx)
		if err != nil {
			var rej *rejectedError
			if errors.As(err, &rej) && rej.code == wire.RejectFenced {
				p.log.Error("the backup rejected this primary as stale: it runs this VM now; not redialing", "reason", rej.reason)
				p.send(engine.Stale{Now: p.now(), Reason: rej.reason})
				return
			}
			if errors.As(err, &rej) && rej.code == wire.RejectReleased {
				// The backup holds nothing of the VM now: the engine
				// releases, and the backup, with nothing to resume,
				// can wait for the next try as long as it likes.
				p.log.Error("gave the backup up: it accepted session after session and acknowledged none; running unprotected",
					"reason", rej.reason, "next_try_in", releasedWait)
				p.mu.Lock()
				p.status.GaveUp++
				p.mu.Unlock()
				p.send(engine.Released{Now: p.now(), Reason: rej.reason})
				if !p.pause(ctx, releasedWait) {
					return
				}
				releasedWait = min(2*releasedWait, time.Minute)
				continue
			}
			if errors.As(err, &rej) {
				// Said once per reason, not at every redial.
				p.mu.Lock()
				again := p.status.BackupRefused == rej.reason
				p.status.BackupRefused = rej.reason
				p.mu.Unlock()
				if !again {
					p.log.Warn("the backup refused this primary; the guest is not protected while it does", "reason", rej.reason)
				}
			} else {
				p.log.Debug("backup not reachable", "addr", p.cfg.Backup, "err", err)
			}
			if !p.pause(ctx, backoff) {
				return
			}
			backoff = min(backoff*2, p.redialMax())
			continue
		}
		backoff = min(100*time.Millisecond, p.redialMax())
		p.peerTimeout.Store(int64(s.peerTimeout))
		s.base = sent
		p.mu.Lock()
		p.sess = s
		p.status.BackupRefused = ""
		p.mu.Unlock()
		p.log.Info("backup session up", "session", s.id, "addr", p.cfg.Backup)
		go s.sender(p)
		go s.heartbeater()
		if s.peerTimeout > 0 && s.peerTimeout < p.cfg.Engine.Timeout {
			p.log.Info("the backup's --timeout is shorter than this primary's: heartbeats go at its pace",
				"backup_timeout", s.peerTimeout, "timeout", p.cfg.Engine.Timeout)
		}
		p.send(engine.Connected{Now: p.now(), Session: s.id, PeerTimeout: s.peerTimeout, Said: s.said})
		// Run stopping ends the session: its receiver would otherwise
		// wait on a backup that keeps the connection open, with the
		// sender and heartbeater, for ever.
		unwatch := context.AfterFunc(ctx, s.close)
		up := time.Now()
		s.receiver(p) // until the connection ends
		unwatch()
		s.close()
		sent += s.conn.Stats().BytesSent
		p.mu.Lock()
		if p.sess == s {
			p.sess = nil
		}
		p.mu.Unlock()
		p.send(engine.Disconnected{Now: p.now(), Session: s.id})
		if p.finished.Load() {
			p.log.Debug("the guest ended and its backup was told: not redialing")
			return
		}
		if n := p.protections.Load(); n != protections {
			protections, releasedWait = n, time.Second
		}
		// A backup that welcomes and drops us again and again is not
		// redialed at once for ever (each new session asks for a full
		// checkpoint), but never later than a backup holding our
		// checkpoints waits before it fails over (redialMax): waits
		// that grew to twice the timeout let it fail over while this
		// primary, not hearing it either, released output. Giving up
		// such a backup is the engine's (GiveUp): through it.
		wait := 50 * time.Millisecond
		if time.Since(up) < p.cfg.Engine.Timeout {
			flaps++
			wait = min(wait<<min(flaps, 6), p.redialMax())
		} else {
			flaps = 0
		}
		if !p.pause(ctx, wait) {
			return
		}
	}
}

type rejectedError struct {
	reason string
	code   wire.RejectCode
}

func (e *rejectedError) Error() string { return "rejected by the backup: " + e.reason }

// connect dials the backup and performs the handshake.
func (p *Primary) connect(ctx context.Context) (*session, error) {
	dctx, cancel := context.WithTimeout(ctx, p.cfg.Engine.Timeout)
	defer cancel()
	c, err := transport.Dial(dctx, p.cfg.Backup, p.cfg.TLS, transport.Options{})
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(p.cfg.Engine.Timeout))
	hello := p.hello
	hello.Released, hello.GiveUp, hello.Dial = p.left.Load(), p.giveUp.Load(), p.dials.Add(1)
	if err := wire.SendFlush(c, &hello); err != nil {
		c.Close()
		return nil, err
	}
	if hello.GiveUp {
		p.send(engine.GiveUpSent{Now: p.now()})
	}
	// While the answer is on its way, keep the backup hearing from us: a
	// backup that accepted the session but whose Welcome is delayed must
	// not take the silence for a dead primary.
	keep := make(chan struct{})
	go func() {
		t := time.NewTicker(p.cfg.Engine.HeartbeatInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				if wire.SendFlush(c, &wire.Heartbeat{}) != nil {
					return
				}
			case <-keep:
				return
			}
		}
	}()
	msg, err := wire.Recv(c)
	close(keep)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	c.SetDeadline(time.Time{})
	switch m := msg.(type) {
	case *wire.Welcome:
		p.mu.Lock()
		p.nextSess++
		id := p.nextSess
		p.mu.Unlock()
		return &session{id: id, conn: c, queue: make(chan any, p.cfg.Engine.MaxInflight+8),
			hb: make(chan struct{}, 1), done: make(chan struct{}), uncompressed: p.cfg.Uncompressed,
			peerTimeout: m.Timeout, said: hello.Released}, nil
	case *wire.Reject:
		c.Close()
		return nil, &rejectedError{reason: m.Reason, code: m.Code}
	default:
		c.Close()
		return nil, fmt.Errorf("handshake: unexpected %s", msg.Type())
	}
}

// session is one connection to the backup. Checkpoints and control
// messages go through one queue, so they leave in order; heartbeats go
// beside it (heartbeater).
type session struct {
	id           uint64
	conn         *transport.Conn
	queue        chan any // *checkpoint or *exitItem
	hb           chan struct{}
	hbSeq        atomic.Uint64 // the seq the next heartbeat carries
	done         chan struct{}
	once         sync.Once
	base         uint64
	uncompressed bool
	peerTimeout  time.Duration // the backup's --timeout, from its Welcome
	said         uint64        // its Hello's Released (engine.Connected.Said)
	lastID       snapshot.Hash
	bases        pageBases // owned by the sender goroutine
	devices      devicesJSON
	closed       atomic.Bool
	exitOnce     sync.Once
	exitDone     atomic.Pointer[chan struct{}] // set before an Exit is sent (by Finish); closed by its ack
	exitSeq      atomic.Uint64                 // that Exit's seq, which its ack carries
	// exiting: the guest ended (Finish); the sender abandons checkpoints
	// of only memory (abandonable), even one it is streaming.
	exiting atomic.Bool
	// emu orders the Exit, when Finish sends it itself (sendExit), with
	// the stream: an abandonable checkpoint's pieces go under it, and not
	// once exiting is set; so does each checkpoint's end, with after.
	emu sync.Mutex
	// after is the last checkpoint sent whole (its CheckpointEnd sent):
	// the one an Exit's disk operations follow.
	after atomic.Uint64
	// whole counts the checkpoints queued or being streamed that must
	// reach the backup before an Exit (not abandonable: disk operations,
	// files, or a full state), and any whose disk operations the sender
	// folded into its Exit: while there are any, the Exit goes through
	// the queue, behind them.
	whole atomic.Int64
	// exitSent: Finish sent the Exit itself (once a session).
	exitSent atomic.Bool
}

func (s *session) close() {
	s.once.Do(func() {
		s.closed.Store(true)
		close(s.done)
		s.conn.Close()
	})
}

// enqueue hands a checkpoint to the sender. The queue holds more than
// MaxInflight, so this blocks only if the session is wedged — then the
// session is given up.
func (s *session) enqueue(cp *checkpoint) {
	cp.enqueued = time.Now()
	if !cp.abandonable() {
		cp.counted = true
		s.whole.Add(1)
	}
	select {
	case s.queue <- cp:
	case <-s.done:
	}
}

// heartbeat has a heartbeat sent, never blocking the driver loop.
func (s *session) heartbeat(seq uint64) {
	s.hbSeq.Store(seq)
	select {
	case s.hb <- struct{}{}:
	default: // one is on its way
	}
}

// heartbeater sends the session's heartbeats, between the sender's frames
// (the connection writes each frame whole). They used to go through the
// sender's queue, behind the checkpoint being streamed, whose encoding at
// low priority (niceThread) slows down as much as other processes keep
// the cores busy, and whose pieces may wait on it: liveness must not
// wait for the data.
func (s *session) heartbeater() {
	for {
		select {
		case <-s.hb:
			if wire.SendFlush(s.conn, &wire.Heartbeat{Seq: s.hbSeq.Load()}) != nil {
				return // the sender or the receiver sees it too
			}
		case <-s.done:
			return
		}
	}
}

// sender encodes and streams checkpoints in order, while the guest runs.
func (s *session) sender(p *Primary) {
	// The chunk buffer is allocated at its full size now, while the
	// session starts: grown on demand, it was copied and cleared again
	// and again inside the first large checkpoint's encoding, which the
	// primary's output (at the end of a computing guest, its exit) waits
	// for.
	var buf bytes.Buffer
	buf.Grow(chunk)
	// Once the guest has ended, checkpoints of only memory are
	// abandoned; an incremental one after that cannot be sent (the
	// backup lacks its base), so its disk operations go with the Exit
	// (folded), which names the last checkpoint sent whole (after).
	var (
		broken bool
		folded []wire.FsOp
	)
	for {
		var item any
		select {
		case item = <-s.queue:
		case <-s.done:
			return
		}
		var err error
		switch it := item.(type) {
		case *exitItem:
			it.exit.After = s.after.Load()
			if it.exit.DiskOps, err = sendDiskOps(s.conn, it.exit.Seq, append(folded, it.ops...)); err == nil {
				err = wire.SendFlush(s.conn, &it.exit)
			}
		case *checkpoint:
			if s.exiting.Load() && (it.abandonable() || broken && !it.full) {
				p.putStager(it.stager)
				folded = append(folded, it.ops...)
				broken = true
				p.log.Debug("checkpoint abandoned: the guest ended", "seq", it.seq, "sent", false, "disk_ops_with_the_exit", len(it.ops))
				break
			}
			// Re-arming the pages (write-protecting them again, one
			// ioctl per run, each flushing TLBs: 68 µs at p50 and 400
			// at p90 for a KV server's 70 pages, measured here) comes
			// after the stream, off the path to the ack that releases
			// the epoch's output, unless the checkpoint is large enough
			// for the next one to be collected ahead (aheadMinPages),
			// which needs its pages re-armed first. Late is safe: the
			// guest's writes meanwhile show against the staged copies
			// (Deferrer.Rearm), and a Collect before it reports the
			// pages again.
			rearmFirst := it.dirty >= aheadMinPages
			t0 := time.Now()
			if rearmFirst {
				s.rearm(p, it)
			}
			rearmed := time.Now()
			if it.dirty >= niceFrom {
				err = s.streamNiced(p, it, &buf)
			} else {
				err = s.stream(p, it, &buf, 1)
			}
			streamed := time.Now()
			if !rearmFirst {
				s.rearm(p, it)
			}
			p.putStager(it.stager)
			if errors.Is(err, errAbandoned) {
				// The backup drops the part it has when the Exit comes.
				p.log.Debug("checkpoint abandoned: the guest ended", "seq", it.seq, "sent", "in part")
				broken, err = true, nil
				break
			}
			if err == nil {
				if it.counted {
					s.whole.Add(-1)
				}
				if it.full { // a whole state: nothing before it is needed
					broken, folded = false, nil
				}
			}
			if err == nil && p.log.Enabled(context.Background(), slog.LevelDebug) {
				p.log.Debug("checkpoint sent", "seq", it.seq, "full", it.full, "pages", it.dirty, "ahead", it.ahead,
					"capture", it.pause, "queued", t0.Sub(it.enqueued), "rearm_first", rearmFirst, "rearm", rearmed.Sub(t0),
					"encode_and_send", streamed.Sub(rearmed), "rearm_after", time.Since(streamed))
			}
		}
		if err != nil {
			if !s.closed.Load() {
				p.log.Warn("streaming to the backup failed", "session", s.id, "err", err)
			}
			s.close()
			return
		}
	}
}

// rearm re-arms dirty tracking for a checkpoint's pages (before its
// stager goes back to the pool).
func (s *session) rearm(p *Primary, cp *checkpoint) {
	if m := p.machine.Load(); m != nil {
		if err := cp.rearm(m); err != nil && !errors.Is(err, dirty.ErrClosed) {
			p.log.Warn("re-arming dirty-page tracking failed: the next checkpoint sends those pages again", "seq", cp.seq, "err", err)
		}
	}
}

// streamNiced streams a large checkpoint (a heap's growth) from a thread
// of its own at nice encodeNice: its encoding (a C guest's 20 MB growth:
// 50 ms of S2) runs beside the guest, which on a machine whose cores are
// all busy it would slow down. The thread ends with its goroutine (it
// stays locked), its priority with it.
func (s *session) streamNiced(p *Primary, cp *checkpoint, buf *bytes.Buffer) error {
	errc := make(chan error, 1)
	go func() {
		niceThread(encodeNice)
		errc <- s.stream(p, cp, buf, nicedWorkers)
	}()
	return <-errc
}

// niceWorker is snapshot.Options.WorkerInit for streamNiced's compressing
// goroutines.
func niceWorker() {
	niceThread(encodeNice)
	if f := testEncodeWorker.Load(); f != nil {
		(*f)()
	}
}

// testEncodeWorker, if set, runs as each of streamNiced's compressing
// goroutines starts: tests hold the encoding there.
var testEncodeWorker atomic.Pointer[func()]

// niceThread locks the calling goroutine to its thread for good and makes
// the thread background work: niceness nice. The thread ends with the
// goroutine, its priority with it. It reports the thread and whether the
// niceness was set.
//
// Not the policy SCHED_IDLE, which such threads took for a while (a woken
// thread preempts one at once): a Go thread holds one of the process's
// few Ps while it runs, and a guest's goroutine holds another for as long
// as it computes, so a SCHED_IDLE thread that other processes starve
// (its weight is 3 against 1,024) stalls every goroutine waiting for a P,
// and any stop of the world, for as long as they keep the cores busy. A
// primary encoding a 64 MiB checkpoint so, with two busy loops beside it,
// fell silent for 0.5–0.9 s and its backup failed over (4 runs in 4);
// at nice 10 (weight 110), 0 in 6, the longest stop 10 ms.
func niceThread(nice int) (tid int, ok bool) {
	runtime.LockOSThread()
	tid = unix.Gettid()
	return tid, unix.Setpriority(unix.PRIO_PROCESS, tid, nice) == nil
}

// raiseThread gives thread tid niceness 0 back (it needs CAP_SYS_NICE or
// a permissive RLIMIT_NICE; it is best effort).
func raiseThread(tid int) { _ = unix.Setpriority(unix.PRIO_PROCESS, tid, 0) }

// niceFrom is the checkpoint size, in dirty pages, streamed by
// streamNiced; encodeNice its threads' niceness (a weight of 110 against
// the guest's 1,024); nicedWorkers how many of its batches (1,024 pages
// each) are compressed at once. A computing guest's first output after a
// long epoch carries its heap's growth, and it then waits for that
// checkpoint's ack (its exit does too): compressing on both cores, each
// thread niced, takes only what the guest leaves, and ends sooner once it
// waits.
const (
	niceFrom     = 1024
	encodeNice   = 10
	nicedWorkers = 2
)

// sendDiskOps sends the disk operations of epoch seq in messages of at most
// about a chunk each, and says how many.
func sendDiskOps(conn *transport.Conn, seq uint64, ops []wire.FsOp) (n uint32, err error) {
	for i := 0; i < len(ops); {
		size, j := 0, i
		for j < len(ops) && (j == i || size+len(ops[j].Data) < chunk) {
			size += len(ops[j].Data) + 64
			j++
		}
		if err := wire.Send(conn, &wire.DiskOps{Seq: seq, Ops: ops[i:j]}); err != nil {
			return n, err
		}
		n++
		i = j
	}
	return n, nil
}

// exitItem is the sender's last item: the Exit, after the disk operations
// of the epoch the guest ended in.
type exitItem struct {
	exit wire.Exit
	ops  []wire.FsOp
}

// chunk is the size of the pieces a checkpoint's snapshot is sent in. The
// backup decodes a checkpoint of several pieces as they arrive
// (decodeStream), so smaller pieces start it sooner; a checkpoint of a few
// dozen pages still goes in one.
const chunk = 256 << 10

// stream encodes checkpoint cp straight onto the connection in chunks, so
// that a large (full) checkpoint is on the wire while it is still being
// encoded: the backup hears from the primary all along, and nothing waits
// for the whole encoding.
func (s *session) stream(p *Primary, cp *checkpoint, buf *bytes.Buffer, workers int) error {
	snap := cp.snap
	if snap.Devices == nil {
		devs, err := s.devices.encode(cp.devices)
		if err != nil {
			return fmt.Errorf("device state: %w", err)
		}
		snap.Devices = devs
		// Encoded (the encoder keeps copies of what it templates): the
		// next pauses may capture into it.
		p.putDevState(cp.devices)
		cp.devices = nil
	}
	if !cp.full {
		if s.lastID.IsZero() {
			return errors.New("incremental checkpoint with no full one before it in this session")
		}
		snap.Parent = s.lastID
	}
	// SnapshotSize 0: the size is known only at the end (CheckpointEnd).
	if err := s.sendPart(&wire.CheckpointBegin{Seq: cp.seq, Full: cp.full}, cp.abandonable(), nil); err != nil {
		return err
	}
	useDeltas, deltas := !cp.full && !s.uncompressed, 0
	if cp.full {
		// The backup's memory becomes this checkpoint's (a session asks
		// for one again after it refused an incremental): the copies
		// kept may be of pages it never got, or has zero now.
		s.bases.reset()
	}
	if useDeltas {
		deltas = s.bases.attach(snap.Pages)
	}
	buf.Reset()
	cw := &chunkWriter{s: s, seq: cp.seq, buf: buf, abandonable: cp.abandonable()}
	if err := snap.EncodeOptions(cw, snapshot.Options{Workers: workers, Uncompressed: s.uncompressed,
		WorkerInit: niceWorker}); err != nil {
		if cw.err != nil {
			return cw.err
		}
		return fmt.Errorf("encoding checkpoint %d: %w", cp.seq, err)
	}
	if err := cw.flush(); err != nil {
		return err
	}
	s.lastID = snap.ID
	end := wire.CheckpointEnd{Seq: cp.seq, SnapshotSize: cw.off, SnapshotCRC: cw.crc}
	n, err := sendDiskOps(s.conn, cp.seq, cp.ops)
	if err != nil {
		return err
	}
	end.DiskOps = n
	for _, f := range cp.tree {
		f.Seq = cp.seq
		data := f.Data
		for off := 0; ; off += chunk {
			part := f
			part.Offset = uint64(off)
			part.Data = data[off:min(off+chunk, len(data))]
			if err := wire.Send(s.conn, &part); err != nil {
				return err
			}
			end.DiskFiles++
			if off+chunk >= len(data) {
				break
			}
		}
	}
	if err := s.sendPart(&end, cp.abandonable(), func() { s.after.Store(cp.seq) }); err != nil {
		return err
	}
	if useDeltas {
		// What the backup will hold once it has this checkpoint (a
		// checkpoint that does not reach it ends the session, and the
		// bases with it). Copied once the checkpoint is on its way: the
		// copies are for the next one, and the backup's ack waits for
		// nothing done here.
		s.bases.keep(cp.seq, snap.Pages)
	}
	p.mu.Lock()
	p.status.LastBytes = int(cw.off)
	p.status.DeltaPages += uint64(deltas)
	p.mu.Unlock()
	return nil
}

// chunkWriter turns the snapshot encoder's output into CheckpointData
// messages of about a chunk each, keeping the running size and CRC.
type chunkWriter struct {
	s   *session
	seq uint64
	buf *bytes.Buffer
	off uint64
	crc uint32
	err error
	// abandonable: the checkpoint is dropped (errAbandoned) at its next
	// piece once the guest has ended (session.exiting).
	abandonable bool
}

// errAbandoned ends the stream of a checkpoint of only memory once the
// guest has ended: no failover will resume it (Finish).
var errAbandoned = errors.New("checkpoint abandoned: the guest ended")

func (w *chunkWriter) Write(b []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	n := len(b)
	for len(b) > 0 {
		take := min(len(b), chunk-w.buf.Len())
		w.buf.Write(b[:take])
		b = b[take:]
		if w.buf.Len() >= chunk {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *chunkWriter) flush() error {
	if w.err != nil || w.buf.Len() == 0 {
		return w.err
	}
	data := w.buf.Bytes()
	w.err = w.s.sendPart(&wire.CheckpointData{Seq: w.seq, Offset: w.off, Data: data}, w.abandonable, nil)
	if w.err != nil {
		return w.err
	}
	w.crc = crc32.Update(w.crc, castagnoli, data)
	w.off += uint64(len(data))
	w.buf.Reset()
	return w.err
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sendPart sends a message of a checkpoint's stream. One of an abandonable
// checkpoint is not sent once the guest has ended (errAbandoned): that is
// checked under emu, which sendExit holds, so none follows an Exit Finish
// sent. A CheckpointEnd (sent is then set) flushes, and sent runs under
// emu too, so the Exit names the right checkpoint whichever goes first.
func (s *session) sendPart(m wire.Message, abandonable bool, sent func()) error {
	end := sent != nil
	if !abandonable && !end {
		return wire.Send(s.conn, m)
	}
	s.emu.Lock()
	defer s.emu.Unlock()
	if abandonable && s.exiting.Load() {
		return errAbandoned
	}
	if !end {
		return wire.Send(s.conn, m)
	}
	if err := wire.SendFlush(s.conn, m); err != nil {
		return err
	}
	sent()
	return nil
}

// sendExit sends the Exit from Finish's goroutine, between the sender's
// messages, when nothing queued or being streamed must reach the backup
// before it: only checkpoints of memory, which are abandoned (sendPart).
// The sender's queue would have it wait for the checkpoint being encoded to
// reach its next piece: a computing guest's last one, taken at its last
// output, carries the memory it wrote since the one before (cpu.c 8: 2,000
// pages, 11–23 ms of compressing on low-priority threads before the
// abandoning). It reports whether it sent it (or tried: an error ends the
// session, which Finish sees).
func (s *session) sendExit(it *exitItem) bool {
	s.emu.Lock()
	defer s.emu.Unlock()
	if s.whole.Load() > 0 || s.exitSent.Load() {
		return false
	}
	s.exitSent.Store(true)
	it.exit.After = s.after.Load()
	var err error
	if it.exit.DiskOps, err = sendDiskOps(s.conn, it.exit.Seq, it.ops); err == nil {
		err = wire.SendFlush(s.conn, &it.exit)
	}
	if err != nil {
		s.close()
	}
	return true
}

// receiver turns the backup's messages into engine events.
func (s *session) receiver(p *Primary) {
	for {
		msg, err := wire.Recv(s.conn)
		recvAt := time.Now()
		if err != nil {
			switch {
			case s.closed.Load():
			case s.exitDone.Load() != nil:
				// The guest exited and the backup was told: it closes
				// the session itself.
				p.log.Info("backup connection ended after the guest's exit", "session", s.id, "err", err)
			default:
				p.log.Warn("backup connection ended", "session", s.id, "err", err)
			}
			return
		}
		now := p.now()
		p.send(engine.Heartbeat{Now: now, Session: s.id})
		switch m := msg.(type) {
		case *wire.Ack:
			if done := s.exitDone.Load(); done != nil && m.Seq == s.exitSeq.Load() {
				s.exitOnce.Do(func() { close(*done) })
				continue
			}
			p.send(engine.Ack{Now: now, Session: s.id, Seq: m.Seq})
			p.mu.Lock()
			p.recent.acked(s.id, m.Seq, recvAt)
			p.mu.Unlock()
			if p.log.Enabled(context.Background(), slog.LevelDebug) {
				p.log.Debug("checkpoint acknowledged", "seq", m.Seq)
			}
		case *wire.NeedFull:
			p.log.Warn("the backup asks for a full checkpoint", "reason", m.Reason)
			p.send(engine.NeedFull{Now: now, Session: s.id, Seq: m.Seq})
		case *wire.Heartbeat:
		case *wire.Reject:
			if m.Code == wire.RejectFenced {
				// It failed over (it stopped hearing this primary, which
				// may still hear it): the VM is the backup's now.
				p.log.Error("the backup failed over and fenced this primary", "reason", m.Reason)
				p.send(engine.Stale{Now: now, Reason: m.Reason})
				return
			}
			p.log.Error("the backup ended the session", "reason", m.Reason)
			return
		default:
			p.log.Warn("unexpected message from the backup", "type", msg.Type())
			return
		}
	}
}

// pageBases keeps a copy of each page a session sent in its recent
// incremental checkpoints, as the backup holds it, so that the next
// checkpoint sends the page as a delta against it (snapshot.Page.Base). A
// server writes much the same pages a little each epoch: a KV server
// under load sent 99% of its pages again in the next checkpoint, and as
// deltas they compressed three times faster to a third of the bytes. A
// page unsent for baseAge checkpoints is dropped, at most maxBases pages
// are kept (16 MiB), and a checkpoint of more than maxNewBases pages adds
// none: a heap's growth or a burst is not a working set, and copying it
// (into fresh memory, 7-30 µs a page on a VM) would cost more than its
// deltas could save.
type pageBases struct {
	pages map[uint32]*pageBase
	free  []*pageBase
	kept  uint64 // keeps since the last sweep
}

type pageBase struct {
	data []byte
	seq  uint64 // the checkpoint that last sent it
}

const (
	baseAge     = 16
	maxBases    = 4096
	maxNewBases = 512
)

// reset forgets every copy.
func (b *pageBases) reset() {
	for idx, pb := range b.pages {
		delete(b.pages, idx)
		b.free = append(b.free, pb)
	}
}

// attach sets the base of every page it has a copy of, and says how many.
func (b *pageBases) attach(pages []snapshot.Page) int {
	if len(b.pages) == 0 {
		return 0
	}
	n := 0
	for i := range pages {
		if pb := b.pages[pages[i].Index]; pb != nil {
			pages[i].Base = pb.data
			n++
		}
	}
	return n
}

// keep records pages, just encoded in checkpoint seq, as the backup's copies.
func (b *pageBases) keep(seq uint64, pages []snapshot.Page) {
	if b.pages == nil {
		b.pages = map[uint32]*pageBase{}
	}
	for i := range pages {
		p := &pages[i]
		pb := b.pages[p.Index]
		if pb == nil {
			if len(b.pages) >= maxBases || len(pages) > maxNewBases {
				continue
			}
			if n := len(b.free); n > 0 {
				pb, b.free = b.free[n-1], b.free[:n-1]
			} else {
				pb = &pageBase{data: make([]byte, snapshot.PageSize)}
			}
			b.pages[p.Index] = pb
		}
		copy(pb.data, p.Data)
		pb.seq = seq
		p.Base = nil // the encoding is done; the copy is no longer its base
	}
	if b.kept++; b.kept >= baseAge/2 {
		b.kept = 0
		for idx, pb := range b.pages {
			if pb.seq+baseAge < seq {
				delete(b.pages, idx)
				b.free = append(b.free, pb)
			}
		}
	}
}
