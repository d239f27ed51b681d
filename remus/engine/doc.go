// Package engine is the Remus protocol (Cully et al., NSDI'08) as two pure
// state machines: Primary decides when to checkpoint, which held output
// may leave and when the backup has failed; Backup decides which
// checkpoints to commit and acknowledge, which primary to follow and when
// to fail over. They do no I/O, read no clock, start no goroutine and draw
// no random number, so every rule here is tested deterministically and a
// failure replays exactly; the drivers around them do the rest.
//
// # Shape
//
// As etcd raft's: Step(event) feeds an input (Now is in every event:
// virtual time), Ready() says what to do, Advance() says it was done.
//
//	for ev := range events {
//		if err := e.Step(ev); err != nil { ... } // a driver bug
//		if e.HasReady() {
//			rd := e.Ready()
//			... act on rd; set the one timer to rd.Wake (Tick then) ...
//			e.Advance()
//		}
//	}
//
// Steps between Ready and Advance are allowed: what they add waits for
// the next Ready. Levels (Release, PassThrough, Wake) are always current
// in a Ready; everything else is an edge to do once.
//
// # Protocol
//
// Checkpoint N closes epoch N; output the guest produces during epoch N
// is tagged N and held until a backup has committed checkpoint N or
// later, for then a failover would reproduce the state that produced it
// (output commit). Sequence numbers are global and monotonic for the life
// of a primary; the first epoch is 1. Acks are cumulative.
//
// A session is one connection to one backup, named by a number the
// primary's driver makes (increasing). Messages of any other session are
// ignored, so nothing late from an old connection can release output. The
// first checkpoint of every session is full, and the backup refuses an
// incremental that is not the successor of its last commit in the same
// session: dirty tracking restarts at every checkpoint, sent or not, so
// an incremental is only meaningful on top of its predecessor.
//
// Decisions the protocol leaves open, taken here:
//
//   - A lost session (Disconnected, or dropped for a protocol violation or
//     AckTimeout) does not end protection: the primary goes back to
//     Connecting, output held, and has until Timeout after the backup was
//     last heard to reconnect and resynchronize with a full checkpoint. The
//     backup, symmetric, keeps its last commit (Waiting) and fails over
//     Timeout after it last heard the primary. Only silence fails a peer,
//     but for a backup that acks nothing (GiveUp, below).
//   - A session's first checkpoint is requested at once, not at the end of
//     the epoch: until it is acknowledged output is held and the guest is
//     unprotected. Output that passed while Unprotected is never held back:
//     Release stays at the last closed epoch and the next checkpoint, the
//     full one, closes the epoch in which protection resumed.
//   - NeedFull carries the refused sequence number. The refused checkpoint
//     and those before it leave the flight (the backup will not ack them;
//     back-pressure must not wait for them) and a full checkpoint follows,
//     unless one newer than the refused one was requested already.
//   - A checkpoint unacknowledged for AckTimeout while the backup is
//     otherwise heard ends the session (and a resync follows): a stalled
//     stream would hold output forever while heartbeats say all is well.
//   - The backup's heartbeat repeats its last ack once it has one, so a
//     lost ack heals within HeartbeatInterval.
//   - Each side says its Timeout in the handshake (Hello, Connected); a
//     peer's shorter one sets the pace: heartbeats (and Ticks) every fifth
//     of it, and standing still is judged against it.
//   - Deadlines fire before the event that carries a later time: a message
//     arriving after Timeout of silence is too late, on both sides alike.
//   - After failing over, the backup rejects every Hello: one of a term up
//     to the failover term is told it is stale (Message.Fenced), the
//     split-brain guard. The session it was following when it failed over
//     is told so too before it is closed: the silence may have been one
//     way, and a primary that still hears the backup is fenced at once. A partition that silences both sides for Timeout
//     still makes two primaries, as in Remus; fencing them is the cluster
//     layer's (leases), the Term is what it has to work with. A primary
//     told it is stale (Stale) is Fenced: nothing more of it leaves.
//   - Both engines want a Tick at least every HeartbeatInterval while they
//     protect (the primary connecting, syncing or protected; the backup
//     following or waiting), so a gap that with one interval reaches
//     Timeout is the engine's own process standing still, its heartbeats
//     with it. A primary that stood still does not give the backup up for
//     that silence (the backup may have failed over: giving it up would
//     release output it never had) but waits a Timeout more to hear from
//     it; a failover then shows as the session's end and a Stale answer to
//     the redial. A backup that stood still likewise does not fail over for
//     the silence it slept through, but a Timeout after it woke.
//   - A guest that ends by itself ends its run: the backup acknowledges the
//     live session's Exit, drops the session and never fails over to that
//     run (Exited, no timer). A later Hello of the slot's term or above is
//     a new run of the VM: accepted, with nothing committed until its own
//     full checkpoint, so that it cannot fail over to the run that ended.
//   - A backup heard but acking nothing (sessions that come up and end
//     before an ack) would keep the silence rule from ever firing, output
//     held for good. Timeout after its last ack, with no session up, the
//     primary gives it up through it: Ready.GiveUp puts it in the next
//     Hello, the backup drops what it holds and answers MsgReleased, and
//     only then (Released) is held output released. Letting a silence of
//     the primary's own making give it up instead let the backup fail
//     over beside a live primary. Unanswered for one more Timeout, the
//     primary gives the backup up without its word, as by silence.
//   - Every Hello says the newest epoch some of whose output left the
//     primary (Primary.Left): a backup never resumes a checkpoint of that
//     run older than it, since clients saw what that state lacks. A Hello
//     of the same run supersedes the session the backup still follows.
package engine
