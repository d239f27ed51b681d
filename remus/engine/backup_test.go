package engine

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// bh drives a Backup in tests, checking what must hold after every step.
type bh struct {
	t         *testing.T
	b         *Backup
	state     BackupState
	failovers int
}

func newBH(t *testing.T) *bh {
	t.Helper()
	b, err := NewBackup(testCfg, "vm1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if b.HasReady() {
		t.Fatal("an idle slot has something to do")
	}
	return &bh{t: t, b: b}
}

func (h *bh) step(ev BackupEvent) BackupReady {
	h.t.Helper()
	if err := h.b.Step(ev); err != nil {
		h.t.Fatalf("Step(%#v): %v", ev, err)
	}
	b := h.b
	rd := BackupReady{Wake: b.Wake()}
	if b.HasReady() {
		rd = b.Ready()
		b.Advance()
		if b.HasReady() {
			h.t.Fatal("HasReady after Advance")
		}
	}
	for _, c := range rd.StateChanges {
		if c.From != h.state || c.From == c.To {
			h.t.Fatalf("state change %+v, engine was %v", c, h.state)
		}
		h.state = c.To
	}
	if h.state != b.State() {
		h.t.Fatalf("state %v, changes say %v", b.State(), h.state)
	}
	if rd.Failover {
		h.failovers++
		if h.failovers > 1 || b.Committed() == 0 || b.State() != FailedOver {
			h.t.Fatalf("failover %d, committed %d, %v", h.failovers, b.Committed(), b.State())
		}
	}
	if rd.Wake <= b.Now() {
		h.t.Fatalf("Wake %v not after now %v", rd.Wake, b.Now())
	}
	return rd
}

// silence ticks at each Wake, as the driver does, with nothing heard,
// until the engine changes state or until; it returns that step's Ready.
// (A single Tick far ahead is a backup that stood still: StoodStill.)
func (h *bh) silence(until Time) BackupReady {
	h.t.Helper()
	for {
		w := h.b.Wake()
		if w == Never || w >= until {
			return h.step(Tick{until})
		}
		if rd := h.step(Tick{w}); len(rd.StateChanges) > 0 {
			return rd
		}
	}
}

func msgs(rd BackupReady, k MessageKind) []Message {
	var out []Message
	for _, m := range rd.Messages {
		if m.Kind == k {
			out = append(out, m)
		}
	}
	return out
}

func (h *bh) hello(now Time, session, term uint64) BackupReady {
	h.t.Helper()
	return h.step(Hello{Now: now, Session: session, VM: "vm1", Term: term})
}

// following returns a slot following session 1 (term 3) that committed
// full checkpoint 5 at 2ms.
func following(t *testing.T) *bh {
	t.Helper()
	h := newBH(t)
	rd := h.hello(1*ms, 1, 3)
	if a := msgs(rd, MsgAccept); len(a) != 1 || a[0].Session != 1 || h.b.State() != Following || h.b.Term() != 3 {
		t.Fatalf("hello: %v %+v", h.b.State(), rd)
	}
	rd = h.step(Checkpoint{2 * ms, 1, 5, true})
	if !slices.Equal(seqs(rd.Commit), []uint64{5}) || len(rd.Discard) != 0 {
		t.Fatalf("full: %+v", rd)
	}
	if a := msgs(rd, MsgAck); len(a) != 1 || a[0] != (Message{Kind: MsgAck, Session: 1, Seq: 5}) {
		t.Fatalf("ack %+v", a)
	}
	return h
}

func TestBackupCheckpointChain(t *testing.T) {
	h := newBH(t)
	h.hello(1*ms, 1, 3)
	rd := h.step(Checkpoint{2 * ms, 1, 4, false})
	if n := msgs(rd, MsgNeedFull); len(rd.Commit) != 0 || !slices.Equal(seqs(rd.Discard), []uint64{4}) || len(n) != 1 || n[0].Seq != 4 {
		t.Fatalf("incremental first: %+v", rd)
	}
	h.step(Checkpoint{3 * ms, 1, 5, true})
	for _, tc := range []struct {
		c              Checkpoint
		commit, discrd bool
		needFull       bool
	}{
		{Checkpoint{4 * ms, 1, 6, false}, true, false, false},   // the next one
		{Checkpoint{5 * ms, 1, 6, false}, false, true, false},   // a copy
		{Checkpoint{5 * ms, 1, 5, true}, false, true, false},    // an old full one
		{Checkpoint{6 * ms, 1, 8, false}, false, true, true},    // a gap
		{Checkpoint{7 * ms, 1, 7, false}, true, false, false},   // late, still the next one
		{Checkpoint{8 * ms, 2, 8, false}, false, true, false},   // another session
		{Checkpoint{9 * ms, 1, 12, true}, true, false, false},   // a full one past a gap
		{Checkpoint{10 * ms, 1, 13, false}, true, false, false}, // and on from it
	} {
		rd := h.step(tc.c)
		if len(rd.Commit) == 1 != tc.commit || len(rd.Discard) == 1 != tc.discrd || len(msgs(rd, MsgNeedFull)) == 1 != tc.needFull {
			t.Fatalf("%+v: %+v", tc.c, rd)
		}
		if tc.commit && (rd.Commit[0].Seq != tc.c.Seq || h.b.Committed() != tc.c.Seq || msgs(rd, MsgAck)[0].Seq != tc.c.Seq) {
			t.Fatalf("%+v: %+v", tc.c, rd)
		}
		if !tc.commit && len(msgs(rd, MsgAck)) != 0 {
			t.Fatalf("ack without commit: %+v", rd)
		}
	}
	// A checkpoint 0 is a violation: the session is closed.
	rd = h.step(Checkpoint{11 * ms, 1, 0, false})
	if len(rd.DropSession) != 1 || h.b.State() != Waiting || h.b.Committed() != 13 {
		t.Fatalf("checkpoint 0: %v %+v", h.b.State(), rd)
	}
}

