package engine

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

const ms = time.Millisecond

// testCfg is small and round so that deadlines in tests read easily.
var testCfg = Config{
	Epoch:             10 * ms,
	MinEpoch:          2 * ms,
	HeartbeatInterval: 20 * ms,
	Timeout:           100 * ms,
	AckTimeout:        time.Second,
	MaxInflight:       2,
}

// ph drives a Primary in tests: it steps, takes the Ready, advances, and
// checks what must hold after every step.
type ph struct {
	t       *testing.T
	p       *Primary
	release uint64
	state   PrimaryState
	out     bool // a checkpoint is outstanding
}

func newPH(t *testing.T, cfg Config) *ph {
	t.Helper()
	p, err := NewPrimary(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &ph{t: t, p: p}
}

func (h *ph) step(ev PrimaryEvent) PrimaryReady {
	h.t.Helper()
	if c, ok := ev.(Connected); ok && c.Said == 0 {
		// As the driver: its Hello said what had left when sent.
		c.Said = h.p.Left()
		ev = c
	}
	if err := h.p.Step(ev); err != nil {
		h.t.Fatalf("Step(%#v): %v", ev, err)
	}
	return h.ready()
}

// silence ticks at each Wake, as the driver does, with nothing heard,
// until the engine changes state or until; it returns that step's Ready.
// (A single Tick far ahead is a primary that stood still: StoodStill.)
func (h *ph) silence(until Time) PrimaryReady {
	h.t.Helper()
	for {
		w := h.p.Wake()
		if w == Never || w >= until {
			return h.step(Tick{until})
		}
		if rd := h.step(Tick{w}); len(rd.StateChanges) > 0 {
			return rd
		}
	}
}

func (h *ph) ready() PrimaryReady {
	h.t.Helper()
	p := h.p
	rd := PrimaryReady{Release: p.Release(), PassThrough: p.PassThrough(), Wake: p.Wake()}
	if p.HasReady() {
		rd = p.Ready()
		p.Advance()
		if p.HasReady() {
			h.t.Fatalf("HasReady after Advance")
		}
	}
	if rd.Release < h.release {
		h.t.Fatalf("Release went back from %d to %d", h.release, rd.Release)
	}
	h.release = rd.Release
	for _, c := range rd.StateChanges {
		if c.From != h.state || c.From == c.To {
			h.t.Fatalf("state change %v, engine was %v", c, h.state)
		}
		h.state = c.To
	}
	if h.state != p.State() {
		h.t.Fatalf("state %v, changes say %v", p.State(), h.state)
	}
	if r := rd.TakeCheckpoint; r != nil {
		if h.out {
			h.t.Fatalf("second checkpoint %+v outstanding", r)
		}
		h.out = true
	}
	if rd.Wake <= p.Now() {
		h.t.Fatalf("Wake %v not after now %v", rd.Wake, p.Now())
	}
	if p.Inflight() > p.Config().MaxInflight {
		h.t.Fatalf("inflight %d", p.Inflight())
	}
	if (p.Session() != 0) != (p.State() == Syncing || p.State() == Protected) {
		h.t.Fatalf("session %d in state %v", p.Session(), p.State())
	}
	return rd
}

func (h *ph) taken(now Time, seq uint64) PrimaryReady {
	h.t.Helper()
	h.out = false
	return h.step(CheckpointTaken{now, seq})
}

// protected returns a primary protected by session 1: Connected at 1ms,
// full checkpoint 1 taken at 2ms and acked at 3ms.
func protected(t *testing.T, cfg Config) *ph {
	t.Helper()
	h := newPH(t, cfg)
	rd := h.step(Connected{1 * ms, 1, 0, 0})
	if r := rd.TakeCheckpoint; r == nil || *r != (CheckpointRequest{Seq: 1, Full: true, Session: 1}) {
		t.Fatalf("first checkpoint %+v", rd.TakeCheckpoint)
	}
	h.taken(2*ms, 1)
	rd = h.step(Ack{3 * ms, 1, 1})
	if h.p.State() != Protected || rd.Release != 1 {
		t.Fatalf("state %v release %d", h.p.State(), rd.Release)
	}
	return h
}

func TestConfig(t *testing.T) {
	d := Config{}.WithDefaults()
	want := Config{Epoch: 25 * ms, Policy: PolicyOutput, MinEpoch: 2 * ms, HeartbeatInterval: 100 * ms,
		Timeout: 500 * ms, AckTimeout: 10 * time.Second, MaxInflight: 4}
	if d != want {
		t.Fatalf("defaults %+v", d)
	}
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
	if c := (Config{Epoch: 500 * time.Microsecond}).WithDefaults(); c.MinEpoch != c.Epoch {
		t.Fatalf("MinEpoch %v above Epoch %v", c.MinEpoch, c.Epoch)
	}
	if c := (Config{Timeout: time.Second}).WithDefaults(); c.HeartbeatInterval != 200*ms {
		t.Fatalf("heartbeat %v", c.HeartbeatInterval)
	}
	for name, f := range map[string]func(*Config){
		"Epoch":             func(c *Config) { c.Epoch = -1 },
		"Policy":            func(c *Config) { c.Policy = 7 },
		"MinEpoch":          func(c *Config) { c.MinEpoch = c.Epoch + 1 },
		"Timeout":           func(c *Config) { c.Timeout = -ms },
		"HeartbeatInterval": func(c *Config) { c.HeartbeatInterval = c.Timeout },
		"AckTimeout":        func(c *Config) { c.AckTimeout = -1 },
		"MaxInflight":       func(c *Config) { c.MaxInflight = -1 },
	} {
		c := d
		f(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), name) && name != "Policy" {
			t.Errorf("%s: %v", name, err)
		}
		if _, err := NewPrimary(c, 0); err == nil {
			t.Errorf("%s: NewPrimary accepted", name)
		}
		if _, err := NewBackup(c, "vm", 0); err == nil {
			t.Errorf("%s: NewBackup accepted", name)
		}
	}
	if _, err := NewBackup(d, "", 0); err == nil {
		t.Error("NewBackup accepted an empty VM")
	}
	for _, s := range []string{PolicyOutput.String(), PolicyFixed.String(), Policy(9).String(),
		Connecting.String(), Syncing.String(), Protected.String(), Unprotected.String(), PrimaryState(9).String(),
		Idle.String(), Following.String(), Waiting.String(), FailedOver.String(), BackupState(9).String(),
		MsgAccept.String(), MsgReject.String(), MsgAck.String(), MsgHeartbeat.String(), MsgNeedFull.String(), MessageKind(0).String()} {
		if s == "" {
			t.Error("empty String")
		}
	}
}

