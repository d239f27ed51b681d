package instrument_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

	"github.com/ftvm/ftvm/machine/instrument"
)

// sections splits a module into its raw sections, for byte-exact comparison.
func sections(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var out [][]byte
	off := 8
	for off < len(b) {
		start := off
		off++
		var size, shift uint64
		for {
			c := b[off]
			off++
			size |= uint64(c&0x7f) << shift
			shift += 7
			if c < 0x80 {
				break
			}
		}
		off += int(size)
		out = append(out, b[start:off])
	}
	return out
}

// fakeWASI instantiates a wasi_snapshot_preview1 with just fd_write, which
// appends to out.
func fakeWASI(t *testing.T, ctx context.Context, rt wazero.Runtime, out *bytes.Buffer) {
	t.Helper()
	_, err := rt.NewHostModuleBuilder("wasi_snapshot_preview1").NewFunctionBuilder().
		WithFunc(func(ctx context.Context, m api.Module, fd, iovs, n, nwritten uint32) uint32 {
			for i := uint32(0); i < n; i++ {
				p, _ := m.Memory().ReadUint32Le(iovs + 8*i)
				l, _ := m.Memory().ReadUint32Le(iovs + 8*i + 4)
				b, _ := m.Memory().Read(p, l)
				out.Write(b)
			}
			return 0
		}).Export("fd_write").Instantiate(ctx)
	if err != nil {
		t.Fatal(err)
	}
}

func TestExportGlobals(t *testing.T) {
	ctx := context.Background()
	orig := wasiHello("hi\n", nil, nil)
	out, globals, err := instrument.ExportGlobals(orig)
	if err != nil {
		t.Fatal(err)
	}
	want := []instrument.Global{
		{Index: 0, Type: instrument.I32, Mutable: true, Export: "ftvm.global.0"},
		{Index: 1, Type: instrument.I64, Export: "ftvm.global.1"},
		{Index: 2, Type: instrument.F64, Mutable: true, Export: "ftvm.global.2"},
		{Index: 3, Type: instrument.I32, Export: "seven"},
	}
	if fmt.Sprint(globals) != fmt.Sprint(want) {
		t.Errorf("globals\n%v\nwant\n%v", globals, want)
	}
	// Every section but the export section is carried over byte for byte.
	os, ns := sections(t, orig), sections(t, out)
	if len(os) != len(ns) {
		t.Fatalf("%d sections, want %d", len(ns), len(os))
	}
	for i := range os {
		if os[i][0] == 7 {
			// The old entries stay verbatim, the new ones follow.
			if !bytes.Contains(ns[i], os[i][3:]) || !bytes.Contains(ns[i], []byte("ftvm.global.2")) {
				t.Errorf("export section %x, was %x", ns[i], os[i])
			}
			continue
		}
		if !bytes.Equal(os[i], ns[i]) {
			t.Errorf("section %d (id %d) changed", i, os[i][0])
		}
	}

	// The rewritten module behaves as the original and exposes every global.
	for _, mod := range [][]byte{orig, out} {
		rt := wazero.NewRuntime(ctx)
		defer rt.Close(ctx)
		var stdout bytes.Buffer
		fakeWASI(t, ctx, rt, &stdout)
		inst, err := rt.Instantiate(ctx, mod)
		if err != nil {
			t.Fatal(err)
		}
		if stdout.String() != "hi\n" {
			t.Errorf("stdout %q", stdout.String())
		}
		if !bytes.Equal(mod, out) {
			continue
		}
		vals := map[string]uint64{"ftvm.global.0": 65536, "ftvm.global.1": uint64(math.MaxUint64 - 41), "ftvm.global.2": 0, "seven": 7}
		for name, v := range vals {
			g := inst.ExportedGlobal(name)
			if g == nil {
				t.Errorf("no global export %q", name)
			} else if g.Get() != v {
				t.Errorf("%s = %d, want %d", name, g.Get(), v)
			}
		}
		// Mutable globals are exported as mutable: the host can restore them.
		g := inst.ExportedGlobal("ftvm.global.0").(api.MutableGlobal)
		g.Set(123)
		if g.Get() != 123 {
			t.Error("mutable global not writable through its export")
		}
	}

	// A module whose globals are all exported comes back as it was.
	again, globals2, err := instrument.ExportGlobals(out)
	if err != nil || !bytes.Equal(again, out) || fmt.Sprint(globals2) != fmt.Sprint(want) {
		t.Errorf("second pass: err %v, changed %v, globals %v", err, !bytes.Equal(again, out), globals2)
	}
}

// TestExportGlobalsNewSection covers a module without an export section,
// with imported globals and custom sections around where the new one goes.
func TestExportGlobalsNewSection(t *testing.T) {
	ctx := context.Background()
	orig := wasmModule(
		custom("first", []byte("a")),
		sec(2, vec(importGlobal("env", "g", tI32, false), importGlobal("env", "h", tI64, true))),
		custom("between", []byte("b")),
		sec(6, vec(global(tI32, false, []byte{0x23, 0}))), // global.get 0
		custom("after-globals", []byte("c")),
		sec(11, vec()),
		custom("last", []byte("d")),
	)
	out, globals, err := instrument.ExportGlobals(orig)
	if err != nil {
		t.Fatal(err)
	}
	want := "[{0 i32 false true ftvm.global.0} {1 i64 true true ftvm.global.1} {2 i32 false false ftvm.global.2}]"
	if fmt.Sprint(globals) != want {
		t.Errorf("globals %v\nwant %s", globals, want)
	}
	os, ns := sections(t, orig), sections(t, out)
	if len(ns) != len(os)+1 {
		t.Fatalf("%d sections, want %d", len(ns), len(os)+1)
	}
	// The export section goes right after the global section.
	if ns[4][0] != 7 {
		t.Errorf("section 4 has id %d, want the export section", ns[4][0])
	}
	for i, j := 0, 0; i < len(os); i, j = i+1, j+1 {
		if j == 4 {
			j++
		}
		if !bytes.Equal(os[i], ns[j]) {
			t.Errorf("section %d changed", i)
		}
	}

	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	_, err = rt.InstantiateWithConfig(ctx, wasmModule(
		sec(6, vec(global(tI32, false, i32const(5)), global(tI64, true, i64const(6)))),
		sec(7, vec(export("g", 3, 0), export("h", 3, 1))),
	), wazero.NewModuleConfig().WithName("env"))
	if err != nil {
		t.Fatal(err)
	}
	inst, err := rt.InstantiateWithConfig(ctx, out, wazero.NewModuleConfig().WithName("m"))
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]uint64{"ftvm.global.0": 5, "ftvm.global.1": 6, "ftvm.global.2": 5} {
		if g := inst.ExportedGlobal(name); g == nil || g.Get() != v {
			t.Errorf("%s: %v, want %d", name, g, v)
		}
	}
}