func TestBackupAcksCoalesce(t *testing.T) {
	b, _ := NewBackup(testCfg, "vm1", 0)
	b.Step(Hello{1 * ms, 1, "vm1", 1, 0, 0, 0, false, 0})
	b.Step(Checkpoint{2 * ms, 1, 1, true})
	b.Step(Checkpoint{2 * ms, 1, 2, false})
	rd := b.Ready()
	if !slices.Equal(seqs(rd.Commit), []uint64{1, 2}) || len(msgs(rd, MsgAck)) != 1 || msgs(rd, MsgAck)[0].Seq != 2 {
		t.Fatalf("%+v", rd)
	}
	b.Step(Checkpoint{3 * ms, 1, 3, false}) // after Ready: its own ack
	b.Advance()
	rd = b.Ready()
	b.Advance()
	if !slices.Equal(seqs(rd.Commit), []uint64{3}) || len(rd.Messages) != 1 || rd.Messages[0].Seq != 3 {
		t.Fatalf("%+v", rd)
	}
}

func TestBackupHello(t *testing.T) {
	type hello struct {
		vm   string
		sess uint64
		term uint64
	}
	for _, tc := range []struct {
		name   string
		second hello
		reject string // "" accepted
	}{
		{"duplicate while live", hello{"vm1", 2, 3}, "duplicate"},
		{"higher term while live", hello{"vm1", 2, 4}, "duplicate"},
		{"wrong VM", hello{"vm2", 2, 3}, "wrong VM"},
		{"session 0", hello{"vm1", 0, 3}, "session 0"},
		{"copy of the live one", hello{"vm1", 1, 3}, "-"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := following(t)
			rd := h.step(Hello{50 * ms, tc.second.sess, tc.second.vm, tc.second.term, 0, 0, 0, false, 0})
			if tc.reject == "-" {
				if len(msgs(rd, MsgReject))+len(msgs(rd, MsgAccept)) != 0 || h.b.LastHeard() != 50*ms {
					t.Fatalf("%+v", rd)
				}
				return
			}
			if r := msgs(rd, MsgReject); len(r) != 1 || !strings.Contains(r[0].Reason, tc.reject) || r[0].Fenced || r[0].Session != tc.second.sess {
				t.Fatalf("%+v", rd)
			}
			if h.b.Session() != 1 || h.b.LastHeard() != 2*ms {
				t.Fatalf("a rejected Hello changed the session: %d %v", h.b.Session(), h.b.LastHeard())
			}
		})
	}
	// After the session closed: a lower term is stale, the same is fine,
	// and a copy of the closed session's Hello is refused.
	h := following(t)
	h.step(Disconnected{10 * ms, 1})
	if h.b.State() != Waiting || h.b.Committed() != 5 {
		t.Fatalf("%v", h.b.State())
	}
	for _, hl := range []hello{{"vm1", 2, 2}, {"vm1", 1, 3}} {
		if rd := h.step(Hello{11 * ms, hl.sess, hl.vm, hl.term, 0, 0, 0, false, 0}); len(msgs(rd, MsgReject)) != 1 {
			t.Fatalf("%+v accepted", hl)
		}
	}
	rd := h.hello(12*ms, 2, 3)
	if len(msgs(rd, MsgAccept)) != 1 || h.b.State() != Following || h.b.Committed() != 5 {
		t.Fatalf("reconnect: %v %+v", h.b.State(), rd)
	}
	// The new session needs its own full checkpoint, even one that would
	// extend the chain of the old.
	if rd = h.step(Checkpoint{13 * ms, 2, 6, false}); len(msgs(rd, MsgNeedFull)) != 1 {
		t.Fatalf("incremental across sessions: %+v", rd)
	}
	// Every ended session stays closed, not only the last: session 1,
	// ended before session 2, cannot come back once session 2 has ended
	// too (the fuzzer found one reopened that way, whose full checkpoint
	// then took the slot back to an older sequence number).
	h.step(Checkpoint{14 * ms, 2, 7, true})
	h.step(Disconnected{15 * ms, 2})
	for _, sess := range []uint64{1, 2} {
		if rd := h.step(Hello{16 * ms, sess, "vm1", 3, 0, 0, 0, false, 0}); len(msgs(rd, MsgReject)) != 1 || h.b.State() != Waiting {
			t.Fatalf("a Hello for ended session %d: %v %+v", sess, h.b.State(), rd)
		}
	}
	if rd := h.hello(17*ms, 4, 3); len(msgs(rd, MsgAccept)) != 1 || h.b.Committed() != 7 {
		t.Fatalf("a new session after them: %v %+v", h.b.State(), rd)
	}
}

