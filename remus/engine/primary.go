package engine

import (
	"errors"
	"fmt"
	"slices"
)

// PrimaryState is where the primary stands with its backup.
type PrimaryState uint8

const (
	// Connecting: no session, but protection is intended, so output is
	// held. Lasts until a session is up or Timeout after the backup was
	// last heard (or after the start).
	Connecting PrimaryState = iota
	// Syncing: a session is up and its backup has not yet acknowledged a
	// full checkpoint of it.
	Syncing
	// Protected: the backup acknowledged a full checkpoint of this session
	// and follows incrementally.
	Protected
	// Unprotected: the backup was declared failed (or never reached);
	// output passes at once while the driver keeps redialing.
	Unprotected
	// Fenced: the backup said it runs this VM now (it failed over while
	// this primary stood still, or was cut off from it: Stale). The VM
	// is the backup's: output still held never leaves, nothing more is
	// checkpointed, and the driver stops the guest. For good.
	Fenced
)

func (s PrimaryState) String() string {
	switch s {
	case Connecting:
		return "connecting"
	case Syncing:
		return "syncing"
	case Protected:
		return "protected"
	case Unprotected:
		return "unprotected"
	case Fenced:
		return "fenced"
	}
	return fmt.Sprintf("PrimaryState(%d)", uint8(s))
}

// PrimaryStateChange is a transition, for logs, metrics and status.
type PrimaryStateChange struct {
	At       Time
	From, To PrimaryState
	Reason   string
}

// CheckpointRequest asks the driver to pause the guest and take checkpoint
// Seq, which closes epoch Seq, and stream it on Session. Full: every page
// rather than those dirtied since checkpoint Seq-1. Dirty tracking restarts
// at every checkpoint, even one whose session is gone by the time it is
// taken: that is why a new session always starts with a full one.
type CheckpointRequest struct {
	Seq     uint64
	Full    bool
	Session uint64
}

// PrimaryReady is what the driver must do now. Edges (TakeCheckpoint,
// SendHeartbeat, DropSession, StateChanges) are to be done once; levels
// (Release, PassThrough, Wake) are the current values, repeated in every
// Ready. The order of doing them does not matter.
type PrimaryReady struct {
	// TakeCheckpoint, if set, is the checkpoint to take now. There is
	// never a second before CheckpointTaken for the first.
	TakeCheckpoint *CheckpointRequest
	// SendHeartbeat, if not 0, is the session to send a heartbeat on.
	SendHeartbeat uint64
	// Release: output of every epoch up to Release may leave. It never
	// decreases.
	Release uint64
	// PassThrough: the primary is Unprotected; release everything held,
	// and let new output leave at once until PassThrough is false again.
	PassThrough bool
	// DropSession lists connections to close (timeout, protocol
	// violation, superseded, no ack).
	DropSession []Drop
	// StateChanges lists the transitions since the last Advance.
	StateChanges []PrimaryStateChange
	// StoodStill, if not 0, says the engine was not stepped for that long
	// while protecting (the primary's process or loop stood still, and
	// its heartbeats with it): the backup may have failed over, so the
	// engine waits up to Timeout to hear from it before it would give it
	// up and release held output (for the log).
	StoodStill Time
	// GiveUp: no session is up, and the backup made no progress (an ack)
	// for Timeout while it was heard (sessions that came up and ended
	// again). The next Hello gives the backup up: it drops what it holds,
	// so that no failover can resume a state older than the output about
	// to leave, and says so (the primary steps Released), and only then
	// is held output released. Waiting longer between redials instead, so
	// that the silence rule gave it up, let the backup fail over a live
	// primary meanwhile. A level, as Release.
	GiveUp bool
	// Wake is when the engine wants its next Tick (Never: no timer).
	Wake Time
}

// inflight is a checkpoint streamed on the current session and neither
// acknowledged nor refused, with the time it was taken (for AckTimeout).
type inflight struct {
	seq uint64
	at  Time
}

