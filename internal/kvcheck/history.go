// Package kvcheck checks that the KV guest (testdata/guests/kvserver) behaves
// like one linearizable register per key, also across crashes and failovers.
//
// A Workload runs concurrent clients against one or more server addresses
// and records a History: every request with its call and return time and
// its result. History.Check feeds it to the porcupine linearizability
// checker (partitioned by key); VerifyAcknowledged is a simpler end-state
// check that no acknowledged write was lost.
//
// A request whose outcome is unknown (timeout, connection reset before the
// reply) is recorded with return time Infinity: it may have taken effect at
// any moment after its call, or never. That is not a failure; only results
// that no order of the operations can explain are.
package kvcheck

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// Kind is a request type.
type Kind uint8

const (
	Get Kind = iota
	Set
	Del
)

func (k Kind) String() string {
	switch k {
	case Get:
		return "GET"
	case Set:
		return "SET"
	case Del:
		return "DEL"
	}
	return fmt.Sprintf("Kind(%d)", k)
}

// Outcome says what became of a request.
type Outcome uint8

const (
	// OK: the server answered (OK, VALUE or NOTFOUND).
	OK Outcome = iota
	// Unknown: no answer (timeout, reset); the request may or may not have
	// taken effect. Return is Infinity.
	Unknown
	// Failed: the server answered ERR or something unparsable; the request
	// took no effect. Failed operations are not checked, only counted.
	Failed
)

func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case Unknown:
		return "unknown"
	case Failed:
		return "failed"
	}
	return fmt.Sprintf("Outcome(%d)", o)
}

// Infinity is the return time of an operation whose outcome is unknown.
const Infinity = time.Duration(math.MaxInt64)

// Op is one request of a history. Times are since History.Start, on the
// monotonic clock.
type Op struct {
	Client  int
	Kind    Kind
	Key     string
	Value   string // SET: the value written; GET: the value read, if Found
	Found   bool   // GET: the key had a value (VALUE rather than NOTFOUND)
	Call    time.Duration
	Return  time.Duration // Infinity when Outcome is Unknown
	Outcome Outcome
	Err     string // why the outcome is Unknown or Failed
}

func (o Op) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "client %d: %s %s", o.Client, o.Kind, o.Key)
	if o.Kind == Set {
		fmt.Fprintf(&b, " %s", o.Value)
	}
	switch {
	case o.Outcome == Unknown:
		b.WriteString(" -> ?")
	case o.Outcome == Failed:
		b.WriteString(" -> failed")
	case o.Kind == Get && o.Found:
		fmt.Fprintf(&b, " -> VALUE %s", o.Value)
	case o.Kind == Get:
		b.WriteString(" -> NOTFOUND")
	default:
		b.WriteString(" -> OK")
	}
	fmt.Fprintf(&b, " [%s, %s]", fmtTime(o.Call), fmtTime(o.Return))
	if o.Err != "" {
		fmt.Fprintf(&b, " (%s)", o.Err)
	}
	return b.String()
}

func fmtTime(d time.Duration) string {
	if d == Infinity {
		return "inf"
	}
	return fmt.Sprintf("%.6fs", d.Seconds())
}

// History is a record of operations. It is safe for concurrent use.
type History struct {
	// Start is time zero of every Op's Call and Return.
	Start time.Time
	// Dials and DialErrors count the connections a Workload made and the
	// attempts that failed.
	Dials, DialErrors int

	mu  sync.Mutex
	ops []Op
}

// NewHistory starts an empty history at time.Now().
func NewHistory() *History { return &History{Start: time.Now()} }

// Now is the time since Start.
func (h *History) Now() time.Duration { return time.Since(h.Start) }

// Add records an operation. An Unknown operation's Return is set to
// Infinity.
func (h *History) Add(ops ...Op) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, op := range ops {
		if op.Outcome == Unknown {
			op.Return = Infinity
		}
		h.ops = append(h.ops, op)
	}
}

// Ops returns a copy of the operations, ordered by call time.
func (h *History) Ops() []Op {
	h.mu.Lock()
	ops := slices.Clone(h.ops)
	h.mu.Unlock()
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].Call < ops[j].Call })
	return ops
}

// Len is the number of operations.
func (h *History) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ops)
}

// Counts summarises a history.
type Counts struct {
	Ops                 int // all operations
	OK, Unknown, Failed int // by outcome
	Gets, Sets, Dels    int // by kind
	AckedWrites         int // SET and DEL with outcome OK
	Keys                int // distinct keys
}

