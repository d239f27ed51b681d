package instrument_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/ftvm/ftvm/machine/instrument"
)

// pollsModule loops n times in an exported function reached through a
// table (call_indirect), exports a funcref global, starts with a start
// function and names its functions: every kind of function reference the
// rewrite renumbers, each checked by running it.
func pollsModule() []byte {
	// types: 0 (i32)->(i32), 1 ()->()
	types := sec(1, vec(functype([]byte{tI32}, []byte{tI32}), functype(nil, nil)))
	imports := sec(2, vec(importFunc("env", "note", 0)))
	// functions (after the 1 import): 1 count, 2 entry, 3 start
	funcs := sec(3, vec(uleb(0), uleb(0), uleb(1), uleb(0))) // + 4 add1
	table := sec(4, vec([]byte{0x70, 0x00, 0x01}))
	globals := sec(6, vec(global(0x70, false, []byte{0xd2, 0x01})))
	exports := sec(7, vec(export("entry", 0, 2), export("count", 0, 1), export("fref", 3, 0)))
	start := sec(8, uleb(3))
	elems := sec(9, vec(cat(uleb(0), i32const(0), []byte{0x0b}, vec(uleb(1)))))
	// count(n): i = 0; loop { i++; if i < n br 0 }; note(i) returns
	countBody := cat(
		uleb(1), uleb(1), []byte{tI32}, // locals: 1 × i32
		[]byte{0x03, 0x40},                               // loop
		[]byte{0x20, 0x01, 0x10, 0x04, 0x21, 0x01},       // i = add1(i): a loop that calls is polled
		[]byte{0x20, 0x01, 0x20, 0x00, 0x48, 0x0d, 0x00}, // br_if 0 (i < n)
		[]byte{0x0b},                   // end loop
		[]byte{0x20, 0x01, 0x10, 0x00}, // note(i)
		[]byte{0x0b},
	)
	// entry(n): call_indirect type 0 table 0 with index 0 -> count
	entryBody := cat(uleb(0), []byte{0x20, 0x00, 0x41, 0x00, 0x11, 0x00, 0x00, 0x0b})
	startBody := cat(uleb(0), []byte{0x41, 0x03, 0x10, 0x01, 0x1a, 0x0b}) // count(3), drop
	add1Body := cat(uleb(0), []byte{0x20, 0x00, 0x41, 0x01, 0x6a, 0x0b})
	code := sec(10, vec(cat(uleb(uint64(len(countBody))), countBody), cat(uleb(uint64(len(entryBody))), entryBody),
		cat(uleb(uint64(len(startBody))), startBody), cat(uleb(uint64(len(add1Body))), add1Body)))
	names := custom("name", cat([]byte{1}, uleb(uint64(len(vec(cat(uleb(1), str("count")), cat(uleb(2), str("entry")))))),
		vec(cat(uleb(1), str("count")), cat(uleb(2), str("entry")))))
	return wasmModule(types, imports, funcs, table, globals, exports, start, elems, code, names)
}

func TestInsertPollsRunsAndPolls(t *testing.T) {
	ctx := context.Background()
	mod := pollsModule()
	out, err := instrument.InsertPolls(mod)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(out, mod) {
		t.Fatal("nothing inserted")
	}
	again, err := instrument.InsertPolls(out)
	if err != nil || !bytes.Equal(again, out) {
		t.Fatalf("a second pass changed the module (err %v)", err)
	}
	for _, tc := range []struct {
		name  string
		mod   []byte
		polls bool
	}{{"original", mod, false}, {"polled", out, true}} {
		t.Run(tc.name, func(t *testing.T) {
			rt := wazero.NewRuntime(ctx)
			defer rt.Close(ctx)
			var notes []uint64
			var polls atomic.Int64
			if _, err := rt.NewHostModuleBuilder("env").NewFunctionBuilder().
				WithGoModuleFunction(api.GoModuleFunc(func(ctx context.Context, m api.Module, s []uint64) {
					notes = append(notes, s[0])
				}), []api.ValueType{api.ValueTypeI32}, []api.ValueType{api.ValueTypeI32}).Export("note").Instantiate(ctx); err != nil {
				t.Fatal(err)
			}
			var yields atomic.Int64
			if err := pollHost(ctx, rt, &polls, &yields); err != nil {
				t.Fatal(err)
			}
			inst, err := rt.Instantiate(ctx, tc.mod)
			if err != nil {
				t.Fatal(err)
			}
			const n = 5*instrument.PollInterval + 7
			res, err := inst.ExportedFunction("entry").Call(ctx, n)
			if err != nil {
				t.Fatal(err)
			}
			if res[0] != n || len(notes) != 2 || notes[0] != 3 || notes[1] != n {
				t.Fatalf("entry(%d) = %v, notes %v", n, res, notes)
			}
			if _, err := inst.ExportedFunction("count").Call(ctx, 10); err != nil {
				t.Fatal(err)
			}
			if g := inst.ExportedGlobal("fref"); g == nil {
				t.Fatal("funcref global lost")
			}
			want := int64(0)
			if tc.polls {
				want = 5 // n iterations of one activation: one poll per interval
			}
			if got := polls.Load(); got != want {
				t.Fatalf("%d polls, want %d", got, want)
			}
		})
	}
}

