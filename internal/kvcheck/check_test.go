package kvcheck

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// Synthetic histories: times in milliseconds, ret < 0 for an unknown outcome.
func set(client int, key, value string, call, ret int) Op {
	return mk(Op{Client: client, Kind: Set, Key: key, Value: value}, call, ret)
}

func get(client int, key, value string, call, ret int) Op {
	return mk(Op{Client: client, Kind: Get, Key: key, Value: value, Found: value != ""}, call, ret)
}

func del(client int, key string, call, ret int) Op {
	return mk(Op{Client: client, Kind: Del, Key: key}, call, ret)
}

func mk(op Op, call, ret int) Op {
	op.Call = time.Duration(call) * time.Millisecond
	if ret < 0 {
		op.Outcome = Unknown
	} else {
		op.Return = time.Duration(ret) * time.Millisecond
	}
	return op
}

func history(ops ...Op) *History {
	h := NewHistory()
	h.Add(ops...)
	return h
}

// finalRead answers VerifyAcknowledged from a fixed state.
func finalRead(state map[string]string) func(string) (string, bool, error) {
	return func(k string) (string, bool, error) {
		v, ok := state[k]
		return v, ok, nil
	}
}

func TestSyntheticHistories(t *testing.T) {
	for _, tc := range []struct {
		name string
		ops  []Op
		ok   bool
	}{
		{"empty", nil, true},
		{"sequential", []Op{
			get(0, "x", "", 0, 1), set(0, "x", "a", 2, 3), get(1, "x", "a", 4, 5),
			set(1, "x", "b", 6, 7), get(0, "x", "b", 8, 9), del(0, "x", 10, 11), get(1, "x", "", 12, 13),
		}, true},
		{"concurrent read sees old value", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, 10), get(2, "x", "a", 3, 4),
		}, true},
		{"concurrent read sees new value", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, 10), get(2, "x", "b", 3, 4),
		}, true},
		{"reads must agree on order", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, 10),
			get(2, "x", "b", 3, 4), get(3, "x", "a", 5, 6), // b took effect before 4: a is stale at 5
		}, false},
		{"lost acknowledged write", []Op{
			set(0, "x", "a", 0, 1), get(1, "x", "", 2, 3),
		}, false},
		{"stale read", []Op{
			set(0, "x", "a", 0, 1), set(0, "x", "b", 2, 3), get(1, "x", "a", 4, 5),
		}, false},
		{"read of a value never written", []Op{
			set(0, "x", "a", 0, 1), get(1, "x", "zzz", 2, 3),
		}, false},
		{"unknown write may take effect late", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, -1), get(2, "x", "a", 50, 51), get(2, "x", "b", 60, 61),
		}, true},
		{"unknown write may never take effect", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, -1), get(2, "x", "a", 50, 51),
		}, true},
		{"unknown write cannot take effect twice", []Op{
			set(0, "x", "a", 0, 1), set(1, "x", "b", 2, -1), get(2, "x", "b", 50, 51),
			get(2, "x", "a", 60, 61), // b became visible by 51, nothing wrote a since
		}, false},
		{"unknown write cannot act before its call", []Op{
			set(0, "x", "a", 0, 1), get(2, "x", "b", 3, 4), set(1, "x", "b", 10, -1),
		}, false},
		{"unknown read is ignored", []Op{
			set(0, "x", "a", 0, 1), get(1, "x", "", 2, -1), get(1, "x", "a", 5, 6),
		}, true},
		{"keys are independent", []Op{
			set(0, "x", "a", 0, 1), set(0, "y", "b", 0, 1), get(1, "x", "a", 2, 3), get(1, "y", "b", 2, 3),
		}, true},
		{"one bad key among good ones", []Op{
			set(0, "x", "a", 0, 1), set(0, "y", "b", 0, 1), get(1, "x", "a", 2, 3), get(1, "y", "", 2, 3),
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := history(tc.ops...)
			dir := t.TempDir()
			r := h.Check(10*time.Second, dir)
			t.Log(r)
			if r.Linearizable != tc.ok || r.TimedOut {
				t.Fatalf("linearizable %v (timed out %v), want %v", r.Linearizable, r.TimedOut, tc.ok)
			}
			if tc.ok {
				if r.Visualization != "" || len(r.Illegal) > 0 {
					t.Fatalf("report for a good history: %v", r)
				}
				return
			}
			if len(r.Illegal) == 0 || r.Visualization == "" {
				t.Fatalf("no report: %v", r)
			}
			b, err := os.ReadFile(r.Visualization)
			if err != nil || !strings.Contains(string(b), "<html") {
				t.Fatalf("visualization %s: %v (%d bytes)", r.Visualization, err, len(b))
			}
		})
	}
}

