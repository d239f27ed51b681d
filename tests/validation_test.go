package tests

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
)

// A minimal encoder of the wasm binary format, enough to assemble the small
// modules these tests need: each one differs from a runnable command in
// exactly the way under test.

// wLEB encodes an unsigned LEB128.
func wLEB(v uint64) []byte {
	var out []byte
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if v != 0 {
			c |= 0x80
		}
		out = append(out, c)
		if v == 0 {
			return out
		}
	}
}

func wName(s string) []byte { return append(wLEB(uint64(len(s))), s...) }

func wCat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// wVec is a vector: a count then the items.
func wVec(items ...[]byte) []byte { return wCat(wLEB(uint64(len(items))), wCat(items...)) }

// wSection wraps content as section id.
func wSection(id byte, content []byte) []byte {
	return wCat([]byte{id}, wLEB(uint64(len(content))), content)
}

func wModule(sections ...[]byte) []byte {
	return wCat([]byte("\x00asm\x01\x00\x00\x00"), wCat(sections...))
}

const (
	wI32       = 0x7f
	wKindFunc  = 0
	wKindMem   = 2
	wOpCall    = 0x10
	wOpI32     = 0x41
	wOpUnreach = 0x00
	wOpEnd     = 0x0b
)

// wFuncType is (params) -> (results).
func wFuncType(params, results []byte) []byte {
	return wCat([]byte{0x60}, wVec(bytesAsItems(params)...), wVec(bytesAsItems(results)...))
}

func bytesAsItems(b []byte) [][]byte {
	out := make([][]byte, len(b))
	for i := range b {
		out[i] = b[i : i+1]
	}
	return out
}

func wImportFunc(module, name string, typeIdx uint32) []byte {
	return wCat(wName(module), wName(name), []byte{wKindFunc}, wLEB(uint64(typeIdx)))
}

func wExport(name string, kind byte, idx uint32) []byte {
	return wCat(wName(name), []byte{kind}, wLEB(uint64(idx)))
}

// wBody is a function body without locals.
func wBody(code ...byte) []byte {
	b := wCat([]byte{0}, code, []byte{wOpEnd})
	return wCat(wLEB(uint64(len(b))), b)
}

// wMemory is a memory section with one memory of the given limits flags.
func wMemory(flags byte, limits ...uint64) []byte {
	l := []byte{flags}
	for _, v := range limits {
		l = append(l, wLEB(v)...)
	}
	return wSection(5, wVec(l))
}

// wCommand assembles a WASI command whose _start runs code, with imports
// (all of type 0: (i32) -> ()) and memory as given. _start has type 1.
func wCommand(imports [][]byte, memory []byte, startType []byte, code ...byte) []byte {
	if startType == nil {
		startType = wFuncType(nil, nil)
	}
	nImports := uint32(len(imports))
	secs := [][]byte{wSection(1, wVec(wFuncType([]byte{wI32}, nil), startType))}
	if len(imports) > 0 {
		secs = append(secs, wSection(2, wVec(imports...)))
	}
	secs = append(secs, wSection(3, wVec(wLEB(1))))
	exports := [][]byte{wExport("_start", wKindFunc, nImports)}
	if memory != nil {
		secs = append(secs, memory)
		exports = append(exports, wExport("memory", wKindMem, 0))
	}
	secs = append(secs, wSection(7, wVec(exports...)), wSection(10, wVec(wBody(code...))))
	return wModule(secs...)
}

var (
	wMem1      = wMemory(0, 1)
	wProcExit  = wImportFunc("wasi_snapshot_preview1", "proc_exit", 0)
	exitWith7  = []byte{wOpI32, 7, wOpCall, 0}
	wStartVoid = wFuncType(nil, nil)
)

// validationCase is one module the CLI must run or refuse, and how.
type validationCase struct {
	name      string
	module    func(t *testing.T) []byte // or
	file      func(t *testing.T) string // a path (e.g. a built guest)
	flags     []string                  // ftvm run flags before the module
	args      []string                  // guest arguments
	code      int
	stderr    []string // substrings stderr must contain
	stdout    string   // substring stdout must contain
	guestIsGo bool
}