func TestPrimaryStartsConnectingThenUnprotected(t *testing.T) {
	h := newPH(t, testCfg)
	rd := h.ready()
	// Ticked every heartbeat interval, a session or not (stoodStill).
	if h.p.State() != Connecting || rd.Wake != 20*ms || rd.PassThrough {
		t.Fatalf("start: %v %+v", h.p.State(), rd)
	}
	h.step(Output{5 * ms})
	if rd = h.silence(99 * ms); h.p.State() != Connecting || rd.TakeCheckpoint != nil {
		t.Fatalf("no session, yet %v %+v", h.p.State(), rd)
	}
	rd = h.silence(100 * ms)
	if h.p.State() != Unprotected || !rd.PassThrough || rd.Wake != Never || len(rd.DropSession) != 0 {
		t.Fatalf("after Timeout: %v %+v", h.p.State(), rd)
	}
	if rd = h.step(Tick{time.Hour}); rd.TakeCheckpoint != nil {
		t.Fatalf("checkpoint while unprotected: %+v", rd)
	}
}

func TestPrimaryFirstCheckpointFullAndProtected(t *testing.T) {
	h := newPH(t, testCfg)
	rd := h.step(Connected{30 * ms, 1, 0, 0})
	if h.p.State() != Syncing || rd.TakeCheckpoint == nil || !rd.TakeCheckpoint.Full || rd.TakeCheckpoint.Seq != 1 {
		t.Fatalf("Connected: %v %+v", h.p.State(), rd)
	}
	h.taken(31*ms, 1)
	if h.p.Inflight() != 1 || h.p.Seq() != 1 {
		t.Fatalf("inflight %d seq %d", h.p.Inflight(), h.p.Seq())
	}
	rd = h.step(Ack{32 * ms, 1, 1})
	if h.p.State() != Protected || rd.Release != 1 || h.p.Acked() != 1 || h.p.Inflight() != 0 {
		t.Fatalf("after ack: %v %+v", h.p.State(), rd)
	}
	if c := rd.StateChanges; len(c) != 1 || c[0].To != Protected || c[0].At != 32*ms {
		t.Fatalf("changes %+v", c)
	}
	rd = h.step(Tick{41 * ms}) // 10ms after the full one was taken
	if r := rd.TakeCheckpoint; r == nil || r.Full || r.Seq != 2 || r.Session != 1 {
		t.Fatalf("second checkpoint %+v", r)
	}
}

// TestPrimaryEpochEnd checks the epoch end rule under both policies: when
// an epoch that began at 12ms ends, given output at some age (-1: none).
func TestPrimaryEpochEnd(t *testing.T) {
	const start = 12 * ms
	for _, tc := range []struct {
		name        string
		policy      Policy
		output, end Time // ages
	}{
		{"fixed, no output", PolicyFixed, -1, 10 * ms},
		{"fixed, output", PolicyFixed, 1 * ms, 10 * ms},
		{"output, no output", PolicyOutput, -1, 10 * ms},
		{"output, early output ends at once (burst)", PolicyOutput, 500 * time.Microsecond, 500 * time.Microsecond},
		{"output, output at once", PolicyOutput, 0, 0},
		{"output, output at MinEpoch", PolicyOutput, 2 * ms, 2 * ms},
		{"output, later output ends at once", PolicyOutput, 5 * ms, 5 * ms},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testCfg
			cfg.Policy = tc.policy
			cfg.HeartbeatInterval = 90 * ms // out of the way of Wake
			h := protected(t, cfg)          // checkpoint 1 taken at 2ms
			if rd := h.step(Tick{start}); rd.TakeCheckpoint == nil {
				t.Fatal("epoch 2 not ended after Epoch")
			}
			h.taken(start, 2)
			h.step(Ack{start, 1, 2})
			if tc.output >= 0 {
				rd := h.step(Output{start + tc.output})
				if rd.TakeCheckpoint != nil {
					if tc.output != tc.end {
						t.Fatalf("ended at output age %v, want %v", tc.output, tc.end)
					}
					return
				}
				if rd.Wake != start+tc.end {
					t.Fatalf("Wake %v, want %v", rd.Wake, start+tc.end)
				}
			}
			if rd := h.step(Tick{start + tc.end - 1}); rd.TakeCheckpoint != nil {
				t.Fatalf("ended before age %v", tc.end)
			}
			if rd := h.step(Tick{start + tc.end}); rd.TakeCheckpoint == nil || rd.TakeCheckpoint.Seq != 3 {
				t.Fatalf("not ended at age %v: %+v", tc.end, rd)
			}
		})
	}
}

func TestPrimaryOutputDuringPauseCountsForNextEpoch(t *testing.T) {
	cfg := testCfg
	cfg.HeartbeatInterval = 90 * ms
	h := protected(t, cfg) // checkpoint 1 taken at 2ms
	if rd := h.step(Tick{12 * ms}); rd.TakeCheckpoint == nil {
		t.Fatal("no checkpoint")
	}
	h.step(Output{12 * ms}) // during the pause: for epoch 3
	rd := h.taken(13*ms, 2)
	if rd.TakeCheckpoint == nil || rd.TakeCheckpoint.Seq != 3 {
		t.Fatalf("epoch 3, with output reported during the pause, not ended at once: %+v", rd)
	}
	h.step(Ack{14 * ms, 1, 2})
	h.taken(16*ms, 3)
	if w := h.p.Wake(); w != 26*ms {
		t.Fatalf("Wake %v: output carried over twice", w)
	}
}

