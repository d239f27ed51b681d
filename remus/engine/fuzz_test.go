package engine

import (
	"strings"
	"testing"
	"time"
)

// The fuzz targets feed each engine arbitrary event sequences, well-formed
// only where the driver is trusted (sessions it makes, checkpoints it was
// asked for), and check the invariants after every step. Their seeds run
// with go test; go test -fuzz FuzzPrimary explores further.

func fuzzSeeds(f *testing.F) {
	f.Add([]byte{2, 1, 4, 1, 5, 1, 0, 100, 1, 3, 0, 100, 4, 2, 5, 0})
	f.Add([]byte{2, 0, 4, 0, 5, 0, 0, 200, 4, 0, 6, 0, 0, 200, 4, 0, 5, 0, 3, 0, 2, 0, 4, 0, 5, 0})
	f.Add([]byte{0, 255, 0, 255, 0, 255, 0, 255, 2, 0, 4, 0, 1, 0, 0, 30, 4, 0, 5, 1, 7, 0, 0, 255})
	f.Add([]byte{2, 0, 4, 0, 5, 0, 0, 120, 4, 0, 0, 120, 4, 0, 6, 2, 0, 120, 4, 0, 5, 3, 8, 0, 8, 1})
}

func FuzzPrimary(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		p, _ := NewPrimary(testCfg, 0)
		var (
			now               Time
			out               *CheckpointRequest
			last, rel, floor  uint64
			state             PrimaryState
			got               = map[uint64]bool{}
			mustFull          = map[uint64]bool{} // a failed checkpoint's session
			sessions, current uint64
		)
		for i := 0; i+1 < len(data); i += 2 {
			op, arg := data[i]%9, uint64(data[i+1])
			now += Time(arg) * 100 * time.Microsecond
			pick := func() uint64 { // the current session mostly, else any
				if arg%4 != 0 || sessions == 0 {
					return current
				}
				return arg%sessions + 1
			}
			var ev PrimaryEvent
			switch op {
			case 0:
				ev = Tick{now}
			case 1:
				if arg%3 == 0 {
					ev = GuestIdle{now}
				} else if arg%7 == 0 {
					ev = HoldFull{now}
				} else {
					ev = Output{now}
				}
			case 2:
				sessions++
				current = sessions
				// Timeout 0: not said. Its Hello said what had left
				// then (bit 0 clear), or nothing.
				said := uint64(0)
				if arg&1 == 0 {
					said = p.Left()
				}
				ev = Connected{now, sessions, Time(arg>>4&3) * 40 * ms, said}
			case 3:
				ev = Disconnected{now, pick()}
				switch {
				case arg%16 == 15:
					ev = Stale{now, "stale primary"}
				case arg%16 == 14:
					// The backup's answer to a Hello that gave it up
					// (or a late one, or one never asked for).
					ev = Released{now, "released"}
				case arg%16 == 13:
					ev = GiveUpSent{now}
				}
			case 4:
				if out == nil {
					continue
				}
				ev = CheckpointTaken{now, out.Seq}
				if arg%8 == 7 {
					// Its number comes again, full if its session lives.
					ev = CheckpointFailed{now, out.Seq, "injected"}
					last = out.Seq - 1
					mustFull[out.Session] = true
				}
				out = nil
			case 5:
				ev = Ack{now, pick(), p.Seq() - min(p.Seq(), arg%3)}
			case 6:
				ev = NeedFull{now, pick(), p.Seq() - min(p.Seq(), arg%3)}
			case 7:
				ev = Heartbeat{now, pick()}
			case 8:
				ev = Ack{now, pick(), p.Seq() + 1 + arg%2} // never sent
			}
			if err := p.Step(ev); err != nil {
				t.Fatalf("Step(%#v): %v", ev, err)
			}
			if !p.HasReady() {
				continue
			}
			rd := p.Ready()
			p.Advance()
			unprot := false
			for _, c := range rd.StateChanges {
				if c.From != state || c.From == c.To || c.From == Fenced {
					t.Fatalf("change %+v from %v", c, state)
				}
				if _, stale := ev.(Stale); c.To == Fenced && !stale {
					t.Fatalf("change %+v on %#v", c, ev)
				}
				if _, r := ev.(Released); r && (c.To != Unprotected || c.From == Fenced) {
					t.Fatalf("change %+v on %#v", c, ev)
				}
				state = c.To
				unprot = unprot || c.To == Unprotected
			}
			if state != p.State() || (p.Session() != 0) != (state == Syncing || state == Protected) {
				t.Fatalf("state %v/%v session %d", state, p.State(), p.Session())
			}
			if p.Session() == 0 {
				current = 0
			}
			if rd.Release < rel || rd.Release > p.Seq() || p.Acked() > p.Seq() {
				t.Fatalf("release %d after %d, seq %d", rd.Release, rel, p.Seq())
			}
			if rd.PassThrough || unprot {
				floor = rd.Release
			} else if rd.Release > max(p.Acked(), floor) {
				t.Fatalf("release %d beyond ack %d", rd.Release, p.Acked())
			}
			if state == Fenced && (rd.PassThrough || rd.Release != rel && !unprot || rd.TakeCheckpoint != nil) {
				// (A Stale stepped while Unprotected fences with
				// everything released already.)
				t.Fatalf("fenced: %+v, released %d before", rd, rel)
			}
			rel = rd.Release
			if r := rd.TakeCheckpoint; r != nil {
				if out != nil || r.Seq != last+1 || r.Session != p.Session() || r.Session == 0 || !got[r.Session] && !r.Full ||
					mustFull[r.Session] && !r.Full {
					t.Fatalf("checkpoint %+v, outstanding %+v, last %d", *r, out, last)
				}
				delete(mustFull, r.Session)
				got[r.Session] = true
				c := *r
				out, last = &c, r.Seq
			}
			if rd.GiveUp && (state != Connecting || p.Session() != 0) {
				t.Fatalf("GiveUp in %v, session %d", state, p.Session())
			}
			if rd.Wake <= p.Now() || p.Inflight() > testCfg.MaxInflight {
				t.Fatalf("wake %v now %v inflight %d", rd.Wake, p.Now(), p.Inflight())
			}
		}
	})
}

