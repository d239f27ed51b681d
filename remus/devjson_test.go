package remus

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/ftvm/ftvm/wasi"
)

// TestDevicesJSON: the cached encoding is byte for byte json.Marshal's,
// through clock ticks, files that move, descriptor changes, strings that
// mimic the clock's and the position's fields, and a state changed in place
// after it was encoded; and a template is encoded again only when more than
// the clock and the positions changed.
func TestDevicesJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	st := &wasi.State{Args: []string{"kv", `"monotonic_ns":18446744073709551615`, `"pos":9223372036854775807`}, Env: []string{"X=1"},
		Preopens: []wasi.Preopen{{HostPath: "/h", GuestPath: "/g"}}, Instrumentation: &wasi.Instrumentation{Module: "m"}}
	var c devicesJSON
	changes := 0
	for i := range 500 {
		switch rng.IntN(5) {
		case 0: // a connection comes
			st.FDs = append(st.FDs, wasi.FDState{Num: uint32(3 + len(st.FDs)), Kind: 4, Addr: "127.0.0.1:7"})
			changes++
		case 1: // one goes (in place: the slice's memory is reused)
			if n := len(st.FDs); n > 0 {
				st.FDs = st.FDs[:n-1]
				changes++
			}
		case 2: // a file moves (in place): only the numbers are written,
			// unless the position leaves or comes back to 0, which
			// json.Marshal leaves out
			if n := len(st.FDs); n > 0 {
				f := &st.FDs[rng.IntN(n)]
				was := f.Pos
				if f.Pos += 10; rng.IntN(8) == 0 {
					f.Pos = 0
				}
				if (was == 0) != (f.Pos == 0) {
					changes++
				}
			}
		}
		st.Monotonic = uint64(i) * 1_000_003
		if i == 250 {
			st.Monotonic = 18446744073709551615
		}
		got, err := c.encode(st)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(st)
		if !bytes.Equal(got, want) {
			t.Fatalf("step %d: encoded\n%s\nwant\n%s", i, got, want)
		}
	}
	if c.built > changes+1 {
		t.Fatalf("%d templates encoded for %d changes of the state: the unchanged state was encoded again", c.built, changes)
	}
}