func TestPrimaryBackPressure(t *testing.T) {
	h := protected(t, testCfg) // MaxInflight 2; checkpoint 1 acked
	h.step(Tick{12 * ms})
	h.taken(12*ms, 2)
	h.step(Tick{22 * ms})
	h.taken(22*ms, 3)
	if h.p.Inflight() != 2 {
		t.Fatalf("inflight %d", h.p.Inflight())
	}
	h.step(Output{23 * ms})
	for _, now := range []Time{32 * ms, 50 * ms} {
		h.step(Heartbeat{now, 1})
		if rd := h.step(Tick{now}); rd.TakeCheckpoint != nil {
			t.Fatalf("checkpoint at the inflight limit: %+v", rd.TakeCheckpoint)
		}
	}
	if w := h.p.Wake(); w != 70*ms { // heartbeat (sent at 50ms) due, no epoch deadline
		t.Fatalf("Wake %v", w)
	}
	rd := h.step(Ack{51 * ms, 1, 2})
	if rd.Release != 2 || rd.TakeCheckpoint == nil || rd.TakeCheckpoint.Seq != 4 {
		t.Fatalf("after ack: %+v", rd)
	}
}

func TestPrimaryHeartbeats(t *testing.T) {
	h := protected(t, testCfg) // Connected at 1ms
	var sent []Time
	for now := 2 * ms; now <= 80*ms; now += ms {
		for _, rd := range []PrimaryReady{h.step(Heartbeat{now, 1}), h.step(Tick{now})} {
			if rd.TakeCheckpoint != nil {
				h.taken(now, rd.TakeCheckpoint.Seq)
				h.step(Ack{now, 1, rd.TakeCheckpoint.Seq})
			}
			if rd.SendHeartbeat != 0 {
				if rd.SendHeartbeat != 1 {
					t.Fatalf("heartbeat on %d", rd.SendHeartbeat)
				}
				sent = append(sent, now)
			}
		}
	}
	if want := []Time{21 * ms, 41 * ms, 61 * ms}; len(sent) != len(want) || sent[0] != want[0] || sent[2] != want[2] {
		t.Fatalf("heartbeats at %v, want %v", sent, want)
	}
}

func TestPrimaryTimeoutUnprotects(t *testing.T) {
	h := protected(t, testCfg) // ack at 3ms
	h.step(Tick{12 * ms})
	h.taken(12*ms, 2)
	h.step(Heartbeat{50 * ms, 1})
	h.step(Output{51 * ms})
	// The driver ticks at Wake (a heartbeat every 20 ms).
	for now := 60 * ms; now < 149*ms; now += 20 * ms {
		h.step(Tick{now})
	}
	if rd := h.step(Tick{149 * ms}); h.p.State() != Protected || rd.Release != 1 {
		t.Fatalf("before Timeout: %v %+v", h.p.State(), rd)
	}
	rd := h.step(Tick{150 * ms})
	if h.p.State() != Unprotected || !rd.PassThrough || rd.Release != h.p.Seq() || h.p.Session() != 0 {
		t.Fatalf("after Timeout: %v %+v", h.p.State(), rd)
	}
	if len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 {
		t.Fatalf("drop %+v", rd.DropSession)
	}
	// The checkpoint being taken when the backup failed is released too.
	h.step(Tick{151 * ms})
	if h.out {
		h.taken(152*ms, h.p.Seq()+1)
		if h.p.Release() != h.p.Seq() {
			t.Fatalf("release %d seq %d", h.p.Release(), h.p.Seq())
		}
	}
	// A message after Timeout of silence is too late, even without a Tick.
	h2 := protected(t, testCfg)
	for now := 20 * ms; now < 100*ms; now += 20 * ms {
		h2.step(Tick{now})
	}
	rd = h2.step(Ack{103 * ms, 1, 1})
	if h2.p.State() != Unprotected || !rd.PassThrough {
		t.Fatalf("late ack: %v", h2.p.State())
	}
}

// TestPrimaryStoodStill: a primary whose engine was not stepped for most
// of a Timeout (its process stopped or starved: no heartbeat left it
// either) does not take the backup's silence over that time for its
// death: the backup may have failed over, and giving it up would release
// output of epochs it never had. The backup's messages queued meanwhile
// keep protection; a failover shows as the session's end and a Stale
// answer to the redial, which fences the primary: held output never
// leaves, and no checkpoint, session or release follows. Silence for a
// Timeout after the primary woke still gives the backup up.
func TestPrimaryStoodStill(t *testing.T) {
	stood := func(t *testing.T) (*ph, PrimaryReady) {
		h := protected(t, testCfg) // ack 1 at 3 ms
		h.step(Tick{12 * ms})
		h.taken(12*ms, 2)
		h.step(Output{13 * ms}) // epoch 3's output: held
		// Stopped from 13 ms to 400 ms.
		rd := h.step(Tick{400 * ms})
		if h.p.State() != Protected || rd.PassThrough || rd.Release != 1 || rd.StoodStill != 387*ms {
			t.Fatalf("after standing still: %v %+v", h.p.State(), rd)
		}
		return h, rd
	}
	t.Run("the backup is still there", func(t *testing.T) {
		h, _ := stood(t)
		// Its ack, queued meanwhile, keeps protection and releases.
		if rd := h.step(Ack{401 * ms, 1, 2}); h.p.State() != Protected || rd.Release != 2 || rd.PassThrough {
			t.Fatalf("ack after standing still: %v %+v", h.p.State(), rd)
		}
	})
	t.Run("the backup failed over", func(t *testing.T) {
		h, _ := stood(t)
		h.step(Disconnected{401 * ms, 1})
		if h.p.State() != Connecting {
			t.Fatalf("session's end: %v", h.p.State())
		}
		rd := h.step(Stale{402 * ms, "stale primary: term 1 failed over"})
		if h.p.State() != Fenced || rd.PassThrough || rd.Release != 1 || rd.Wake != Never {
			t.Fatalf("stale answer: %v %+v", h.p.State(), rd)
		}
		// Nothing ever leaves or is taken again.
		for _, ev := range []PrimaryEvent{Tick{time.Hour}, Output{time.Hour + ms}, GuestIdle{time.Hour + 2*ms},
			Connected{time.Hour + 3*ms, 2, 0, 0}, Ack{time.Hour + 4*ms, 2, 3}} {
			rd := h.step(ev)
			if h.p.State() != Fenced || rd.PassThrough || rd.Release != 1 || rd.TakeCheckpoint != nil || h.p.Session() != 0 {
				t.Fatalf("%#v when fenced: %v %+v", ev, h.p.State(), rd)
			}
		}
	})
	t.Run("the backup is silent", func(t *testing.T) {
		h, _ := stood(t)
		for now := 420 * ms; now < 500*ms; now += 20 * ms {
			if h.step(Tick{now}); h.p.State() != Protected {
				t.Fatalf("at %v: %v", now, h.p.State())
			}
		}
		if rd := h.step(Tick{500 * ms}); h.p.State() != Unprotected || !rd.PassThrough {
			t.Fatalf("a Timeout after waking: %v %+v", h.p.State(), rd)
		}
	})
	t.Run("between sessions", func(t *testing.T) {
		// The session ended (a redial under way) when the primary stood
		// still: the backup, waiting, may have failed over meanwhile.
		h := protected(t, testCfg)
		h.step(Output{4 * ms})
		h.step(Disconnected{5 * ms, 1})
		rd := h.step(Tick{400 * ms})
		if h.p.State() != Connecting || rd.PassThrough || rd.StoodStill == 0 {
			t.Fatalf("connecting, after standing still: %v %+v", h.p.State(), rd)
		}
		if rd := h.step(Stale{401 * ms, "stale primary"}); h.p.State() != Fenced || rd.PassThrough {
			t.Fatalf("stale answer: %v %+v", h.p.State(), rd)
		}
	})
	t.Run("a shorter gap", func(t *testing.T) {
		h := protected(t, testCfg)
		if rd := h.step(Tick{3*ms + 79*ms}); rd.StoodStill != 0 {
			t.Fatalf("a gap under Timeout less a heartbeat interval: %+v", rd)
		}
	})
}