// Primary is the primary side of Remus for one VM: when to checkpoint,
// which held output may leave, and when the backup is taken as failed.
// It is a pure state machine: Step it with events, then do what Ready says
// and Advance. Not safe for concurrent use.
type Primary struct {
	cfg   Config
	pace  pace // heartbeat timing against the peer's timeout
	now   Time
	state PrimaryState

	seq           uint64             // last checkpoint taken; the open epoch is seq+1
	outstanding   *CheckpointRequest // requested, not yet taken
	epochStart    Time               // when the open epoch began (last CheckpointTaken)
	outputWaiting bool               // the open epoch has held output
	// tat is the output policy's rate limit (GCRA, a token bucket): the
	// theoretical time of the next checkpoint at one per MinEpoch. Output
	// may end an epoch once now >= tat - (burst-1)*MinEpoch, so a guest
	// that answers now and then is checkpointed at once, while a
	// saturated one averages one checkpoint per MinEpoch.
	tat Time
	// idle: the guest went to sleep with output waiting (GuestIdle).
	idle bool
	// urgent: held output passed the limit (HoldFull): end the epoch now.
	urgent     bool
	outputNext bool // output reported during the pause: for the next epoch

	release     uint64
	passThrough bool
	acked       uint64 // highest ack of any session
	lastHeard   Time   // last message from a backup (or start, or Connected)
	// progress is the last sign the backup protects: an ack, or a
	// session up after running unprotected (or the start). A backup
	// heard, but that made none for Timeout with no session up, is given
	// up (GiveUp). A session that ends without an ack is none, however
	// long it lasted: a backup that heartbeats and never acks (its disk
	// behind, a full checkpoint longer than AckTimeout) is given up too.
	progress Time
	// asked: a Hello that gives the backup up left at askedAt
	// (GiveUpSent); unanswered for Timeout after that (or after the
	// engine woke from standing still), the backup is given up without
	// its word (giveUpUnanswered).
	asked   bool
	askedAt Time
	// left is the newest epoch some of whose output has left (Left): it
	// never decreases, though Release may lag it after passing through.
	left        uint64
	lastSession uint64 // highest session ever connected
	stepped     Time   // the last event's time
	// woke is when the engine was stepped after standing still while
	// protecting: the backup is not given up before woke+Timeout.
	woke Time

	// The current session; all zero when there is none.
	session   uint64
	lastHB    Time
	sessFirst uint64     // its first checkpoint (a full one); 0: none taken yet
	sessAcked uint64     // its highest ack
	needFull  bool       // its next checkpoint must be full
	lastFull  uint64     // its last full checkpoint requested
	syncSeq   uint64     // Syncing: the full checkpoint whose ack ends it
	flight    []inflight // its checkpoints in flight, oldest first

	pend   PrimaryReady // edges accumulated since the last Advance
	handed *PrimaryReady
	adv    PrimaryReady // levels as of the last Advance
}

// NewPrimary starts a primary at now, Connecting, with cfg's zero fields
// defaulted.
func NewPrimary(cfg Config, now Time) (*Primary, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Primary{cfg: cfg, pace: cfg.paceFor(0), now: now, epochStart: now, lastHeard: now, progress: now, stepped: now, adv: PrimaryReady{Wake: Never}}, nil
}

// Config returns the configuration in force, defaults applied.
func (p *Primary) Config() Config { return p.cfg }

// HeartbeatInterval is how often heartbeats go now: the configured
// interval, or a fifth of the peer's Timeout if that is shorter.
func (p *Primary) HeartbeatInterval() Time { return p.pace.every }

// State returns the current state.
func (p *Primary) State() PrimaryState { return p.state }

// Seq returns the last checkpoint taken (0: none); the open epoch is Seq()+1.
func (p *Primary) Seq() uint64 { return p.seq }

// Acked returns the highest checkpoint acknowledged by any session.
func (p *Primary) Acked() uint64 { return p.acked }

// Release returns the highest epoch whose output may leave.
func (p *Primary) Release() uint64 { return p.release }

// PassThrough reports whether output leaves at once (Unprotected).
func (p *Primary) PassThrough() bool { return p.passThrough }

// Inflight returns how many checkpoints streamed on the current session
// are neither acknowledged nor refused yet; at MaxInflight no checkpoint
// is taken, and the driver should bound the output it holds meanwhile.
func (p *Primary) Inflight() int { return len(p.flight) }

// Session returns the current session (0: none).
func (p *Primary) Session() uint64 { return p.session }

// LastHeard returns when a backup was last heard (or the start).
func (p *Primary) LastHeard() Time { return p.lastHeard }

// Now returns the latest time the engine was given.
func (p *Primary) Now() Time { return p.now }

