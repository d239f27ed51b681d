package engine

// A randomized simulation of a primary and a backup driven the way the
// real drivers will drive them, over a network that delays, loses,
// reorders and duplicates messages, drops connections and partitions,
// with hosts that crash. Everything comes from one seed, so a failure
// reruns exactly: go test ./remus/engine -run TestSimulation -sim.seed=N
// prints the trace of seed N.

import (
	"container/heap"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	simSeed  = flag.Int64("sim.seed", -1, "simulate this seed only, with its trace on failure (env REMUS_SIM_SEED)")
	simSeeds = flag.Int("sim.seeds", 0, "seeds to simulate (default 600; env REMUS_SIM_SEEDS)")
	simSteps = flag.Int("sim.steps", 0, "events to simulate per seed, at least (default 4000; env REMUS_SIM_STEPS)")
)

// simParam is the flag if set (>= 0 for a seed, > 0 for counts), else the
// environment variable if set, else def.
func simParam(f int64, set bool, env string, def int64) int64 {
	if set {
		return f
	}
	if v, err := strconv.ParseInt(os.Getenv(env), 10, 64); err == nil {
		return v
	}
	return def
}

// simProfile is a fault model for one episode. Faults stop at the
// episode's quiet time, so that recovery can be checked after it.
type simProfile struct {
	name          string
	loss, dup     float64 // per message
	longDelay     float64 // chance of a delay up to 40ms, reordering
	fifo          bool    // per connection and direction, as TCP
	drops         float64 // connection resets per second
	primaryCrash  float64 // chance the primary crashes in the episode
	backupCrashes float64 // per second
	partitions    float64 // per second, 20-400ms each
	commitFails   float64 // chance a commit cannot be applied (CommitFailed)
}

var simProfiles = []simProfile{
	{name: "clean", fifo: true},
	{name: "tcp", fifo: true, drops: 2, primaryCrash: 0.3, backupCrashes: 0.5, partitions: 0.3, commitFails: 0.005},
	{name: "lossy", loss: 0.03, dup: 0.03, longDelay: 0.05},
	// A backup that accepts and then drops session after session (most
	// commits fail, connections reset): the primary must give it up
	// through it (GiveUp), not by a silence it makes itself.
	{name: "flapping", fifo: true, drops: 6, commitFails: 0.4},
	{name: "chaos", loss: 0.05, dup: 0.05, longDelay: 0.1, drops: 3, primaryCrash: 0.4, backupCrashes: 1, partitions: 0.5, commitFails: 0.01},
}

type simStats struct {
	mu                                    sync.Mutex
	seeds, episodes, steps                int
	profiles, failoversAliveBy            map[string]int
	checkpoints, fulls, needFulls, drops  int
	unprotected, failoversDead            int
	failoversAlive, fenced, backupCrashes int
	primaryCrashes, idleResets            int
	commitFails, givenUp                  int
	released, releasedUnprotected, outs   int
	maxCleanLatency                       Time
}

func (a *simStats) add(b *simStats) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.profiles == nil {
		a.profiles = map[string]int{}
	}
	if a.failoversAliveBy == nil {
		a.failoversAliveBy = map[string]int{}
	}
	for k, v := range b.profiles {
		a.profiles[k] += v
	}
	for k, v := range b.failoversAliveBy {
		a.failoversAliveBy[k] += v
	}
	a.seeds += b.seeds
	a.episodes += b.episodes
	a.steps += b.steps
	a.checkpoints += b.checkpoints
	a.fulls += b.fulls
	a.needFulls += b.needFulls
	a.drops += b.drops
	a.unprotected += b.unprotected
	a.failoversDead += b.failoversDead
	a.failoversAlive += b.failoversAlive
	a.fenced += b.fenced
	a.backupCrashes += b.backupCrashes
	a.primaryCrashes += b.primaryCrashes
	a.idleResets += b.idleResets
	a.commitFails += b.commitFails
	a.givenUp += b.givenUp
	a.released += b.released
	a.releasedUnprotected += b.releasedUnprotected
	a.outs += b.outs
	a.maxCleanLatency = max(a.maxCleanLatency, b.maxCleanLatency)
}

type simItem struct {
	at Time
	n  uint64
	fn func()
}

type simQueue []simItem

func (q simQueue) Len() int { return len(q) }
func (q simQueue) Less(i, j int) bool {
	return q[i].at < q[j].at || q[i].at == q[j].at && q[i].n < q[j].n
}
func (q simQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *simQueue) Push(x any)   { *q = append(*q, x.(simItem)) }
func (q *simQueue) Pop() any {
	old := *q
	it := old[len(old)-1]
	*q = old[:len(old)-1]
	return it
}