func TestBackupFailover(t *testing.T) {
	h := following(t) // heard at 2ms
	for now := 10 * ms; now < 300*ms; now += 50 * ms {
		if rd := h.step(Heartbeat{now, 1}); rd.Failover {
			t.Fatal("failover while heartbeats flow")
		}
		h.step(Heartbeat{now, 7}) // another session: not heard
	}
	rd := h.silence(359 * ms) // heard at 260ms
	if rd.Failover || h.b.State() != Following {
		t.Fatalf("early failover")
	}
	rd = h.silence(360 * ms)
	if !rd.Failover || h.b.State() != FailedOver || len(rd.DropSession) != 1 || rd.Wake != Never {
		t.Fatalf("no failover: %v %+v", h.b.State(), rd)
	}
	// Split-brain guard: the old primary and its term are done.
	rd = h.hello(400*ms, 2, 3)
	if r := msgs(rd, MsgReject); len(r) != 1 || !r[0].Fenced || !strings.Contains(r[0].Reason, "stale primary") {
		t.Fatalf("stale primary: %+v", rd)
	}
	// A higher term is refused too, and fenced: the VM runs here.
	rd = h.hello(401*ms, 3, 4)
	if r := msgs(rd, MsgReject); len(r) != 1 || !r[0].Fenced || !strings.Contains(r[0].Reason, "slot failed over") {
		t.Fatalf("higher term: %+v", rd)
	}
	rd = h.step(Hello{401 * ms, 4, "vm2", 1, 0, 0, 0, false, 0})
	if r := msgs(rd, MsgReject); len(r) != 1 || r[0].Fenced {
		t.Fatalf("another VM: %+v", rd)
	}
	for _, ev := range []BackupEvent{Checkpoint{402 * ms, 1, 6, false}, Heartbeat{403 * ms, 1}, Tick{time1h}, Disconnected{time1h, 1}} {
		if rd = h.step(ev); rd.Failover || len(rd.Commit) != 0 || len(msgs(rd, MsgAck)) != 0 {
			t.Fatalf("after failover %#v: %+v", ev, rd)
		}
	}
	if h.b.Term() != 3 {
		t.Fatalf("term %d", h.b.Term())
	}
}

// TestBackupStoodStill: a backup whose engine was not stepped for most of
// a Timeout while following (its process stopped or starved) heard
// nothing because it did not listen: it does not fail over for that
// silence, which would resume an older checkpoint beside a live primary.
// The primary's messages queued meanwhile keep the session; if the
// primary dropped it (it gave this backup up), its redial is accepted;
// only silence for a Timeout after waking fails it over.
func TestBackupStoodStill(t *testing.T) {
	stood := func(t *testing.T) *bh {
		h := following(t) // heard at 2 ms
		rd := h.step(Tick{500 * ms})
		if rd.Failover || h.b.State() != Following || rd.StoodStill != 498*ms {
			t.Fatalf("after standing still: %v %+v", h.b.State(), rd)
		}
		return h
	}
	t.Run("queued messages", func(t *testing.T) {
		h := stood(t)
		h.step(Heartbeat{501 * ms, 1})
		if rd := h.silence(600 * ms); rd.Failover || h.b.State() != Following {
			t.Fatalf("heard after waking: %v %+v", h.b.State(), rd)
		}
	})
	t.Run("the primary redials", func(t *testing.T) {
		h := stood(t)
		h.step(Disconnected{501 * ms, 1})
		if rd := h.silence(590 * ms); rd.Failover || h.b.State() != Waiting {
			t.Fatalf("before the redial: %v %+v", h.b.State(), rd)
		}
		if rd := h.hello(591*ms, 2, 3); len(msgs(rd, MsgAccept)) != 1 || h.b.State() != Following {
			t.Fatalf("the redial: %v %+v", h.b.State(), rd)
		}
	})
	t.Run("waiting", func(t *testing.T) {
		// The session had ended (the primary redials) when the backup
		// stood still: the redial waits in its listener.
		h := following(t)
		h.step(Disconnected{3 * ms, 1})
		if rd := h.step(Tick{500 * ms}); rd.Failover || h.b.State() != Waiting || rd.StoodStill == 0 {
			t.Fatalf("waiting, after standing still: %v %+v", h.b.State(), rd)
		}
		if rd := h.hello(501*ms, 2, 3); len(msgs(rd, MsgAccept)) != 1 {
			t.Fatalf("the redial: %v %+v", h.b.State(), rd)
		}
	})
	t.Run("silence after waking", func(t *testing.T) {
		h := stood(t)
		if rd := h.silence(599 * ms); rd.Failover {
			t.Fatal("failed over within a Timeout of waking")
		}
		if rd := h.silence(600 * ms); !rd.Failover {
			t.Fatalf("silent a Timeout after waking: %v %+v", h.b.State(), rd)
		}
	})
}

const time1h = 3600 * 1000 * ms

func TestBackupFailoverFromWaiting(t *testing.T) {
	h := following(t)
	h.step(Heartbeat{20 * ms, 1})
	h.step(Disconnected{30 * ms, 1})
	if rd := h.silence(119 * ms); rd.Failover {
		t.Fatal("early")
	}
	if rd := h.silence(120 * ms); !rd.Failover || len(rd.DropSession) != 0 {
		t.Fatalf("%+v", rd)
	}
	// A new session that never committed does not cancel the old commit.
	h = following(t)
	h.step(Disconnected{30 * ms, 1})
	h.hello(50*ms, 2, 3)
	h.step(Checkpoint{60 * ms, 2, 9, false}) // refused, but heard
	if rd := h.silence(160 * ms); !rd.Failover || h.b.Committed() != 5 {
		t.Fatalf("%+v", rd)
	}
	// A message after Timeout of silence comes too late.
	h = following(t)
	h.silence(100 * ms)
	if rd := h.step(Heartbeat{102 * ms, 1}); !rd.Failover {
		t.Fatal("late heartbeat prevented failover")
	}
}

func TestBackupSilenceWithNothingCommitted(t *testing.T) {
	h := newBH(t)
	h.hello(1*ms, 1, 1)
	h.step(Checkpoint{2 * ms, 1, 3, false}) // refused
	rd := h.silence(102 * ms)
	if rd.Failover || h.b.State() != Idle || len(rd.DropSession) != 1 || rd.Wake != Never {
		t.Fatalf("%v %+v", h.b.State(), rd)
	}
	if !strings.Contains(rd.StateChanges[0].Reason, "nothing committed") {
		t.Fatalf("reason %q", rd.StateChanges[0].Reason)
	}
	if rd = h.hello(103*ms, 2, 1); len(msgs(rd, MsgAccept)) != 1 {
		t.Fatalf("dead session still blocks: %+v", rd)
	}
	h.step(Disconnected{104 * ms, 2})
	if h.b.State() != Idle {
		t.Fatal(h.b.State())
	}
}