func TestExportGlobalsNoGlobals(t *testing.T) {
	orig := wasmModule(sec(1, vec(functype(nil, nil))))
	out, globals, err := instrument.ExportGlobals(orig)
	if err != nil || len(globals) != 0 || !bytes.Equal(out, orig) {
		t.Errorf("got %x %v %v", out, globals, err)
	}
}

func TestExportGlobalsRejects(t *testing.T) {
	globals := func(entries ...[]byte) []byte { return sec(6, vec(entries...)) }
	g32 := global(tI32, true, i32const(1))
	for _, c := range []struct {
		name string
		mod  []byte
		want string
	}{
		{"empty", nil, "no \\0asm magic"},
		{"magic only", []byte("\x00asm"), "no \\0asm magic"},
		{"version", []byte("\x00asm\x02\x00\x00\x00"), "unsupported binary version"},
		{"component", []byte("\x00asm\x0d\x00\x01\x00"), "unsupported binary version"},
		{"truncated size", wasmModule([]byte{1, 0x80}), "unexpected end"},
		{"size past end", wasmModule([]byte{1, 5, 0}), "runs past the end"},
		{"unknown section", wasmModule(sec(14, nil)), "unknown section id 14"},
		{"out of order", wasmModule(sec(7, vec()), globals()), "duplicated or out of order"},
		{"duplicate", wasmModule(globals(), globals()), "duplicated or out of order"},
		{"bad valtype", wasmModule(globals([]byte{0x40, 0, 0x0b})), "unsupported global type 0x40"},
		{"bad mutability", wasmModule(globals([]byte{tI32, 2, 0x41, 0, 0x0b})), "invalid global mutability"},
		{"non-constant", wasmModule(globals([]byte{tI32, 0, 0x20, 0, 0x0b})), "not allowed in a constant expression"},
		{"no end", wasmModule(globals([]byte{tI32, 0, 0x41, 1})), "unexpected end"},
		{"u32 too long", wasmModule([]byte{6, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00}), "longer than 5 bytes"},
		{"u32 too large", wasmModule([]byte{6, 0xff, 0xff, 0xff, 0xff, 0x1f}), "u32 out of range"},
		{"s32 too long", wasmModule(globals([]byte{tI32, 0, 0x41, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 0x0b})), "longer than 5 bytes"},
		{"s32 too large", wasmModule(globals([]byte{tI32, 0, 0x41, 0x80, 0x80, 0x80, 0x80, 0x10, 0x0b})), "s32 out of range"},
		{"left over", wasmModule(sec(6, cat(vec(g32), []byte{0}))), "left over"},
		{"export out of range", wasmModule(globals(g32), sec(7, vec(export("x", 3, 1)))), "refers to global 1, but the module has 1 globals"},
		{"duplicate export", wasmModule(globals(g32), sec(7, vec(export("x", 3, 0), export("x", 3, 0)))), "duplicate export name"},
		{"bad export kind", wasmModule(sec(7, vec(export("x", 9, 0)))), "unknown export kind"},
		{"invalid utf-8", wasmModule(sec(7, vec(export("\xff", 0, 0)))), "not valid UTF-8"},
		{"bad import kind", wasmModule(sec(2, vec(cat(str("a"), str("b"), []byte{5, 0})))), "unknown import kind"},
		{"name taken", wasmModule(sec(1, vec(functype(nil, nil))), sec(3, vec(uleb(0))), globals(g32),
			sec(7, vec(export("ftvm.global.0", 0, 0))), sec(10, vec(body()))), "already used by another export"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out, _, err := instrument.ExportGlobals(c.mod)
			var fe *instrument.FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("got %x, %v; want a FormatError", out, err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
		})
	}
}

// TestExportGlobalsGuest checks the rewrite on a real Go guest: same
// behaviour under the machine, every global exported.
func TestExportGlobalsGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles a Go guest twice")
	}
	orig := goGuest(t, "testdata/guests/hello")
	out, globals, err := instrument.ExportGlobals(orig)
	if err != nil {
		t.Fatal(err)
	}
	if len(globals) == 0 {
		t.Fatal("a Go module has globals (SP, g, ...)")
	}
	for _, g := range globals {
		if g.Export != instrument.GlobalExportName(g.Index) {
			t.Errorf("global %d exported as %q", g.Index, g.Export)
		}
	}
	cache := t.TempDir()
	want := run(t, orig, cache, "a", "b c")
	if got := run(t, out, cache, "a", "b c"); got != want {
		t.Errorf("rewritten guest: %+v\nwant %+v", got, want)
	}
}
