package kvcheck

import (
	"fmt"
	"hash/fnv"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// input and output are porcupine's view of an Op.
type input struct {
	kind       Kind
	key, value string
}

type output struct {
	found   bool
	value   string
	unknown bool
}

// state is one key's register: a value or none.
type state struct {
	present bool
	value   string
}

// Model is the porcupine model of the KV protocol, partitioned by key: SET
// k v -> OK, GET k -> VALUE v | NOTFOUND, DEL k -> OK, each key an
// independent register that starts without a value. Inputs and outputs are
// those History.Check builds.
func Model() porcupine.Model {
	return porcupine.Model{
		Partition: func(ops []porcupine.Operation) [][]porcupine.Operation {
			parts, _ := partition(ops)
			return parts
		},
		Init: func() interface{} { return state{} },
		Step: func(st, in, out interface{}) (bool, interface{}) {
			s, i, o := st.(state), in.(input), out.(output)
			switch i.kind {
			case Set:
				return true, state{present: true, value: i.value}
			case Del:
				return true, state{}
			default: // Get
				if o.unknown {
					return true, s
				}
				if o.found != s.present {
					return false, s
				}
				return !o.found || o.value == s.value, s
			}
		},
		Hash: func(st interface{}) uint64 {
			s := st.(state)
			h := fnv.New64a()
			if s.present {
				h.Write([]byte{1})
				h.Write([]byte(s.value))
			}
			return h.Sum64()
		},
		DescribeOperation: func(in, out interface{}) string {
			i, o := in.(input), out.(output)
			switch {
			case o.unknown && i.kind == Set:
				return fmt.Sprintf("SET %s %s -> ?", i.key, i.value)
			case o.unknown:
				return fmt.Sprintf("%s %s -> ?", i.kind, i.key)
			case i.kind == Set:
				return fmt.Sprintf("SET %s %s -> OK", i.key, i.value)
			case i.kind == Del:
				return fmt.Sprintf("DEL %s -> OK", i.key)
			case o.found:
				return fmt.Sprintf("GET %s -> %s", i.key, o.value)
			default:
				return fmt.Sprintf("GET %s -> NOTFOUND", i.key)
			}
		},
		DescribeState: func(st interface{}) string {
			if s := st.(state); s.present {
				return s.value
			}
			return "(none)"
		},
		DescribeOperationMetadata: func(m interface{}) string {
			if m == nil {
				return ""
			}
			return fmt.Sprint(m)
		},
	}
}

// partition splits operations by key, keys sorted.
func partition(ops []porcupine.Operation) ([][]porcupine.Operation, []string) {
	byKey := map[string][]porcupine.Operation{}
	for _, op := range ops {
		k := op.Input.(input).key
		byKey[k] = append(byKey[k], op)
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([][]porcupine.Operation, len(keys))
	for i, k := range keys {
		parts[i] = byKey[k]
	}
	return parts, keys
}

// operations converts the history for porcupine. Failed operations took no
// effect and GETs without an answer constrain nothing: both are left out.
// Unknown writes stay, with return time +infinity.
func (h *History) operations() []porcupine.Operation {
	var out []porcupine.Operation
	for _, op := range h.Ops() {
		if op.Outcome == Failed || (op.Outcome == Unknown && op.Kind == Get) {
			continue
		}
		ret := int64(op.Return)
		if op.Outcome == Unknown {
			ret = math.MaxInt64
		}
		meta := fmt.Sprintf("client %d, call %s, return %s", op.Client, fmtTime(op.Call), fmtTime(op.Return))
		if op.Err != "" {
			meta += ", " + op.Err
		}
		out = append(out, porcupine.Operation{
			ClientId: op.Client,
			Input:    input{kind: op.Kind, key: op.Key, value: valueIf(op.Kind == Set, op.Value)},
			Call:     int64(op.Call),
			Output:   output{found: op.Found, value: valueIf(op.Kind == Get, op.Value), unknown: op.Outcome == Unknown},
			Return:   ret,
			Metadata: meta,
		})
	}
	return out
}

func valueIf(ok bool, v string) string {
	if ok {
		return v
	}
	return ""
}

// Result is the verdict of History.Check.
type Result struct {
	// Linearizable is true when porcupine found a linearization for every
	// key within the timeout.
	Linearizable bool
	// TimedOut: the check did not finish; Linearizable is false and
	// nothing is known.
	TimedOut bool
	Ops      int // operations checked (failed ones and unanswered GETs are left out)
	Unknown  int // of which writes with unknown outcome
	Keys     int
	Elapsed  time.Duration
	// Illegal describes each key that has no linearization.
	Illegal []KeyReport
	// ReportIncomplete: the history is not linearizable, but explaining
	// it (porcupine's verbose check) timed out, so Illegal may miss keys
	// or list keys that were merely not finished.
	ReportIncomplete bool
	// Visualization is the porcupine HTML page of the first three illegal
	// keys, when a directory was given and the history is not
	// linearizable.
	Visualization string
	// VisualizationErr is why writing it failed.
	VisualizationErr error
}

// KeyReport describes a key whose history is not linearizable.
type KeyReport struct {
	Key     string
	Ops     int // operations on the key
	Longest int // longest linearizable prefix porcupine found
	// Stuck is the operation with the earliest return among those in no
	// longest partial linearization: usually the read that cannot be
	// explained.
	Stuck Op
}

func (r Result) String() string {
	var b strings.Builder
	switch {
	case r.Linearizable:
		b.WriteString("linearizable")
	case r.TimedOut:
		b.WriteString("check TIMED OUT (not verified)")
	default:
		b.WriteString("NOT linearizable")
	}
	fmt.Fprintf(&b, ": %d ops (%d unknown writes) on %d keys, checked in %v", r.Ops, r.Unknown, r.Keys, r.Elapsed.Round(time.Millisecond))
	if r.ReportIncomplete {
		b.WriteString(" (explanation timed out: key list may be incomplete)")
	}
	for i, k := range r.Illegal {
		if i == 10 {
			fmt.Fprintf(&b, "\n  ... and %d more keys", len(r.Illegal)-i)
			break
		}
		fmt.Fprintf(&b, "\n  key %s: %d ops, longest linearizable prefix %d; cannot place %s", k.Key, k.Ops, k.Longest, k.Stuck)
	}
	if r.Visualization != "" {
		fmt.Fprintf(&b, "\n  visualization: %s", r.Visualization)
	}
	if r.VisualizationErr != nil {
		fmt.Fprintf(&b, "\n  visualization not written: %v", r.VisualizationErr)
	}
	return b.String()
}

// Check runs porcupine's linearizability check on the history, partitioned
// by key, for at most timeout (0: no limit). When the history is not
// linearizable and dir is not empty, it writes porcupine's HTML
// visualization of the illegal keys to a new file in dir (created if
// needed) and puts its path in the result.
func (h *History) Check(timeout time.Duration, dir string) Result {
	ops := h.operations()
	parts, keys := partition(ops)
	r := Result{Ops: len(ops), Keys: len(keys)}
	for _, op := range ops {
		if op.Output.(output).unknown {
			r.Unknown++
		}
	}
	model := Model()
	t0 := time.Now()
	// The plain check is several times faster than the verbose one, which
	// also records partial linearizations; those are only needed to
	// explain a failure.
	res := porcupine.CheckOperationsTimeout(model, ops, timeout)
	r.Linearizable = res == porcupine.Ok
	r.TimedOut = res == porcupine.Unknown
	if res != porcupine.Illegal {
		r.Elapsed = time.Since(t0)
		return r
	}
	t1 := time.Now()
	vres, info := porcupine.CheckOperationsVerbose(model, ops, timeout)
	r.Elapsed = time.Since(t0)
	// The verbose check finishes every key unless the timeout cuts it
	// short; keys it did not finish look illegal too.
	r.ReportIncomplete = vres != porcupine.Illegal || (timeout > 0 && time.Since(t1) >= timeout)
	partials := info.PartialLinearizations()
	var bad []porcupine.Operation
	for p, part := range parts {
		if p >= len(partials) {
			break
		}
		in := make([]bool, len(part))
		longest := 0
		for _, lin := range partials[p] {
			longest = max(longest, len(lin))
		}
		if longest == len(part) {
			continue
		}
		for _, lin := range partials[p] {
			if len(lin) == longest {
				for _, id := range lin {
					in[id] = true
				}
			}
		}
		rep := KeyReport{Key: keys[p], Ops: len(part), Longest: longest}
		best := -1
		for id, op := range part {
			if !in[id] && (best < 0 || op.Return < part[best].Return) {
				best = id
			}
		}
		if best >= 0 {
			rep.Stuck = fromPorcupine(part[best])
		}
		r.Illegal = append(r.Illegal, rep)
		if len(r.Illegal) <= vizKeys {
			bad = append(bad, part...)
		}
	}
	if dir != "" && len(bad) > 0 {
		r.Visualization, r.VisualizationErr = visualize(model, bad, timeout, dir)
	}
	return r
}

// vizKeys is how many illegal keys the visualization shows: the page holds
// every operation of each (some MB for a few thousand), and one is usually
// enough to see what went wrong.
const vizKeys = 3

// visualize checks the operations of the illegal keys again, to get their
// partial linearizations alone, and writes porcupine's HTML page for them.
func visualize(model porcupine.Model, ops []porcupine.Operation, timeout time.Duration, dir string) (string, error) {
	_, info := porcupine.CheckOperationsVerbose(model, ops, timeout)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "kvcheck-*.html")
	if err != nil {
		return "", err
	}
	if err := porcupine.Visualize(model, info, f); err != nil {
		f.Close()
		return f.Name(), err
	}
	if err := f.Close(); err != nil {
		return f.Name(), err
	}
	abs, err := filepath.Abs(f.Name())
	if err != nil {
		abs = f.Name()
	}
	return abs, nil
}

func fromPorcupine(p porcupine.Operation) Op {
	i, o := p.Input.(input), p.Output.(output)
	op := Op{Client: p.ClientId, Kind: i.kind, Key: i.key, Call: time.Duration(p.Call), Return: time.Duration(p.Return)}
	switch {
	case o.unknown:
		op.Outcome = Unknown
	default:
		op.Outcome = OK
	}
	if i.kind == Set {
		op.Value = i.value
	} else if i.kind == Get {
		op.Value, op.Found = o.value, o.found
	}
	return op
}

// DefaultCheckTimeout bounds RequireLinearizable's check.
const DefaultCheckTimeout = time.Minute

// RequireLinearizable checks the history and fails the test (Errorf) when
// it is not linearizable or the check times out (timeout 0:
// DefaultCheckTimeout). On failure the visualization goes to dir; with dir
// empty, to $KVCHECK_ARTIFACTS or else a new directory under the system's
// temporary directory that is kept after the test, so the file can be
// opened. It logs the verdict and returns the result.
func (h *History) RequireLinearizable(t testing.TB, timeout time.Duration, dir string) Result {
	t.Helper()
	if timeout == 0 {
		timeout = DefaultCheckTimeout
	}
	if dir == "" {
		dir = os.Getenv("KVCHECK_ARTIFACTS")
	}
	if dir == "" {
		d, err := os.MkdirTemp("", "kvcheck-")
		if err != nil {
			t.Fatal(err)
		}
		dir = d
		defer func() {
			os.Remove(d) // only if empty: kept when it holds a visualization
		}()
	}
	r := h.Check(timeout, dir)
	if r.Linearizable {
		t.Logf("kvcheck: %v", r)
	} else {
		t.Errorf("kvcheck: %v\n  history: %v", r, h.Counts())
	}
	return r
}
