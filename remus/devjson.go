package remus

import (
	"bytes"
	"encoding/json"
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