// TestPrimaryReconnectAfterDisconnect: output stays held across the gap,
// the new session starts with a full checkpoint, and its ack releases the
// epochs the old session never acknowledged.
func TestPrimaryReconnectAfterDisconnect(t *testing.T) {
	cfg := testCfg
	cfg.Policy = PolicyFixed // output held across the gap must not end epochs here
	h := protected(t, cfg)
	for i, now := range []Time{12 * ms, 22 * ms} {
		h.step(Tick{now})
		h.taken(now, uint64(i+2))
	}
	h.step(Ack{23 * ms, 1, 2}) // 3 in flight
	h.step(Output{23 * ms})    // epoch 4, held
	rd := h.step(Disconnected{25 * ms, 1})
	if h.p.State() != Connecting || rd.PassThrough || rd.Release != 2 || len(rd.DropSession) != 0 {
		t.Fatalf("disconnected: %v %+v", h.p.State(), rd)
	}
	if rd.Wake != 45*ms { // a heartbeat interval on (the Timeout after the ack: 123 ms)
		t.Fatalf("Wake %v", rd.Wake)
	}
	if rd = h.step(Tick{40 * ms}); rd.TakeCheckpoint != nil {
		t.Fatal("checkpoint with no session")
	}
	h.step(Ack{41 * ms, 1, 3}) // stale session: ignored
	if h.p.Release() != 2 {
		t.Fatal("stale ack released")
	}
	rd = h.step(Connected{50 * ms, 2, 0, 0})
	if r := rd.TakeCheckpoint; r == nil || *r != (CheckpointRequest{Seq: 4, Full: true, Session: 2}) {
		t.Fatalf("resync %+v", r)
	}
	h.taken(51*ms, 4)
	h.step(Ack{52 * ms, 1, 4}) // old session again
	if rd = h.step(Ack{53 * ms, 2, 4}); rd.Release != 4 || h.p.State() != Protected {
		t.Fatalf("after resync: %v %+v", h.p.State(), rd)
	}
}

func TestPrimaryReconnectAfterUnprotected(t *testing.T) {
	h := newPH(t, testCfg)
	h.silence(100 * ms)
	if h.p.State() != Unprotected {
		t.Fatal(h.p.State())
	}
	rd := h.step(Connected{300 * ms, 5, 0, 0})
	if h.p.State() != Syncing || rd.PassThrough || rd.TakeCheckpoint == nil || !rd.TakeCheckpoint.Full {
		t.Fatalf("reconnect: %v %+v", h.p.State(), rd)
	}
	h.taken(301*ms, 1)
	h.step(Output{302 * ms}) // epoch 2: held until checkpoint 2 is acked
	if rd = h.step(Ack{303 * ms, 5, 1}); rd.Release != 1 || h.p.State() != Protected {
		t.Fatalf("%v %+v", h.p.State(), rd)
	}
}

func TestPrimaryRejectsDriverMistakes(t *testing.T) {
	h := protected(t, testCfg)
	for _, ev := range []PrimaryEvent{nil, Connected{5 * ms, 0, 0, 0}, Connected{5 * ms, 1, 0, 0}, CheckpointTaken{5 * ms, 2}} {
		if err := h.p.Step(ev); err == nil {
			t.Errorf("%#v accepted", ev)
		}
	}
	if h.p.Now() != 3*ms {
		t.Fatalf("a refused event moved time to %v", h.p.Now())
	}
	h.step(Tick{12 * ms})
	if err := h.p.Step(CheckpointTaken{13 * ms, 3}); err == nil {
		t.Error("wrong seq taken")
	}
	// Time never goes back: an old timestamp counts as now.
	h.step(Heartbeat{1 * ms, 1})
	if h.p.Now() != 12*ms || h.p.LastHeard() != 12*ms {
		t.Fatalf("now %v heard %v", h.p.Now(), h.p.LastHeard())
	}
}

func TestPrimaryProtocolViolations(t *testing.T) {
	for name, ev := range map[string]PrimaryEvent{
		"ack of outstanding":       Ack{13 * ms, 1, 3},
		"ack beyond":               Ack{13 * ms, 1, 9},
		"need-full of outstanding": NeedFull{13 * ms, 1, 3},
	} {
		t.Run(name, func(t *testing.T) {
			h := protected(t, testCfg)
			h.step(Tick{12 * ms})
			h.taken(12*ms, 2)
			h.step(Tick{22 * ms}) // checkpoint 3 outstanding
			rd := h.step(ev)
			if len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 || !strings.Contains(rd.DropSession[0].Reason, "violation") {
				t.Fatalf("drop %+v", rd.DropSession)
			}
			if h.p.State() != Connecting || rd.Release != 1 || rd.PassThrough {
				t.Fatalf("%v %+v", h.p.State(), rd)
			}
		})
	}
	// An ack of a checkpoint before the session's first one.
	h := protected(t, testCfg)
	h.step(Disconnected{4 * ms, 1})
	h.step(Connected{5 * ms, 2, 0, 0})
	h.taken(6*ms, 2)
	if rd := h.step(Ack{7 * ms, 2, 1}); len(rd.DropSession) != 1 {
		t.Fatalf("ack of an older session's checkpoint: %+v", rd)
	}
	// An ack before the session has any checkpoint taken.
	h = newPH(t, testCfg)
	h.step(Connected{5 * ms, 2, 0, 0})
	if rd := h.step(Ack{6 * ms, 2, 1}); len(rd.DropSession) != 1 {
		t.Fatalf("ack before any checkpoint: %+v", rd)
	}
}

