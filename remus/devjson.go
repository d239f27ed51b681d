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
// while nothing changed except the clock and files' positions, it writes
// only those numbers into the last encoding: between two checkpoints of a
// server the descriptor table rarely changes otherwise (a guest writing a
// log moves its position every epoch), and encoding it (a KV server with
// 32 connections: about 20 µs) was a tenth of the primary's work per
// checkpoint, on the path of its acknowledgement.
type devicesJSON struct {
	prev  wasi.State // what parts encode (its clock and positions aside)
	parts [][]byte   // the encoding around the clock's digits, then each templated position's
	// posFDs are the descriptors (indexes into FDs) whose positions are
	// templated: those not zero (json.Marshal leaves a zero one out).
	posFDs []int
	fds    []wasi.FDState // scratch for same
	ok     bool
	built  int // templates encoded (tests)
}

// clockKey and posKey are the JSON keys, with their quotes and colon, of
// the numbers a state's encoding changes in place (devicesJSON) and the
// backup compares around (maskState): the clock and a file's position.
const (
	clockKey = `"monotonic_ns":`
	posKey   = `"pos":`
)

// clockMark is the clock the template is encoded with: its digits, after
// the field's name, occur nowhere else (a string's quotes are escaped).
const clockMark = clockKey + `18446744073709551615`

// posMark is the position the template gives its k-th templated
// descriptor: all of them 19 digits long, so none is the start of another.
func posMark(k int) int64 { return math.MaxInt64 - int64(k) }

func (c *devicesJSON) encode(st *wasi.State) ([]byte, error) {
	if !c.ok || !c.same(st) {
		c.ok = false
		c.built++
		if !c.template(st) {
			return json.Marshal(st) // not the expected shape: no template
		}
		c.ok = true
	}
	n := 20 * (1 + len(c.posFDs))
	for _, p := range c.parts {
		n += len(p)
	}
	out := make([]byte, 0, n)
	out = append(out, c.parts[0]...)
	out = strconv.AppendUint(out, st.Monotonic, 10)
	for k, i := range c.posFDs {
		out = append(out, c.parts[k+1]...)
		out = strconv.AppendInt(out, st.FDs[i].Pos, 10)
	}
	return append(out, c.parts[len(c.parts)-1]...), nil
}

// same reports whether st is the template's state but for its clock and
// the positions of the descriptors whose positions are templated.
func (c *devicesJSON) same(st *wasi.State) bool {
	if len(st.FDs) != len(c.prev.FDs) {
		return false
	}
	c.fds = append(c.fds[:0], st.FDs...)
	for _, i := range c.posFDs {
		if c.fds[i].Pos == 0 {
			return false // json.Marshal would leave it out
		}
		c.fds[i].Pos = c.prev.FDs[i].Pos
	}
	view := *st
	view.FDs = c.fds
	return view.SameButClock(&c.prev)
}

// template encodes st with markers for its clock and non-zero positions,
// and splits the encoding around them.
func (c *devicesJSON) template(st *wasi.State) bool {
	tmpl := *st
	tmpl.Monotonic = math.MaxUint64
	tmpl.FDs = slices.Clone(st.FDs)
	c.posFDs = c.posFDs[:0]
	for i := range tmpl.FDs {
		if tmpl.FDs[i].Pos != 0 {
			tmpl.FDs[i].Pos = posMark(len(c.posFDs))
			c.posFDs = append(c.posFDs, i)
		}
	}
	b, err := json.Marshal(&tmpl)
	if err != nil {
		return false
	}
	i := bytes.Index(b, []byte(clockMark))
	if i < 0 {
		return false
	}
	c.parts = append(c.parts[:0], b[:i+len(clockKey)])
	rest := i + len(clockMark)
	for k := range c.posFDs {
		mark := posKey + strconv.FormatInt(posMark(k), 10)
		j := bytes.Index(b[rest:], []byte(mark))
		if j < 0 {
			return false
		}
		c.parts = append(c.parts, b[rest:rest+j+len(posKey)])
		rest += j + len(mark)
	}
	c.parts = append(c.parts, b[rest:])
	c.prev = *st // its own copies: the device layer's may change
	c.prev.Args, c.prev.Env = slices.Clone(st.Args), slices.Clone(st.Env)
	c.prev.Preopens, c.prev.FDs = slices.Clone(st.Preopens), slices.Clone(st.FDs)
	if st.Instrumentation != nil {
		in := *st.Instrumentation
		c.prev.Instrumentation = &in
	}
	return true
}

// deviceCheck is the backup's side: it validates the device state each
// checkpoint carries before the checkpoint is acknowledged (a failover
// restores that state, and must not fail on it then; the primary is a
// network peer like any other). A state that differs from the last one
// validated only in its clock and its files' positions, as most do, is
// compared with it (maskState), not parsed again: parsing a server's 33
// descriptors costs about 57 µs here, on the path of the ack.
type deviceCheck struct {
	masked []byte // the last state validated, masked
	ok     bool
	buf    []byte
	parsed int // states parsed (tests)
}

// check validates state, the JSON of a checkpoint's device state, for a
// primary whose Hello named preopens (the guest paths, in order: the
// backup keeps a replica of each).
func (c *deviceCheck) check(state []byte, preopens []string) error {
	masked, maskable := maskState(c.buf[:0], state)
	c.buf = masked
	if maskable && c.ok && bytes.Equal(masked, c.masked) {
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
	if maskable {
		c.masked, c.ok = append(c.masked[:0], masked...), true
	}
	return nil
}

// maskedFields are the numbers maskState masks, each with the most digits
// it keeps (so that the number fits its field with either sign): the
// clock (uint64) and a file's position (int64).
var maskedFields = [...]struct {
	key    []byte
	digits int
}{{[]byte(clockKey), 19}, {[]byte(posKey), 18}}

// maskState appends to dst the JSON of a device state with the digits of
// each number that follows a masked field's key replaced by '#'. Two
// states with the same mask are, if either is valid JSON, the same state
// but for those numbers, which no check reads: a key with its quotes, and
// the colon, occur only where an object's key ends (a string's quotes are
// escaped), and what was a plain non-negative integer stays one. maskable
// is false, and the state must be parsed, where such a number is not one
// that fits: a leading zero or too many digits.
func maskState(dst, state []byte) (masked []byte, maskable bool) {
	var next [len(maskedFields)]int
	for k, f := range maskedFields {
		next[k] = bytes.Index(state, f.key)
	}
	at := 0
	for {
		k := -1
		for j, n := range next {
			if n >= 0 && (k < 0 || n < next[k]) {
				k = j
			}
		}
		if k < 0 {
			return append(dst, state[at:]...), true
		}
		f := maskedFields[k]
		start := next[k] + len(f.key)
		end := start
		for end < len(state) && state[end] >= '0' && state[end] <= '9' {
			end++
		}
		if n := end - start; n == 0 || n > f.digits || (n > 1 && state[start] == '0') {
			return dst, false
		}
		dst = append(append(dst, state[at:start]...), '#')
		at = end
		if i := bytes.Index(state[end:], f.key); i >= 0 {
			next[k] = end + i
		} else {
			next[k] = -1
		}
	}
}
