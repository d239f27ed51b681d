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

	"github.com/ftvm/ftvm/machine"
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
		if !oracleSafe(mod) {
			return
		}
		if compiles(ctx, rt, mod) == nil {
			if err := compiles(ctx, rt, out); err != nil {
				t.Fatalf("wazero compiles the input but not the output: %v", err)
			}
		}
	})
}

// compiles reports whether wazero compiles mod. wazero v1.12.0's decoder
// panics on some malformed code sections (see the corpus entry
// f59c7c08a941cdd1); that counts as a rejection.
func compiles(ctx context.Context, rt wazero.Runtime, mod []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("wazero panicked: %v", r)
		}
	}()
	c, err := rt.CompileModule(ctx, mod)
	if err == nil {
		c.Close(ctx)
	}
	return err
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

// oracleSafe reports whether a module may be given to wazero, the fuzz
// targets' oracle: only one machine.ScanModule passes, as ftvm hands wazero
// nothing else (a data segment declaring 4 GiB in a short file made
// wazero's decoder allocate them, and killed the fuzz worker), and that
// wazeroSafe passes.
func oracleSafe(mod []byte) bool {
	_, err := machine.ScanModule(mod)
	return err == nil && wazeroSafe(mod)
}

// wazeroSafe filters out inputs that would make wazero's decoder allocate
// by a declared count before it sees the bytes are missing (a code section
// claiming 800 million bodies kills the fuzz worker): wazero is the oracle
// here, not the target. It checks the counts wazero preallocates by: each
// section's item count, function type arities and locals; element sections,
// with their many encodings, are skipped altogether.
func wazeroSafe(mod []byte) bool {
	off := 8
	u32 := func(b []byte, o *int) (uint64, bool) {
		var v uint64
		for shift := 0; shift < 35; shift += 7 {
			if *o >= len(b) {
				return 0, false
			}
			c := b[*o]
			*o++
			v |= uint64(c&0x7f) << shift
			if c < 0x80 {
				return v, true
			}
		}
		return 0, false
	}
	for off < len(mod) {
		id := mod[off]
		off++
		size, ok := u32(mod, &off)
		if !ok || size > uint64(len(mod)-off) {
			return true // wazero rejects this before allocating
		}
		body := mod[off : off+int(size)]
		off += int(size)
		if id == 0 || id == 8 || id == 12 {
			continue
		}
		if id == 9 {
			return false
		}
		o := 0
		n, ok := u32(body, &o)
		if !ok {
			return true
		}
		if n > uint64(len(body)) {
			return false
		}
		switch id {
		case 1: // function types: 0x60, params, results
			for i := uint64(0); i < n && o < len(body); i++ {
				o++
				for k := 0; k < 2; k++ {
					c, ok := u32(body, &o)
					if !ok || c > uint64(len(body)-o) {
						return !ok
					}
					o += int(c)
				}
			}
		case 10: // bodies: size, local declarations
			var locals uint64
			for i := uint64(0); i < n; i++ {
				bs, ok := u32(body, &o)
				if !ok || bs > uint64(len(body)-o) {
					return true
				}
				fb, fo := body[o:o+int(bs)], 0
				o += int(bs)
				decls, ok := u32(fb, &fo)
				if !ok || decls > uint64(len(fb)) {
					return !ok
				}
				for d := uint64(0); d < decls; d++ {
					c, ok := u32(fb, &fo)
					if !ok {
						break
					}
					fo++
					locals += c
				}
				if locals > 1<<16 {
					return false
				}
			}
		}
	}
	return true
}