// Step feeds one event. It returns an error, leaving the engine unchanged,
// only for a driver mistake (a session that is zero or not new, a
// CheckpointTaken not requested); what a backup sends is never an error
// here, at worst a DropSession. Time never goes back: an event older than
// one already seen counts as happening at the latest time seen.
func (p *Primary) Step(ev PrimaryEvent) error {
	if ev == nil {
		return errors.New("remus: nil event")
	}
	switch e := ev.(type) {
	case Connected:
		if e.Session == 0 || e.Session <= p.lastSession {
			return fmt.Errorf("remus: session %d not above %d", e.Session, p.lastSession)
		}
	case CheckpointTaken:
		if p.outstanding == nil || e.Seq != p.outstanding.Seq {
			return fmt.Errorf("remus: checkpoint %d taken, but %s", e.Seq, p.requested())
		}
	case CheckpointFailed:
		if p.outstanding == nil || e.Seq != p.outstanding.Seq {
			return fmt.Errorf("remus: checkpoint %d failed, but %s", e.Seq, p.requested())
		}
	}
	p.now = max(p.now, ev.primaryAt())
	p.stoodStill(p.now - p.stepped)
	p.stepped = p.now
	p.expire()
	switch e := ev.(type) {
	case Tick:
	case Output:
		if p.outstanding != nil {
			p.outputNext = true
		} else {
			p.outputWaiting = true
		}
	case GuestIdle:
		if p.outstanding == nil && p.outputWaiting {
			p.idle = true
		}
	case HoldFull:
		if p.outstanding == nil {
			p.urgent = true
		}
	case Connected:
		p.connected(e.Session, e.PeerTimeout, e.Said)
	case Disconnected:
		if e.Session == p.session && p.session != 0 {
			p.endSession(Connecting, fmt.Sprintf("session %d lost; backup last heard %v ago", e.Session, p.now-p.lastHeard))
		}
	case CheckpointTaken:
		p.taken()
	case CheckpointFailed:
		p.failed()
	case Ack:
		p.ack(e.Session, e.Seq)
	case NeedFull:
		p.needFullFrom(e.Session, e.Seq)
	case Heartbeat:
		if e.Session == p.session && p.session != 0 {
			p.lastHeard = p.now
		}
	case Stale:
		p.fence(e.Reason)
	case GiveUpSent:
		if !p.asked && p.giveUp() {
			p.asked, p.askedAt = true, p.now
		}
	case Released:
		if p.state != Fenced && p.state != Unprotected {
			p.unprotect("the backup let this VM go (it holds nothing to fail over to): " + e.Reason)
		}
	default:
		panic(fmt.Sprintf("remus: unknown primary event %T", ev))
	}
	p.giveUpUnanswered()
	if p.passThrough {
		p.left = max(p.left, p.seq+1)
	}
	p.poll()
	return nil
}

func (p *Primary) requested() string {
	if p.outstanding == nil {
		return "none was requested"
	}
	return fmt.Sprintf("%d was requested", p.outstanding.Seq)
}

// stoodStill notes a gap of gap since the last event. Protecting, the
// engine is stepped at least every HeartbeatInterval (Wake), so a gap
// that, with the heartbeat interval before it, reaches Timeout means this
// primary's loop stood still — a process stopped, or starved — and sent
// no heartbeat meanwhile: the backup may have taken the silence for its
// death and failed over. Giving the backup up now would release output of
// epochs it never had while it runs the VM from an older one (two
// histories before the clients). So the backup gets a Timeout from now:
// its messages, queued while this one stood still, keep protection; a
// failover shows as the session's end, and the redial's answer (Stale)
// fences this primary.
func (p *Primary) stoodStill(gap Time) {
	if p.state == Fenced || p.state == Unprotected || !p.pace.stoodStill(gap) {
		return
	}
	p.woke = p.now
	p.pend.StoodStill = gap
}

// fence hands the VM to the backup that says it runs it (Stale).
func (p *Primary) fence(reason string) {
	if p.state == Fenced {
		return
	}
	if p.session != 0 {
		p.pend.DropSession = append(p.pend.DropSession, Drop{p.session, reason})
	}
	p.clearSession()
	p.passThrough = false
	p.setState(Fenced, reason)
}

// expire fires the deadlines that passed, before the event at now is
// handled: a message arriving after Timeout of silence is too late.
func (p *Primary) expire() {
	if p.state == Unprotected || p.state == Fenced {
		return
	}
	if p.now >= max(p.lastHeard, p.woke)+p.cfg.Timeout {
		p.unprotect(fmt.Sprintf("backup not heard for %v", p.now-p.lastHeard))
		return
	}
	p.giveUpUnanswered()
	if p.session != 0 && len(p.flight) > 0 && p.now >= p.flight[0].at+p.cfg.AckTimeout {
		p.drop(fmt.Sprintf("checkpoint %d not acknowledged within %v", p.flight[0].seq, p.cfg.AckTimeout))
	}
}

