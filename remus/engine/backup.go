package engine

import (
	"errors"
	"fmt"
	"slices"
)

// BackupState is where a backup slot stands.
type BackupState uint8

const (
	// Idle: no session and nothing committed; nothing to fail over to.
	Idle BackupState = iota
	// Following: a session is up.
	Following
	// Waiting: the session is gone, a committed checkpoint is kept, and
	// the primary has Timeout since it was last heard to come back.
	Waiting
	// FailedOver: terminal. The driver runs the last committed
	// checkpoint; every Hello is rejected.
	FailedOver
	// Exited: the VM ended by itself on its primary (Exit). Nothing is
	// resumed and no timer runs; a Hello of the slot's term or a later
	// one starts a new run of the VM, from a full checkpoint.
	Exited
)

func (s BackupState) String() string {
	switch s {
	case Idle:
		return "idle"
	case Following:
		return "following"
	case Waiting:
		return "waiting"
	case FailedOver:
		return "failed-over"
	case Exited:
		return "exited"
	}
	return fmt.Sprintf("BackupState(%d)", uint8(s))
}

// BackupStateChange is a transition, for logs, metrics and status.
type BackupStateChange struct {
	At       Time
	From, To BackupState
	Reason   string
}

// MessageKind is the kind of a message from the backup to a primary.
type MessageKind uint8

const (
	// MsgAccept accepts the Hello of Session: the primary steps Connected.
	MsgAccept MessageKind = iota + 1
	// MsgReject refuses the Hello of Session for Reason; the driver sends
	// it and closes that connection.
	MsgReject
	// MsgAck acknowledges every checkpoint of Session up to Seq, all
	// committed: the primary steps Ack. Repeated as the heartbeat.
	MsgAck
	// MsgHeartbeat says the backup is alive: the primary steps Heartbeat.
	// Once the session has a commit, heartbeats are MsgAck instead.
	MsgHeartbeat
	// MsgNeedFull refuses checkpoint Seq of Session for Reason and asks
	// for a full one: the primary steps NeedFull.
	MsgNeedFull
	// MsgExited acknowledges the Exit of Session in epoch Seq; the
	// session is over (DropSession follows).
	MsgExited
	// MsgReleased answers a Hello that gives the slot up (Hello.GiveUp):
	// the slot dropped what it held, so its primary may release output
	// (it steps Released). The driver sends it and closes that
	// connection, as for MsgReject.
	MsgReleased
)

func (k MessageKind) String() string {
	switch k {
	case MsgAccept:
		return "accept"
	case MsgReject:
		return "reject"
	case MsgAck:
		return "ack"
	case MsgHeartbeat:
		return "heartbeat"
	case MsgNeedFull:
		return "need-full"
	case MsgExited:
		return "exited"
	case MsgReleased:
		return "released"
	}
	return fmt.Sprintf("MessageKind(%d)", uint8(k))
}

// Message is one message for the driver to send to a primary on Session's
// connection (dropped if that connection is gone).
type Message struct {
	Kind    MessageKind
	Session uint64
	Seq     uint64
	Reason  string
	// Fenced, on a MsgReject: the slot failed over, so the primary's term
	// is over. It must not redial, and must stop running the VM.
	Fenced bool
}

// Staged names a checkpoint the driver staged (stepped as Checkpoint): two
// sessions' checkpoints may have the same number (a restarted primary
// numbers afresh), and only one of them is to be applied.
type Staged struct{ Session, Seq uint64 }

// BackupReady is what the driver must do now, in this order: apply Commit,
// drop Discard, send Messages, close DropSession, then fail over. Commit
// comes first because an ack in Messages promises the commit happened; a
// driver may finish copying the last commit's data after sending, if by
// then nothing about it can fail any more and the copy ends before it
// fails over or handles anything else.
type BackupReady struct {
	// Commit lists staged checkpoints to apply atomically, in order. If
	// one cannot be applied, the driver applies none after it, withholds
	// the acks from it on (Messages), and steps CommitFailed.
	Commit []Staged
	// Discard lists staged checkpoints refused: drop their data. When a
	// session ends the driver drops its partial and staged data unasked.
	Discard []Staged
	// Messages lists messages to send, in order.
	Messages []Message
	// DropSession lists connections to close.
	DropSession []Drop
	// Failover: restore the last committed checkpoint (Committed()) and
	// run it. Set once in the life of the engine.
	Failover bool
	// StateChanges lists the transitions since the last Advance.
	StateChanges []BackupStateChange
	// Exit is set when the engine took an Exit: the driver records for
	// good that the run ended (it is never resumed).
	Exit *ExitTaken
	// StoodStill, if not 0, says the engine was not stepped for that long
	// while following or waiting (the backup's process or loop stood
	// still): the primary's silence over that time is not its failure, so
	// the engine waits up to Timeout to hear from it before failing over
	// (for the log).
	StoodStill Time
	// Wake is when the engine wants its next Tick (Never: no timer).
	Wake Time
}