type simConn struct {
	session          uint64
	upAt             Time   // when the primary stepped Connected
	said             uint64 // the Released its Hello carried
	pOpen            bool   // the primary's end
	bInc             int    // the backup incarnation it reached (0: none yet)
	bOpen            bool   // the backup's end
	accepted         bool   // the primary stepped Connected
	fifoP2B, fifoB2P Time
}

const (
	p2bHello = iota
	p2bCkpt
	p2bHeartbeat
)

type p2b struct {
	kind uint8
	seq  uint64
	full bool
	// A Hello's: Primary.Left and Ready.GiveUp when it was sent.
	released uint64
	giveUp   bool
	dial     uint64
	sent     Time
}

type simOutput struct {
	epoch      uint64
	at         Time
	released   bool
	protected  bool
	releasedAt Time
}

type simPrimary struct {
	e           *Primary
	alive       bool
	state       PrimaryState
	conn        *simConn
	dialing     bool
	fenced      bool
	paused      bool
	lastSeq     uint64
	outstanding bool
	release     uint64
	floor       uint64 // Release as justified by being unprotected
	passThrough bool
	giveUp      bool   // the last Ready's GiveUp
	dials       uint64 // connections made (Hello.Dial)
	flaps       int    // sessions in a row that ended within Timeout
	wakeGen     uint64
	held        []*simOutput
	sessGot     map[uint64]bool
	reported    uint64 // last epoch whose output was reported
	protectedAt Time   // since when Protected; -1: not
	releasedAt  Time   // when Release last rose
	outMean     Time
}

type simBackup struct {
	e        *Backup
	inc      int
	state    BackupState
	has      bool   // a committed state
	seq      uint64 // its checkpoint
	staged   *Checkpoint
	sessFull map[uint64]bool
	lastAck  map[uint64]uint64
	heard    Time // last message delivered on the session it follows
	// heardSent: when the newest message from the primary that this
	// incarnation handled was sent (any connection, Hellos too).
	heardSent  Time
	wakeGen    uint64
	failedOver bool
}

type sim struct {
	rng     *rand.Rand
	cfg     Config
	prof    simProfile
	vm      string
	now     Time
	q       simQueue
	n       uint64
	steps   int
	err     error
	tracing bool
	trace   []string
	st      *simStats

	quiet, settle, end Time
	partUntil          Time

	p           *simPrimary
	b           *simBackup // nil while down
	bIncs       int
	conns       map[uint64]*simConn
	connList    []*simConn
	nextSession uint64

	outs           []*simOutput
	maxCommitted   uint64 // by any backup incarnation, ever
	maxProtRel     uint64 // highest epoch released under protection
	failoverSeq    uint64
	failedOver     bool
	firstProtected Time
}

func (s *sim) at(t Time, fn func()) {
	s.n++
	heap.Push(&s.q, simItem{t, s.n, fn})
}
func (s *sim) after(d Time, fn func()) { s.at(s.now+d, fn) }
func (s *sim) chance(p float64) bool   { return p > 0 && s.rng.Float64() < p }
func (s *sim) dur(lo, hi Time) Time    { return lo + Time(s.rng.Int64N(int64(hi-lo)+1)) }
func pick[T any](s *sim, xs ...T) T    { return xs[s.rng.IntN(len(xs))] }

func (s *sim) failf(format string, args ...any) {
	if s.err == nil {
		s.err = fmt.Errorf("t=%v: %s", s.now, fmt.Sprintf(format, args...))
		s.logf("FAIL %v", s.err)
	}
}

func (s *sim) logf(format string, args ...any) {
	if s.tracing {
		s.trace = append(s.trace, fmt.Sprintf("%12v ", s.now)+fmt.Sprintf(format, args...))
	}
}

func newRng(seed int64) *rand.Rand { return rand.New(rand.NewPCG(uint64(seed), 0x52454d5553)) }

// runSim simulates episodes of seed until at least minSteps events ran.
func runSim(seed int64, minSteps int, tracing bool, st *simStats) (trace []string, err error) {
	rng := newRng(seed)
	st.seeds++
	for ep := 0; st.steps < minSteps; ep++ {
		s := newSim(rng, ep, tracing, st)
		s.run()
		st.episodes++
		st.steps += s.steps
		st.profiles[s.prof.name]++
		if s.err != nil {
			return s.trace, fmt.Errorf("episode %d, profile %s, %+v: %w", ep, s.prof.name, s.cfg, s.err)
		}
	}
	return nil, nil
}