func TestBackupHeartbeats(t *testing.T) {
	h := newBH(t)
	h.hello(0, 1, 1)
	var sent []Time
	for now := ms; now <= 75*ms; now += ms {
		rd := h.step(Heartbeat{now, 1})
		if now == 30*ms {
			rd.Messages = append(rd.Messages, h.step(Checkpoint{now, 1, 1, true}).Messages...) // an ack counts as a heartbeat
		}
		if m := append(msgs(rd, MsgHeartbeat), msgs(rd, MsgAck)...); len(m) > 0 {
			sent = append(sent, now)
			if now > 30*ms && (m[0].Kind != MsgAck || m[0].Seq != 1) {
				t.Fatalf("heartbeat after a commit: %+v", m)
			}
		}
	}
	if want := []Time{20 * ms, 30 * ms, 50 * ms, 70 * ms}; !slices.Equal(sent, want) {
		t.Fatalf("heartbeats at %v, want %v", sent, want)
	}
}

func TestBackupNilEvent(t *testing.T) {
	h := newBH(t)
	if err := h.b.Step(nil); err == nil {
		t.Fatal("nil event accepted")
	}
	if h.b.VM() != "vm1" || h.b.Config().Timeout != testCfg.Timeout {
		t.Fatal("accessors")
	}
}

// TestBackupCommitFailed: a checkpoint the driver could not apply is taken
// back. The slot reports the one its copy holds, the session ends (no ack
// of the failed one is repeated by the heartbeat), a failover resumes the
// copy, and a new session starts over with a full checkpoint.
func TestBackupCommitFailed(t *testing.T) {
	h := following(t) // committed full 5 at 2ms
	h.step(Checkpoint{3 * ms, 1, 6, false})
	h.step(Checkpoint{4 * ms, 1, 7, false})
	if h.b.Committed() != 7 {
		t.Fatalf("committed %d", h.b.Committed())
	}
	// Impossible reports are refused and change nothing.
	for _, bad := range []CommitFailed{{5 * ms, 1, 8, 5}, {5 * ms, 1, 0, 5}} {
		if err := h.b.Step(bad); err == nil || h.b.Committed() != 7 || h.b.State() != Following {
			t.Fatalf("%+v: err %v, committed %d, %v", bad, err, h.b.Committed(), h.b.State())
		}
	}
	rd := h.step(CommitFailed{5 * ms, 1, 6, 5}) // 6 failed, so 7 was not applied either
	if h.b.Committed() != 5 || h.b.State() != Waiting || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 {
		t.Fatalf("after the failed commit: committed %d, %v, %+v", h.b.Committed(), h.b.State(), rd)
	}
	for now := 6 * ms; now < 100*ms; now += 10 * ms {
		if rd := h.step(Tick{now}); len(msgs(rd, MsgAck)) != 0 || rd.Failover {
			t.Fatalf("at %v: %+v", now, rd)
		}
	}
	// The same primary comes back: it must send a full checkpoint.
	h.hello(100*ms, 2, 3)
	if rd := h.step(Checkpoint{101 * ms, 2, 8, false}); len(msgs(rd, MsgNeedFull)) != 1 || len(rd.Commit) != 0 {
		t.Fatalf("incremental after the failed commit: %+v", rd)
	}
	if rd := h.step(Checkpoint{102 * ms, 2, 9, true}); !slices.Equal(seqs(rd.Commit), []uint64{9}) || h.b.Committed() != 9 {
		t.Fatalf("full after the failed commit: %+v", rd)
	}
	// Without a primary, the failover resumes the copy as it is.
	h = following(t)
	h.step(Checkpoint{3 * ms, 1, 6, false})
	h.step(CommitFailed{4 * ms, 1, 6, 5})
	if rd := h.silence(104 * ms); !rd.Failover || h.b.Committed() != 5 {
		t.Fatalf("failover: committed %d, %+v", h.b.Committed(), rd)
	}
	// A restarted primary numbers afresh: its full checkpoint 1 fails
	// over the copy of an older session's 5, which the copy keeps.
	h = following(t)
	h.step(Disconnected{3 * ms, 1})
	h.hello(4*ms, 2, 3)
	h.step(Checkpoint{5 * ms, 2, 1, true})
	if rd := h.step(CommitFailed{6 * ms, 2, 1, 5}); h.b.Committed() != 5 || h.b.State() != Waiting || len(rd.DropSession) != 1 {
		t.Fatalf("restarted primary's failed full: committed %d, %v, %+v", h.b.Committed(), h.b.State(), rd)
	}
	// An apply so slow that the primary timed out: the failover came
	// first, and the number is set right after it.
	h = following(t)
	h.step(Checkpoint{3 * ms, 1, 6, false})
	if rd := h.silence(200 * ms); !rd.Failover {
		t.Fatal("no failover")
	}
	h.step(CommitFailed{201 * ms, 1, 6, 5})
	if h.b.Committed() != 5 || h.b.State() != FailedOver {
		t.Fatalf("failed commit after the failover: committed %d, %v", h.b.Committed(), h.b.State())
	}
	// A failed first full checkpoint leaves nothing to fail over to.
	h = newBH(t)
	h.hello(1*ms, 1, 1)
	h.step(Checkpoint{2 * ms, 1, 1, true})
	h.step(CommitFailed{3 * ms, 1, 1, 0})
	if rd := h.step(Tick{200 * ms}); rd.Failover || h.b.State() != Idle || h.b.Committed() != 0 {
		t.Fatalf("failed first commit: %v, committed %d, %+v", h.b.State(), h.b.Committed(), rd)
	}
}