func TestPrimaryDuplicateAndStaleAcks(t *testing.T) {
	h := protected(t, testCfg)
	h.step(Tick{12 * ms})
	h.taken(12*ms, 2)
	h.step(Ack{13 * ms, 1, 2})
	for _, ev := range []PrimaryEvent{Ack{14 * ms, 1, 2}, Ack{15 * ms, 1, 1}, Ack{16 * ms, 7, 2}, NeedFull{16 * ms, 7, 2}} {
		if rd := h.step(ev); len(rd.DropSession) != 0 || rd.Release != 2 || h.p.State() != Protected {
			t.Fatalf("%#v: %v %+v", ev, h.p.State(), rd)
		}
	}
	if h.p.LastHeard() != 15*ms {
		t.Fatalf("a duplicate refreshes liveness, a stale session does not: %v", h.p.LastHeard())
	}
}

func TestPrimaryNeedFull(t *testing.T) {
	h := protected(t, testCfg) // MaxInflight 2
	h.step(Tick{12 * ms})
	h.taken(12*ms, 2)
	h.step(Tick{22 * ms})
	h.taken(22*ms, 3) // 2 and 3 in flight: at the limit
	rd := h.step(NeedFull{23 * ms, 1, 2})
	if h.p.State() != Syncing || h.p.Inflight() != 1 || rd.TakeCheckpoint != nil || rd.Release != 1 {
		t.Fatalf("need-full: %v inflight %d %+v", h.p.State(), h.p.Inflight(), rd)
	}
	h.step(NeedFull{24 * ms, 1, 3}) // same episode: no second request
	if h.p.Inflight() != 0 {
		t.Fatalf("inflight %d", h.p.Inflight())
	}
	rd = h.step(Tick{32 * ms})
	if r := rd.TakeCheckpoint; r == nil || !r.Full || r.Seq != 4 {
		t.Fatalf("full %+v", r)
	}
	h.step(NeedFull{33 * ms, 1, 3}) // late copy, a full one is on its way
	h.taken(33*ms, 4)
	h.step(NeedFull{34 * ms, 1, 3})
	if h.p.State() != Syncing {
		t.Fatal(h.p.State())
	}
	rd = h.step(Tick{43 * ms})
	if r := rd.TakeCheckpoint; r == nil || r.Full {
		t.Fatalf("late need-full made another full checkpoint: %+v", r)
	}
	h.taken(43*ms, 5)
	if rd = h.step(Ack{44 * ms, 1, 5}); h.p.State() != Protected || rd.Release != 5 {
		t.Fatalf("%v %+v", h.p.State(), rd)
	}
	// The full one was lost: refusing the incremental after it asks again.
	h.step(Tick{53 * ms})
	h.taken(53*ms, 6)
	h.step(NeedFull{54 * ms, 1, 6})
	if rd = h.step(Tick{63 * ms}); rd.TakeCheckpoint == nil || !rd.TakeCheckpoint.Full {
		t.Fatalf("%+v", rd.TakeCheckpoint)
	}
}

func TestPrimaryAckTimeout(t *testing.T) {
	cfg := testCfg
	cfg.AckTimeout = 50 * ms
	h := protected(t, cfg)
	h.step(Tick{12 * ms})
	h.taken(12*ms, 2)
	for now := 13 * ms; now < 62*ms; now += 10 * ms {
		h.step(Heartbeat{now, 1})
	}
	if rd := h.step(Tick{61 * ms}); h.p.State() != Protected || len(rd.DropSession) != 0 {
		t.Fatalf("early: %v", h.p.State())
	}
	rd := h.step(Tick{62 * ms})
	if h.p.State() != Connecting || len(rd.DropSession) != 1 || !strings.Contains(rd.DropSession[0].Reason, "checkpoint 2") {
		t.Fatalf("%v %+v", h.p.State(), rd)
	}
	if rd.PassThrough || rd.Release != 1 {
		t.Fatalf("stall released output: %+v", rd)
	}
}

// A checkpoint requested for a session that ends before it is taken is
// an orphan: never in flight, and the next session still gets a full one.
func TestPrimaryOrphanCheckpoint(t *testing.T) {
	h := protected(t, testCfg)
	h.step(Tick{12 * ms}) // checkpoint 2 for session 1
	rd := h.step(Connected{13 * ms, 2, 0, 0})
	if rd.TakeCheckpoint != nil || len(rd.DropSession) != 1 || rd.DropSession[0].Session != 1 {
		t.Fatalf("superseding: %+v", rd)
	}
	rd = h.taken(14*ms, 2)
	if h.p.Inflight() != 0 {
		t.Fatalf("orphan in flight")
	}
	if r := rd.TakeCheckpoint; r == nil || *r != (CheckpointRequest{Seq: 3, Full: true, Session: 2}) {
		t.Fatalf("after orphan: %+v", r)
	}
	h.taken(15*ms, 3)
	if rd = h.step(Ack{16 * ms, 2, 2}); len(rd.DropSession) != 1 {
		t.Fatal("ack of the orphan accepted")
	}
}