func FuzzBackup(f *testing.F) {
	f.Add([]byte{0, 1, 1, 0x15, 1, 0x06, 4, 200, 4, 200})
	f.Add([]byte{0, 1, 1, 0x11, 1, 0x02, 1, 0x04, 3, 0, 0, 2, 1, 0x25, 4, 255, 0, 1})
	f.Add([]byte{0, 1, 2, 0, 4, 90, 4, 90, 0, 2, 1, 0x13, 2, 9, 4, 255, 4, 255, 0, 3})
	f.Add([]byte{0, 0x41, 0, 0x03, 1, 0x11, 1, 0x12, 1, 0x14, 1, 0x13, 3, 1, 0, 2})
	// A full checkpoint, then its commit fails; a second session's full
	// one, an incremental after it whose commit fails, then silence.
	f.Add([]byte{0, 1, 1, 0x55, 5, 0, 4, 20, 0, 2, 1, 0x5a, 1, 0x1e, 5, 0, 4, 255, 4, 255})
	// A full checkpoint and an incremental, then the driver cannot resume
	// them; silence; a new session.
	f.Add([]byte{0, 1, 1, 0x45, 1, 0x0a, 7, 0, 4, 255, 4, 255, 0, 2, 1, 0x0e, 1, 0x46})
	f.Fuzz(func(t *testing.T, data []byte) {
		b, _ := NewBackup(testCfg, "vm1", 0)
		var (
			now, heard Time
			state      BackupState
			has        bool
			seq        uint64
			full       = map[uint64]bool{}
			acked      = map[uint64]uint64{}
			failed     bool
			// The last step's commit, which the next may report as
			// failed (CommitFailed), and what was committed before it.
			justSess, justSeq uint64
			prevHas           bool
			prevSeq           uint64
			// The session of the last commit (seq), and of the one
			// before it.
			seqSess, prevSess uint64
			// wantFull: WantFull was stepped and no full checkpoint
			// committed since.
			wantFull bool
			// The highest Released of any Hello: a commit may be
			// dropped as older than that.
			maxReleased uint64
			// The run and term of the session accepted last, and of
			// the last commit (and the one before it).
			accRun, accTerm           uint64
			copyRun, copyTerm         uint64
			prevCopyRun, prevCopyTerm uint64
		)
		for i := 0; i+1 < len(data); i += 2 {
			op, arg := data[i]%8, data[i+1]
			var ev BackupEvent
			s := uint64(arg&3) + uint64(arg>>7) // sessions 0-4
			switch op {
			case 0:
				vm := "vm1"
				if arg&0x40 != 0 {
					vm = "vm2"
				}
				ev = Hello{now, s, vm, uint64(arg>>2) & 3, Time(arg>>7&1) * 60 * ms, uint64(arg >> 4 & 1), 0, false, 0}
			case 1:
				// Bits 2-5 the sequence number, bit 6 full (bit 5
				// was, which made every full one 8 or more and every
				// incremental 7 or less: no chain ever committed).
				ev = Checkpoint{now, s, uint64(arg>>2) & 15, arg&0x40 != 0}
			case 2:
				ev = Heartbeat{now, s}
			case 3:
				ev = Disconnected{now, s}
			case 4:
				now += Time(arg) * ms
				ev = Tick{now}
			case 5:
				if justSeq == 0 {
					ev = Tick{now}
					break
				}
				// The driver could not apply the commit just made.
				held := uint64(0)
				if prevHas {
					held = prevSeq
				}
				ev = CommitFailed{now, justSess, justSeq, held}
				has, seq, seqSess = prevHas, prevSeq, prevSess
				copyRun, copyTerm = prevCopyRun, prevCopyTerm
			case 6:
				// Bit 6: its ops follow the last commit, else the
				// epoch before its own.
				e := Exit{now, s, uint64(arg>>2) & 15, uint32(arg), 0}
				if e.After = max(e.Seq, 1) - 1; arg&0x40 != 0 {
					e.After = seq
				}
				ev = e
			case 7:
				switch arg & 3 {
				case 0:
					// The driver's disk failed: a full checkpoint next.
					ev = WantFull{now, "disk"}
					wantFull = true
				case 1:
					// The driver cannot resume what was committed.
					ev = Unresumable{now, "unresumable"}
				default:
					// A Hello of run 1, term 1, saying which epoch's
					// output it released (bits 4-7), giving the slot
					// up if bit 0 is clear.
					ev = Hello{Now: now, Session: uint64(arg>>2)&3 + 1, VM: "vm1", Term: 1, Run: 1,
						Released: uint64(arg >> 4), GiveUp: arg&1 == 0}
				}
			}
			wasHas, wasSeq := has, seq
			if h, ok := ev.(Hello); ok {
				maxReleased = max(maxReleased, h.Released)
			}
			justSeq = 0
			now += 100 * time.Microsecond
			if err := b.Step(ev); err != nil {
				t.Fatal(err)
			}
			if h, ok := ev.(Hello); (!ok || h.VM == "vm1" && h.Term == b.Term()) && op <= 2 && b.Session() != 0 && b.Session() == s {
				heard = b.Now()
			}
			if h, ok := ev.(Hello); ok && wasHas && b.Committed() == 0 && b.State() != FailedOver {
				// Dropped only for a primary that gives the slot up or
				// released output of a later epoch (or a new run, after
				// an exit: below).
				// Or a run other than the copy's says output of its own
				// left: its numbers say nothing of the copy's.
				other := h.Released > 0 && (h.Run != copyRun || h.Term != copyTerm)
				if !h.GiveUp && !other && maxReleased <= wasSeq && b.State() != Exited && state != Exited {
					t.Fatalf("committed %d dropped on %#v", wasSeq, h)
				}
				has, seq = false, 0
			}
			if _, ok := ev.(Unresumable); ok {
				// Nothing is kept to resume, and no session goes on,
				// unless the VM failed over or exited already.
				switch st := b.State(); {
				case b.Session() != 0:
					t.Fatalf("session %d after Unresumable", b.Session())
				case st == Idle:
					has, seq = false, 0
				case st != FailedOver && st != Exited:
					t.Fatalf("%v after Unresumable", st)
				}
			}
			if !b.HasReady() {
				continue
			}
			rd := b.Ready()
			b.Advance()
			for _, c := range rd.StateChanges {
				if c.From != state || c.From == c.To || state == FailedOver {
					t.Fatalf("change %+v from %v", c, state)
				}
				if _, isExit := ev.(Exit); c.To == Exited && (!isExit || c.From != Following) {
					t.Fatalf("change %+v on %#v", c, ev)
				}
				if _, isU := ev.(Unresumable); isU && c.To != Idle && c.To != FailedOver {
					t.Fatalf("change %+v on %#v", c, ev)
				}
				if c.From == Exited {
					// A new run: the one that ended is never resumed.
					if _, ok := ev.(Hello); !ok || c.To != Following {
						t.Fatalf("change %+v on %#v", c, ev)
					}
					has, seq = false, 0
				}
				if c.To == Idle && strings.HasSuffix(c.Reason, "not resumed") {
					has, seq = false, 0 // older than output its primary released
				}
				state = c.To
			}
			for _, cr := range rd.Commit {
				c := cr.Seq
				ck, ok := ev.(Checkpoint)
				if !ok || ck.Seq != c || ck.Session != cr.Session || len(rd.Commit) != 1 {
					t.Fatalf("commit %+v on %#v", cr, ev)
				}
				if ck.Full {
					full[ck.Session] = true
					wantFull = false
				} else if !full[ck.Session] || !has || seq != c-1 || wantFull {
					t.Fatalf("incremental %d on %v %d (a full one wanted: %v)", c, has, seq, wantFull)
				}
				prevHas, prevSeq, prevSess = has, seq, seqSess
				prevCopyRun, prevCopyTerm = copyRun, copyTerm
				has, seq, seqSess = true, c, ck.Session
				copyRun, copyTerm = accRun, accTerm
				justSess, justSeq = ck.Session, c
			}
			if x := rd.Exit; x != nil {
				e, ok := ev.(Exit)
				follow := ok && e.After != 0 && e.Seq > e.After && has && e.After == seq && seqSess == e.Session
				if !ok || x.Seq != e.Seq || x.Code != e.Code || x.OpsFollow != follow {
					t.Fatalf("exit taken %+v on %#v, last commit %d (%v) of session %d", *x, ev, seq, has, seqSess)
				}
			}
			for _, m := range rd.Messages {
				if h, ok := ev.(Hello); ok && m.Kind == MsgAccept && m.Session == h.Session {
					accRun, accTerm = h.Run, h.Term
				}
				if m.Kind == MsgExited {
					if e, ok := ev.(Exit); !ok || m.Session != e.Session || m.Seq != e.Seq || b.State() != Exited || rd.Exit == nil {
						t.Fatalf("exit ack %+v on %#v in %v", m, ev, b.State())
					}
				}
				if m.Kind == MsgAck {
					if !has || m.Seq != seq || m.Seq < acked[m.Session] || !full[m.Session] {
						t.Fatalf("ack %+v, committed %d", m, seq)
					}
					acked[m.Session] = m.Seq
				}
			}
			if rd.Failover {
				if failed || !has || b.Now()-heard < testCfg.Timeout {
					t.Fatalf("failover: again %v, committed %v, heard %v at %v", failed, has, heard, b.Now())
				}
				failed = true
			}
			if b.Committed() != seq || state == Idle && has || rd.Wake <= b.Now() {
				t.Fatalf("committed %d/%d in %v, wake %v", b.Committed(), seq, state, rd.Wake)
			}
		}
	})
}