// TestBackupExitOpsFollowTheLastCommit: an Exit's disk operations are
// those of the epochs after the checkpoint it names, so they apply only on
// top of that checkpoint, committed in this session. An Exit naming
// another one (the backup refused a checkpoint in between: a gap), or
// coming before any commit of its session, is still acknowledged — the
// run is over — but its operations are not to be applied.
func TestBackupExitOpsFollowTheLastCommit(t *testing.T) {
	for _, tc := range []struct {
		name   string
		after  uint64
		follow bool
	}{
		{"the last commit", 6, true},
		{"an older commit", 5, false},
		{"a refused checkpoint", 7, false},
		{"none", 0, false},
		{"the exit's own epoch", 8, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := following(t)
			h.step(Checkpoint{3 * ms, 1, 6, false})
			if rd := h.step(Checkpoint{4 * ms, 1, 8, false}); len(msgs(rd, MsgNeedFull)) != 1 {
				t.Fatalf("gap not refused: %+v", rd)
			}
			rd := h.step(Exit{5 * ms, 1, 8, 0, tc.after})
			if h.b.State() != Exited || len(msgs(rd, MsgExited)) != 1 {
				t.Fatalf("exit not taken: %v %+v", h.b.State(), rd)
			}
			if rd.Exit == nil || rd.Exit.OpsFollow != tc.follow || rd.Exit.Committed != 6 {
				t.Fatalf("exit after %d: %+v, want ops follow %v over commit 6", tc.after, rd.Exit, tc.follow)
			}
			if why := rd.StateChanges[0].Reason; tc.follow == strings.Contains(why, "files here are as of") {
				t.Errorf("reason %q", why)
			}
		})
	}
	// A session that committed nothing: nothing for the ops to follow.
	h := newBH(t)
	h.hello(1*ms, 1, 3)
	if rd := h.step(Exit{2 * ms, 1, 1, 0, 0}); rd.Exit == nil || rd.Exit.OpsFollow {
		t.Errorf("exit before any commit: %+v", rd.Exit)
	}
}

// TestBackupExit: the live session's Exit is acknowledged and ends the run
// for good: no timer, no failover however long nothing is heard. A stale
// Exit changes nothing. A later run of the VM is accepted (a term below
// the slot's is not), starts from nothing — if it dies before its first
// checkpoint, the slot is idle, never resuming the run that ended — and
// is followed as any other.
func TestBackupExit(t *testing.T) {
	h := following(t)
	h.step(Checkpoint{3 * ms, 1, 6, false})
	// An Exit naming another session is dropped.
	rd := h.step(Exit{4 * ms, 2, 7, 0, 6})
	if len(msgs(rd, MsgExited)) != 0 || h.b.State() != Following || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 2 {
		t.Fatalf("stale exit: %v %+v", h.b.State(), rd)
	}
	rd = h.step(Exit{5 * ms, 1, 7, 3, 6})
	if e := msgs(rd, MsgExited); len(e) != 1 || e[0] != (Message{Kind: MsgExited, Session: 1, Seq: 7}) {
		t.Fatalf("exit answered %+v", rd)
	}
	if rd.Exit == nil || *rd.Exit != (ExitTaken{Seq: 7, Code: 3, OpsFollow: true, Committed: 6}) {
		t.Errorf("exit taken: %+v, want its ops to follow commit 6", rd.Exit)
	}
	if h.b.State() != Exited || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 || rd.Wake != Never {
		t.Fatalf("after the exit: %v %+v", h.b.State(), rd)
	}
	if !strings.Contains(rd.StateChanges[0].Reason, "code 3") {
		t.Errorf("reason %q", rd.StateChanges[0].Reason)
	}
	if h.b.Committed() != 6 {
		t.Errorf("committed %d after the exit, want 6 (kept for status)", h.b.Committed())
	}
	// Silence, and late messages of the ended session, change nothing.
	for _, ev := range []BackupEvent{Tick{time.Hour}, Checkpoint{time.Hour + ms, 1, 7, false}, Heartbeat{time.Hour + 2*ms, 1},
		Exit{time.Hour + 3*ms, 1, 7, 3, 6}} {
		rd := h.step(ev)
		if h.b.State() != Exited || len(rd.Commit) != 0 || len(msgs(rd, MsgAck)) != 0 || len(msgs(rd, MsgExited)) != 0 || rd.Exit != nil {
			t.Fatalf("%#v after the exit: %v %+v", ev, h.b.State(), rd)
		}
	}
	// A primary of an older term is stale.
	if rd := h.hello(2*time.Hour, 2, 2); len(msgs(rd, MsgReject)) != 1 || h.b.State() != Exited {
		t.Fatalf("older term after the exit: %v %+v", h.b.State(), rd)
	}
	// A new run: accepted, and nothing of the old one is kept to resume.
	rd = h.hello(2*time.Hour+ms, 3, 3)
	if len(msgs(rd, MsgAccept)) != 1 || h.b.State() != Following || h.b.Committed() != 0 {
		t.Fatalf("new run: %v, committed %d, %+v", h.b.State(), h.b.Committed(), rd)
	}
	if rd := h.step(Disconnected{2*time.Hour + 2*ms, 3}); h.b.State() != Idle || rd.Failover {
		t.Fatalf("the new run's session lost before its first checkpoint: %v %+v", h.b.State(), rd)
	}
	// Another run commits from its full checkpoint (numbered afresh) and
	// is protected as usual: its silence fails it over.
	h.hello(3*time.Hour, 4, 3)
	if rd := h.step(Checkpoint{3*time.Hour + ms, 4, 1, true}); !slices.Equal(seqs(rd.Commit), []uint64{1}) {
		t.Fatalf("the new run's full checkpoint: %+v", rd)
	}
	if rd := h.silence(4 * time.Hour); !rd.Failover || h.b.Committed() != 1 {
		t.Fatalf("the new run's primary silent: %v %+v", h.b.State(), rd)
	}
}