// Steps between Ready and Advance keep what they add for the next Ready.
func TestPrimaryReadyAdvanceInterleave(t *testing.T) {
	p, _ := NewPrimary(testCfg, 0)
	p.Step(Connected{1 * ms, 1, 0, 0})
	rd1 := p.Ready()
	p.Step(CheckpointTaken{2 * ms, 1})
	p.Step(Ack{3 * ms, 1, 1})
	p.Step(Tick{13 * ms})
	p.Advance()
	if !p.HasReady() {
		t.Fatal("lost what came after Ready")
	}
	rd2 := p.Ready()
	p.Advance()
	if rd1.TakeCheckpoint.Seq != 1 || rd2.TakeCheckpoint == nil || rd2.TakeCheckpoint.Seq != 2 || rd2.Release != 1 {
		t.Fatalf("%+v / %+v", rd1, rd2)
	}
	if len(rd2.StateChanges) != 1 || rd2.StateChanges[0].To != Protected {
		t.Fatalf("changes %+v", rd2.StateChanges)
	}
	p.Advance() // without Ready: nothing
	if p.HasReady() {
		t.Fatal("HasReady")
	}
}

// TestPrimaryOutputRateLimit: under output that never stops, checkpoints
// come at once for a burst, then one per MinEpoch on average.
func TestPrimaryOutputRateLimit(t *testing.T) {
	cfg := testCfg
	cfg.MaxInflight = 100
	cfg.HeartbeatInterval = time.Second
	cfg.Timeout = 10 * time.Second
	h := protected(t, cfg) // checkpoint 1 taken at 2ms
	now := 2 * ms
	var starts []Time
	for len(starts) < 20 {
		rd := h.step(Output{now})
		if rd.TakeCheckpoint == nil {
			if rd.Wake <= now || rd.Wake == Never {
				t.Fatalf("output waiting at %v and no checkpoint, Wake %v", now, rd.Wake)
			}
			now = rd.Wake
			rd = h.step(Tick{now})
		}
		if rd.TakeCheckpoint == nil {
			t.Fatalf("no checkpoint at its Wake %v", now)
		}
		starts = append(starts, now)
		now += 100 * time.Microsecond // the pause
		h.taken(now, rd.TakeCheckpoint.Seq)
	}
	// The first few come back to back; the last ten average MinEpoch.
	if starts[2]-starts[0] > time.Millisecond {
		t.Errorf("no burst: %v", starts[:4])
	}
	if avg := (starts[19] - starts[9]) / 10; avg < cfg.MinEpoch || avg > cfg.MinEpoch+200*time.Microsecond {
		t.Errorf("sustained spacing %v, want about MinEpoch %v (starts %v)", avg, cfg.MinEpoch, starts)
	}
}

// TestPrimaryIdleEndsEpoch: output waiting and the guest idle ends the
// epoch at once, even with the rate limit's tokens spent; output alone,
// with the guest still running, waits for the rate limit.
func TestPrimaryIdleEndsEpoch(t *testing.T) {
	cfg := testCfg
	cfg.MaxInflight = 100
	cfg.HeartbeatInterval = time.Second
	cfg.Timeout = 10 * time.Second
	h := protected(t, cfg) // checkpoint 1 taken at 2ms
	now := 2 * ms
	// Spend the burst: output, checkpoint, output, checkpoint...
	for i := 0; i < 8; i++ {
		rd := h.step(Output{now})
		if rd.TakeCheckpoint == nil {
			break
		}
		now += 10 * time.Microsecond
		h.taken(now, rd.TakeCheckpoint.Seq)
	}
	rd := h.step(Output{now})
	if rd.TakeCheckpoint != nil {
		t.Fatal("the rate limit let a running guest's output end epochs without end")
	}
	if rd = h.step(GuestIdle{now + time.Microsecond}); rd.TakeCheckpoint == nil {
		t.Fatal("an idle guest with output waiting was not checkpointed at once")
	}
	h.taken(now+50*time.Microsecond, rd.TakeCheckpoint.Seq)
	// Idle without output waiting ends nothing.
	if rd = h.step(GuestIdle{now + 60*time.Microsecond}); rd.TakeCheckpoint != nil {
		t.Fatal("idle without output ended the epoch")
	}
}

// TestPrimaryHoldFullEndsEpoch: held output over the limit ends the epoch
// at once under either policy.
func TestPrimaryHoldFullEndsEpoch(t *testing.T) {
	for _, pol := range []Policy{PolicyFixed, PolicyOutput} {
		cfg := testCfg
		cfg.Policy = pol
		cfg.HeartbeatInterval = 90 * ms
		h := protected(t, cfg) // checkpoint 1 taken at 2ms
		if rd := h.step(Tick{3 * ms}); rd.TakeCheckpoint != nil {
			t.Fatalf("%v: epoch ended early without a reason", pol)
		}
		if rd := h.step(HoldFull{3 * ms}); rd.TakeCheckpoint == nil {
			t.Fatalf("%v: held output over the limit did not end the epoch", pol)
		}
	}
}

// TestHeartbeatsAtThePeersPace: each side says its timeout in the
// handshake, and heartbeats go often enough for the shorter one. A backup
// with a 100 ms timeout must hear a primary configured for 1 s at least
// every 20 ms when nothing else flows (no checkpoint: the guest stalled,
// say), or it fails over a live primary; and the other way round. A step
// gap that the peer's timeout would not survive is standing still.
func TestHeartbeatsAtThePeersPace(t *testing.T) {
	cfg := testCfg
	cfg.Timeout, cfg.HeartbeatInterval, cfg.Epoch = time.Second, 200*ms, time.Hour
	for _, peer := range []Time{0, 100 * ms, 5 * time.Second} {
		want := 200 * ms
		if peer == 100*ms {
			want = 20 * ms
		}
		t.Run(fmt.Sprintf("primary, backup's timeout %v", peer), func(t *testing.T) {
			h := newPH(t, cfg)
			rd := h.step(Connected{1 * ms, 1, peer, 0})
			h.taken(2*ms, rd.TakeCheckpoint.Seq)
			h.step(Ack{3 * ms, 1, 1})
			if got := h.p.HeartbeatInterval(); got != want {
				t.Fatalf("HeartbeatInterval %v, want %v", got, want)
			}
			// Ticked at each Wake, the backup heard.
			var sent []Time
			for now := h.p.Wake(); now <= 3*ms+4*want; now = h.p.Wake() {
				for _, rd := range []PrimaryReady{h.step(Heartbeat{now, 1}), h.step(Tick{now})} {
					if rd.SendHeartbeat == 1 {
						sent = append(sent, now)
					}
				}
			}
			checkPace(t, sent, want)
			// A gap of 90 ms outlives a 100 ms peer's patience less a
			// heartbeat interval; not a 1 s one's.
			last := sent[len(sent)-1]
			h.step(Heartbeat{last, 1})
			rd = h.step(Tick{last + 90*ms})
			if stood := rd.StoodStill != 0; stood != (peer == 100*ms) {
				t.Fatalf("a 90 ms gap: StoodStill %v, with the backup's timeout %v", rd.StoodStill, peer)
			}
		})
		t.Run(fmt.Sprintf("backup, primary's timeout %v", peer), func(t *testing.T) {
			b, err := NewBackup(cfg, "vm1", 0)
			if err != nil {
				t.Fatal(err)
			}
			h := &bh{t: t, b: b}
			h.step(Hello{1 * ms, 1, "vm1", 1, peer, 0, 0, false, 0})
			if got := b.HeartbeatInterval(); got != want {
				t.Fatalf("HeartbeatInterval %v, want %v", got, want)
			}
			var sent []Time
			for now := b.Wake(); now <= 1*ms+4*want; now = b.Wake() {
				for _, rd := range []BackupReady{h.step(Heartbeat{now, 1}), h.step(Tick{now})} {
					if len(msgs(rd, MsgHeartbeat)) > 0 {
						sent = append(sent, now)
					}
				}
			}
			checkPace(t, sent, want)
		})
	}
}

