package instrument_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/ftvm/ftvm/machine/instrument"
)

func needWasmOpt(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("wasm-opt"); err != nil {
		t.Skip("wasm-opt not installed (Debian package binaryen)")
	}
}

// featuresModule is a WASI command using every feature instrument.Features
// enables: multivalue results and block types, sign-ext, saturating
// float-to-int, bulk memory and reference types. It prints "r=5!\n".
func featuresModule() []byte {
	pair := functype(nil, []byte{tI32, tI32}) // type 2
	return wasiHello("r=__\n", [][]byte{pair}, [][2][]byte{{uleb(2), body(i32const(1), i32const(2))}},
		i32const(18),
		[]byte{0x10, 2, 0x6a},             // call $pair; i32.add          -> 3
		i32const(255), []byte{0xc0, 0x6a}, // i32.extend8_s; add           -> 2
		[]byte{0xd0, 0x70, 0xd1, 0x6a},                                      // ref.null func; ref.is_null   -> 3
		[]byte{0x43, 0, 0, 0x20, 0x40},                                      // f32.const 2.5
		[]byte{0xfc, 0, 0x6a},                                               // i32.trunc_sat_f32_s; add     -> 5
		[]byte{0x02, 2}, i32const(7), i32const(7), []byte{0x0b, 0x6b, 0x6a}, // block (type 2); sub; add
		i32const('0'), []byte{0x6a, 0x3a, 0, 0}, // + '0'; i32.store8
		i32const(19), i32const('!'), i32const(1), []byte{0xfc, 0x0b, 0}, // memory.fill
	)
}

func TestInstrumentFeatures(t *testing.T) {
	needWasmOpt(t)
	// The second input exports mutable globals (mutable-globals feature).
	withExports, _, err := instrument.ExportGlobals(featuresModule())
	if err != nil {
		t.Fatal(err)
	}
	for _, orig := range [][]byte{featuresModule(), withExports} {
		want := run(t, orig, "-")
		if want.stdout != "r=5!\n" {
			t.Fatalf("original prints %q", want.stdout)
		}
		in, err := instrument.Instrument(context.Background(), orig, "-")
		if err != nil {
			t.Fatal(err)
		}
		if got := run(t, in.Module, "-"); got != want {
			t.Errorf("instrumented: %+v, want %+v", got, want)
		}
		if strings.Join(in.SafePoints, ",") != "wasi_snapshot_preview1.fd_write" {
			t.Errorf("safe points %v", in.SafePoints)
		}
		checkInstrumented(t, in)
	}
}

// checkInstrumented checks the promises of an Instrumented: Asyncify's
// functions exported, every global exported under the listed name.
func checkInstrumented(t *testing.T, in *instrument.Instrumented) {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigInterpreter())
	defer rt.Close(ctx)
	c, err := rt.CompileModule(ctx, in.Module)
	if err != nil {
		t.Fatal(err)
	}
	fns := c.ExportedFunctions()
	for _, name := range instrument.AsyncifyExports {
		if fns[name] == nil {
			t.Errorf("no %s export", name)
		}
	}
	same, globals, err := instrument.ExportGlobals(in.Module)
	if err != nil || !bytes.Equal(same, in.Module) {
		t.Fatalf("instrumented module has unexported globals (err %v)", err)
	}
	if len(globals) != len(in.Globals) {
		t.Fatalf("%d globals listed, module has %d", len(in.Globals), len(globals))
	}
	// Asyncify adds two i32 globals (state and data pointer); they must be
	// exported too, so a capture sees them.
	if len(globals) < 2 {
		t.Errorf("globals %v: Asyncify's are missing", globals)
	}
	for i, g := range in.Globals {
		if g != globals[i] || g.Export == "" {
			t.Errorf("global %d: %+v, module says %+v", i, g, globals[i])
		}
	}
	checkAsyncifyState(t, in)
}

// checkAsyncifyState checks what NOTES.md says of wasm-opt 108's output:
// the data header is {i32 pos, i32 end}, the start/stop functions trap when
// pos > end, and __asyncify_state and __asyncify_data are the last two
// globals, exported by Instrument.
func checkAsyncifyState(t *testing.T, in *instrument.Instrumented) {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigInterpreter())
	defer rt.Close(ctx)
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	mod, err := rt.InstantiateWithConfig(ctx, in.Module, wazero.NewModuleConfig().WithStartFunctions())
	if err != nil {
		t.Fatal(err)
	}
	n := len(in.Globals)
	state, data := mod.ExportedGlobal(in.Globals[n-2].Export), mod.ExportedGlobal(in.Globals[n-1].Export)
	mem := mod.ExportedMemory("memory")
	d := mem.Size() - 64 // a region at the top of memory
	call := func(name string, args ...uint64) ([]uint64, error) {
		return mod.ExportedFunction(name).Call(ctx, args...)
	}
	mem.WriteUint32Le(d, d+8)
	mem.WriteUint32Le(d+4, d+64)
	if _, err := call(instrument.ExportStartUnwind, uint64(d)); err != nil {
		t.Fatal(err)
	}
	if st, _ := call(instrument.ExportGetState); st[0] != 1 || state.Get() != 1 || data.Get() != uint64(d) {
		t.Errorf("unwinding: get_state %d, globals %d and %d; want 1, 1, %d", st[0], state.Get(), data.Get(), d)
	}
	if _, err := call(instrument.ExportStopUnwind); err != nil || state.Get() != 0 {
		t.Errorf("stop_unwind: %v, state %d", err, state.Get())
	}
	mem.WriteUint32Le(d, d+65) // pos past end
	if _, err := call(instrument.ExportStartRewind, uint64(d)); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Errorf("start_rewind with pos > end: %v, want a trap", err)
	}
}

