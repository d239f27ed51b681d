package remus

import (
	"sync"
	"sync/atomic"

	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/wasi"
)

// holdGate is the primary's output gate: output commit. Every externally
// visible effect of epoch N — bytes to sockets and stdio, shutdowns,
// socket closes — is copied and held until the backup has acknowledged
// checkpoint N, then performed in order. The guest is told at once that its
// write succeeded, exactly as if the bytes sat in a kernel buffer.
//
// Filesystem mutations cannot wait (the guest must read its own writes), so
// they happen at once on the primary's disk and are journaled, by
// description, into the epoch's disk ops, which travel with checkpoint N and
// are applied on the backup only when N commits.
//
// The guest goroutine calls Output; the driver switches epochs while the
// guest is paused (also on the guest goroutine) and releases from its own
// goroutine.
type holdGate struct {
	mu        sync.Mutex
	cond      *sync.Cond
	epoch     uint64 // the epoch outputs are tagged with now
	held      []heldOutput
	heldBytes int
	pass      bool // unprotected: outputs leave at once
	waiting   bool // output is waiting in the current epoch (reported once)
	closed    bool
	// draining says a drain is performing outputs it took: new output
	// queues behind them even in pass-through. performMu makes drains
	// take turns, so that outputs leave one at a time, in order.
	draining  bool
	performMu sync.Mutex

	// ops is the current epoch's disk journal; guest goroutine only.
	// journaled is its size, read by other goroutines too (the stall's
	// end).
	ops       []wire.FsOp
	journaled atomic.Int64

	// onOutput is told of the first held output of each epoch (the output
	// epoch policy ends the epoch early); onOverLimit when held bytes pass
	// the limit (back-pressure: the driver pauses the guest until acks
	// release enough).
	onOutput    func()
	onOverLimit func()
	// onQueued is told of output queued in pass-through behind a drain
	// or held outputs: a drain must take it (the driver's releaser).
	onQueued func()
	limit    int

	// Counters, under mu.
	releasedBytes uint64
	heldTotal     uint64
}

type heldOutput struct {
	epoch   uint64
	data    []byte
	perform wasi.Perform
}