// TestCheckpointFailedIsTakenAgainFull: a pause that could not capture its
// checkpoint leaves nothing outstanding; the next checkpoint has the same
// number and is full (the stream lost the pages that one collected), and
// the epoch's output waits for its ack. Before, the request stayed
// outstanding for good: no checkpoint again, output held until the guest
// stalled.
func TestCheckpointFailedIsTakenAgainFull(t *testing.T) {
	h := protected(t, testCfg) // checkpoint 1 acked at 3ms
	var req *CheckpointRequest
	for now := 4 * ms; now < 20*ms && req == nil; now += ms {
		req = h.step(Output{now}).TakeCheckpoint
		if req == nil {
			req = h.step(Tick{now}).TakeCheckpoint
		}
	}
	if req == nil || req.Seq != 2 || req.Full {
		t.Fatalf("checkpoint 2: %+v", req)
	}
	h.out = false // the harness's record of an outstanding request
	rd := h.step(CheckpointFailed{14 * ms, 2, "injected"})
	if rd.Release != 1 {
		t.Fatalf("released %d after a failed checkpoint 2", rd.Release)
	}
	next := rd.TakeCheckpoint
	for now := 15 * ms; now < 40*ms && next == nil; now += ms {
		next = h.step(Tick{now}).TakeCheckpoint
	}
	if next == nil || next.Seq != 2 || !next.Full || next.Session != 1 {
		t.Fatalf("after the failure: %+v, want checkpoint 2 again, full", next)
	}
	h.taken(40*ms, 2)
	if rd := h.step(Ack{41 * ms, 1, 2}); rd.Release != 2 || h.p.State() != Protected {
		t.Fatalf("after its ack: release %d, %v", rd.Release, h.p.State())
	}
	if err := h.p.Step(CheckpointFailed{42 * ms, 3, "not asked for"}); err == nil {
		t.Fatal("a failure of a checkpoint not asked for was taken")
	}
}

// checkPace fails unless heartbeats went at least every want, from a
// session that began at 1 ms, four or more of them.
func checkPace(t *testing.T, sent []Time, want Time) {
	t.Helper()
	if len(sent) < 4 || sent[0] > 1*ms+want {
		t.Fatalf("heartbeats at %v, want one every %v", sent, want)
	}
	for i := 1; i < len(sent); i++ {
		if sent[i]-sent[i-1] > want {
			t.Fatalf("heartbeats at %v: a gap over %v", sent, want)
		}
	}
}

// A backup that accepts session after session and drops each before it
// acks (a flapping backup) keeps being heard, so the silence rule never
// gives it up. Timeout after its last ack with no session up, the engine
// asks for it to be given up through the next Hello (GiveUp), and releases
// held output only once the backup says it let the VM go (Released):
// until then a failover could still resume a state without that output.
func TestPrimaryGivesUpAFlappingBackup(t *testing.T) {
	h := protected(t, testCfg) // acked at 3 ms
	if rd := h.step(Output{4 * ms}); rd.TakeCheckpoint != nil {
		h.taken(4*ms, rd.TakeCheckpoint.Seq) // epoch 2's, never acked
	}
	h.step(Disconnected{5 * ms, 1})
	sess := uint64(2)
	now := 5 * ms
	for ; now < 95*ms; now += 15 * ms {
		rd := h.step(Connected{now, sess, 0, 0})
		if rd.GiveUp || rd.PassThrough {
			t.Fatalf("at %v: %+v", now, rd)
		}
		if r := rd.TakeCheckpoint; r != nil {
			h.taken(now+ms, r.Seq)
		}
		rd = h.step(Disconnected{now + 2*ms, sess})
		if rd.GiveUp || rd.PassThrough || rd.Release != 1 || h.p.State() != Connecting {
			t.Fatalf("at %v: %v %+v", now+2*ms, h.p.State(), rd)
		}
		sess++
	}
	if w := h.p.Wake(); w > 103*ms {
		t.Fatalf("Wake %v, after the give-up time 103ms", w)
	}
	rd := h.step(Tick{103 * ms})
	if !rd.GiveUp || rd.PassThrough || h.p.State() != Connecting || rd.Release != 1 {
		t.Fatalf("at the give-up time: %v %+v", h.p.State(), rd)
	}
	left := h.p.Left()
	rd = h.step(Released{110 * ms, "let go"})
	if rd.GiveUp || !rd.PassThrough || h.p.State() != Unprotected {
		t.Fatalf("released: %v %+v", h.p.State(), rd)
	}
	if h.p.Left() <= left || h.p.Left() != h.p.Seq()+1 {
		t.Fatalf("Left %d then %d, seq %d", left, h.p.Left(), h.p.Seq())
	}
	// A session that reaches Protected again resets the count: a later
	// flap waits Timeout from its last ack once more.
	rd = h.step(Connected{120 * ms, sess, 0, 0})
	if rd.TakeCheckpoint == nil {
		t.Fatalf("no full checkpoint asked: %v %+v", h.p.State(), rd)
	}
	h.taken(121*ms, rd.TakeCheckpoint.Seq)
	h.step(Ack{122 * ms, sess, rd.TakeCheckpoint.Seq})
	if rd = h.step(Disconnected{130 * ms, sess}); rd.GiveUp || h.p.State() != Connecting {
		t.Fatalf("after a protected session: %v %+v", h.p.State(), rd)
	}
}