// giveUpUnanswered gives the backup up without its word once GiveUp went
// unanswered for another Timeout: a backup that keeps accepting sessions
// but neither acks nor lets the VM go must not hold output for ever. One
// that works answers within a round trip; one that heard nothing of this
// primary for Timeout fails over on its own, as under the silence rule.
// Checked before an event and after it (a session's end, in Connecting),
// from when a Hello giving the backup up left (GiveUpSent): never before
// the backup could have heard it, nor before it had a Timeout after this
// primary stood still (the backup may have failed over meanwhile).
func (p *Primary) giveUpUnanswered() {
	if p.state == Connecting && p.asked && p.now >= max(p.askedAt, p.woke)+p.cfg.Timeout {
		p.unprotect(fmt.Sprintf("backup acknowledged nothing for %v, nor let the VM go when given up %v ago", p.now-p.progress, p.now-p.askedAt))
	}
}

// poll does what is due at now: a checkpoint, a heartbeat.
func (p *Primary) poll() {
	if p.session == 0 {
		return
	}
	if p.outstanding == nil && p.epochDue() {
		p.take()
	}
	if p.now >= p.lastHB+p.pace.every {
		p.pend.SendHeartbeat = p.session
		p.lastHB = p.now
	}
}

// epochDue applies the epoch end rule, session up and no checkpoint
// outstanding. A session's first (full) checkpoint is due at once: until
// its ack, output is held and the guest runs unprotected.
func (p *Primary) epochDue() bool {
	if p.needFull && p.sessFirst == 0 {
		return true
	}
	d := p.epochDeadline()
	return d != Never && p.now >= d
}

// epochDeadline is when the open epoch ends, with the session as it is
// (Never: back-pressure, or a checkpoint already outstanding).
func (p *Primary) epochDeadline() Time {
	if p.session == 0 || p.outstanding != nil || len(p.flight) >= p.cfg.MaxInflight {
		return Never
	}
	if p.needFull && p.sessFirst == 0 {
		return p.now
	}
	if p.urgent {
		return p.now
	}
	if p.cfg.Policy == PolicyOutput && p.outputWaiting {
		if p.idle {
			return p.now
		}
		return min(max(p.tat-(outputBurst-1)*p.cfg.MinEpoch, p.epochStart), p.epochStart+p.cfg.Epoch)
	}
	return p.epochStart + p.cfg.Epoch
}

// outputBurst is how many output-driven checkpoints may follow each other
// faster than one per MinEpoch before the rate limit spaces them.
const outputBurst = 4

func (p *Primary) take() {
	r := &CheckpointRequest{Seq: p.seq + 1, Full: p.needFull, Session: p.session}
	if r.Full {
		p.needFull = false
		p.lastFull = r.Seq
	}
	p.outstanding = r
	p.pend.TakeCheckpoint = r
	p.tat = max(p.tat, p.now) + p.cfg.MinEpoch
}

func (p *Primary) taken() {
	r := p.outstanding
	p.outstanding = nil
	p.seq = r.Seq
	p.epochStart = p.now
	p.outputWaiting, p.outputNext = p.outputNext, false
	p.idle, p.urgent = false, false
	if p.state == Fenced {
		return // its output is the backup's now
	}
	if p.state == Unprotected {
		p.release = max(p.release, p.seq) // nothing to protect it for
		return
	}
	if r.Session != p.session || p.session == 0 {
		return // its session is gone: an orphan, never acked
	}
	if p.sessFirst == 0 {
		p.sessFirst = r.Seq
	}
	if r.Full && p.state == Syncing {
		p.syncSeq = r.Seq
	}
	p.flight = append(p.flight, inflight{r.Seq, p.now})
}

// failed forgets the outstanding request, which left nothing behind but
// held output (still the open epoch's) and pages the stream no longer
// holds: the next checkpoint of its session is full. Without this the
// request stayed outstanding for good: no checkpoint again, output held
// until the guest stalled.
func (p *Primary) failed() {
	r := p.outstanding
	p.outstanding = nil
	if r.Session == p.session && p.session != 0 {
		p.needFull = true
	}
}