func newSim(rng *rand.Rand, ep int, tracing bool, st *simStats) *sim {
	s := &sim{rng: rng, tracing: tracing, st: st, conns: map[uint64]*simConn{}, firstProtected: -1}
	s.prof = pick(s, simProfiles...)
	s.vm = fmt.Sprintf("vm%d", ep)
	s.cfg = Config{
		Epoch:       pick(s, 2*ms, 5*ms, 10*ms, 25*ms),
		Policy:      pick(s, PolicyOutput, PolicyFixed),
		MinEpoch:    pick(s, 500*time.Microsecond, ms),
		Timeout:     pick(s, 150*ms, 250*ms),
		AckTimeout:  pick(s, 150*ms, 300*ms),
		MaxInflight: pick(s, 1, 2, 4),
	}.WithDefaults()
	s.quiet = s.dur(400*ms, 2000*ms)
	s.settle = 300*ms + s.cfg.AckTimeout + s.cfg.Timeout + 200*ms
	s.end = s.quiet + s.settle + 400*ms
	s.logf("episode %d: %s %+v quiet %v", ep, s.prof.name, s.cfg, s.quiet)
	return s
}

func (s *sim) run() {
	e, err := NewPrimary(s.cfg, 0)
	if err != nil {
		s.failf("%v", err)
		return
	}
	s.p = &simPrimary{e: e, alive: true, sessGot: map[uint64]bool{}, protectedAt: -1, outMean: pick(s, ms, 5*ms, 20*ms)}
	s.primaryReady()
	s.restartBackup()
	s.scheduleDial()
	s.scheduleOutput()
	s.poisson(s.prof.drops, s.dropConn)
	s.poisson(s.prof.backupCrashes, s.crashBackup)
	s.poisson(s.prof.partitions, func() {
		s.partUntil = min(s.quiet, max(s.partUntil, s.now+s.dur(20*ms, 400*ms)))
		s.logf("partition until %v", s.partUntil)
	})
	if s.chance(s.prof.primaryCrash) {
		s.at(s.dur(50*ms, s.quiet), s.crashPrimary)
	}
	for s.q.Len() > 0 && s.err == nil {
		it := heap.Pop(&s.q).(simItem)
		if it.at > s.end {
			break
		}
		s.now = it.at
		it.fn()
		s.steps++
		s.check()
	}
	if s.err == nil {
		s.now = s.end
		s.finalCheck()
	}
}

// poisson runs fn at random times, rate per second, until the quiet time.
func (s *sim) poisson(rate float64, fn func()) {
	if rate <= 0 {
		return
	}
	var next func()
	next = func() {
		d := Time(s.rng.ExpFloat64() / rate * float64(time.Second))
		if s.now+d < s.quiet {
			s.after(d, func() { fn(); next() })
		}
	}
	next()
}

// check runs after every event: the failure detectors fire on time.
func (s *sim) check() {
	if b := s.b; b != nil {
		st := b.e.State()
		if (st == Following || st == Waiting) && s.now > b.heard+s.cfg.Timeout {
			s.failf("backup %v, primary silent since %v", st, b.heard)
		}
		if (b.e.Committed() != 0) != b.has || b.has && b.e.Committed() != b.seq {
			s.failf("backup says committed %d, applied %v %d", b.e.Committed(), b.has, b.seq)
		}
	}
	if p := s.p; p.alive && p.state != Unprotected && p.state != Fenced && s.now > p.e.LastHeard()+s.cfg.Timeout {
		s.failf("primary %v, backup silent since %v", p.state, p.e.LastHeard())
	}
}

// finalCheck: liveness. With no fault left (clean: from the first
// protection; otherwise settle after the faults stopped) the primary is
// protected, checkpoints are acked and every output leaves within a bound.
func (s *sim) finalCheck() {
	p := s.p
	from := s.quiet + s.settle
	if s.prof.name == "clean" {
		if s.firstProtected < 0 || s.firstProtected > 100*ms {
			s.failf("clean: first protected at %v", s.firstProtected)
			return
		}
		from = s.firstProtected
	}
	if !p.alive || p.fenced || s.failedOver || s.b == nil {
		return
	}
	if p.state != Protected || p.protectedAt > from {
		s.failf("not protected since %v: %v since %v", from, p.state, p.protectedAt)
		return
	}
	bound := s.cfg.Epoch + 25*ms
	if s.now-p.releasedAt > bound {
		s.failf("no ack since %v", p.releasedAt)
	}
	for _, o := range s.outs {
		start := max(o.at, from)
		if o.released && o.releasedAt-start > bound || !o.released && s.now-start > bound {
			s.failf("output of epoch %d at %v released %v at %v", o.epoch, o.at, o.released, o.releasedAt)
			return
		}
		if o.released && s.prof.name == "clean" {
			s.st.maxCleanLatency = max(s.st.maxCleanLatency, o.releasedAt-o.at)
		}
	}
}

// The network.

func (s *sim) transmit(c *simConn, toBackup bool, deliver func()) {
	faulty := s.now < s.quiet
	if s.now < s.partUntil || faulty && s.chance(s.prof.loss) {
		s.logf("  lost on %d", c.session)
		return
	}
	n := 1
	if faulty && s.chance(s.prof.dup) {
		n = 2
	}
	for range n {
		t := s.now + s.dur(100*time.Microsecond, 2*ms)
		if faulty && s.chance(s.prof.longDelay) {
			t = s.now + s.dur(2*ms, 40*ms)
		}
		if s.prof.fifo || !faulty {
			f := &c.fifoB2P
			if toBackup {
				f = &c.fifoP2B
			}
			t = max(t, *f)
			*f = t
		}
		s.at(t, deliver)
	}
}

