package machine

import (
	"log/slog"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The Go garbage collector stops the world twice a cycle, and a stop waits
// until every goroutine reaches a point where Go can stop it. A goroutine
// running guest code compiled by wazero never does: the stop waits for the
// guest's next host call, and the whole process — every other goroutine —
// stands still meanwhile. A guest computing for seconds without a host call
// froze a Remus primary for longer than the heartbeat timeout: the backup
// failed over while the primary, waking, took the backup for dead and
// carried on (two copies of the guest serving).
//
// CollectAtSafePoints turns Go's own collection pacing off and runs every
// cycle on a guest's goroutine while it is in Go code, for the whole cycle:
// at the start of a host call, or inside a blocked poll_oneoff (the steward
// wakes the wait for it, and the wait goes on afterwards). Both of the
// cycle's stops then find the guest stopped. With no guest running the
// steward collects itself (and no guest starts meanwhile). The steward paces
// as the GOGC variable says (100 unless set; off: only GOMEMLIMIT, if set,
// makes the runtime collect): a cycle once the heap holds that percentage more than the last
// one left live (at least 4 MiB more). If a guest computes on without host
// calls while the heap grows past that by gcBackstop, it collects anyway:
// better a freeze than running out of memory. (With several guests in one
// process, a cycle run on one guest's goroutine still waits for the others
// to make a host call.)

var steward = struct {
	once    sync.Once
	on      atomic.Bool   // CollectAtSafePoints was called
	wanted  atomic.Bool   // a cycle is due: the next host call runs it
	done    chan struct{} // a cycle ran at a host call
	mu      sync.Mutex
	running map[*Machine]struct{} // machines whose guest is running
	cycles  atomic.Uint64         // cycles run on a guest's goroutine
	alone   atomic.Uint64         // cycles run with no guest running
	forced  atomic.Uint64         // cycles run past the backstop
}{done: make(chan struct{}, 1), running: map[*Machine]struct{}{}}

// gcBackstop is how far past its pacing goal the heap may grow while every
// running guest computes without host calls, before the steward collects
// regardless.
const gcBackstop = 256 << 20

// The steward looks at the heap again in a quarter of the time it would
// take to reach the goal at its latest rate of growth, within gcPollMin
// and gcPollMax (an idle process wakes once a second). It sets no memory
// limit of its own (a full checkpoint of a large guest stages that much
// memory at once, legitimately); a GOMEMLIMIT the user set still holds.
const (
	gcPollMin = 10 * time.Millisecond
	gcPollMax = time.Second
)

// CollectAtSafePoints makes garbage collection wait for safe points (see
// above), for the rest of the process. A program that runs guests calls it
// once at start; a library leaves the choice to its program.
func CollectAtSafePoints() {
	steward.once.Do(func() {
		steward.on.Store(true)
		debug.SetGCPercent(-1)
		go stewardLoop()
	})
}

// collectAtHostCall runs on a guest's goroutine at the start of a host call.
func collectAtHostCall() {
	if steward.wanted.CompareAndSwap(true, false) {
		runtime.GC()
		steward.cycles.Add(1)
		select {
		case steward.done <- struct{}{}:
		default:
		}
	}
}

// guestRunning records whether m's guest may be running. A guest does not
// start while the steward collects on its own goroutine.
func guestRunning(m *Machine, running bool) {
	if !steward.on.Load() {
		return
	}
	steward.mu.Lock()
	defer steward.mu.Unlock()
	if running {
		steward.running[m] = struct{}{}
	} else {
		delete(steward.running, m)
	}
}

// GCCycles is how many garbage collections ran on a guest's goroutine
// (CollectAtSafePoints).
func GCCycles() uint64 { return steward.cycles.Load() }

// GCStats says how the process collects garbage, for GET /vm.
type GCStats struct {
	// AtSafePoints: CollectAtSafePoints is in force.
	AtSafePoints bool `json:"at_safe_points"`
	// OnGuest counts cycles run on a guest's goroutine, Alone those run
	// with no guest running, Forced those run while a guest computed
	// because the heap passed the backstop (each may have frozen the
	// process until that guest's next host call).
	OnGuest uint64 `json:"cycles_on_guest"`
	Alone   uint64 `json:"cycles_alone"`
	Forced  uint64 `json:"cycles_forced"`
}

// ReadGCStats returns the process's figures so far.
func ReadGCStats() GCStats {
	return GCStats{AtSafePoints: steward.on.Load(), OnGuest: steward.cycles.Load(), Alone: steward.alone.Load(),
		Forced: steward.forced.Load()}
}

// collectAlone collects on the steward's goroutine if no guest is running,
// holding off any guest's start until the cycle is over.
func collectAlone() bool {
	steward.mu.Lock()
	defer steward.mu.Unlock()
	if len(steward.running) > 0 {
		return false
	}
	runtime.GC()
	steward.alone.Add(1)
	return true
}

// kickWaiting wakes the guests blocked in poll_oneoff, which then collect
// (collectAtHostCall runs where their wait wakes up).
func kickWaiting() {
	steward.mu.Lock()
	defer steward.mu.Unlock()
	for m := range steward.running {
		if m.dev.Waiting() {
			m.dev.Interrupt()
		}
	}
}

// gcPercent is GOGC as the runtime reads it: 100 unless set, -1 for off.
func gcPercent() int {
	switch v := os.Getenv("GOGC"); {
	case v == "":
		return 100
	case v == "off":
		return -1
	default:
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
		return 100
	}
}

func stewardLoop() {
	samples := []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/gc/heap/live:bytes"},
	}
	heap := func() uint64 {
		metrics.Read(samples[:1])
		return samples[0].Value.Uint64()
	}
	percent := gcPercent()
	// paced is the goal after a cycle.
	paced := func() uint64 {
		metrics.Read(samples[1:2])
		live := samples[1].Value.Uint64()
		if percent < 0 {
			return math.MaxInt64 / 2
		}
		return max(live+live*uint64(percent)/100, live+4<<20)
	}
	next := paced()
	every := gcPollMin
	last := heap()
	for {
		time.Sleep(every)
		h := heap()
		if h < next {
			// Look again in about a quarter of the time the heap would
			// take to reach the goal at its latest rate.
			slept := every
			every = gcPollMax
			if h > last {
				eta := time.Duration(float64(slept) * float64(next-h) / float64(h-last))
				every = min(max(eta/4, gcPollMin), gcPollMax)
			}
			last = h
			continue
		}
		every = gcPollMin
		if collectAlone() {
			next, last = paced(), heap()
			continue
		}
		// A guest's goroutine collects: at its next host call, or in its
		// wait once woken. Past the backstop, here.
		steward.wanted.Store(true)
		kickWaiting()
		for served := false; !served; {
			select {
			case <-steward.done:
				served = true
				continue
			case <-time.After(gcPollMin):
			}
			if h := heap(); h < next+gcBackstop {
				kickWaiting() // a guest that blocked since
				continue
			}
			if !steward.wanted.CompareAndSwap(true, false) {
				<-steward.done // a guest took it meanwhile
				break
			}
			slog.Debug("garbage collection while a guest runs: the heap passed its backstop (if the guest is computing, the process stands still until its next host call)",
				"goal", next)
			runtime.GC()
			steward.forced.Add(1)
			served = true
		}
		next, last = paced(), heap()
	}
}