func bytesCase(b []byte) func(t *testing.T) []byte { return func(*testing.T) []byte { return b } }

// failGuest is fail.c as guests are normally built (-O2).
func failGuest(t *testing.T) string { return cGuest(t, "fail", []string{"fail.c"}) }

// failGuestNamed is fail.c built with -O0: at -O2 clang runs binaryen's
// wasm-opt after linking, which drops the name section, and a stack trace of
// bare function indices would not show that the trace names the right
// functions. (At -O0 deep recursion exhausts the C shadow stack in linear
// memory before the wasm call stack, so the recursion case uses failGuest.)
func failGuestNamed(t *testing.T) string { return cGuest(t, "fail", []string{"fail.c"}, "-O0") }

func goFail(t *testing.T) string { return guest.MustGo(t, "testdata/guests/gofail") }

var validationCases = []validationCase{
	// Positive controls: the encoder makes runnable commands.
	{name: "minimal command", module: bytesCase(wCommand(nil, wMem1, nil)), code: 0},
	{name: "proc_exit 7", module: bytesCase(wCommand([][]byte{wProcExit}, wMem1, nil, exitWith7...)), code: 7},

	// Not a module at all.
	{name: "text file", module: bytesCase([]byte("#!/bin/sh\necho hello\n")), code: 126,
		stderr: []string{"not a WebAssembly module"}},
	{name: "empty file", module: bytesCase(nil), code: 126, stderr: []string{"not a WebAssembly module"}},
	{name: "missing file", file: func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope.wasm") },
		code: 126, stderr: []string{"nope.wasm", "no such file"}},
	{name: "wasm version 2", module: bytesCase([]byte("\x00asm\x02\x00\x00\x00")), code: 126,
		stderr: []string{"version"}},
	{name: "component", module: bytesCase(wCat([]byte("\x00asm\x0d\x00\x01\x00"), wSection(0, wName("x")))),
		code: 126, stderr: []string{"component", "preview 1"}},

	// Broken modules.
	{name: "truncated real module", module: func(t *testing.T) []byte {
		b := readModule(t, failGuest(t))
		return b[:len(b)/2]
	}, code: 126, stderr: []string{"truncated"}},
	{name: "section size past the end", module: bytesCase(wCat(wCommand(nil, wMem1, nil), []byte{11, 0x80, 0x80, 0x04})),
		code: 126, stderr: []string{"truncated"}},
	{name: "invalid instruction", module: bytesCase(wCommand(nil, wMem1, nil, 0xff)), code: 126,
		stderr: []string{"does not compile"}},

	// Modules ftvm cannot run, each for one reason.
	{name: "shared memory", module: bytesCase(wCommand(nil, wMemory(3, 1, 1), nil)), code: 126,
		stderr: []string{"shared memory"}},
	{name: "memory64", module: bytesCase(wCommand(nil, wMemory(4, 1), nil)), code: 126,
		stderr: []string{"memory64"}},
	{name: "no _start", module: bytesCase(wModule(
		wSection(1, wVec(wStartVoid)), wSection(3, wVec(wLEB(0))), wMem1,
		wSection(7, wVec(wExport("run", wKindFunc, 0), wExport("memory", wKindMem, 0))),
		wSection(10, wVec(wBody())))), code: 126, stderr: []string{"_start"}},
	{name: "reactor", file: func(t *testing.T) string {
		return cGuest(t, "reactor", []string{"reactor.c"}, "-mexec-model=reactor", "-Wl,--export=add")
	}, code: 126, stderr: []string{"reactor", "_initialize"}},
	{name: "unknown imports", module: bytesCase(wCommand([][]byte{
		wImportFunc("env", "foo", 0), wImportFunc("wasi_snapshot_preview1", "nonexistent", 0), wProcExit,
	}, wMem1, nil)), code: 126, stderr: []string{"env.foo", "wasi_snapshot_preview1.nonexistent"}},
	{name: "wasi_unstable", module: bytesCase(wCommand([][]byte{wImportFunc("wasi_unstable", "proc_exit", 0)}, wMem1, nil)),
		code: 126, stderr: []string{"wasi_unstable"}},
	{name: "memory not exported", module: bytesCase(wModule(
		wSection(1, wVec(wStartVoid)), wSection(3, wVec(wLEB(0))), wMem1,
		wSection(7, wVec(wExport("_start", wKindFunc, 0))), wSection(10, wVec(wBody())))),
		code: 126, stderr: []string{"memory"}},
	{name: "initial memory above the limit", module: bytesCase(wCommand(nil, wMemory(0, 32), nil)),
		flags: []string{"--memory-limit", "1MiB"}, code: 126, stderr: []string{"2MiB", "1MiB"}},

	// Bad flags are ftvm's setup errors.
	{name: "memory limit not a page multiple", module: bytesCase(wCommand(nil, wMem1, nil)),
		flags: []string{"--memory-limit", "100000"}, code: 125, stderr: []string{"64KiB"}},
	{name: "memory limit unparsable", module: bytesCase(wCommand(nil, wMem1, nil)),
		flags: []string{"--memory-limit", "lots"}, code: 125, stderr: []string{"--memory-limit"}},

	// Traps: 134, the trap's cause and the wasm stack.
	{name: "C __builtin_trap", file: failGuestNamed, args: []string{"trap"}, code: 134, stdout: "about to trap",
		flags:  []string{"--instrument=false"},
		stderr: []string{"guest trapped: unreachable", "wasm stack trace:", "crash_here", "main"}},
	// Instrumented (the default), the optimizer after Asyncify inlines
	// functions: the trace is shorter, and ftvm says how to get all of it.
	{name: "C __builtin_trap instrumented", file: failGuestNamed, args: []string{"trap"}, code: 134, stdout: "about to trap",
		stderr: []string{"guest trapped: unreachable", "wasm stack trace:", "_start", "--instrument=false for every frame"}},
	{name: "C divide by zero", file: failGuest, args: []string{"divzero"}, code: 134,
		stderr: []string{"integer divide by zero", "wasm stack trace:"}},
	{name: "C out of bounds store", file: failGuest, args: []string{"oob"}, code: 134,
		stderr: []string{"out of bounds memory access", "wasm stack trace:"}},
	{name: "C call stack exhausted", file: failGuest, args: []string{"recurse"}, code: 134,
		stderr: []string{"stack overflow"}},
	{name: "unreachable in _start", module: bytesCase(wCommand(nil, wMem1, nil, wOpUnreach)), code: 134,
		stderr: []string{"unreachable", "wasm stack trace:"}},

	// Memory limit: the guest sees allocation fail; ftvm says why.
	{name: "C malloc beyond the limit", file: failGuest, args: []string{"malloc"},
		flags: []string{"--memory-limit", "16MiB"}, code: 12,
		stderr: []string{"malloc failed after", "refused memory growth", "--memory-limit 16MiB"}},
	{name: "Go allocating beyond the limit", file: goFail, args: []string{"alloc"}, guestIsGo: true,
		flags: []string{"--memory-limit", "32MiB"}, code: 2,
		stderr: []string{"out of memory", "refused memory growth", "--memory-limit 32MiB"}},

	// Go guests report their own panics and exit 2 through proc_exit.
	{name: "Go panic", file: goFail, args: []string{"panic"}, guestIsGo: true, code: 2,
		stderr: []string{"panic: gofail: deliberate panic", "main.main()"}},
	{name: "Go nil dereference", file: goFail, args: []string{"nil"}, guestIsGo: true, code: 2,
		stderr: []string{"nil pointer dereference", "main.main()"}},
}