// notify delivers a connection's close to one end; a partition delays it
// (TCP retransmits its FIN) but does not lose it.
func (s *sim) notify(fn func()) {
	t := s.now + s.dur(100*time.Microsecond, 2*ms)
	if s.partUntil > s.now {
		t += s.partUntil - s.now
	}
	s.at(t, fn)
}

func (s *sim) sendP2B(c *simConn, m p2b) {
	m.sent = s.now
	s.transmit(c, true, func() { s.deliverP2B(c, m) })
}
func (s *sim) sendB2P(c *simConn, m Message) {
	s.transmit(c, false, func() { s.deliverB2P(c, m) })
}

func (s *sim) dropConn() {
	c := s.p.conn
	if c == nil || !s.p.alive {
		return
	}
	s.logf("reset connection %d", c.session)
	s.notify(func() { s.primarySeesClose(c) })
	s.notify(func() { s.backupSeesClose(c) })
}

func (s *sim) crashPrimary() {
	p := s.p
	if !p.alive {
		return
	}
	s.logf("primary crashes")
	s.st.primaryCrashes++
	p.alive = false
	if c := p.conn; c != nil {
		c.pOpen = false
		if s.chance(0.5) { // its kernel resets the connection
			s.notify(func() { s.backupSeesClose(c) })
		}
	}
	p.conn = nil
}

func (s *sim) crashBackup() {
	b := s.b
	if b == nil || b.failedOver {
		return
	}
	s.logf("backup %d crashes", b.inc)
	s.st.backupCrashes++
	s.b = nil
	for _, c := range s.connList {
		if c.bInc == b.inc && c.bOpen {
			c.bOpen = false
			if s.chance(0.5) {
				s.notify(func() { s.primarySeesClose(c) })
			}
		}
	}
	s.after(s.dur(10*ms, 300*ms), s.restartBackup)
}

func (s *sim) restartBackup() {
	s.bIncs++
	e, err := NewBackup(s.cfg, s.vm, s.now)
	if err != nil {
		s.failf("%v", err)
		return
	}
	s.logf("backup %d starts", s.bIncs)
	s.b = &simBackup{e: e, inc: s.bIncs, sessFull: map[uint64]bool{}, lastAck: map[uint64]uint64{}, heard: s.now}
	s.backupReady()
}

// The primary's driver.

func (s *sim) scheduleDial() {
	p := s.p
	if !p.alive || p.fenced || p.conn != nil || p.dialing {
		return
	}
	p.dialing = true
	// As the driver: a session that ended soon after it came up makes
	// the next dial wait longer, but never as long as a backup that
	// holds checkpoints gives its primary (Timeout).
	wait := s.dur(ms, 30*ms)
	if p.flaps > 0 {
		wait = max(wait, min(ms<<min(p.flaps, 10), s.cfg.Timeout/4))
	}
	s.after(wait, func() {
		p.dialing = false
		if !p.alive || p.fenced || p.conn != nil {
			return
		}
		s.nextSession++
		c := &simConn{session: s.nextSession, pOpen: true}
		s.conns[c.session] = c
		s.connList = append(s.connList, c)
		p.conn = c
		s.logf("P dials %d", c.session)
		c.said = p.e.Left()
		p.dials++
		if p.giveUp {
			s.pstep(GiveUpSent{s.now})
		}
		s.sendP2B(c, p2b{kind: p2bHello, released: c.said, giveUp: p.giveUp, dial: p.dials})
		s.after(50*ms, func() {
			if p.alive && p.conn == c && !c.accepted {
				s.logf("P dial %d times out", c.session)
				s.primaryClose(c)
			}
		})
	})
}

// primaryClose: the primary's driver closes its end.
func (s *sim) primaryClose(c *simConn) {
	if !c.pOpen {
		return
	}
	c.pOpen = false
	if s.p.conn == c {
		s.p.conn = nil
		s.p.countFlap(c, s.now, s.cfg.Timeout)
		s.scheduleDial()
	}
	s.notify(func() { s.backupSeesClose(c) })
}

func (p *simPrimary) countFlap(c *simConn, now, timeout Time) {
	switch {
	case !c.accepted:
	case now-c.upAt < timeout:
		p.flaps++
	default:
		p.flaps = 0
	}
}

func (s *sim) primarySeesClose(c *simConn) {
	p := s.p
	if !p.alive || !c.pOpen {
		return
	}
	c.pOpen = false
	if p.conn != c {
		return
	}
	p.conn = nil
	p.countFlap(c, s.now, s.cfg.Timeout)
	if c.accepted {
		s.pstep(Disconnected{s.now, c.session})
	}
	s.scheduleDial()
}