// TestFailedOpsIgnored: an ERR reply took no effect and is not checked.
func TestFailedOpsIgnored(t *testing.T) {
	bad := set(0, "x", "zzz", 2, 3)
	bad.Outcome, bad.Err = Failed, "ERR nope"
	h := history(set(0, "x", "a", 0, 1), bad, get(1, "x", "a", 4, 5))
	if r := h.Check(time.Second, ""); !r.Linearizable || r.Ops != 2 {
		t.Fatalf("%v", r)
	}
	c := h.Counts()
	if c.Failed != 1 || c.OK != 2 || c.AckedWrites != 1 || c.Keys != 1 {
		t.Fatalf("counts %+v", c)
	}
}

func TestIllegalReport(t *testing.T) {
	h := history(set(0, "x", "a", 0, 1), set(0, "y", "b", 0, 1), get(1, "x", "a", 2, 3), get(1, "y", "", 4, 5))
	r := h.Check(time.Second, "")
	if r.Linearizable || len(r.Illegal) != 1 {
		t.Fatalf("%v", r)
	}
	k := r.Illegal[0]
	if k.Key != "y" || k.Ops != 2 || k.Longest != 1 || k.Stuck.Kind != Get || k.Stuck.Found {
		t.Fatalf("report %+v", k)
	}
	if r.Visualization != "" {
		t.Fatal("visualization written without a directory")
	}
}

func TestAcknowledged(t *testing.T) {
	h := history(set(0, "x", "a", 0, 1), set(1, "x", "b", 2, -1), get(2, "x", "a", 3, 4), del(0, "y", 5, 6))
	acks := h.Acknowledged()
	if len(acks) != 2 || acks[0].Value != "a" || acks[1].Kind != Del {
		t.Fatalf("%v", acks)
	}
	if got := h.Counts(); got.Unknown != 1 || got.AckedWrites != 2 || got.Ops != 4 {
		t.Fatalf("%+v", got)
	}
	if ops := h.Ops(); ops[1].Return != Infinity {
		t.Fatalf("unknown op returns at %v", ops[1].Return)
	}
}

func TestVerifyAcknowledged(t *testing.T) {
	h := history(
		set(0, "a", "a1", 0, 1), set(1, "a", "a2", 2, 3), // a: last acked a2
		set(0, "b", "b1", 0, 1), set(1, "b", "b2", 2, -1), // b: b1 acked, b2 unknown
		set(0, "c", "c1", 0, 1), set(1, "c", "c2", 2, -1), set(2, "c", "c3", 10, 11), // c2 may land after c3
		set(0, "d", "d1", 0, 10), set(1, "d", "d2", 5, 6), // concurrent: d1 or d2
		set(0, "e", "e1", 0, -1),                   // only unknown: e1 or nothing
		set(0, "f", "f1", 0, 1), del(1, "f", 2, 3), // deleted
	)
	good := map[string]string{"a": "a2", "b": "b1", "c": "c3", "d": "d1", "e": "e1"}
	if err := VerifyAcknowledged(h, finalRead(good)); err != nil {
		t.Fatal(err)
	}
	alt := map[string]string{"a": "a2", "b": "b2", "c": "c2", "d": "d2"}
	if err := VerifyAcknowledged(h, finalRead(alt)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		key, value, want string
	}{
		{"a", "", "acknowledged write lost"},
		{"a", "a1", "acknowledged write lost"},
		{"c", "c1", "acknowledged write lost"},
		{"f", "f1", "acknowledged write lost"},
		{"b", "zz", "no one wrote"},
	} {
		state := map[string]string{}
		for k, v := range good {
			state[k] = v
		}
		if tc.value == "" {
			delete(state, tc.key)
		} else {
			state[tc.key] = tc.value
		}
		err := VerifyAcknowledged(h, finalRead(state))
		var lw *LostWritesError
		if !errors.As(err, &lw) || len(lw.Violations) != 1 || !strings.Contains(err.Error(), tc.want) ||
			!strings.HasPrefix(lw.Violations[0], tc.key+":") {
			t.Errorf("%s=%q: %v", tc.key, tc.value, err)
		} else {
			t.Logf("%s=%q: %v", tc.key, tc.value, err)
		}
	}
	readErr := errors.New("boom")
	if err := VerifyAcknowledged(h, func(string) (string, bool, error) { return "", false, readErr }); !errors.Is(err, readErr) {
		t.Fatalf("read error: %v", err)
	}
}