// ExitTaken is an Exit the slot acknowledged. Its disk operations are
// those of the epochs after the checkpoint the Exit names (Exit.After):
// applied to the replica on top of anything else, they would make files
// the guest never had. So OpsFollow says whether that checkpoint is the
// session's last commit; if not (a checkpoint of the session was refused,
// or none was committed), the replica stays as of Committed.
type ExitTaken struct {
	Seq       uint64
	Code      uint32
	OpsFollow bool
	Committed uint64 // the session's last commit (0: none)
}

// Backup is the backup side of Remus for one protected VM slot: which
// primary it follows, which checkpoints it commits and acks, and when it
// fails over. A pure state machine like Primary. Not safe for concurrent
// use.
type Backup struct {
	cfg Config
	// wantFull, if not "", is why incrementals are refused until a full
	// checkpoint commits (WantFull).
	wantFull string
	pace     pace // heartbeat timing against the peer's timeout
	vm       string
	now      Time
	state    BackupState

	term      uint64 // highest term accepted; after failover, the failover term
	committed uint64 // last checkpoint committed, any session (0: none)
	// run is the primary process whose session was accepted last (its
	// Hello's Run; 0: not known, as after a restart from disk): while
	// what it committed waits for it, another run's Hello is refused.
	run uint64
	// released is the newest epoch whose output that run said had left
	// (Hello.Released): a commit older than it is not resumed.
	released uint64
	// dial is the highest Hello.Dial of that run handled: an older one,
	// handled late, must not supersede a newer session or give it up.
	dial uint64
	// kept lists the commits made since the copy was last dropped (the
	// slot given up, a new run, a stale state), newest last: a failed
	// commit leaves the copy at one of them, or at something dropped,
	// which must not come back (commitFailed).
	kept []commit
	// copyRun is the run whose checkpoint the copy holds (committed).
	copyRun uint64

	// The current session; zero when there is none.
	session       uint64
	sessCommitted uint64 // its last commit; 0: no full checkpoint yet
	lastHeard     Time   // last message of a session
	lastSent      Time
	stepped       Time // the last event's time
	// woke is when the engine was stepped after standing still while
	// following or waiting: the primary is not failed before woke+Timeout.
	woke Time
	// closed is the newest session that ended: it and every session
	// before it are over, and a Hello naming one (a late copy) is
	// refused. The driver numbers sessions in increasing order.
	closed uint64

	pend   BackupReady
	handed *BackupReady
	advWak Time
}

// NewBackup makes an Idle slot for vm at now, with cfg's zero fields
// defaulted.
func NewBackup(cfg Config, vm string, now Time) (*Backup, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if vm == "" {
		return nil, errors.New("remus: empty VM name")
	}
	return &Backup{cfg: cfg, pace: cfg.paceFor(0), vm: vm, now: now, lastHeard: now, stepped: now, advWak: Never}, nil
}

// Config returns the configuration in force, defaults applied.
func (b *Backup) Config() Config { return b.cfg }

// HeartbeatInterval is how often heartbeats go now: the configured
// interval, or a fifth of the peer's Timeout if that is shorter.
func (b *Backup) HeartbeatInterval() Time { return b.pace.every }

// VM returns the slot's VM.
func (b *Backup) VM() string { return b.vm }

// State returns the current state.
func (b *Backup) State() BackupState { return b.state }

// Term returns the highest term accepted; once FailedOver, the term that
// failed over (the new primary's term must be above it).
func (b *Backup) Term() uint64 { return b.term }

// Committed returns the last checkpoint committed (0: none).
func (b *Backup) Committed() uint64 { return b.committed }

// Session returns the current session (0: none).
func (b *Backup) Session() uint64 { return b.session }