func (s *sim) deliverB2P(c *simConn, m Message) {
	p := s.p
	if !p.alive {
		return
	}
	current := p.conn == c && c.pOpen
	s.logf("P <- %v %d/%d %s (current %v)", m.Kind, m.Session, m.Seq, m.Reason, current)
	switch m.Kind {
	case MsgAccept:
		if current && !c.accepted {
			c.accepted, c.upAt = true, s.now
			s.pstep(Connected{s.now, c.session, 0, c.said})
		}
	case MsgReleased:
		if current && !c.accepted {
			s.st.givenUp++
			s.pstep(Released{s.now, m.Reason})
			s.primaryClose(c)
		}
	case MsgReject:
		if current {
			if m.Fenced {
				p.fenced = true
				s.st.fenced++
				s.pstep(Stale{s.now, m.Reason})
			}
			s.primaryClose(c)
		}
	default:
		// A sloppy driver may deliver what a closed connection had
		// buffered: the engine must ignore stale sessions itself.
		if !current && (s.now >= s.quiet || !s.chance(0.3)) {
			return
		}
		var ev PrimaryEvent = Heartbeat{s.now, m.Session}
		switch m.Kind {
		case MsgAck:
			ev = Ack{s.now, m.Session, m.Seq}
		case MsgNeedFull:
			ev = NeedFull{s.now, m.Session, m.Seq}
		}
		s.pstep(ev)
	}
}

func (s *sim) scheduleOutput() {
	p := s.p
	s.after(Time(s.rng.ExpFloat64()*float64(p.outMean)), func() {
		if !p.alive {
			return
		}
		defer s.scheduleOutput()
		if p.paused {
			return
		}
		o := &simOutput{epoch: p.e.Seq() + 1, at: s.now}
		s.outs = append(s.outs, o)
		s.st.outs++
		if p.passThrough {
			s.releaseOutput(o, false)
			return
		}
		p.held = append(p.held, o)
		if o.epoch != p.reported || s.chance(0.1) {
			p.reported = o.epoch
			s.pstep(Output{s.now})
		}
		// Sometimes the guest then goes to sleep with its output waiting.
		if s.chance(0.3) {
			s.pstep(GuestIdle{s.now})
		}
		if s.chance(0.05) {
			s.pstep(HoldFull{s.now})
		}
	})
}

func (s *sim) releaseOutput(o *simOutput, protected bool) {
	o.released, o.protected, o.releasedAt = true, protected, s.now
	if !protected {
		s.st.releasedUnprotected++
		return
	}
	s.st.released++
	if s.maxCommitted < o.epoch {
		s.failf("output of epoch %d released; no backup ever committed it (highest %d)", o.epoch, s.maxCommitted)
	}
	if s.failedOver && o.epoch > s.failoverSeq {
		s.failf("output of epoch %d released; the backup failed over to %d", o.epoch, s.failoverSeq)
	}
	s.maxProtRel = max(s.maxProtRel, o.epoch)
}

func (s *sim) pstep(ev PrimaryEvent) {
	p := s.p
	if err := p.e.Step(ev); err != nil {
		s.failf("primary Step(%#v): %v", ev, err)
		return
	}
	s.logf("P %T%+v: %v seq %d acked %d release %d inflight %d", ev, ev, p.e.State(), p.e.Seq(), p.e.Acked(), p.e.Release(), p.e.Inflight())
	s.primaryReady()
}

