package engine

// PrimaryEvent is an input of the Primary: Tick, Output, Connected,
// Disconnected, CheckpointTaken, CheckpointFailed, Ack, Heartbeat,
// NeedFull, Stale, GiveUpSent or Released. The interface
// is sealed so that feeding a backup's event to a primary does not compile.
type PrimaryEvent interface{ primaryAt() Time }

// BackupEvent is an input of the Backup: Tick, Hello, Checkpoint,
// CommitFailed, Heartbeat, Disconnected, Exit, Unresumable or WantFull.
type BackupEvent interface{ backupAt() Time }

// Tick tells an engine the time; the driver sends one at each Wake.
type Tick struct{ Now Time }

// Heartbeat is a heartbeat from the peer on Session, or any message that
// has no event of its own: the backup's driver reports each part of a
// checkpoint as it arrives, since a large one can take longer than
// Timeout to stream and its Checkpoint comes only at the end.
type Heartbeat struct {
	Now     Time
	Session uint64
}

// Disconnected reports that Session's connection broke or was closed.
type Disconnected struct {
	Now     Time
	Session uint64
}

// Output reports that the guest produced held output in the current epoch.
// Reporting the first per epoch is enough; more are harmless. Reported
// while a checkpoint is being taken, it counts for the epoch after it: at
// worst that epoch ends at MinEpoch for nothing, never later than due.
type Output struct{ Now Time }

// GuestIdle reports that the guest, with output waiting in the current epoch,
// is about to sleep until input arrives. Under PolicyOutput the epoch then
// ends at once, rate limit or not: pausing a guest that has nothing to do
// costs it nothing, and its reply is waiting on this checkpoint. The rate
// limit is for guests that keep running (a saturated server).
type GuestIdle struct{ Now Time }

// HoldFull reports that the output held for acknowledgement passed the
// primary's limit: under any policy the epoch ends as soon as a checkpoint
// may be taken, so that acknowledgements can release it (back-pressure).
type HoldFull struct{ Now Time }

// Stale reports that the backup refused this primary's Hello because it
// runs the VM itself now (it failed over): the primary is fenced.
type Stale struct {
	Now    Time
	Reason string
}

// GiveUpSent reports that a Hello carrying GiveUp left for the backup (the
// engine's GiveUp was up when the driver sent it): a backup that answers
// it neither with Released nor otherwise within Timeout is given up
// without its word. A Hello without it, accepted, proves nothing.
type GiveUpSent struct{ Now Time }

// Released reports that the backup answered a Hello that gave it up
// (Ready.GiveUp) by dropping what it held for this VM: nothing it has can
// be resumed now, so held output may leave. The primary is Unprotected.
type Released struct {
	Now    Time
	Reason string
}

// Connected reports that a backup accepted the handshake of Session.
// Sessions must increase over the life of a Primary, so that a late
// message of an old session can never pass for a new one.
type Connected struct {
	Now     Time
	Session uint64
	// PeerTimeout is the backup's Timeout, from its Welcome (0: not
	// said): heartbeats go at least every fifth of it.
	PeerTimeout Time
	// Said is the Released its Hello carried (Primary.Left when it was
	// sent): below Left now, the session is dropped for a redial that
	// tells the backup.
	Said uint64
}

// CheckpointTaken reports that the pause for the requested checkpoint Seq
// is over and its streaming has started. Step it before any Ack can name
// Seq: an ack of a checkpoint not yet taken is a protocol violation.
type CheckpointTaken struct {
	Now Time
	Seq uint64
}

// CheckpointFailed reports that the pause for the requested checkpoint Seq
// could not capture it (the driver logs why). Nothing of it was streamed;
// the pages it collected are lost to the stream, so the next checkpoint is
// full, and its number is Seq again.
type CheckpointFailed struct {
	Now    Time
	Seq    uint64
	Reason string
}

// Ack is the backup's cumulative acknowledgement: it committed every
// checkpoint of Session up to Seq.
type Ack struct {
	Now     Time
	Session uint64
	Seq     uint64
}

// NeedFull is the backup's refusal of checkpoint Seq of Session (no full
// checkpoint to build on, or a gap): it needs a full one. Seq lets the
// primary tell a new request from a late copy of one it already served.
type NeedFull struct {
	Now     Time
	Session uint64
	Seq     uint64
}