// fakeWasmOpt is a wasm-opt that counts its instrumenting runs in a file.
func fakeWasmOpt(t *testing.T, body string) (path, count string) {
	t.Helper()
	dir := t.TempDir()
	path, count = filepath.Join(dir, "wasm-opt"), filepath.Join(dir, "runs")
	script := "#!/bin/sh\nif [ \"$1\" = --version ]; then echo version >> " + count + "; echo 'wasm-opt version 108 (test wrapper)'; exit 0; fi\n" +
		"echo run >> " + count + "\n" + body + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, count
}

func runs(t *testing.T, count string) int {
	b, err := os.ReadFile(count)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "run\n")
}

func setWasmOpt(t *testing.T, path string) {
	old := instrument.WasmOpt
	instrument.WasmOpt = path
	t.Cleanup(func() { instrument.WasmOpt = old })
}

// countedWasmOpt makes instrumentation use the real wasm-opt through
// fakeWasmOpt's counting wrapper.
func countedWasmOpt(t *testing.T) (path, count string) {
	needWasmOpt(t)
	real, _ := exec.LookPath("wasm-opt")
	path, count = fakeWasmOpt(t, "exec "+real+" \"$@\"")
	setWasmOpt(t, path)
	return path, count
}

func TestInstrumentCacheOnce(t *testing.T) {
	_, count := countedWasmOpt(t)
	cache := t.TempDir()
	mod := wasiHello("cached\n", nil, nil)

	// Concurrent callers: one runs wasm-opt, the others wait and load.
	const n = 6
	var wg sync.WaitGroup
	results := make([]*instrument.Instrumented, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i], errs[i] = instrument.Instrument(context.Background(), mod, cache)
		}(i)
	}
	wg.Wait()
	fresh := 0
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if !bytes.Equal(results[i].Module, results[0].Module) || results[i].Key != results[0].Key {
			t.Errorf("caller %d got a different result", i)
		}
		if !results[i].Cached {
			fresh++
		}
	}
	if r := runs(t, count); r != 1 || fresh != 1 {
		t.Errorf("wasm-opt ran %d times, %d fresh results; want 1 and 1", r, fresh)
	}
	checkInstrumented(t, results[0])
	if got := run(t, results[0].Module, "-"); got.stdout != "cached\n" {
		t.Errorf("stdout %q", got.stdout)
	}

	// The cache holds the finished module under its key, and the tool's
	// version, and nothing else.
	entries, _ := os.ReadDir(cache)
	for _, e := range entries {
		if e.Name() != results[0].Key+".wasm" && e.Name() != "wasm-opt-version" {
			t.Errorf("stray file in cache: %s", e.Name())
		}
	}
	// A damaged cache entry is redone, not trusted.
	if err := os.WriteFile(filepath.Join(cache, results[0].Key+".wasm"), []byte("\x00asm\x01\x00\x00\x00\x01"), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := instrument.Instrument(context.Background(), mod, cache)
	if err != nil || in.Cached || !bytes.Equal(in.Module, results[0].Module) || runs(t, count) != 2 {
		t.Errorf("after damage: err %v cached %v runs %d", err, in != nil && in.Cached, runs(t, count))
	}
	// Another module is another key.
	other, err := instrument.Instrument(context.Background(), wasiHello("other\n", nil, nil), cache)
	if err != nil || other.Key == in.Key || other.Cached {
		t.Errorf("other module: err %v, same key %v", err, other != nil && other.Key == in.Key)
	}
}