// A backup that stops answering altogether is given up by the silence
// rule, as before: no Hello could carry GiveUp to it.
func TestPrimaryGiveUpIsNotTheSilenceRule(t *testing.T) {
	h := protected(t, testCfg)
	h.step(Disconnected{5 * ms, 1})
	rd := h.silence(104 * ms)
	if h.p.State() != Unprotected || !rd.PassThrough || rd.GiveUp {
		t.Fatalf("%v %+v", h.p.State(), rd)
	}
	// A Released that comes late changes nothing.
	if rd = h.step(Released{105 * ms, "late"}); len(rd.StateChanges) != 0 {
		t.Fatalf("%+v", rd)
	}
}

// A backup that keeps accepting sessions but neither acks nor answers a
// Hello that gives it up (Released) holds output for one more Timeout at
// most after that Hello left: then the primary runs unprotected, as under
// the silence rule. Sessions of Hellos without GiveUp prove nothing.
func TestPrimaryGiveUpUnansweredUnprotects(t *testing.T) {
	h := protected(t, testCfg) // acked at 3 ms
	rd := h.step(Disconnected{5 * ms, 1})
	sess := uint64(2)
	sentAt := Time(-1)
	for now := 10 * ms; now < 400*ms && h.p.State() != Unprotected; now += 10 * ms {
		if rd.GiveUp && now >= 150*ms && sentAt < 0 {
			h.step(GiveUpSent{now - ms}) // and the backup accepts it
			sentAt = now - ms
		}
		rd = h.step(Connected{now, sess, 0, 0})
		if r := rd.TakeCheckpoint; r != nil {
			h.taken(now+ms, r.Seq)
		}
		rd = h.step(Disconnected{now + 2*ms, sess})
		sess++
	}
	if h.p.State() != Unprotected || !rd.PassThrough || h.p.Now() > sentAt+112*ms || h.p.Now() < sentAt+100*ms {
		t.Fatalf("at %v (GiveUp sent at %v): %v %+v", h.p.Now(), sentAt, h.p.State(), rd)
	}
}

// A primary that stood still after its GiveUp Hello left gives the backup
// a Timeout from when it woke before giving it up unanswered: the backup,
// not hearing it, may have failed over meanwhile, and its redial's answer
// (Stale) must come first.
func TestPrimaryGiveUpUnansweredWaitsAfterStandingStill(t *testing.T) {
	h := protected(t, testCfg) // acked at 3 ms
	h.step(Disconnected{5 * ms, 1})
	sess := uint64(2)
	for now := 5 * ms; now < 100*ms; now += 15 * ms { // flapping
		if r := h.step(Connected{now, sess, 0, 0}).TakeCheckpoint; r != nil {
			h.taken(now+ms, r.Seq)
		}
		h.step(Disconnected{now + 2*ms, sess})
		sess++
	}
	if rd := h.step(Tick{103 * ms}); !rd.GiveUp {
		t.Fatalf("%+v", rd)
	}
	h.step(GiveUpSent{104 * ms})
	h.step(Tick{120 * ms})
	rd := h.step(Tick{205 * ms}) // stood still from 120
	if rd.StoodStill == 0 || h.p.State() != Connecting || rd.PassThrough {
		t.Fatalf("woken at 205ms: %v %+v", h.p.State(), rd)
	}
	if rd = h.step(Stale{210 * ms, "stale primary"}); h.p.State() != Fenced || rd.PassThrough {
		t.Fatalf("the redial's answer: %v %+v", h.p.State(), rd)
	}
}

// Output that left while a Hello was on its way (a silence gave the
// backup up meanwhile): the Hello told the backup less than has left, so
// the session is dropped and the redial says it all. And Left never goes
// back, though Release may trail it once protection resumes.
func TestPrimaryDropsASessionWhoseHelloSaidLess(t *testing.T) {
	h := protected(t, testCfg) // release 1
	said := h.p.Left()
	h.step(Disconnected{5 * ms, 1})
	h.silence(110 * ms)
	if h.p.State() != Unprotected || h.p.Left() != 2 {
		t.Fatalf("%v, Left %d", h.p.State(), h.p.Left())
	}
	rd := h.step(Connected{120 * ms, 2, 0, said})
	if len(rd.DropSession) != 1 || rd.DropSession[0].Session != 2 || h.p.State() != Unprotected || !rd.PassThrough {
		t.Fatalf("a Hello that said %d: %v %+v", said, h.p.State(), rd)
	}
	rd = h.step(Connected{130 * ms, 3, 0, h.p.Left()})
	if h.p.State() != Syncing || h.p.Left() != 2 || rd.Release != 1 {
		t.Fatalf("the redial: %v, Left %d, %+v", h.p.State(), h.p.Left(), rd)
	}
}

// A try after running unprotected gives the backup its Timeout: a
// session lost before its first ack does not give the backup up at once
// (progress was the last ack, long ago), let alone without asking it.
func TestPrimaryNewTryAfterUnprotectedHasItsTimeout(t *testing.T) {
	h := newPH(t, testCfg)
	h.silence(150 * ms)
	if h.p.State() != Unprotected {
		t.Fatal(h.p.State())
	}
	rd := h.step(Connected{time.Second, 2, 0, 0})
	h.taken(time.Second+ms, rd.TakeCheckpoint.Seq)
	h.step(Output{time.Second + 2*ms})
	h.step(Heartbeat{time.Second + 5*ms, 2})
	rd = h.step(Disconnected{time.Second + 10*ms, 2}) // its ack lost
	if h.p.State() != Connecting || rd.GiveUp || rd.PassThrough {
		t.Fatalf("lost before its ack: %v %+v", h.p.State(), rd)
	}
	for h.p.Now() < time.Second+100*ms && !rd.GiveUp {
		rd = h.step(Tick{h.p.Wake()})
	}
	if !rd.GiveUp || rd.PassThrough || h.p.Now() != time.Second+100*ms {
		t.Fatalf("a Timeout after the try began: %v at %v %+v", h.p.State(), h.p.Now(), rd)
	}
}