// TestValidationCLI runs each case through the ftvm binary: the exit code
// says which kind of failure it was, stderr says why in words a user can
// act on, and ftvm itself never panics.
func TestValidationCLI(t *testing.T) {
	for _, tc := range validationCases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			var path string
			if tc.file != nil {
				path = tc.file(t)
			} else {
				path = filepath.Join(t.TempDir(), "m.wasm")
				if err := os.WriteFile(path, tc.module(t), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			args := append(append(append([]string{"run"}, tc.flags...), path), tc.args...)
			res := runCLI(t, 2*time.Minute, "", args...)
			if res.code != tc.code {
				t.Errorf("exit code %d, want %d", res.code, tc.code)
			}
			for _, want := range tc.stderr {
				if !strings.Contains(res.stderr, want) {
					t.Errorf("stderr lacks %q", want)
				}
			}
			if !strings.Contains(res.stdout, tc.stdout) {
				t.Errorf("stdout lacks %q", tc.stdout)
			}
			if tc.code >= 125 && !strings.HasPrefix(res.stderr, "ftvm: ") && !strings.Contains(res.stderr, "\nftvm: ") {
				t.Errorf("ftvm's own failure is not reported as ftvm's")
			}
			checkNoHostPanic(t, res.stderr, tc.guestIsGo)
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", res.stdout, res.stderr)
			}
		})
	}
}