// TestBackupUnresumable: once the driver reports it cannot resume what the
// slot committed (its module could not be prepared), the live session
// ends, nothing is kept to fail over to (so the primary's silence fails
// nothing over, however long), and a later Hello starts afresh from a
// full checkpoint; after a failover, or an exit, it changes nothing.
func TestBackupUnresumable(t *testing.T) {
	h := following(t)
	h.step(Checkpoint{3 * ms, 1, 6, false})
	rd := h.step(Unresumable{4 * ms, "no wasm-opt"})
	if h.b.State() != Idle || h.b.Committed() != 0 || h.b.Session() != 0 || len(rd.DropSession) != 1 ||
		rd.DropSession[0] != (Drop{1, "no wasm-opt"}) || rd.Wake != Never {
		t.Fatalf("after Unresumable: %v committed %d session %d %+v", h.b.State(), h.b.Committed(), h.b.Session(), rd)
	}
	if !strings.Contains(rd.StateChanges[0].Reason, "no wasm-opt") {
		t.Errorf("reason %q", rd.StateChanges[0].Reason)
	}
	// Silence, and the ended session's late messages: nothing.
	for _, ev := range []BackupEvent{Tick{time.Hour}, Checkpoint{time.Hour + ms, 1, 7, false}, Heartbeat{time.Hour + 2*ms, 1}} {
		rd := h.step(ev)
		if h.b.State() != Idle || rd.Failover || len(rd.Commit) != 0 || len(msgs(rd, MsgAck)) != 0 {
			t.Fatalf("%#v after Unresumable: %v %+v", ev, h.b.State(), rd)
		}
	}
	// A new session: an incremental does not extend anything.
	if rd := h.hello(2*time.Hour, 2, 3); len(msgs(rd, MsgAccept)) != 1 || h.b.State() != Following {
		t.Fatalf("hello after Unresumable: %v %+v", h.b.State(), rd)
	}
	if rd := h.step(Checkpoint{2*time.Hour + ms, 2, 7, false}); len(rd.Commit) != 0 {
		t.Fatalf("an incremental committed over nothing: %+v", rd)
	}
	if rd := h.step(Checkpoint{2*time.Hour + 2*ms, 2, 1, true}); !slices.Equal(seqs(rd.Commit), []uint64{1}) {
		t.Fatalf("a full checkpoint after Unresumable: %+v", rd)
	}
	// After a failover it changes nothing: the VM runs already.
	rd = h.silence(3 * time.Hour)
	if !rd.Failover || h.b.State() != FailedOver {
		t.Fatalf("silence: %v %+v", h.b.State(), rd)
	}
	if rd := h.step(Unresumable{3*time.Hour + ms, "late"}); h.b.State() != FailedOver || h.b.Committed() != 1 || len(rd.StateChanges) != 0 {
		t.Fatalf("Unresumable after a failover: %v %d %+v", h.b.State(), h.b.Committed(), rd)
	}
}

// seqs is the checkpoint numbers of a Ready's Commit or Discard.
func seqs(l []Staged) []uint64 {
	out := make([]uint64, len(l))
	for i, c := range l {
		out[i] = c.Seq
	}
	return out
}

// TestBackupRefusesANewRunOverWhatItHolds: a slot waiting for the primary
// whose committed checkpoint it holds (the session lost, the VM not
// exited) takes that primary's redials (the same Run) but fences a new run
// of the VM (another Run: a restarted primary, or a second one under the
// same id). Accepting it let its first full checkpoint replace what the
// last run's clients were told is saved. Once the slot fails over, the
// new run is fenced as any other; a slot with nothing committed, or whose
// VM exited, takes a new run.
func TestBackupRefusesANewRunOverWhatItHolds(t *testing.T) {
	const runA, runB = 11, 22
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: runA})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	h.step(Disconnected{3 * ms, 1})
	if h.b.State() != Waiting || h.b.Committed() != 5 {
		t.Fatalf("after the session was lost: %v, committed %d", h.b.State(), h.b.Committed())
	}
	rd := h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: runB})
	if r := msgs(rd, MsgReject); len(r) != 1 || !r[0].Fenced || !strings.Contains(r[0].Reason, "another run") {
		t.Fatalf("a new run's Hello over checkpoint 5: %+v", rd)
	}
	if h.b.State() != Waiting || h.b.Committed() != 5 {
		t.Fatalf("after the new run's Hello: %v, committed %d", h.b.State(), h.b.Committed())
	}
	rd = h.step(Hello{Now: 5 * ms, Session: 3, VM: "vm1", Term: 1, Run: runA})
	if a := msgs(rd, MsgAccept); len(a) != 1 || h.b.State() != Following {
		t.Fatalf("the run's own redial: %+v, %v", rd, h.b.State())
	}
	// Silent for the timeout: the slot fails over; the new run is
	// fenced as stale.
	h.step(Disconnected{6 * ms, 3})
	for h.b.State() == Waiting && h.b.Now() < 10*testCfg.Timeout {
		h.step(Tick{h.b.Wake()})
	}
	if h.b.State() != FailedOver {
		t.Fatalf("after the timeout: %v", h.b.State())
	}
	if r := msgs(h.step(Hello{Now: time1h, Session: 4, VM: "vm1", Term: 1, Run: runB}), MsgReject); len(r) != 1 || !r[0].Fenced {
		t.Fatalf("the new run after the failover: %+v", r)
	}

	// A new run of a higher term supersedes the one the slot waits for.
	h = newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: runA})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	h.step(Disconnected{3 * ms, 1})
	if a := msgs(h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 2, Run: runB}), MsgAccept); len(a) != 1 {
		t.Fatal("a new run of a higher term refused")
	}

	// Nothing committed: a new run is welcome.
	h = newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: runA})
	h.step(Disconnected{2 * ms, 1})
	if a := msgs(h.step(Hello{Now: 3 * ms, Session: 2, VM: "vm1", Term: 1, Run: runB}), MsgAccept); len(a) != 1 {
		t.Fatal("a new run refused by a slot holding nothing")
	}
	// The VM exited: a new run is welcome.
	h.step(Checkpoint{4 * ms, 2, 1, true})
	h.step(Exit{5 * ms, 2, 2, 0, 1})
	if a := msgs(h.step(Hello{Now: 6 * ms, Session: 3, VM: "vm1", Term: 1, Run: runA}), MsgAccept); len(a) != 1 {
		t.Fatal("a new run refused after the VM exited")
	}
}

