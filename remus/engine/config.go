package engine

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// Time is a virtual instant: a duration since an origin the driver picks.
// The engines never read a clock; every event carries its Time, so a test
// can run hours of protocol in microseconds and replay it exactly.
type Time = time.Duration

// Never is the Wake of an engine that wants no Tick.
const Never Time = math.MaxInt64

// Policy decides when an epoch ends.
type Policy uint8

const (
	// PolicyOutput ends an epoch after Epoch, or sooner when output is
	// waiting for it (at once if the guest goes idle, else rate-limited
	// by MinEpoch): held output is latency the client sees, so an epoch
	// with none can run long and one with some should not. The zero
	// value, because it is what a server wants.
	PolicyOutput Policy = iota
	// PolicyFixed ends every epoch after Epoch, as in the Remus paper.
	PolicyFixed
)

func (p Policy) String() string {
	switch p {
	case PolicyOutput:
		return "output"
	case PolicyFixed:
		return "fixed"
	}
	return fmt.Sprintf("Policy(%d)", uint8(p))
}

// Config is shared by the primary and the backup: both sides must agree on
// Timeout, or one would declare the other failed first.
type Config struct {
	// Epoch is the longest an epoch runs before its checkpoint (25ms).
	Epoch time.Duration
	// Policy decides when an epoch ends (PolicyOutput).
	Policy Policy
	// MinEpoch is, under PolicyOutput, the rate limit on epochs ended by
	// waiting output while the guest keeps running: a token bucket, a
	// burst of 4 then one per MinEpoch, so a saturated server is not
	// checkpointed after every write. A guest that goes idle with output
	// waiting (GuestIdle) is checkpointed at once (2ms, at most Epoch).
	MinEpoch time.Duration
	// HeartbeatInterval is how often each side sends a heartbeat while a
	// session is up (Timeout/5: four may be lost or late before the
	// peer's Timeout).
	HeartbeatInterval time.Duration
	// Timeout is the silence after which the peer is taken as failed:
	// the primary stops protecting, the backup fails over (500ms).
	Timeout time.Duration
	// AckTimeout is how long the oldest checkpoint in flight may stay
	// unacknowledged while the backup is otherwise heard before the
	// primary drops the session and resynchronizes: a stream that lost a
	// checkpoint, or a backup stuck applying one, would otherwise hold
	// output forever while heartbeats say all is well. It must exceed
	// the time to stream and apply the largest full checkpoint (10s).
	AckTimeout time.Duration
	// MaxInflight is how many checkpoints may be taken and not yet
	// acknowledged; at the limit the epoch stretches instead (4).
	MaxInflight int
}

// pace is an engine's heartbeat timing against its peer. Each side has
// its own Timeout, and says it in the handshake (Hello, and the backup's
// Welcome, which the primary steps as Connected): a peer's shorter one
// sets the pace. Heartbeats then go every fifth of it, or a backup with
// a 300 ms timeout would fail over a live primary that heartbeats every
// 4 s for its own 20 s while nothing else flows (a stalled guest); and a
// step gap counts as standing still once that peer may have given this
// side up.
type pace struct {
	every Time // heartbeats and Ticks at least this often
	still Time // a step gap at least this long is standing still
}

// paceFor is the pace against a peer whose Timeout is peer (0: not
// known, own timing).
func (c Config) paceFor(peer Time) pace {
	every, timeout := c.HeartbeatInterval, c.Timeout
	if peer > 0 {
		every, timeout = min(every, max(peer/5, 1)), min(timeout, peer)
	}
	return pace{every: every, still: timeout - every}
}

// stoodStill says whether an engine not stepped for gap, though it wants
// a Tick every heartbeat interval, stood still long enough for its peer to
// have heard nothing for its timeout (its heartbeats did not leave either).
func (p pace) stoodStill(gap Time) bool { return gap >= p.still }

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if c.Epoch == 0 {
		c.Epoch = 25 * time.Millisecond
	}
	if c.MinEpoch == 0 {
		c.MinEpoch = min(2*time.Millisecond, c.Epoch)
	}
	if c.Timeout == 0 {
		c.Timeout = 500 * time.Millisecond
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = c.Timeout / 5
	}
	if c.AckTimeout == 0 {
		c.AckTimeout = 10 * time.Second
	}
	if c.MaxInflight == 0 {
		c.MaxInflight = 4
	}
	return c
}

// Validate reports the first field out of range. Zero fields are errors:
// call WithDefaults first (NewPrimary and NewBackup do).
func (c Config) Validate() error {
	switch {
	case c.Epoch <= 0:
		return errors.New("remus: Epoch must be positive")
	case c.Policy != PolicyOutput && c.Policy != PolicyFixed:
		return fmt.Errorf("remus: unknown %v", c.Policy)
	case c.MinEpoch <= 0 || c.MinEpoch > c.Epoch:
		return fmt.Errorf("remus: MinEpoch %v must be positive and at most Epoch %v", c.MinEpoch, c.Epoch)
	case c.Timeout <= 0:
		return errors.New("remus: Timeout must be positive")
	case c.HeartbeatInterval <= 0 || c.HeartbeatInterval >= c.Timeout:
		return fmt.Errorf("remus: HeartbeatInterval %v must be positive and below Timeout %v", c.HeartbeatInterval, c.Timeout)
	case c.AckTimeout <= 0:
		return errors.New("remus: AckTimeout must be positive")
	case c.MaxInflight < 1:
		return errors.New("remus: MaxInflight must be at least 1")
	}
	return nil
}