// TestDeviceCheck: the backup validates every checkpoint's device state,
// parsing only a state that differs from the last valid one in more than
// its clock and its files' positions (the primary's encoder, whose output
// it checks here, writes only those numbers into such a state's last
// encoding); a state that changed otherwise is parsed and validated
// again, a bad one is never taken for the last good one, and a number that
// would not parse as its field (a leading zero, too many digits) is never
// taken for a position or a clock.
func TestDeviceCheck(t *testing.T) {
	st := &wasi.State{Args: []string{"kv"}, Preopens: []wasi.Preopen{{HostPath: "/h", GuestPath: "/g"}},
		FDs: []wasi.FDState{{Num: 3, Kind: wasi.KindListener, Addr: "127.0.0.1:7"},
			{Num: 4, Kind: wasi.KindFile, Root: 0, Path: "log", Writable: true, Pos: 10}}}
	var enc devicesJSON
	var c deviceCheck
	encode := func() []byte {
		t.Helper()
		b, err := enc.encode(st)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for i := range 100 {
		st.Monotonic = uint64(i) * 999_983
		st.FDs[1].Pos += int64(i) * 4099 // a log that grows
		if err := c.check(encode(), []string{"/g"}); err != nil {
			t.Fatalf("tick %d: %v", i, err)
		}
	}
	if c.parsed != 1 {
		t.Errorf("%d parses for one state at 100 clocks and positions, want 1", c.parsed)
	}
	// A connection comes: parsed again, valid.
	st.FDs = append(st.FDs, wasi.FDState{Num: 5, Kind: wasi.KindConn, Addr: "127.0.0.1:9"})
	if err := c.check(encode(), []string{"/g"}); err != nil || c.parsed != 2 {
		t.Fatalf("a new connection: %v, %d parses", err, c.parsed)
	}
	// One number twice: refused, then again at the next clock (no
	// shortcut to a state that failed).
	st.FDs = append(st.FDs, wasi.FDState{Num: 5, Kind: wasi.KindConn, Addr: "127.0.0.1:10"})
	for i := range 2 {
		st.Monotonic++
		if err := c.check(encode(), []string{"/g"}); err == nil {
			t.Fatalf("try %d: a descriptor given twice passed", i)
		}
	}
	st.FDs = st.FDs[:3]
	// Preopens other than the Hello's.
	for _, hello := range [][]string{nil, {"/other"}, {"/g", "/h"}} {
		if err := c.check(encode(), hello); err == nil {
			t.Errorf("preopens %q against a state of [/g]: passed", hello)
		}
	}
	// Valid again; then the same state with numbers no field takes: a
	// leading zero is not JSON, 20 digits overflow the clock, 19 may
	// overflow a position.
	good := encode()
	if err := c.check(good, []string{"/g"}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct{ key, num string }{
		{`"pos":`, "0123"}, {`"monotonic_ns":`, "012"}, {`"monotonic_ns":`, "18446744073709551616"},
		{`"pos":`, "9223372036854775808"},
	} {
		i := bytes.Index(good, []byte(bad.key)) + len(bad.key)
		j := i
		for good[j] >= '0' && good[j] <= '9' {
			j++
		}
		mangled := append(append(append([]byte(nil), good[:i]...), bad.num...), good[j:]...)
		if err := c.check(mangled, []string{"/g"}); err == nil {
			t.Errorf("%s%s passed", bad.key, bad.num)
		}
		if err := c.check(good, []string{"/g"}); err != nil {
			t.Fatal(err)
		}
	}
	// Not JSON, and a state without a clock: parsed, refused or checked
	// in full.
	if err := c.check([]byte(`{"fds":[`), []string{"/g"}); err == nil {
		t.Error("truncated JSON passed")
	}
	if err := c.check([]byte(`{"preopens":[{"GuestPath":"/g"}]}`), []string{"/g"}); err != nil {
		t.Errorf("a state without a clock: %v", err)
	}
}

// FuzzDeviceCheck: whatever a primary sends, the backup's check passes a
// device state only if it parses as a state that is valid: json.Unmarshal
// and wasi.State.Validate, what a failover runs, agree with it on every
// state it passes, the shortcut's included. Each input is a valid state's
// JSON and a mutation of it, checked in turn.
func FuzzDeviceCheck(f *testing.F) {
	base := `{"args":["kv"],"env":null,"preopens":[{"HostPath":"/h","GuestPath":"/g"}],"monotonic_ns":123,` +
		`"fds":[{"num":3,"kind":4,"filetype":6,"rights_base":0,"root":0,"addr":"127.0.0.1:7"},` +
		`{"num":4,"kind":3,"filetype":4,"rights_base":0,"root":0,"path":"log","writable":true,"pos":4096}]}`
	f.Add([]byte(base), []byte(strings.Replace(base, `"pos":4096`, `"pos":8192`, 1)))
	f.Add([]byte(base), []byte(strings.Replace(base, `"pos":4096`, `"pos":04096`, 1)))
	f.Add([]byte(base), []byte(strings.Replace(base, `"monotonic_ns":123`, `"monotonic_ns":99999999999999999999`, 1)))
	f.Add([]byte(base), []byte(strings.Replace(base, `"num":4`, `"num":3`, 1)))
	f.Add([]byte(base), []byte(strings.Replace(base, `"path":"log"`, `"path":"a"pos":1`, 1)))
	f.Fuzz(func(t *testing.T, first, second []byte) {
		var c deviceCheck
		for _, state := range [][]byte{first, second} {
			err := c.check(state, []string{"/g"})
			if err != nil {
				continue
			}
			var st wasi.State
			if uerr := json.Unmarshal(state, &st); uerr != nil {
				t.Fatalf("passed %q, which does not parse: %v", state, uerr)
			}
			if verr := st.Validate(); verr != nil {
				t.Fatalf("passed %q, which is not valid: %v", state, verr)
			}
			if len(st.Preopens) != 1 || st.Preopens[0].GuestPath != "/g" {
				t.Fatalf("passed %q, whose preopens are %v", state, st.Preopens)
			}
		}
	})
}

// BenchmarkDeviceCheck: the backup's check of a KV server's device state
// (32 connections) at a checkpoint: "clock" is the usual case, a state
// that changed only its clock; "changed" parses and validates it.
func BenchmarkDeviceCheck(b *testing.B) {
	st := &wasi.State{Args: []string{"kv"}, Preopens: []wasi.Preopen{{HostPath: "/h", GuestPath: "/g"}},
		FDs: []wasi.FDState{{Num: 3, Kind: wasi.KindListener, Addr: "127.0.0.1:7"}}}
	for i := range 32 {
		st.FDs = append(st.FDs, wasi.FDState{Num: uint32(4 + i), Kind: wasi.KindConn, Addr: "127.0.0.1:40000",
			RightsBase: 0x1ffffff, Readable: true, Writable: true})
	}
	var enc devicesJSON
	states := make([][]byte, 64)
	for i := range states {
		st.Monotonic = uint64(i) * 25_000_000
		s, err := enc.encode(st)
		if err != nil {
			b.Fatal(err)
		}
		states[i] = s
	}
	b.Logf("%d bytes of device state", len(states[0]))
	for _, changed := range []bool{false, true} {
		name := map[bool]string{false: "clock", true: "changed"}[changed]
		b.Run(name, func(b *testing.B) {
			var c deviceCheck
			for i := 0; b.Loop(); i++ {
				if changed {
					c.ok = false
				}
				if err := c.check(states[i%len(states)], []string{"/g"}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDevicesJSON: the primary's encoding of a KV server's device
// state (32 connections and a log it appends to) at a checkpoint where
// only the clock and the log's position moved ("template"), against
// json.Marshal of it ("marshal").
func BenchmarkDevicesJSON(b *testing.B) {
	st := &wasi.State{Args: []string{"kv"}, Preopens: []wasi.Preopen{{HostPath: "/h", GuestPath: "/g"}},
		FDs: []wasi.FDState{{Num: 3, Kind: wasi.KindListener, Addr: "127.0.0.1:7"},
			{Num: 4, Kind: wasi.KindFile, Path: "log", Writable: true, Pos: 1}}}
	for i := range 32 {
		st.FDs = append(st.FDs, wasi.FDState{Num: uint32(5 + i), Kind: wasi.KindConn, Addr: "127.0.0.1:40000",
			RightsBase: 0x1ffffff, Readable: true, Writable: true})
	}
	b.Run("template", func(b *testing.B) {
		var c devicesJSON
		for b.Loop() {
			st.Monotonic += 25_000_000
			st.FDs[1].Pos += 4096
			if _, err := c.encode(st); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("marshal", func(b *testing.B) {
		for b.Loop() {
			st.Monotonic += 25_000_000
			st.FDs[1].Pos += 4096
			if _, err := json.Marshal(st); err != nil {
				b.Fatal(err)
			}
		}
	})
}