func (s *sim) primaryReady() {
	p := s.p
	if !p.e.HasReady() {
		return
	}
	rd := p.e.Ready()
	p.e.Advance()
	unprot := false
	for _, c := range rd.StateChanges {
		s.logf("P %v -> %v: %s", c.From, c.To, c.Reason)
		if c.From != p.state || c.From == c.To || c.At != s.now {
			s.failf("primary state change %+v, was %v", c, p.state)
		}
		if s.prof.name == "clean" && c.From == Protected {
			s.failf("clean: primary left protection: %+v", c)
		}
		p.state = c.To
		p.protectedAt = -1
		switch c.To {
		case Unprotected:
			unprot = true
			s.st.unprotected++
		case Protected:
			p.protectedAt = s.now
			if s.firstProtected < 0 {
				s.firstProtected = s.now
			}
		}
	}
	if p.state != p.e.State() {
		s.failf("primary %v, changes say %v", p.e.State(), p.state)
	}
	if rd.Release < p.release {
		s.failf("Release went back from %d to %d", p.release, rd.Release)
	}
	if rd.PassThrough || unprot {
		p.floor = rd.Release
	} else if rd.Release > max(p.e.Acked(), p.floor) {
		s.failf("Release %d beyond ack %d (unprotected up to %d)", rd.Release, p.e.Acked(), p.floor)
	}
	if rd.Release > p.release {
		p.releasedAt = s.now
	}
	p.release, p.passThrough, p.giveUp = rd.Release, rd.PassThrough, rd.GiveUp
	if rd.GiveUp && (p.state != Connecting || p.e.Session() != 0) {
		s.failf("GiveUp in %v, session %d", p.state, p.e.Session())
	}
	kept := p.held[:0]
	for _, o := range p.held {
		if rd.PassThrough || o.epoch <= rd.Release {
			s.releaseOutput(o, !rd.PassThrough && !unprot)
		} else {
			kept = append(kept, o)
		}
	}
	p.held = kept
	for _, d := range rd.DropSession {
		s.logf("P drops %d: %s", d.Session, d.Reason)
		s.st.drops++
		if s.prof.name == "clean" {
			s.failf("clean: primary drops session %d: %s", d.Session, d.Reason)
		}
		if c := p.conn; c != nil && c.session == d.Session {
			s.primaryClose(c)
		}
	}
	if r := rd.TakeCheckpoint; r != nil {
		s.logf("P takes %+v", *r)
		s.st.checkpoints++
		if p.outstanding || r.Seq != p.lastSeq+1 || r.Session == 0 || r.Session != p.e.Session() {
			s.failf("checkpoint %+v: outstanding %v, last %d, session %d", *r, p.outstanding, p.lastSeq, p.e.Session())
		}
		if !p.sessGot[r.Session] && !r.Full {
			s.failf("session %d starts with incremental %d", r.Session, r.Seq)
		}
		if r.Full {
			s.st.fulls++
		}
		p.sessGot[r.Session] = true
		p.outstanding, p.paused, p.lastSeq = true, true, r.Seq
		req := *r
		s.after(s.dur(100*time.Microsecond, 2*ms), func() { s.pauseDone(req) })
	}
	if hb := rd.SendHeartbeat; hb != 0 {
		if c := p.conn; c != nil && c.session == hb && c.accepted {
			s.sendP2B(c, p2b{kind: p2bHeartbeat})
		}
	}
	if n := p.e.Inflight(); n > s.cfg.MaxInflight {
		s.failf("inflight %d", n)
	}
	if rd.Wake <= s.now {
		s.failf("primary Wake %v", rd.Wake)
	}
	p.wakeGen++
	if rd.Wake != Never {
		gen := p.wakeGen
		s.at(rd.Wake, func() {
			if p.alive && p.wakeGen == gen {
				s.pstep(Tick{s.now})
			}
		})
	}
}

func (s *sim) pauseDone(r CheckpointRequest) {
	p := s.p
	if !p.alive {
		return
	}
	p.paused, p.outstanding = false, false
	s.pstep(CheckpointTaken{s.now, r.Seq})
	if c := p.conn; c != nil && c.session == r.Session && c.accepted && c.pOpen {
		s.sendP2B(c, p2b{kind: p2bCkpt, seq: r.Seq, full: r.Full})
	}
}

// The backup's driver.

func (s *sim) deliverP2B(c *simConn, m p2b) {
	b := s.b
	if b == nil || c.bInc != 0 && c.bInc != b.inc { // refused, or reset by a new incarnation
		if c.pOpen {
			s.notify(func() { s.primarySeesClose(c) })
		}
		return
	}
	if m.kind == p2bHello && c.bInc == 0 {
		if !c.pOpen {
			return
		}
		c.bInc, c.bOpen = b.inc, true
	}
	if !c.bOpen {
		return
	}
	// Heard: a message of the session followed before it (a checkpoint
	// that then fails to apply ends the session) or after it (a hello).
	followed := b.e.Session() == c.session
	switch m.kind {
	case p2bHello:
		s.bstep(Hello{Now: s.now, Session: c.session, VM: s.vm, Term: 1, Run: 1, Released: m.released, GiveUp: m.giveUp, Dial: m.dial})
	case p2bCkpt:
		ck := Checkpoint{s.now, c.session, m.seq, m.full}
		b.staged = &ck
		s.bstep(ck)
	case p2bHeartbeat:
		s.bstep(Heartbeat{s.now, c.session})
	}
	if s.b == b && !b.failedOver && (followed || b.e.Session() == c.session) {
		b.heard = s.now
	}
	if s.b == b {
		b.heardSent = max(b.heardSent, m.sent)
	}
}

func (s *sim) backupSeesClose(c *simConn) {
	b := s.b
	if b == nil || c.bInc != b.inc || !c.bOpen {
		return
	}
	c.bOpen = false
	s.bstep(Disconnected{s.now, c.session})
}

func (s *sim) backupClose(c *simConn) {
	if !c.bOpen {
		return
	}
	c.bOpen = false
	s.notify(func() { s.primarySeesClose(c) })
}