// SessionCommitted returns the last checkpoint the current session
// committed (0: none yet), which its acknowledgements carry.
func (b *Backup) SessionCommitted() uint64 { return b.sessCommitted }

// LastHeard returns when a primary was last heard on a session.
func (b *Backup) LastHeard() Time { return b.lastHeard }

// Now returns the latest time the engine was given.
func (b *Backup) Now() Time { return b.now }

// Step feeds one event. Everything a primary sends is handled (refused at
// worst); the error is only for a nil event. Time never goes back, as for
// Primary.Step.
func (b *Backup) Step(ev BackupEvent) error {
	if ev == nil {
		return errors.New("remus: nil event")
	}
	b.now = max(b.now, ev.backupAt())
	b.stoodStill(b.now - b.stepped)
	b.stepped = b.now
	b.expire()
	switch e := ev.(type) {
	case Tick:
	case Hello:
		b.hello(e)
	case Checkpoint:
		b.checkpoint(e)
	case CommitFailed:
		if err := b.commitFailed(e); err != nil {
			return err
		}
	case Heartbeat:
		if b.live(e.Session) {
			b.lastHeard = b.now
		}
	case Disconnected:
		if b.live(e.Session) {
			b.endSession(fmt.Sprintf("session %d lost", e.Session))
		}
	case Exit:
		b.exit(e)
	case Unresumable:
		b.unresumable(e)
	case WantFull:
		b.wantFull = e.Reason
	default:
		panic(fmt.Sprintf("remus: unknown backup event %T", ev))
	}
	if b.state == Following && b.now >= b.lastSent+b.pace.every {
		if b.sessCommitted != 0 { // repeat the ack: it heals a lost one
			b.send(Message{Kind: MsgAck, Session: b.session, Seq: b.sessCommitted})
		} else {
			b.send(Message{Kind: MsgHeartbeat, Session: b.session})
		}
	}
	return nil
}

func (b *Backup) live(s uint64) bool { return s != 0 && s == b.session }

// stoodStill notes a gap of gap since the last event. While following or
// waiting, the engine is stepped at least every HeartbeatInterval (Wake), so a gap that
// with the heartbeat interval reaches Timeout means this backup stood
// still (a process stopped or starved) and heard nothing only because it
// did not listen: the primary's messages wait in the connection. Failing
// over now would resume an older checkpoint beside a live primary, which,
// not hearing this backup either, may have given it up and released
// output since. So the primary gets a Timeout from now: its queued
// messages keep the session, its redial (it dropped the session) finds
// this backup still following, and only silence after waking fails it.
func (b *Backup) stoodStill(gap Time) {
	if (b.state != Following && b.state != Waiting) || !b.pace.stoodStill(gap) {
		return
	}
	b.woke = b.now
	b.pend.StoodStill = gap
}

// expire fires the failure detector before the event at now is handled,
// so that a message arriving after Timeout of silence is too late, as on
// the primary. With something committed, silence is the primary's
// failure; with nothing, there is nothing to run, so the slot resets.
func (b *Backup) expire() {
	if (b.state != Following && b.state != Waiting) || b.now < max(b.lastHeard, b.woke)+b.cfg.Timeout {
		return
	}
	reason := fmt.Sprintf("primary not heard for %v", b.now-b.lastHeard)
	if !b.resumable() {
		b.pend.DropSession = append(b.pend.DropSession, Drop{b.session, reason})
		b.clearSession()
		if b.committed == 0 {
			b.setState(Idle, reason+"; nothing committed to fail over to")
		} else {
			b.setState(Idle, fmt.Sprintf("%s; checkpoint %d is older than output its primary released (epoch %d): not resumed", reason, b.committed, b.released))
			b.dropCopy()
		}
		return
	}
	if b.session != 0 {
		// Said on the session, not only to the next Hello: a primary
		// that still hears this backup (the silence was one way) is
		// fenced now instead of giving the backup up after its own
		// Timeout and releasing output beside the failed-over VM.
		b.send(Message{Kind: MsgReject, Session: b.session, Fenced: true,
			Reason: fmt.Sprintf("stale primary: not heard for %v, the backup failed over at term %d", b.now-b.lastHeard, b.term)})
		b.pend.DropSession = append(b.pend.DropSession, Drop{b.session, reason + "; failing over"})
	}
	b.clearSession()
	b.pend.Failover = true
	b.setState(FailedOver, fmt.Sprintf("%s; running checkpoint %d under term %d", reason, b.committed, b.term))
}

