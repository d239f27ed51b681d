package remus

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"

	"github.com/ftvm/ftvm/wasi"
)

// devicesJSON encodes checkpoints' device state as json.Marshal does, but
// re-encodes only the clock while nothing else changed: between two
// checkpoints of a server the descriptor table rarely does, and encoding
// it (a KV server with 32 connections: about 20 µs) was a tenth of the
// primary's work per checkpoint, on the path of its acknowledgement.
type devicesJSON struct {
	prev           wasi.State // what prefix and suffix encode (any clock)
	prefix, suffix []byte     // the encoding around the clock's digits
	ok             bool
	built          int // templates encoded (tests)
}

// clockMark is the clock the template is encoded with: its digits, after
// the field's name, occur nowhere else (a string's quotes are escaped).
const clockMark = `"monotonic_ns":18446744073709551615`

func (c *devicesJSON) encode(st *wasi.State) ([]byte, error) {
	if !c.ok || !st.SameButClock(&c.prev) {
		c.ok = false
		c.built++
		tmpl := *st
		tmpl.Monotonic = math.MaxUint64
		b, err := json.Marshal(&tmpl)
		if err != nil {
			return nil, err
		}
		i := bytes.Index(b, []byte(clockMark))
		if i < 0 {
			return json.Marshal(st) // not the expected shape: no template
		}
		at := i + len(`"monotonic_ns":`)
		c.prefix, c.suffix = b[:at], b[i+len(clockMark):]
		c.prev = tmpl // its own copies: the device layer's may change
		c.prev.Args, c.prev.Env = slices.Clone(st.Args), slices.Clone(st.Env)
		c.prev.Preopens, c.prev.FDs = slices.Clone(st.Preopens), slices.Clone(st.FDs)
		if st.Instrumentation != nil {
			in := *st.Instrumentation
			c.prev.Instrumentation = &in
		}
		c.ok = true
	}
	out := make([]byte, 0, len(c.prefix)+20+len(c.suffix))
	out = append(out, c.prefix...)
	out = strconv.AppendUint(out, st.Monotonic, 10)
	return append(out, c.suffix...), nil
}

// deviceCheck is the backup's side: it validates the device state each
// checkpoint carries before the checkpoint is acknowledged (a failover
// restores that state, and must not fail on it then; the primary is a
// network peer like any other). A state equal to the last one validated
// but for its clock, as most are, is compared with it, not parsed again.
type deviceCheck struct {
	prefix, suffix []byte // the last state validated, around its clock's digits
	ok             bool
	parsed         int // states parsed (tests)
}

// check validates state, the JSON of a checkpoint's device state, for a
// primary whose Hello named preopens (the guest paths, in order: the
// backup keeps a replica of each).
func (c *deviceCheck) check(state []byte, preopens []string) error {
	pre, suf, found := splitClock(state)
	if found && c.ok && bytes.Equal(pre, c.prefix) && bytes.Equal(suf, c.suffix) {
		return nil
	}
	c.ok = false
	c.parsed++
	var st wasi.State
	if err := json.Unmarshal(state, &st); err != nil {
		return err
	}
	if err := st.Validate(); err != nil {
		return err
	}
	if len(st.Preopens) != len(preopens) {
		return fmt.Errorf("%d preopened directories, the session's Hello named %d", len(st.Preopens), len(preopens))
	}
	for i, p := range st.Preopens {
		if p.GuestPath != preopens[i] {
			return fmt.Errorf("preopen %d is %q, the session's Hello named %q", i, p.GuestPath, preopens[i])
		}
	}
	if found {
		c.prefix, c.suffix, c.ok = append(c.prefix[:0], pre...), append(c.suffix[:0], suf...), true
	}
	return nil
}

// splitClock splits a device state's JSON around the digits of its clock
// (found: the field is there, followed by digits). The field's name with
// its quotes occurs once: a string's quotes are escaped.
func splitClock(state []byte) (pre, suf []byte, found bool) {
	const field = `"monotonic_ns":`
	i := bytes.Index(state, []byte(field))
	if i < 0 {
		return nil, nil, false
	}
	at := i + len(field)
	end := at
	for end < len(state) && state[end] >= '0' && state[end] <= '9' {
		end++
	}
	if end == at {
		return nil, nil, false
	}
	return state[:at], state[end:], true
}