func (s *sim) bstep(ev BackupEvent) {
	b := s.b
	if err := b.e.Step(ev); err != nil {
		s.failf("backup Step(%#v): %v", ev, err)
		return
	}
	s.logf("B%d %T%+v: %v committed %d", b.inc, ev, ev, b.e.State(), b.e.Committed())
	if _, cf := ev.(CommitFailed); !cf && b.has && b.e.Committed() == 0 && b.e.State() != FailedOver {
		// The slot dropped its copy as not resumable (given up, or
		// older than output its primary released): it keeps the
		// bytes, but they are nothing to fail over to now.
		s.logf("B%d drops its copy of %d", b.inc, b.seq)
		b.has = false
	}
	s.backupReady()
}

func (s *sim) backupReady() {
	b := s.b
	if !b.e.HasReady() {
		return
	}
	rd := b.e.Ready()
	b.e.Advance()
	for _, c := range rd.StateChanges {
		s.logf("B%d %v -> %v: %s", b.inc, c.From, c.To, c.Reason)
		if c.From != b.state || c.From == c.To || c.At != s.now {
			s.failf("backup state change %+v, was %v", c, b.state)
		}
		if c.From == Following && c.To == Idle && strings.Contains(c.Reason, "not heard") {
			s.st.idleResets++
		}
		b.state = c.To
	}
	if b.state != b.e.State() {
		s.failf("backup %v, changes say %v", b.e.State(), b.state)
	}
	var failed *CommitFailed
	for _, cr := range rd.Commit {
		seq := cr.Seq
		ck := b.staged
		if ck == nil || ck.Seq != seq || ck.Session != cr.Session {
			s.failf("commit %+v, staged %+v", cr, ck)
			return
		}
		if failed != nil || s.now < s.quiet && s.chance(s.prof.commitFails) {
			// As the driver does when a checkpoint does not apply: the
			// copy stays as it was, nothing after it applies, no ack of
			// this Ready goes out, its connections close.
			if failed == nil {
				s.st.commitFails++
				// The copy's own number, even of a state the slot
				// dropped (given up, stale): the bytes are still there.
				failed = &CommitFailed{Now: s.now, Session: ck.Session, Seq: seq, Committed: b.seq}
				s.logf("B%d cannot apply %d", b.inc, seq)
			}
			b.staged = nil
			continue
		}
		switch {
		case ck.Full:
			b.sessFull[ck.Session] = true
		case !b.sessFull[ck.Session]:
			s.failf("incremental %d committed in session %d before a full one", seq, ck.Session)
		case !b.has || b.seq != seq-1:
			s.failf("incremental %d applied on %v %d", seq, b.has, b.seq)
		}
		b.has, b.seq, b.staged = true, seq, nil
		s.maxCommitted = max(s.maxCommitted, seq)
	}
	for _, d := range rd.Discard {
		if b.staged == nil || b.staged.Seq != d.Seq || b.staged.Session != d.Session {
			s.failf("discard %+v, staged %+v", d, b.staged)
		}
		b.staged = nil
	}
	if b.staged != nil {
		s.failf("checkpoint %d neither committed nor discarded", b.staged.Seq)
	}
	for _, m := range rd.Messages {
		if failed != nil && m.Kind == MsgAck {
			continue // as the driver: its connections are all closed
		}
		s.logf("B%d -> %v %d/%d %s", b.inc, m.Kind, m.Session, m.Seq, m.Reason)
		switch m.Kind {
		case MsgAck:
			if !b.has || m.Seq != b.seq || !b.sessFull[m.Session] || m.Seq < b.lastAck[m.Session] {
				s.failf("ack %d on %d: committed %v %d, full %v, last ack %d", m.Seq, m.Session, b.has, b.seq, b.sessFull[m.Session], b.lastAck[m.Session])
			}
			b.lastAck[m.Session] = m.Seq
		case MsgNeedFull:
			s.st.needFulls++
			if s.prof.name == "clean" {
				s.failf("clean: need-full: %s", m.Reason)
			}
		}
		if c := s.conns[m.Session]; c != nil && c.bInc == b.inc && c.bOpen {
			s.sendB2P(c, m)
			if m.Kind == MsgReject || m.Kind == MsgReleased {
				s.backupClose(c)
			}
		}
	}
	for _, d := range rd.DropSession {
		s.logf("B%d drops %d: %s", b.inc, d.Session, d.Reason)
		if c := s.conns[d.Session]; c != nil && c.bInc == b.inc {
			s.backupClose(c)
		}
	}
	if rd.Failover {
		s.logf("B%d FAILS OVER to %d (primary alive %v)", b.inc, b.seq, s.p.alive)
		switch {
		case b.failedOver:
			s.failf("second failover")
		case !b.has:
			s.failf("failover with nothing committed")
		case s.now-b.heard < s.cfg.Timeout:
			s.failf("failover %v after the primary was heard", s.now-b.heard)
		case s.maxProtRel > b.seq:
			s.failf("output of epoch %d released under protection; failover runs checkpoint %d", s.maxProtRel, b.seq)
		case s.prof.name == "clean":
			s.failf("clean: failover")
		}
		for _, o := range s.outs {
			// Released without the backup, before a message the backup
			// then heard from its primary: the backup was told, and
			// must not resume a state without it. (Released unheard,
			// in a partition, is Remus's split brain, left to fencing.)
			if o.released && !o.protected && o.epoch > b.seq && o.releasedAt < b.heardSent {
				s.failf("failover to %d, but output of epoch %d left unprotected at %v, before a message of the primary the backup heard (sent %v)",
					b.seq, o.epoch, o.releasedAt, b.heardSent)
				break
			}
		}
		if s.p.alive && s.prof.name == "flapping" {
			// No partition, no crash, no loss: the two always reach
			// each other, so this is two copies of the VM running.
			s.failf("flapping: failover to %d while the primary runs", b.seq)
		}
		b.failedOver, s.failedOver, s.failoverSeq = true, true, b.seq
		if s.p.alive {
			s.st.failoversAlive++
			s.st.failoversAliveBy[s.prof.name]++
		} else {
			s.st.failoversDead++
		}
	}
	if rd.Wake <= s.now {
		s.failf("backup Wake %v", rd.Wake)
	}
	b.wakeGen++
	if rd.Wake != Never {
		gen := b.wakeGen
		s.at(rd.Wake, func() {
			if s.b == b && b.wakeGen == gen {
				s.bstep(Tick{s.now})
			}
		})
	}
	if failed != nil && !rd.Failover {
		if c := s.conns[failed.Session]; c != nil && c.bInc == b.inc {
			s.backupClose(c)
		}
		s.bstep(*failed)
		if got := b.e.Committed(); (got != 0) != b.has || b.has && got != b.seq {
			s.failf("after the failed commit of %d the engine says %d is committed; the copy holds %v %d", failed.Seq, got, b.has, b.seq)
		}
	}
}

