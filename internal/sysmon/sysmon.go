// Package sysmon lengthens the sleeps of the Go runtime's system monitor.
//
// sysmon is a runtime thread that wakes every 20 µs while any goroutine
// runs, to hand processors of goroutines blocked in system calls to others
// and to preempt long-running ones. Under replication load it never backs
// off (some processor is in a system call at almost every wake-up), and on
// a paravirtualised machine each wake-up costs a world switch: measured
// here, it was 11% of a Remus primary's CPU and 15% of its backup's, about a
// tenth of a two-core machine. Go has no setting for it, but the kernel
// rounds a thread's sleeps up by that thread's timer slack, so giving the
// monitor's thread alone a slack of a millisecond or so makes it wake at
// most about once per slack. What it costs: a goroutine waiting for a
// processor held by a blocking system call may wait up to the slack longer,
// and a guest computing without host calls is asked to yield a little later
// (it cannot yield before its next host call anyway).
package sysmon

import (
	"sync/atomic"
	"time"
)

// Status says what Relax achieved, for status reports.
type Status struct {
	// TID is the monitor's thread once found, 0 before.
	TID int `json:"tid,omitempty"`
	// SlackNS is the slack set on it, 0 if none was.
	SlackNS int64 `json:"slack_ns,omitempty"`
	// Err is why it was not set (not found yet, no permission, not Linux).
	Err string `json:"error,omitempty"`
}

var state atomic.Pointer[Status]

// Read returns what Relax has done so far.
func Read() Status {
	if s := state.Load(); s != nil {
		return *s
	}
	return Status{Err: "not requested"}
}

func set(s Status) { state.Store(&s) }

// DefaultSlack is what Relax(0) sets: the monitor then wakes at most about
// 500 times a second (more when other timers end its sleeps early), and it
// is short against the 10 ms the runtime itself waits before preempting a
// goroutine.
const DefaultSlack = 2 * time.Millisecond