// TestValidationLibrary checks the library's error types, which the CLI's
// exit codes and the API rely on: a module that cannot run is a
// *machine.ModuleError from New, a trap is a *machine.TrapError from Run
// with the wasm stack separate from the message.
func TestValidationLibrary(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  []byte
	}{
		{"not wasm", []byte("hello")},
		{"unknown import", wCommand([][]byte{wImportFunc("env", "foo", 0)}, wMem1, nil)},
		{"shared memory", wCommand(nil, wMemory(3, 1, 1), nil)},
		{"invalid instruction", wCommand(nil, wMem1, nil, 0xff)},
	} {
		_, err := machine.New(t.Context(), machine.Config{Module: tc.mod, Name: "m.wasm", CacheDir: "-"})
		var me *machine.ModuleError
		if !errors.As(err, &me) {
			t.Errorf("%s: New returned %v (%T), want a *machine.ModuleError", tc.name, err, err)
		}
	}

	res := runLib(t, time.Minute, machine.Config{Module: readModule(t, failGuestNamed(t)), Name: "fail.wasm",
		Args: []string{"trap"}})
	var te *machine.TrapError
	if !errors.As(res.err, &te) {
		t.Fatalf("a trapping guest: Run returned %v, %v; want a *machine.TrapError", res.code, res.err)
	}
	if te.Message != "unreachable" {
		t.Errorf("trap message %q, want \"unreachable\"", te.Message)
	}
	if !strings.Contains(te.Stack, "crash_here") || strings.Contains(te.Message, "\n") {
		t.Errorf("trap stack %q should name crash_here and be separate from the message", te.Stack)
	}
	if res.stdout != "about to trap\n" {
		t.Errorf("stdout before the trap: %q", res.stdout)
	}
}

// TestValidationSignatureMismatch covers modules that name functions ftvm
// provides but with the wrong types, or a _start that takes arguments:
// they cannot run, which is a module error (126), not a trap.
func TestValidationSignatureMismatch(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  []byte
	}{
		// proc_exit imported as () -> () instead of (i32) -> (), and
		// called, so no optimizer may drop it.
		{"import with the wrong type", wModule(
			wSection(1, wVec(wStartVoid)),
			wSection(2, wVec(wImportFunc("wasi_snapshot_preview1", "proc_exit", 0))),
			wSection(3, wVec(wLEB(0))), wMem1,
			wSection(7, wVec(wExport("_start", wKindFunc, 1), wExport("memory", wKindMem, 0))),
			wSection(10, wVec(wBody(wOpCall, 0))))},
		// _start of type (i32) -> ().
		{"_start with a parameter", wModule(
			wSection(1, wVec(wFuncType([]byte{wI32}, nil))),
			wSection(3, wVec(wLEB(0))), wMem1,
			wSection(7, wVec(wExport("_start", wKindFunc, 0), wExport("memory", wKindMem, 0))),
			wSection(10, wVec(wBody())))},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "m.wasm")
			if err := os.WriteFile(path, tc.mod, 0o644); err != nil {
				t.Fatal(err)
			}
			res := runCLI(t, time.Minute, "", "run", path)
			if res.code != 126 {
				t.Errorf("exit code %d, want 126 (the module cannot run)", res.code)
			}
			if strings.Contains(res.stderr, "trapped") {
				t.Errorf("reported as a trap: %s", res.stderr)
			}
			checkNoHostPanic(t, res.stderr, false)
			if t.Failed() {
				t.Logf("stderr:\n%s", res.stderr)
			}
		})
	}
}