func TestSimulation(t *testing.T) {
	seed := simParam(*simSeed, *simSeed >= 0, "REMUS_SIM_SEED", -1)
	seeds := simParam(int64(*simSeeds), *simSeeds > 0, "REMUS_SIM_SEEDS", 600)
	steps := int(simParam(int64(*simSteps), *simSteps > 0, "REMUS_SIM_STEPS", 4000))
	if testing.Short() && seed < 0 {
		seeds = min(seeds, 100)
	}
	if seed >= 0 {
		st := &simStats{profiles: map[string]int{}, failoversAliveBy: map[string]int{}}
		trace, err := runSim(seed, steps, true, st)
		if err != nil {
			if n := len(trace) - 400; n > 0 && os.Getenv("REMUS_SIM_FULLTRACE") == "" {
				trace = append([]string{fmt.Sprintf("... %d lines (all: REMUS_SIM_FULLTRACE=1)", n)}, trace[n:]...)
			}
			t.Fatalf("seed %d: %v\ntrace:\n%s", seed, err, strings.Join(trace, "\n"))
		}
		t.Logf("seed %d: %d episodes %v, %d steps", seed, st.episodes, st.profiles, st.steps)
		return
	}
	start := time.Now()
	total := &simStats{}
	var mu sync.Mutex
	var failed []int64
	next := int64(0)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				next++
				seed := next
				mu.Unlock()
				if seed > seeds {
					return
				}
				st := &simStats{profiles: map[string]int{}, failoversAliveBy: map[string]int{}}
				_, err := runSim(seed, steps, false, st)
				total.add(st)
				if err != nil {
					mu.Lock()
					failed = append(failed, seed)
					mu.Unlock()
					t.Errorf("seed %d: %v\n  rerun with its trace: go test ./remus/engine -run TestSimulation -sim.seed=%d", seed, err, seed)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d seeds, %d episodes %v, %d steps in %v", total.seeds, total.episodes, total.profiles, total.steps, time.Since(start).Round(time.Millisecond))
	t.Logf("checkpoints %d (full %d), need-full %d, primary drops %d, unprotected %d (backup given up %d), fenced %d",
		total.checkpoints, total.fulls, total.needFulls, total.drops, total.unprotected, total.givenUp, total.fenced)
	t.Logf("crashes: primary %d, backup %d; failovers: primary dead %d, alive %d %v; backup idle resets %d; commits that failed %d",
		total.primaryCrashes, total.backupCrashes, total.failoversDead, total.failoversAlive, total.failoversAliveBy, total.idleResets, total.commitFails)
	if total.episodes >= 100 && total.commitFails == 0 {
		t.Error("no commit failed: CommitFailed was not exercised")
	}
	t.Logf("outputs %d: released protected %d, unprotected %d; clean max latency %v",
		total.outs, total.released, total.releasedUnprotected, total.maxCleanLatency)
}