func (p *Primary) connected(s uint64, peerTimeout Time, said uint64) {
	p.lastSession = s
	// The backup's timing, kept past the session: a backup that lost it
	// may still be following it, and judges silence by its own timeout.
	p.pace = p.cfg.paceFor(peerTimeout)
	if p.state == Fenced {
		p.pend.DropSession = append(p.pend.DropSession, Drop{s, "fenced: the backup runs this VM"})
		return
	}
	if said < p.Left() {
		// Output of a later epoch left while its Hello was on the way:
		// the backup must hear it (a checkpoint older than that is
		// not to be resumed), so this session goes and the redial's
		// Hello says it.
		p.pend.DropSession = append(p.pend.DropSession, Drop{s, fmt.Sprintf("its Hello said epoch %d released; epoch %d has been since", said, p.Left())})
		return
	}
	if p.session != 0 {
		p.pend.DropSession = append(p.pend.DropSession, Drop{p.session, fmt.Sprintf("superseded by session %d", s)})
	}
	if p.state == Unprotected {
		p.progressed() // a new try: the backup has Timeout to ack
	}
	p.clearSession()
	p.session = s
	p.lastHeard = p.now
	p.lastHB = p.now
	p.needFull = true
	p.passThrough = false
	next := p.seq + 1
	if p.outstanding != nil {
		next++ // the one being taken is for the old session
	}
	p.setState(Syncing, fmt.Sprintf("session %d up; full checkpoint %d next", s, next))
}

// ack applies a cumulative ack: this session's backup committed every
// checkpoint up to seq, so a failover now would reproduce every epoch up
// to seq, and their output may leave. Every ack of a session is at least
// its first checkpoint, which is above every seq taken before it: so the
// epochs of an earlier session that were never acked are covered as well.
func (p *Primary) ack(s, seq uint64) {
	if s != p.session || s == 0 {
		return
	}
	if p.sessFirst == 0 || seq < p.sessFirst || seq > p.seq {
		p.drop(fmt.Sprintf("protocol violation: ack of checkpoint %d, not sent on session %d", seq, s))
		return
	}
	p.lastHeard = p.now
	p.progressed()
	if seq <= p.sessAcked {
		return
	}
	p.sessAcked = seq
	p.acked = max(p.acked, seq)
	p.release = max(p.release, seq)
	i := 0
	for i < len(p.flight) && p.flight[i].seq <= seq {
		i++
	}
	p.flight = p.flight[i:]
	if p.state == Syncing && p.syncSeq != 0 && seq >= p.syncSeq {
		p.setState(Protected, fmt.Sprintf("backup committed checkpoint %d", seq))
	}
}

// needFullFrom handles a refusal of checkpoint seq. The backup commits
// nothing more of its chain until a full checkpoint: seq and what came
// before it leave the flight (back-pressure and AckTimeout must not wait
// for acks that may never come; one that does is still taken), and the
// next checkpoint is full, unless a full one newer than seq was already
// requested: then this is a late copy of a refusal already served.
func (p *Primary) needFullFrom(s, seq uint64) {
	if s != p.session || s == 0 {
		return
	}
	if p.sessFirst == 0 || seq < p.sessFirst || seq > p.seq {
		p.drop(fmt.Sprintf("protocol violation: refusal of checkpoint %d, not sent on session %d", seq, s))
		return
	}
	p.lastHeard = p.now
	p.flight = slices.DeleteFunc(p.flight, func(f inflight) bool { return f.seq <= seq })
	if p.lastFull > seq || p.needFull {
		return
	}
	p.needFull = true
	p.syncSeq = 0
	p.setState(Syncing, fmt.Sprintf("backup refused checkpoint %d; full checkpoint next", seq))
}

// drop closes the current session and waits for another, output held.
func (p *Primary) drop(reason string) {
	p.pend.DropSession = append(p.pend.DropSession, Drop{p.session, reason})
	p.endSession(Connecting, reason)
}

func (p *Primary) endSession(to PrimaryState, reason string) {
	p.clearSession()
	p.setState(to, reason)
}

// unprotect gives up on the backup: every closed epoch is released and
// PassThrough lets the open one's output go, held or new.
func (p *Primary) unprotect(reason string) {
	if p.session != 0 {
		p.pend.DropSession = append(p.pend.DropSession, Drop{p.session, reason})
	}
	p.clearSession()
	p.release = max(p.release, p.seq)
	p.passThrough = true
	p.setState(Unprotected, reason)
}

func (p *Primary) clearSession() {
	p.session, p.lastHB, p.sessFirst, p.sessAcked, p.needFull, p.lastFull, p.syncSeq = 0, 0, 0, 0, false, 0, 0
	p.flight = p.flight[:0]
}