// hello accepts a session unless it would make two primaries: a term
// below the slot's, a slot that failed over (its primary is stale: the
// split-brain guard), or a live session already (silent for less than
// Timeout: expire ended it otherwise).
func (b *Backup) hello(h Hello) {
	reject := func(why string) { b.send(Message{Kind: MsgReject, Session: h.Session, Reason: why}) }
	if !b.live(h.Session) && h.VM == b.vm && h.Run == b.run && h.Term == b.term && b.state != FailedOver {
		// Heard even from a Hello refused below: the run's numbers are
		// the slot's (a run that says nothing of itself, Run 0, is
		// taken for the same).
		b.released = max(b.released, h.Released)
	}
	switch {
	case b.live(h.Session):
		// A copy of the Hello that opened the session refreshes it; any
		// other Hello naming it is ignored, as a reply would go to (and
		// the reject close) the live connection.
		if h.VM == b.vm && h.Term == b.term {
			b.lastHeard = b.now
		}
	case h.VM != b.vm:
		reject(fmt.Sprintf("wrong VM %q: slot is for %q", h.VM, b.vm))
	case b.state == FailedOver && h.Term <= b.term:
		b.send(Message{Kind: MsgReject, Session: h.Session, Fenced: true,
			Reason: fmt.Sprintf("stale primary: term %d failed over at term %d", h.Term, b.term)})
	case b.state == FailedOver:
		// A higher term, but the VM runs here: it too must stop.
		b.send(Message{Kind: MsgReject, Session: h.Session, Fenced: true, Reason: "slot failed over: it runs the VM now"})
	case h.Session == 0:
		reject("session 0")
	case h.Term < b.term:
		reject(fmt.Sprintf("stale term %d: slot is at term %d", h.Term, b.term))
	case h.Session <= b.closed:
		reject(fmt.Sprintf("session %d is closed", h.Session))
	case b.sameRun(h) && h.Dial != 0 && h.Dial <= b.dial:
		// Handled late (its handshake stalled): its primary has moved
		// on to a newer connection, which it must not end or give up.
		reject(fmt.Sprintf("late hello: connection %d of its primary, after %d", h.Dial, b.dial))
	case b.state == Following && !b.sameRun(h):
		reject(fmt.Sprintf("duplicate: session %d is live (heard %v ago)", b.session, b.now-b.lastHeard))
	case b.state == Waiting && b.committed != 0 && b.run != 0 && h.Run != 0 && h.Run != b.run && h.Term <= b.term:
		// A new run of the VM (a restarted primary, or a second one
		// under its id) while what the last run committed, which did
		// not exit, waits for it: starting over would throw away what
		// that run's clients were told is saved. The slot fails over
		// to it unless that run comes back within the timeout; this
		// run is fenced. (A run that says nothing of itself, Run 0, is
		// not told apart; one of a higher term is the operator's word
		// that it supersedes the last.)
		b.send(Message{Kind: MsgReject, Session: h.Session, Fenced: true,
			Reason: fmt.Sprintf("stale primary: another run of VM %s holds checkpoint %d here and did not exit: "+
				"this backup resumes it unless that run comes back within %v; a new run must not start over it",
				b.vm, b.committed, b.cfg.Timeout)})
	case h.GiveUp:
		b.supersede(h)
		// The primary goes on without a backup: what the slot holds
		// falls behind the output about to leave, so it is dropped
		// before the primary hears it may release (MsgReleased). A
		// primary that let output go unanswered instead gave the slot
		// a silence, and the slot resumed its older state beside it.
		why := fmt.Sprintf("its primary (term %d) gives this backup up and runs unprotected", h.Term)
		if b.committed != 0 {
			why += fmt.Sprintf("; checkpoint %d is no longer resumed", b.committed)
		}
		b.dropCopy()
		b.adopt(h)
		b.closed = max(b.closed, h.Session)
		b.send(Message{Kind: MsgReleased, Session: h.Session, Reason: why})
		if b.state == Waiting {
			b.setState(Idle, why)
		}
	default:
		b.supersede(h)
		why := fmt.Sprintf("session %d accepted, term %d", h.Session, h.Term)
		exited := b.state == Exited
		b.adopt(h)
		b.session = h.Session
		switch {
		case exited:
			// A new run: the last one ended, and what it committed
			// must never be resumed, even if this session fails
			// before its first (full) checkpoint.
			b.dropCopy()
			why += "; a new run of the VM"
		case b.committed != 0 && !b.resumable():
			// Its primary let output go while it ran without this
			// backup that the checkpoint lacks: resuming it would
			// take back what clients were shown.
			why += fmt.Sprintf("; checkpoint %d is older than the output its primary released (epoch %d), so it is no longer resumed", b.committed, b.released)
			b.dropCopy()
		}
		b.lastHeard = b.now
		b.pace = b.cfg.paceFor(h.PeerTimeout)
		b.send(Message{Kind: MsgAccept, Session: h.Session})
		b.setState(Following, why)
	}
}