// Real guests, polled, run as before and poll.
func TestInsertPollsGuests(t *testing.T) {
	ctx := context.Background()
	for _, g := range []struct {
		name string
		mod  func(t testing.TB) []byte
		args []string
	}{
		{"c-cpu", func(t testing.TB) []byte { return cGuest(t, "cpu", "testdata/guests/c/cpu.c") }, []string{"cpu", "1"}},
		{"go-cpu", func(t testing.TB) []byte { return goGuest(t, "testdata/guests/gocpu") }, []string{"gocpu", "1"}},
	} {
		t.Run(g.name, func(t *testing.T) {
			mod := g.mod(t)
			out, err := instrument.InsertPolls(mod)
			if err != nil {
				t.Fatal(err)
			}
			run := func(m []byte) (string, int64, int64) {
				rt := wazero.NewRuntime(ctx)
				defer rt.Close(ctx)
				wasi_snapshot_preview1.MustInstantiate(ctx, rt)
				var polls, yields atomic.Int64
				if err := pollHost(ctx, rt, &polls, &yields); err != nil {
					t.Fatal(err)
				}
				var stdout bytes.Buffer
				_, err := rt.InstantiateWithConfig(ctx, m, wazero.NewModuleConfig().WithStdout(&stdout).WithArgs(g.args...))
				if err != nil && !strings.Contains(err.Error(), "exit_code(0)") {
					t.Fatal(err)
				}
				return stdout.String(), polls.Load(), yields.Load()
			}
			want, _, _ := run(mod)
			got, polls, yields := run(out)
			if got != want || want == "" {
				t.Fatalf("output differs:\n%s\nvs\n%s", got, want)
			}
			if polls == 0 || (g.name == "c-cpu" && yields == 0) { // Go code has no leaf loops (see polls.go)
				t.Fatalf("%d polls, %d yields", polls, yields)
			}
			t.Logf("%d bytes -> %d bytes, %d polls, %d yields", len(mod), len(out), polls, yields)
		})
	}
}

// FuzzInsertPolls: the rewrite never panics, fails only with a
// FormatError, is idempotent, and keeps a module wazero compiles
// compilable.
func FuzzInsertPolls(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Add(pollsModule())
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigInterpreter())
	defer rt.Close(ctx)
	f.Fuzz(func(t *testing.T, mod []byte) {
		orig := bytes.Clone(mod)
		out, err := instrument.InsertPolls(mod)
		if !bytes.Equal(mod, orig) {
			t.Fatal("input modified")
		}
		if err != nil {
			var fe *instrument.FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("error is not a FormatError: %v", err)
			}
			return
		}
		again, err := instrument.InsertPolls(out)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("second pass: err %v, changed %v", err, !bytes.Equal(again, out))
		}
		if !oracleSafe(mod) || !wazeroSafe(out) {
			return
		}
		if compiles(ctx, rt, mod) == nil {
			if err := compiles(ctx, rt, out); err != nil {
				os.WriteFile("/tmp/polls-bad.wasm", out, 0o644)
				t.Fatalf("wazero compiles the input but not the output: %v", err)
			}
		}
	})
}

// pollHost provides ftvm.safepoint and ftvm.yield, counting their calls.
func pollHost(ctx context.Context, rt wazero.Runtime, polls, yields *atomic.Int64) error {
	_, err := rt.NewHostModuleBuilder(instrument.PollModule).
		NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(func(context.Context, api.Module, []uint64) { polls.Add(1) }), nil, nil).
		Export(instrument.PollName).
		NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(func(context.Context, api.Module, []uint64) { yields.Add(1) }), nil, nil).
		Export(instrument.YieldName).
		Instantiate(ctx)
	return err
}