func (p *Primary) setState(to PrimaryState, reason string) {
	if to == p.state {
		return
	}
	if to != Connecting && to != Syncing {
		p.asked = false // Syncing keeps it: the backup accepted the Hello that gave it up
	}
	p.pend.StateChanges = append(p.pend.StateChanges, PrimaryStateChange{p.now, p.state, to, reason})
	p.state = to
}

// Wake returns when the engine wants its next Tick (Never: no timer).
func (p *Primary) Wake() Time {
	if p.state == Unprotected || p.state == Fenced {
		return Never
	}
	// At least every HeartbeatInterval, even without a session (a redial
	// under way, the backup perhaps still following the last one): a
	// longer gap is then the loop's own standing still (stoodStill).
	w := min(max(p.lastHeard, p.woke)+p.cfg.Timeout, p.stepped+p.pace.every)
	if p.state == Connecting {
		if p.asked {
			w = min(w, max(p.askedAt, p.woke)+p.cfg.Timeout)
		} else if g := p.giveUpAt(); g > p.now {
			w = min(w, g) // GiveUp goes up then
		}
	}
	if p.session != 0 {
		w = min(w, p.lastHB+p.pace.every, p.epochDeadline())
		if len(p.flight) > 0 {
			w = min(w, p.flight[0].at+p.cfg.AckTimeout)
		}
	}
	return w
}

// HasReady reports whether Ready has anything new since the last Advance.
func (p *Primary) HasReady() bool {
	r := &p.pend
	return r.TakeCheckpoint != nil || r.SendHeartbeat != 0 || len(r.DropSession) > 0 || len(r.StateChanges) > 0 || r.StoodStill != 0 ||
		p.release != p.adv.Release || p.passThrough != p.adv.PassThrough || p.giveUp() != p.adv.GiveUp || p.Wake() != p.adv.Wake
}

// progressed notes a sign that the backup protects (progress): a GiveUp
// asked before it is void.
func (p *Primary) progressed() {
	p.progress = p.now
	p.asked = false
}

// giveUpAt is when a backup that acks nothing is given up (GiveUp).
func (p *Primary) giveUpAt() Time { return max(p.progress, p.woke) + p.cfg.Timeout }

// giveUp reports whether the next Hello is to give the backup up: no
// session, and no ack for Timeout. The backup was heard meanwhile, or the
// silence rule (expire) would have given it up already.
func (p *Primary) giveUp() bool { return p.state == Connecting && p.now >= p.giveUpAt() }

// Left returns the newest epoch some of whose output has left: Release,
// or, passing output through, the open epoch. A backup holding an older
// checkpoint than that must not resume it (Hello.Released).
func (p *Primary) Left() uint64 {
	if p.passThrough {
		return max(p.left, p.seq+1)
	}
	return max(p.left, p.release)
}

// Ready returns what the driver must do. Events may be stepped before the
// matching Advance: what they add stays for the next Ready.
func (p *Primary) Ready() PrimaryReady {
	rd := PrimaryReady{
		SendHeartbeat: p.pend.SendHeartbeat,
		Release:       p.release,
		PassThrough:   p.passThrough,
		DropSession:   slices.Clone(p.pend.DropSession),
		StateChanges:  slices.Clone(p.pend.StateChanges),
		StoodStill:    p.pend.StoodStill,
		GiveUp:        p.giveUp(),
		Wake:          p.Wake(),
	}
	if r := p.pend.TakeCheckpoint; r != nil {
		c := *r
		rd.TakeCheckpoint = &c
	}
	p.handed = &rd
	return rd
}

// Advance acknowledges that the last Ready was done.
func (p *Primary) Advance() {
	h := p.handed
	if h == nil {
		return
	}
	p.handed = nil
	if h.TakeCheckpoint != nil && p.pend.TakeCheckpoint != nil && *h.TakeCheckpoint == *p.pend.TakeCheckpoint {
		p.pend.TakeCheckpoint = nil
	}
	if h.SendHeartbeat == p.pend.SendHeartbeat {
		p.pend.SendHeartbeat = 0
	}
	p.pend.DropSession = slices.Delete(p.pend.DropSession, 0, len(h.DropSession))
	p.pend.StateChanges = slices.Delete(p.pend.StateChanges, 0, len(h.StateChanges))
	if h.StoodStill == p.pend.StoodStill {
		p.pend.StoodStill = 0
	}
	p.adv = PrimaryReady{Release: h.Release, PassThrough: h.PassThrough, GiveUp: h.GiveUp, Wake: h.Wake}
}