// TestToolVersionRemembered: a process that finds its module in the cache
// does not start wasm-opt at all, not even to ask its version — unless the
// binary changed, and then the new version makes a new key.
func TestToolVersionRemembered(t *testing.T) {
	path, count := countedWasmOpt(t)
	cache := t.TempDir()
	mod := wasiHello("versioned\n", nil, nil)
	versions := func() int {
		b, _ := os.ReadFile(count)
		return strings.Count(string(b), "version\n")
	}
	instrument.ForgetToolVersion()
	first, err := instrument.Instrument(context.Background(), mod, cache)
	if err != nil {
		t.Fatal(err)
	}
	if v := versions(); v != 1 {
		t.Fatalf("wasm-opt --version ran %d times, want 1", v)
	}
	// A new process: version from the cache, module from the cache.
	instrument.ForgetToolVersion()
	again, err := instrument.Instrument(context.Background(), mod, cache)
	if err != nil || !again.Cached || again.Key != first.Key {
		t.Fatalf("second process: err %v, cached %v, same key %v", err, again != nil && again.Cached, again != nil && again.Key == first.Key)
	}
	if v, r := versions(), runs(t, count); v != 1 || r != 1 {
		t.Errorf("second process started wasm-opt: %d version runs, %d instrumenting runs; want 1 and 1", v, r)
	}
	// An upgraded binary (another version, another size and time).
	script, _ := os.ReadFile(path)
	upgraded := strings.Replace(string(script), "version 108 (test wrapper)", "version 109 (test wrapper)", 1)
	if err := os.WriteFile(path, []byte(upgraded), 0o755); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Hour)
	if err := os.Chtimes(path, future, future); err != nil {
		t.Fatal(err)
	}
	instrument.ForgetToolVersion()
	up, err := instrument.Instrument(context.Background(), mod, cache)
	if err != nil {
		t.Fatal(err)
	}
	if v := versions(); v != 2 {
		t.Errorf("after the upgrade wasm-opt --version ran %d times in all, want 2", v)
	}
	if up.Cached || up.Key == first.Key {
		t.Errorf("after the upgrade: cached %v, same key %v; want a fresh instrumentation under a new key", up.Cached, up.Key == first.Key)
	}
	// A damaged memo is asked again, not trusted.
	if err := os.WriteFile(filepath.Join(cache, "wasm-opt-version"), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	instrument.ForgetToolVersion()
	if _, err := instrument.Instrument(context.Background(), mod, cache); err != nil {
		t.Fatal(err)
	}
	if v := versions(); v != 3 {
		t.Errorf("with a damaged memo wasm-opt --version ran %d times in all, want 3", v)
	}
}

func TestInstrumentMissingTool(t *testing.T) {
	setWasmOpt(t, filepath.Join(t.TempDir(), "wasm-opt"))
	_, err := instrument.Instrument(context.Background(), wasiHello("x\n", nil, nil), t.TempDir())
	var mt *instrument.MissingToolError
	if !errors.As(err, &mt) || !strings.Contains(err.Error(), "Debian package binaryen") {
		t.Errorf("error %v, want one naming the Debian package binaryen", err)
	}
}

func TestInstrumentTimeout(t *testing.T) {
	path, _ := fakeWasmOpt(t, "exec sleep 30")
	setWasmOpt(t, path)
	old := instrument.Timeout
	instrument.Timeout = 300 * time.Millisecond
	defer func() { instrument.Timeout = old }()
	t0 := time.Now()
	_, err := instrument.Instrument(context.Background(), wasiHello("x\n", nil, nil), t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "did not finish within") {
		t.Errorf("error %v, want a time-out", err)
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("took %v", d)
	}
	// Cancellation by the caller is reported as such.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	instrument.Timeout = time.Minute
	if _, err := instrument.Instrument(ctx, wasiHello("y\n", nil, nil), "-"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v, want the context's", err)
	}
}

func TestInstrumentRejects(t *testing.T) {
	needWasmOpt(t)
	if _, err := instrument.Instrument(context.Background(), []byte("not wasm"), "-"); err == nil {
		t.Error("instrumented garbage")
	}
	in, err := instrument.Instrument(context.Background(), wasiHello("x\n", nil, nil), "-")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := instrument.Instrument(context.Background(), in.Module, "-"); err == nil || !strings.Contains(err.Error(), "already instrumented") {
		t.Errorf("second instrumentation: %v", err)
	}
}

// TestInstrumentGuests runs real guests before and after instrumentation
// under the machine: same output, same exit code.
func TestInstrumentGuests(t *testing.T) {
	needWasmOpt(t)
	if testing.Short() {
		t.Skip("wasm-opt takes about a minute per Go guest on a cold cache")
	}
	for _, g := range []struct {
		name string
		mod  func(testing.TB) []byte
		args []string
	}{
		{"hello", func(t testing.TB) []byte { return goGuest(t, "testdata/guests/hello") }, []string{"a", "b c"}},
		{"gocpu", func(t testing.TB) []byte { return goGuest(t, "testdata/guests/gocpu") }, []string{"1"}},
		{"cpu.c", func(t testing.TB) []byte { return cGuest(t, "cpu", "testdata/guests/c/cpu.c") }, []string{"1"}},
	} {
		t.Run(g.name, func(t *testing.T) {
			orig := g.mod(t)
			in := instrumentCached(t, orig)
			checkInstrumented(t, in)
			want := run(t, orig, "", g.args...)
			got := run(t, in.Module, "", g.args...)
			if got != want {
				t.Errorf("instrumented: %+v\nwant %+v", got, want)
			}
			t.Logf("%d -> %d bytes, %d globals, safe points %v", len(orig), len(in.Module), len(in.Globals), in.SafePoints)
		})
	}
}
