package instrument_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/tetratelabs/wazero"

	"github.com/ftvm/ftvm/machine/instrument"
)

// fuzzSeeds are small modules covering what the rewriter decodes: imports of
// every kind, each global type and constant-expression form, existing and
// missing export sections, custom sections in between. They are also written
// to testdata/fuzz/FuzzExportGlobals (FTVM_WRITE_SEEDS=1 go test -run Seeds).
func fuzzSeeds() map[string][]byte {
	g := func(t byte, init ...[]byte) []byte { return global(t, true, cat(init...)) }
	return map[string][]byte{
		"hello": wasiHello("hi\n", nil, nil),
		"imports": wasmModule(
			sec(1, vec(functype([]byte{tI32}, nil))),
			sec(2, vec(
				importFunc("wasi_snapshot_preview1", "proc_exit", 0),
				cat(str("env"), str("t"), []byte{1, 0x70, 1, 1, 2}), // table funcref 1..2
				importMemory("env", "m", 1),
				importGlobal("env", "g", tF32, false),
				cat(str("env"), str("e"), []byte{4, 0}, uleb(0)), // tag
			)),
			custom("mid", []byte{0xff}),
			sec(6, vec(g(tF32, []byte{0x23, 0}))),
		),
		"consts": wasmModule(sec(6, vec(
			g(tI32, i32const(-1)), g(tI64, i64const(math64)), g(tF32, []byte{0x43, 0, 0, 0x80, 0x3f}),
			g(tF64, cat([]byte{0x44}, make([]byte, 8))), g(0x7b, cat([]byte{0xfd, 12}, make([]byte, 16))),
			g(0x70, []byte{0xd0, 0x70}), g(0x6f, []byte{0xd0, 0x6f}),
			g(tI32, i32const(1), i32const(2), []byte{0x6a}), // extended-const i32.add
		)), sec(7, vec(export("first", 3, 0)))),
		"no-globals":  wasmModule(sec(1, vec(functype(nil, nil))), sec(3, vec(uleb(0))), sec(10, vec(body()))),
		"custom-only": wasmModule(custom("a", nil), custom("b", []byte("x"))),
		"truncated":   wasiHello("hi\n", nil, nil)[:40],
	}
}

const math64 = -1 << 63

// FuzzExportGlobals: the rewriter never panics, rejects with a FormatError,
// and on success exports every global, is idempotent, and keeps a module
// that wazero accepts acceptable to wazero.
func FuzzExportGlobals(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigInterpreter())
	defer rt.Close(ctx)
	f.Fuzz(func(t *testing.T, mod []byte) {
		orig := bytes.Clone(mod)
		out, globals, err := instrument.ExportGlobals(mod)
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
		for i, g := range globals {
			if g.Index != uint32(i) || g.Export == "" {
				t.Fatalf("global %d: %+v", i, g)
			}
		}
		again, globals2, err := instrument.ExportGlobals(out)
		if err != nil || !bytes.Equal(again, out) || fmt.Sprint(globals2) != fmt.Sprint(globals) {
			t.Fatalf("second pass: err %v, changed %v, globals %v vs %v", err, !bytes.Equal(again, out), globals2, globals)
		}
		if c, err := rt.CompileModule(ctx, mod); err == nil {
			c.Close(ctx)
			c, err := rt.CompileModule(ctx, out)
			if err != nil {
				t.Fatalf("wazero compiles the input but not the output: %v", err)
			}
			c.Close(ctx)
		}
	})
}

// TestWriteFuzzSeeds writes fuzzSeeds as committed corpus files.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("FTVM_WRITE_SEEDS") == "" {
		t.Skip("set FTVM_WRITE_SEEDS=1 to rewrite testdata/fuzz/FuzzExportGlobals")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzExportGlobals")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range fuzzSeeds() {
		data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, "seed-"+name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