func newHoldGate(limit int) *holdGate {
	g := &holdGate{epoch: 1, limit: limit}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// Output implements wasi.OutputGate.
func (g *holdGate) Output(e wasi.Effect, perform wasi.Perform) (uint32, wasi.Errno) {
	if e.Kind == wasi.EffectFs {
		n, errno := perform(e.Data)
		g.mu.Lock()
		pass := g.pass
		g.mu.Unlock()
		switch {
		case pass:
			// Unprotected: the next checkpoint, of the next session,
			// is full and carries the directories whole. A journal kept
			// meanwhile would only grow: every byte the guest writes,
			// for as long as the backup is away.
			g.ops = nil
			g.journaled.Store(0)
		case errno == wasi.ESUCCESS:
			g.journal(e, n)
			// The journal is held like output until its checkpoint is
			// taken: past the limit, end the epoch, and stall the guest
			// until one can be (a slow backup holds epochs open).
			if g.limit > 0 && g.journalBytes() > g.limit && g.onOverLimit != nil {
				g.onOverLimit()
			}
		}
		return n, errno
	}
	g.mu.Lock()
	if g.pass && len(g.held) == 0 && !g.draining {
		g.mu.Unlock()
		return perform(e.Data)
	}
	later := perform
	if e.Later != nil {
		later = e.Later
	}
	data := append([]byte(nil), e.Data...)
	g.held = append(g.held, heldOutput{epoch: g.epoch, data: data, perform: later})
	g.heldBytes += len(data)
	g.heldTotal += uint64(len(data))
	first := !g.waiting && !g.pass
	g.waiting = true
	over := g.limit > 0 && g.heldBytes > g.limit
	queued := g.pass
	g.mu.Unlock()
	if queued && g.onQueued != nil {
		g.onQueued()
	}
	if first && g.onOutput != nil {
		g.onOutput()
	}
	if over && g.onOverLimit != nil {
		g.onOverLimit()
	}
	return uint32(len(data)), wasi.ESUCCESS
}

// outputWaiting says output of the running epoch is held.
func (g *holdGate) outputWaiting() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

// journal records a performed filesystem mutation for the backup. A write
// records what was actually written.
func (g *holdGate) journal(e wasi.Effect, n uint32) {
	op := wire.FsOp{Op: uint8(e.Op), Root: uint32(e.Root), Path: e.Path, Root2: uint32(e.Root2), Path2: e.Path2,
		Offset: e.Offset, Size: e.Size, Flags: e.Flags}
	if e.Op == wasi.FsWrite {
		if int(n) < len(e.Data) {
			e.Data = e.Data[:n]
		}
		op.Data = append([]byte(nil), e.Data...)
		op.Size = int64(len(op.Data))
	}
	g.ops = append(g.ops, op)
	g.journaled.Add(int64(op.HeldBytes()))
}

// journalBytes is the size of the running epoch's disk journal.
func (g *holdGate) journalBytes() int { return int(g.journaled.Load()) }

// endEpoch closes the current epoch (the guest is paused) and returns its
// number and disk journal; outputs from now on belong to the next epoch.
func (g *holdGate) endEpoch() (epoch uint64, ops []wire.FsOp) {
	g.mu.Lock()
	epoch = g.epoch
	g.epoch++
	g.waiting = false
	g.mu.Unlock()
	ops, g.ops = g.ops, nil
	g.journaled.Store(0)
	return epoch, ops
}

// setEpoch sets the number of the running epoch (the first checkpoint of a
// primary is 1; the engine decides).
func (g *holdGate) setEpoch(n uint64) {
	g.mu.Lock()
	g.epoch = n
	g.mu.Unlock()
}

// drain performs the held outputs of epochs up to upTo (all of them with
// all), in order, and those queued meanwhile, until none is left to take.
// Drains take turns, and while one runs, output in pass-through queues
// behind it: a write sent at once on the guest's goroutine would overtake
// the ones being sent (or its close cut them short, or the descriptor's
// number, reused, send their rest to another client).
func (g *holdGate) drain(upTo uint64, all bool) {
	g.performMu.Lock()
	defer g.performMu.Unlock()
	for {
		g.mu.Lock()
		out := g.take(upTo, all)
		g.draining = len(out) > 0
		g.mu.Unlock()
		if len(out) == 0 {
			return
		}
		for _, h := range out {
			h.perform(h.data)
		}
	}
}

// take removes and returns the held outputs of epochs up to upTo (all of
// them with all), in order, for drain to perform. g.mu is held.
func (g *holdGate) take(upTo uint64, all bool) []heldOutput {
	i := 0
	for i < len(g.held) && (all || g.held[i].epoch <= upTo) {
		g.heldBytes -= len(g.held[i].data)
		g.releasedBytes += uint64(len(g.held[i].data))
		i++
	}
	out := append([]heldOutput(nil), g.held[:i]...)
	g.held = append(g.held[:0], g.held[i:]...)
	g.cond.Broadcast()
	return out
}

// setPass switches pass-through (unprotected) on or off. Turning it off
// means a new backup is syncing: outputs are held again.
func (g *holdGate) setPass(on bool) {
	g.mu.Lock()
	g.pass = on
	g.cond.Broadcast()
	g.mu.Unlock()
}

// overLimitOld says held output is over the limit and some of it belongs
// to an epoch already checkpointed (so acks can release it). Output of the
// running epoch alone never stalls the guest: only its checkpoint, at the
// next safe point, can release it.
func (g *holdGate) overLimitOld() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.overLimitOldLocked()
}

func (g *holdGate) overLimitOldLocked() bool {
	return g.limit > 0 && !g.pass && !g.closed && g.heldBytes > g.limit && len(g.held) > 0 && g.held[0].epoch < g.epoch
}

// waitBelow blocks (the guest is paused) while overLimitOld holds, until
// stop, or until over says to stop waiting (checked at each nudge).
func (g *holdGate) waitBelow(stop <-chan struct{}, over func() bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.overLimitOldLocked() && (over == nil || !over()) {
		select {
		case <-stop:
			return
		default:
		}
		g.cond.Wait()
	}
}

// nudge wakes waitBelow to check its over again.
func (g *holdGate) nudge() {
	g.mu.Lock()
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *holdGate) close() {
	g.mu.Lock()
	g.closed = true
	g.cond.Broadcast()
	g.mu.Unlock()
}

// stats returns bytes held now, released so far and held in all.
func (g *holdGate) stats() (held int, released, total uint64, epoch uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.heldBytes, g.releasedBytes, g.heldTotal, g.epoch
}