// waitOut ticks at each Wake until the slot leaves Waiting (or an hour).
func (h *bh) waitOut() {
	h.t.Helper()
	for h.b.State() == Waiting && h.b.Now() < time1h {
		h.step(Tick{h.b.Wake()})
	}
}

// A primary that gives the slot up (Hello.GiveUp) is answered MsgReleased
// once the slot dropped what it held: no failover can then resume a
// state older than the output the primary goes on to release.
func TestBackupReleasesOnGiveUp(t *testing.T) {
	const run = 7
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: run})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	h.step(Disconnected{3 * ms, 1})
	rd := h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: run, Released: 5, GiveUp: true})
	if m := msgs(rd, MsgReleased); len(m) != 1 || m[0].Session != 2 || len(msgs(rd, MsgAccept)) != 0 {
		t.Fatalf("give-up: %+v", rd)
	}
	if h.b.State() != Idle || h.b.Committed() != 0 || h.b.Session() != 0 {
		t.Fatalf("after the give-up: %v, committed %d, session %d", h.b.State(), h.b.Committed(), h.b.Session())
	}
	if rd = h.silence(time1h); rd.Failover || h.failovers != 0 {
		t.Fatal("failed over after being given up")
	}
	// The same primary comes back: a new session, from a full checkpoint.
	rd = h.step(Hello{Now: time1h + ms, Session: 3, VM: "vm1", Term: 1, Run: run, Released: 6})
	if len(msgs(rd, MsgAccept)) != 1 {
		t.Fatalf("redial after the give-up: %+v", rd)
	}
	if rd = h.step(Checkpoint{time1h + 2*ms, 3, 7, false}); len(msgs(rd, MsgNeedFull)) != 1 {
		t.Fatalf("an incremental after the give-up: %+v", rd)
	}

	// A slot following a session when the same run gives it up on a new
	// connection (its close of the old one not seen yet) lets it go too.
	h = newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: run})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	rd = h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: run, Released: 5, GiveUp: true})
	if len(msgs(rd, MsgReleased)) != 1 || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 || h.b.Committed() != 0 {
		t.Fatalf("give-up over a live session: %+v, committed %d", rd, h.b.Committed())
	}
	// Another run may not give up what this one holds.
	h = newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: run})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	h.step(Disconnected{3 * ms, 1})
	rd = h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: run + 1, GiveUp: true})
	if r := msgs(rd, MsgReject); len(r) != 1 || !r[0].Fenced || h.b.Committed() != 5 {
		t.Fatalf("another run's give-up: %+v, committed %d", rd, h.b.Committed())
	}
}

// A primary that released output without the slot (unprotected) says so
// in its Hello (Released): a checkpoint older than that output is not
// resumed, even if the session that follows fails before its first.
func TestBackupDoesNotResumeWhatIsOlderThanReleasedOutput(t *testing.T) {
	const run = 7
	for _, tc := range []struct {
		name     string
		released uint64
		failover bool
	}{
		{"released what it holds", 5, true},
		{"released a later epoch", 6, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newBH(t)
			h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: run})
			h.step(Checkpoint{2 * ms, 1, 5, true})
			h.step(Disconnected{3 * ms, 1})
			if rd := h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: run, Released: tc.released}); len(msgs(rd, MsgAccept)) != 1 {
				t.Fatalf("redial: %+v", rd)
			}
			h.step(Disconnected{5 * ms, 2})
			h.waitOut()
			if got := h.failovers == 1; got != tc.failover {
				t.Fatalf("failover %v, want %v (%v)", got, tc.failover, h.b.State())
			}
		})
	}
	// A Hello of the same run that the slot refuses (here a late one,
	// naming a closed session) still tells it what was released.
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 2, VM: "vm1", Term: 1, Run: run})
	h.step(Checkpoint{2 * ms, 2, 5, true})
	h.step(Disconnected{3 * ms, 2})
	if rd := h.step(Hello{Now: 4 * ms, Session: 1, VM: "vm1", Term: 1, Run: run, Released: 9}); len(msgs(rd, MsgReject)) != 1 {
		t.Fatalf("a closed session's Hello: %+v", rd)
	}
	h.waitOut()
	if h.failovers != 0 || h.b.State() != Idle {
		t.Fatalf("resumed checkpoint 5 after its primary said it released epoch 9: %v", h.b.State())
	}
}