func (c Counts) String() string {
	return fmt.Sprintf("%d ops (%d GET, %d SET, %d DEL) on %d keys: %d ok, %d unknown, %d failed; %d acknowledged writes",
		c.Ops, c.Gets, c.Sets, c.Dels, c.Keys, c.OK, c.Unknown, c.Failed, c.AckedWrites)
}

// Counts counts the operations by outcome and kind.
func (h *History) Counts() Counts {
	h.mu.Lock()
	defer h.mu.Unlock()
	var c Counts
	keys := map[string]bool{}
	for _, op := range h.ops {
		c.Ops++
		keys[op.Key] = true
		switch op.Outcome {
		case OK:
			c.OK++
			if op.Kind != Get {
				c.AckedWrites++
			}
		case Unknown:
			c.Unknown++
		case Failed:
			c.Failed++
		}
		switch op.Kind {
		case Get:
			c.Gets++
		case Set:
			c.Sets++
		case Del:
			c.Dels++
		}
	}
	c.Keys = len(keys)
	return c
}

// Acknowledged returns every write (SET or DEL) the server answered OK,
// ordered by call time.
func (h *History) Acknowledged() []Op {
	var out []Op
	for _, op := range h.Ops() {
		if op.Kind != Get && op.Outcome == OK {
			out = append(out, op)
		}
	}
	return out
}

// Keys returns the distinct keys of the history, sorted.
func (h *History) Keys() []string {
	h.mu.Lock()
	seen := map[string]bool{}
	var keys []string
	for _, op := range h.ops {
		if !seen[op.Key] {
			seen[op.Key] = true
			keys = append(keys, op.Key)
		}
	}
	h.mu.Unlock()
	sort.Strings(keys)
	return keys
}

// LostWritesError is what VerifyAcknowledged returns when the server's
// state contradicts acknowledged writes.
type LostWritesError struct {
	Keys       int      // keys read
	Violations []string // one line per bad key
}

func (e *LostWritesError) Error() string {
	const show = 20
	var b strings.Builder
	fmt.Fprintf(&b, "%d of %d keys contradict acknowledged writes", len(e.Violations), e.Keys)
	for i, v := range e.Violations {
		if i == show {
			fmt.Fprintf(&b, "\n  ... and %d more", len(e.Violations)-show)
			break
		}
		b.WriteString("\n  ")
		b.WriteString(v)
	}
	return b.String()
}

// VerifyAcknowledged reads every key of the history with read (after the
// workload has finished) and checks that no acknowledged write was lost:
// the value read must come from a write (acknowledged or unknown) that no
// acknowledged write started after it had returned, i.e. the last
// acknowledged write of the key or one that may have been applied after it.
// NOTFOUND is allowed only when no acknowledged write exists for the key or
// it comes from such a DEL. A read error stops the check and is returned.
//
// This is implied by linearizability when the final reads are part of the
// history (see Workload.ReadBack and History.Check); it is cheaper, and its
// report names the lost write.
func VerifyAcknowledged(h *History, read func(key string) (value string, found bool, err error)) error {
	byKey := map[string][]Op{}
	for _, op := range h.Ops() {
		if op.Kind != Get && op.Outcome != Failed {
			byKey[op.Key] = append(byKey[op.Key], op)
		}
	}
	keys := h.Keys()
	lost := &LostWritesError{Keys: len(keys)}
	for _, key := range keys {
		value, found, err := read(key)
		if err != nil {
			return fmt.Errorf("read %s: %w", key, err)
		}
		writes := byKey[key]
		// The latest-starting acknowledged write supersedes every write
		// that returned before it was called.
		var lastAck *Op
		for i := range writes {
			w := &writes[i]
			if w.Outcome == OK && (lastAck == nil || w.Call > lastAck.Call) {
				lastAck = w
			}
		}
		superseded := func(ret time.Duration) bool {
			return lastAck != nil && lastAck.Call > ret
		}
		explained := false
		sawValue := false
		if !found && !superseded(-1) { // the initial state: no value
			explained = true
		}
		for _, w := range writes {
			matches := (found && w.Kind == Set && w.Value == value) || (!found && w.Kind == Del)
			if matches {
				sawValue = true
				if !superseded(w.Return) {
					explained = true
					break
				}
			}
		}
		if explained {
			continue
		}
		got := "NOTFOUND"
		if found {
			got = "VALUE " + value
		}
		switch {
		case found && !sawValue:
			lost.Violations = append(lost.Violations, fmt.Sprintf("%s: read %s, which no one wrote (last acknowledged: %s)", key, got, lastAck))
		default:
			lost.Violations = append(lost.Violations, fmt.Sprintf("%s: read %s, but acknowledged write lost: %s", key, got, lastAck))
		}
	}
	if len(lost.Violations) > 0 {
		return lost
	}
	return nil
}
