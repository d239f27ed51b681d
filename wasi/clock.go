package wasi

import (
	"sync/atomic"
	"time"
)

// HostClock is the host's time source, replaceable for tests.
type HostClock interface {
	// Realtime is nanoseconds since the Unix epoch.
	Realtime() int64
	// Monotonic is nanoseconds on a host clock that never goes backwards.
	Monotonic() int64
}

type realClock struct{ start time.Time }

func (realClock) Realtime() int64    { return time.Now().UnixNano() }
func (c realClock) Monotonic() int64 { return int64(time.Since(c.start)) }

// Clock is the guest's view of time. Its monotonic clock is virtual: it counts
// from Base, which a restored VM carries over from its snapshot, so guest
// monotonic time never goes backwards even on another host.
type Clock struct {
	host HostClock
	// base is the guest monotonic time at hostStart.
	base      atomic.Int64
	hostStart int64
	// last is the greatest monotonic value handed out, to keep it monotonic
	// even if the state is rebased.
	last atomic.Int64
}

func newClock(h HostClock) *Clock {
	if h == nil {
		h = realClock{start: time.Now()}
	}
	c := &Clock{host: h}
	c.hostStart = h.Monotonic()
	return c
}

// Monotonic is the guest's monotonic time in nanoseconds.
func (c *Clock) Monotonic() uint64 {
	v := c.base.Load() + (c.host.Monotonic() - c.hostStart)
	for {
		last := c.last.Load()
		if v <= last {
			return uint64(last)
		}
		if c.last.CompareAndSwap(last, v) {
			return uint64(v)
		}
	}
}

// Realtime is wall-clock time in nanoseconds since the epoch.
func (c *Clock) Realtime() uint64 { return uint64(c.host.Realtime()) }

// SetMonotonic makes the guest's monotonic clock continue from now (used on
// restore). It never moves the clock backwards.
func (c *Clock) SetMonotonic(now uint64) {
	c.hostStart = c.host.Monotonic()
	c.base.Store(int64(now))
	if int64(now) > c.last.Load() {
		c.last.Store(int64(now))
	}
}

// Clock exposes the guest clock (for snapshot and restore).
func (d *Devices) Clock() *Clock { return d.clock }

const (
	monotonicResolution = 1    // ns
	realtimeResolution  = 1000 // ns: what the guest can rely on across hosts
)

func clockResGet(d *Devices, m Mem, p []uint64) Errno {
	var res uint64
	switch uint32(p[0]) {
	case ClockRealtime:
		res = realtimeResolution
	case ClockMonotonic, ClockProcessCputimeID, ClockThreadCputimeID:
		res = monotonicResolution
	default:
		return EINVAL
	}
	if !m.PutU64(uint32(p[1]), res) {
		return EFAULT
	}
	return ESUCCESS
}

// clock_time_get. The CPU-time clocks report the guest's monotonic time: a
// guest is one thread that runs whenever it is not waiting, and the host
// process's own CPU time would not survive a restore.
func clockTimeGet(d *Devices, m Mem, p []uint64) Errno {
	var v uint64
	switch uint32(p[0]) {
	case ClockRealtime:
		v = d.clock.Realtime()
	case ClockMonotonic, ClockProcessCputimeID, ClockThreadCputimeID:
		v = d.clock.Monotonic()
	default:
		return EINVAL
	}
	if !m.PutU64(uint32(p[2]), v) {
		return EFAULT
	}
	d.input(Input{Kind: InputClock, Call: CallClockTimeGet, Fd: -1, Value: v})
	return ESUCCESS
}