// sameRun reports whether h comes from the primary process whose session
// the slot accepted last, under the same term: its checkpoint numbers are
// the slot's, and a session of it that the slot still follows is one it
// has left (a primary has one session at a time).
func (b *Backup) sameRun(h Hello) bool {
	return h.Run != 0 && h.Run == b.run && h.Term == b.term && h.VM == b.vm
}

// adopt makes h's run the one the slot follows: its term, run and Dial,
// and its Released if it is another run (another term) than the last,
// whose numbers are its own; the same run's was taken already (hello).
func (b *Backup) adopt(h Hello) {
	if h.Run != b.run || h.Term != b.term {
		b.released = h.Released
	}
	b.dial, b.term, b.run = h.Dial, h.Term, h.Run
}

// supersede ends the session the slot follows, if any, for h's: the same
// run's newer connection (sameRun). Rejecting it as a duplicate instead
// kept the slot on a connection its primary had closed (its close not
// seen yet) until the timeout, and then failed over while that primary,
// refused, could neither be protected nor release.
func (b *Backup) supersede(h Hello) {
	if b.state != Following {
		return
	}
	b.pend.DropSession = append(b.pend.DropSession, Drop{b.session, fmt.Sprintf("superseded by session %d of the same primary", h.Session)})
	b.endSession(fmt.Sprintf("session %d superseded by %d", b.session, h.Session))
}

// dropCopy forgets the last commit: nothing the copy holds now, nor what
// a failed commit leaves it at, is to be resumed.
func (b *Backup) dropCopy() {
	b.committed = 0
	b.kept = b.kept[:0]
	b.copyRun = 0
}

// commit is a checkpoint the slot committed, and the run it came from.
type commit struct{ run, seq uint64 }

// resumable reports whether the last commit may be run at a failover: it
// exists and is not older than output its primary said it released
// (Hello.Released) while it ran without this backup. A copy of another run
// than the one the slot follows now (accepted over it with a higher term)
// is resumable only while the new run says none of its output left: its
// numbers say nothing of the copy's.
func (b *Backup) resumable() bool {
	switch {
	case b.committed == 0:
		return false
	case b.copyRun != b.run:
		return b.released == 0
	}
	return b.committed >= b.released
}

// exit ends the run of the VM: its primary's guest ended by itself, so no
// failover will ever resume it. Only the live session's Exit counts (a
// stale or late one is dropped). What was committed stays, for status and
// for the disk, but a later session starts from nothing (hello).
func (b *Backup) exit(e Exit) {
	if !b.live(e.Session) || b.state != Following {
		b.pend.DropSession = append(b.pend.DropSession, Drop{e.Session, "exit of a session that is not live"})
		return
	}
	b.lastHeard = b.now
	b.send(Message{Kind: MsgExited, Session: e.Session, Seq: e.Seq})
	reason := fmt.Sprintf("the VM exited with code %d on its primary (session %d, epoch %d)", e.Code, e.Session, e.Seq)
	follow := e.After != 0 && e.After == b.sessCommitted && e.Seq > e.After
	b.pend.Exit = &ExitTaken{Seq: e.Seq, Code: e.Code, OpsFollow: follow, Committed: b.sessCommitted}
	if !follow {
		reason += fmt.Sprintf("; its last disk operations follow checkpoint %d, not this session's last commit %d: its files here are as of that commit",
			e.After, b.sessCommitted)
	}
	b.pend.DropSession = append(b.pend.DropSession, Drop{e.Session, reason})
	b.clearSession()
	b.setState(Exited, reason)
}