// The same run's new connection supersedes the session the slot still
// follows: the primary has one session at a time, so that one is over.
func TestBackupSupersedesTheSameRunsSession(t *testing.T) {
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: 7})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	rd := h.step(Hello{Now: 3 * ms, Session: 2, VM: "vm1", Term: 1, Run: 7})
	if len(msgs(rd, MsgAccept)) != 1 || h.b.Session() != 2 || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 || h.b.Committed() != 5 {
		t.Fatalf("same run: %+v, session %d, committed %d", rd, h.b.Session(), h.b.Committed())
	}
	// Another run's is a duplicate.
	rd = h.step(Hello{Now: 4 * ms, Session: 3, VM: "vm1", Term: 1, Run: 8})
	if r := msgs(rd, MsgReject); len(r) != 1 || !strings.Contains(r[0].Reason, "duplicate") || h.b.Session() != 2 {
		t.Fatalf("another run: %+v", rd)
	}
}

// A Hello of the slot's run handled after a newer one (its handshake
// stalled) neither supersedes the newer session nor gives the slot up.
func TestBackupRefusesALateHelloOfItsRun(t *testing.T) {
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 2, VM: "vm1", Term: 1, Run: 7, Dial: 2})
	h.step(Checkpoint{2 * ms, 2, 5, true})
	rd := h.step(Hello{Now: 3 * ms, Session: 3, VM: "vm1", Term: 1, Run: 7, Dial: 1, Released: 4, GiveUp: true})
	if r := msgs(rd, MsgReject); len(r) != 1 || !strings.Contains(r[0].Reason, "late hello") || r[0].Fenced {
		t.Fatalf("late give-up: %+v", rd)
	}
	if h.b.State() != Following || h.b.Session() != 2 || h.b.Committed() != 5 || len(rd.DropSession) != 0 {
		t.Fatalf("after the late Hello: %v, session %d, committed %d", h.b.State(), h.b.Session(), h.b.Committed())
	}
	// A newer one supersedes it.
	if rd = h.step(Hello{Now: 4 * ms, Session: 4, VM: "vm1", Term: 1, Run: 7, Dial: 3, Released: 5}); len(msgs(rd, MsgAccept)) != 1 || h.b.Session() != 4 {
		t.Fatalf("newer Hello: %+v", rd)
	}
}

// A commit that fails leaves the copy as it was; if what it holds is a
// state the slot dropped (given up, here), that is not brought back by
// the failure: nothing is resumed.
func TestBackupFailedCommitDoesNotBringBackWhatWasDropped(t *testing.T) {
	h := newBH(t)
	h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: 7, Dial: 1})
	h.step(Checkpoint{2 * ms, 1, 5, true})
	h.step(Disconnected{3 * ms, 1})
	h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 1, Run: 7, Dial: 2, Released: 6, GiveUp: true})
	h.step(Hello{Now: 5 * ms, Session: 3, VM: "vm1", Term: 1, Run: 8, Dial: 1})
	h.step(Checkpoint{6 * ms, 3, 1, true})
	h.step(CommitFailed{Now: 7 * ms, Session: 3, Seq: 1, Committed: 5}) // the copy still holds run 7's 5
	if h.b.Committed() != 0 || h.b.State() != Idle {
		t.Fatalf("after the failed commit: %v, committed %d", h.b.State(), h.b.Committed())
	}
	if rd := h.silence(time1h); rd.Failover || h.failovers != 0 {
		t.Fatal("failed over to the state its primary gave up")
	}
}

// A run accepted over another run's checkpoint (a higher term) keeps it
// resumable only while it says none of its own output left: its numbers
// say nothing of that checkpoint's.
func TestBackupAnotherRunsCheckpointAndReleasedOutput(t *testing.T) {
	for _, tc := range []struct {
		released uint64
		failover bool
	}{{0, true}, {7, false}} {
		h := newBH(t)
		h.step(Hello{Now: 1 * ms, Session: 1, VM: "vm1", Term: 1, Run: 11, Dial: 1})
		h.step(Checkpoint{2 * ms, 1, 500, true})
		h.step(Disconnected{3 * ms, 1})
		h.step(Hello{Now: 4 * ms, Session: 2, VM: "vm1", Term: 2, Run: 22, Dial: 1})
		h.step(Disconnected{5 * ms, 2})
		rd := h.step(Hello{Now: 6 * ms, Session: 3, VM: "vm1", Term: 2, Run: 22, Dial: 2, Released: tc.released})
		if len(msgs(rd, MsgAccept)) != 1 {
			t.Fatalf("released %d: %+v", tc.released, rd)
		}
		h.step(Disconnected{7 * ms, 3})
		h.waitOut()
		if got := h.failovers == 1; got != tc.failover {
			t.Fatalf("run 22 said %d released: failover %v, want %v (%v)", tc.released, got, tc.failover, h.b.State())
		}
	}
}

// A slot that fails over while it follows a session tells that session's
// primary it is fenced before closing it: the silence may have been one
// way, and a primary that still hears this backup must not give it up and
// release output beside the failed-over VM.
func TestBackupFailoverFencesTheSessionItDrops(t *testing.T) {
	h := following(t) // session 1, checkpoint 5
	rd := h.silence(time1h)
	if !rd.Failover {
		t.Fatalf("no failover: %+v", rd)
	}
	r := msgs(rd, MsgReject)
	if len(r) != 1 || r[0].Session != 1 || !r[0].Fenced || !strings.HasPrefix(r[0].Reason, "stale primary") {
		t.Fatalf("the dropped session was not told: %+v", rd.Messages)
	}
	if len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 {
		t.Fatalf("DropSession %+v", rd.DropSession)
	}
}