// Hello is a primary's handshake for Session: it protects VM under Term.
// Session names the connection in every message after it, so the driver
// refuses a Hello naming a session another connection already uses.
type Hello struct {
	Now     Time
	Session uint64
	VM      string
	Term    uint64
	// PeerTimeout is the primary's Timeout (0: not said): once the
	// session is accepted, heartbeats go at least every fifth of it.
	PeerTimeout Time
	// Run identifies the primary's process (0: not said): the same for
	// its redials, another for a new run of the VM.
	Run uint64
	// Released is the newest epoch some of whose output has left the
	// primary (Primary.Left): a committed checkpoint older than that is
	// not what the clients saw, and is never resumed.
	Released uint64
	// GiveUp: the primary gives this backup up (PrimaryReady.GiveUp). The
	// slot drops what it holds and answers MsgReleased instead of
	// accepting a session.
	GiveUp bool
	// Dial numbers the run's connections (0: not said): a Hello handled
	// after a later one of its run is refused.
	Dial uint64
}

// Checkpoint reports that every part of checkpoint Seq of Session arrived
// and was verified, and is staged: the backup engine decides whether it
// is committed (Ready.Commit) or dropped (Ready.Discard).
type Checkpoint struct {
	Now     Time
	Session uint64
	Seq     uint64
	Full    bool
}

// Exit reports that the primary of Session said its guest ended by itself
// in epoch Seq, with Code, once every checkpoint heard before it was
// handled. Its disk operations are those of the epochs after checkpoint
// After (0: none was sent whole). Nothing will resume that run: the slot
// acknowledges the Exit and never fails over to it (BackupReady.Exit).
type Exit struct {
	Now     Time
	Session uint64
	Seq     uint64
	Code    uint32
	After   uint64
}

// Unresumable reports that the driver cannot resume what the slot
// committed (it could not prepare the VM's module for failover): a
// failover would run nothing, and a primary that counted on this backup
// would be wrong. The live session ends, and the slot keeps nothing to fail
// over to; a later Hello starts from a full checkpoint, as on a new slot.
type Unresumable struct {
	Now    Time
	Reason string
}

// WantFull reports that the driver can no longer build on the chain it
// holds (storing a checkpoint on disk failed: the disk keeps an older one,
// and the memory image must not pair with it): every incremental
// checkpoint is refused with NeedFull until a full one is committed.
type WantFull struct {
	Now    Time
	Reason string
}

func (e Tick) primaryAt() Time             { return e.Now }
func (e CheckpointFailed) primaryAt() Time { return e.Now }
func (e Tick) backupAt() Time              { return e.Now }
func (e Heartbeat) primaryAt() Time        { return e.Now }
func (e Heartbeat) backupAt() Time         { return e.Now }
func (e Disconnected) primaryAt() Time     { return e.Now }
func (e Disconnected) backupAt() Time      { return e.Now }
func (e Output) primaryAt() Time           { return e.Now }
func (e Connected) primaryAt() Time        { return e.Now }
func (e Stale) primaryAt() Time            { return e.Now }
func (e Released) primaryAt() Time         { return e.Now }
func (e GiveUpSent) primaryAt() Time       { return e.Now }
func (e GuestIdle) primaryAt() Time        { return e.Now }
func (e HoldFull) primaryAt() Time         { return e.Now }
func (e CheckpointTaken) primaryAt() Time  { return e.Now }
func (e Ack) primaryAt() Time              { return e.Now }
func (e NeedFull) primaryAt() Time         { return e.Now }
func (e Hello) backupAt() Time             { return e.Now }
func (e Checkpoint) backupAt() Time        { return e.Now }
func (e CommitFailed) backupAt() Time      { return e.Now }
func (e Exit) backupAt() Time              { return e.Now }
func (e Unresumable) backupAt() Time       { return e.Now }
func (e WantFull) backupAt() Time          { return e.Now }

// Drop asks the driver to close Session's connection, saying Reason.
type Drop struct {
	Session uint64
	Reason  string
}

// CommitFailed reports that the driver could not apply checkpoint Seq of
// Session, which a Ready listed in Commit (its pages did not resolve
// against the backup's copy, or the image refused it), and so applied
// none after it in that Ready either: its copy holds Committed, the last
// one applied (0: none). The driver withheld the acks of Seq and of
// every later one. The session ends, and its primary resynchronizes with
// a full checkpoint in a new one; until then, a failover resumes
// Committed.
type CommitFailed struct {
	Now       Time
	Session   uint64
	Seq       uint64
	Committed uint64
}