// unresumable forgets what the slot committed, which the driver cannot
// resume (Unresumable). After a failover, or an exit, there is nothing to
// take back.
func (b *Backup) unresumable(e Unresumable) {
	if b.state == FailedOver || b.state == Exited {
		return
	}
	if b.session != 0 {
		b.pend.DropSession = append(b.pend.DropSession, Drop{b.session, e.Reason})
	}
	b.clearSession()
	b.dropCopy()
	b.setState(Idle, e.Reason+"; nothing here can be resumed")
}

// checkpoint commits c if it extends this session's chain: a full one
// newer than the last commit, or the incremental right after it. A full
// checkpoint is a whole state, so it needs nothing before it; an
// incremental is only the pages its epoch dirtied, so applied to anything
// but its predecessor it would make a state that never existed.
func (b *Backup) checkpoint(c Checkpoint) {
	if !b.live(c.Session) || b.state != Following {
		b.pend.Discard = append(b.pend.Discard, Staged{c.Session, c.Seq})
		return
	}
	b.lastHeard = b.now
	switch {
	case c.Seq == 0:
		b.pend.Discard = append(b.pend.Discard, Staged{c.Session, c.Seq})
		b.pend.DropSession = append(b.pend.DropSession, Drop{c.Session, "protocol violation: checkpoint 0"})
		b.endSession(fmt.Sprintf("session %d: protocol violation", c.Session))
	case c.Seq <= b.sessCommitted:
		b.pend.Discard = append(b.pend.Discard, Staged{c.Session, c.Seq}) // a copy of one committed
	case c.Full || c.Seq == b.sessCommitted+1 && b.sessCommitted != 0 && b.wantFull == "":
		b.committed, b.sessCommitted = c.Seq, c.Seq
		b.copyRun = b.run
		if b.kept = append(b.kept, commit{b.run, c.Seq}); len(b.kept) > 64 {
			b.kept = slices.Delete(b.kept, 0, len(b.kept)-64)
		}
		if c.Full {
			b.wantFull = ""
		}
		b.pend.Commit = append(b.pend.Commit, Staged{c.Session, c.Seq})
		b.ack(c.Session, c.Seq)
	default:
		why := fmt.Sprintf("incremental %d without a full checkpoint in session %d", c.Seq, c.Session)
		switch {
		case b.wantFull != "":
			why = fmt.Sprintf("incremental %d refused: %s", c.Seq, b.wantFull)
		case b.sessCommitted != 0:
			why = fmt.Sprintf("incremental %d after %d: gap", c.Seq, b.sessCommitted)
		}
		b.pend.Discard = append(b.pend.Discard, Staged{c.Session, c.Seq})
		b.send(Message{Kind: MsgNeedFull, Session: c.Session, Seq: c.Seq, Reason: why})
	}
}

// commitFailed takes back the commits from e.Seq on: the copy holds
// e.Committed (which may be above e.Seq: a restarted primary's first full
// checkpoint, numbered afresh, over an older session's copy). The session
// that sent them ends, so that nothing of it is acknowledged again (the
// heartbeat repeats the last ack). After a failover (the apply was slow
// enough for the primary to time out) only the number is set right: the
// failover resumes the copy as it is.
func (b *Backup) commitFailed(e CommitFailed) error {
	if e.Seq == 0 || e.Seq > b.committed && b.state != FailedOver {
		return fmt.Errorf("remus: commit of %d failed, but %d is the last committed", e.Seq, b.committed)
	}
	// The failed commit and those after it never took; what the copy
	// holds is resumable only if it is a commit made since the copy was
	// last dropped (a given-up slot's image, say, stays in memory).
	if i := slices.IndexFunc(b.kept, func(c commit) bool { return c.seq == e.Seq }); i >= 0 {
		b.kept = b.kept[:i]
	}
	b.copyRun = 0
	found := false
	for i := len(b.kept) - 1; i >= 0 && e.Committed != 0; i-- {
		if b.kept[i].seq == e.Committed {
			b.copyRun, found = b.kept[i].run, true
			break
		}
	}
	if !found {
		e.Committed = 0
	}
	b.committed = e.Committed
	if b.state == FailedOver {
		return nil
	}
	reason := fmt.Sprintf("checkpoint %d could not be applied", e.Seq)
	if b.live(e.Session) {
		b.pend.DropSession = append(b.pend.DropSession, Drop{e.Session, reason})
		b.endSession(reason)
		return nil
	}
	if b.committed == 0 && b.state == Waiting {
		b.setState(Idle, reason+"; nothing committed")
	}
	return nil
}

// ack sends a cumulative ack, replacing one for the same session not yet
// handed to the driver: only the highest matters.
func (b *Backup) ack(s, seq uint64) {
	m := b.pend.Messages
	if n := len(m); n > 0 && (b.handed == nil || n > len(b.handed.Messages)) && m[n-1].Kind == MsgAck && m[n-1].Session == s {
		m[n-1].Seq = seq
		b.lastSent = b.now
		return
	}
	b.send(Message{Kind: MsgAck, Session: s, Seq: seq})
}

func (b *Backup) send(m Message) {
	b.pend.Messages = append(b.pend.Messages, m)
	if b.live(m.Session) {
		b.lastSent = b.now
	}
}

// endSession keeps what was committed: Waiting, the primary has until
// Timeout after it was last heard to come back with a new session.
func (b *Backup) endSession(reason string) {
	b.clearSession()
	if b.committed == 0 {
		b.setState(Idle, reason+"; nothing committed")
	} else {
		b.setState(Waiting, fmt.Sprintf("%s; keeping checkpoint %d", reason, b.committed))
	}
}

func (b *Backup) clearSession() {
	b.closed = max(b.closed, b.session)
	b.session, b.sessCommitted, b.lastSent = 0, 0, 0
}

func (b *Backup) setState(to BackupState, reason string) {
	if to == b.state {
		return
	}
	b.pend.StateChanges = append(b.pend.StateChanges, BackupStateChange{b.now, b.state, to, reason})
	b.state = to
}

// Wake returns when the engine wants its next Tick (Never: no timer).
func (b *Backup) Wake() Time {
	switch b.state {
	case Following:
		return min(max(b.lastHeard, b.woke)+b.cfg.Timeout, b.lastSent+b.pace.every)
	case Waiting:
		// Ticked every HeartbeatInterval, as when following, so that a
		// longer gap is the backup's own standing still (stoodStill).
		return min(max(b.lastHeard, b.woke)+b.cfg.Timeout, b.stepped+b.pace.every)
	}
	return Never
}

// HasReady reports whether Ready has anything new since the last Advance.
func (b *Backup) HasReady() bool {
	r := &b.pend
	return len(r.Commit) > 0 || len(r.Discard) > 0 || len(r.Messages) > 0 || len(r.DropSession) > 0 ||
		r.Failover || len(r.StateChanges) > 0 || r.Exit != nil || r.StoodStill != 0 || b.Wake() != b.advWak
}

// Ready returns what the driver must do. Events may be stepped before the
// matching Advance: what they add stays for the next Ready.
func (b *Backup) Ready() BackupReady {
	rd := BackupReady{
		Commit:       slices.Clone(b.pend.Commit),
		Discard:      slices.Clone(b.pend.Discard),
		Messages:     slices.Clone(b.pend.Messages),
		DropSession:  slices.Clone(b.pend.DropSession),
		Failover:     b.pend.Failover,
		StateChanges: slices.Clone(b.pend.StateChanges),
		Exit:         b.pend.Exit,
		StoodStill:   b.pend.StoodStill,
		Wake:         b.Wake(),
	}
	b.handed = &rd
	return rd
}

// Advance acknowledges that the last Ready was done.
func (b *Backup) Advance() {
	h := b.handed
	if h == nil {
		return
	}
	b.handed = nil
	b.pend.Commit = slices.Delete(b.pend.Commit, 0, len(h.Commit))
	b.pend.Discard = slices.Delete(b.pend.Discard, 0, len(h.Discard))
	b.pend.Messages = slices.Delete(b.pend.Messages, 0, len(h.Messages))
	b.pend.DropSession = slices.Delete(b.pend.DropSession, 0, len(h.DropSession))
	b.pend.StateChanges = slices.Delete(b.pend.StateChanges, 0, len(h.StateChanges))
	if h.Failover {
		b.pend.Failover = false
	}
	if h.Exit != nil {
		b.pend.Exit = nil
	}
	if h.StoodStill == b.pend.StoodStill {
		b.pend.StoodStill = 0
	}
	b.advWak = h.Wake
}
