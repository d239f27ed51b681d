package instrument_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"github.com/tetratelabs/wazero/sys"

	"github.com/ftvm/ftvm/machine/instrument"
)

// TestAsyncifyProtocol walks through the capture/restore protocol of
// NOTES.md on wazero directly (not the machine): a guest is unwound inside
// its second fd_write, its memory, globals and stack blob are copied into a
// fresh instance (as another process would), the blob at another address,
// and it is rewound to finish with the same output as an undisturbed run.
func TestAsyncifyProtocol(t *testing.T) {
	needWasmOpt(t)
	if testing.Short() {
		t.Skip("instruments real guests")
	}
	for _, g := range []struct {
		name string
		mod  func(testing.TB) []byte
	}{
		{"hello", func(t testing.TB) []byte { return goGuest(t, "testdata/guests/hello") }},
		{"cpu.c", func(t testing.TB) []byte { return cGuest(t, "cpu", "testdata/guests/c/cpu.c") }},
	} {
		t.Run(g.name, func(t *testing.T) {
			orig := g.mod(t)
			in := instrumentCached(t, orig)
			want := runWazero(t, orig, nil)
			var p protocol
			got := runWazeroGlobals(t, in.Module, &p, in.Globals)
			if got != want {
				t.Errorf("output after restore:\n%s\nwant\n%s", got, want)
			}
			t.Logf("unwound in fd_write #%d: stack blob %d bytes", p.unwindAt, len(p.blob))
		})
	}
}

// region is the scratch region borrowed from the top of memory.
const region = 64 << 10

// protocol is the host side: it unwinds in fd_write number unwindAt and
// stops rewinding when the rewound guest calls fd_write again.
type protocol struct {
	unwindAt int
	writes   int
	state    int // 0 running, 1 unwinding, 2 rewinding
	data     uint32
	saved    []byte
	blob     []byte
}

// borrow saves the region at d and writes the Asyncify header there.
func (p *protocol) borrow(mem api.Memory, d uint32, blob []byte) {
	b, _ := mem.Read(d, region)
	p.data, p.saved = d, bytes.Clone(b)
	mem.Write(d+8, blob)
	mem.WriteUint32Le(d, d+8+uint32(len(blob))) // current position: the stack grows up
	mem.WriteUint32Le(d+4, d+region)            // end
}

// fdWrite is fd_write for stdout and stderr, with the protocol's hooks.
func (p *protocol) fdWrite(out *bytes.Buffer) func(context.Context, api.Module, uint32, uint32, uint32, uint32) uint32 {
	return func(ctx context.Context, m api.Module, fd, iovs, n, nwritten uint32) uint32 {
		mem := m.Memory()
		switch {
		case p.state == 2: // the rewind reached the host call: finish it, then do the call
			if _, err := m.ExportedFunction(instrument.ExportStopRewind).Call(ctx); err != nil {
				panic(err)
			}
			mem.Write(p.data, p.saved)
			p.state = 0
		case p.unwindAt > 0 && p.writes+1 == p.unwindAt && p.blob == nil: // pause before the call
			p.borrow(mem, mem.Size()-region, nil)
			if _, err := m.ExportedFunction(instrument.ExportStartUnwind).Call(ctx, uint64(p.data)); err != nil {
				panic(err)
			}
			p.state = 1
			return 0 // ignored by the unwinding caller
		}
		p.writes++
		var total uint32
		for i := uint32(0); i < n; i++ {
			ptr, _ := mem.ReadUint32Le(iovs + 8*i)
			l, _ := mem.ReadUint32Le(iovs + 8*i + 4)
			b, _ := mem.Read(ptr, l)
			out.Write(b)
			total += l
		}
		mem.WriteUint32Le(nwritten, total)
		return 0
	}
}

// runWazero runs a guest with wazero's WASI but our fd_write; with a
// protocol, it captures the guest in its second write and resumes it in a
// new instance.
func runWazero(t *testing.T, mod []byte, p *protocol) string {
	return runWazeroGlobals(t, mod, p, nil)
}

func runWazeroGlobals(t *testing.T, mod []byte, p *protocol, exported []instrument.Global) string {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	var out bytes.Buffer
	if p == nil {
		p = &protocol{}
	} else {
		p.unwindAt = 2
	}
	hb := rt.NewHostModuleBuilder(wasi_snapshot_preview1.ModuleName)
	wasi_snapshot_preview1.NewFunctionExporter().ExportFunctions(hb)
	hb.NewFunctionBuilder().WithFunc(p.fdWrite(&out)).Export("fd_write")
	if _, err := hb.Instantiate(ctx); err != nil {
		t.Fatal(err)
	}
	compiled, err := rt.CompileModule(ctx, mod)
	if err != nil {
		t.Fatal(err)
	}
	cfg := wazero.NewModuleConfig().WithStartFunctions().WithArgs("guest", "1").
		WithSysNanotime().WithSysWalltime().WithSysNanosleep()
	start := func(m api.Module) {
		_, err := m.ExportedFunction("_start").Call(ctx)
		var ee *sys.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 0) {
			t.Fatalf("_start: %v", err)
		}
	}
	m, err := rt.InstantiateModule(ctx, compiled, cfg.WithName("first"))
	if err != nil {
		t.Fatal(err)
	}
	start(m)
	if p.state != 1 {
		return out.String() // ran to the end
	}

	// Capture: _start returned because the stack unwound.
	mem := m.Memory()
	pos, _ := mem.ReadUint32Le(p.data)
	if pos > p.data+region {
		t.Fatalf("asyncify stack overflowed the region (%d bytes)", pos-p.data)
	}
	blob, _ := mem.Read(p.data+8, pos-p.data-8)
	p.blob = bytes.Clone(blob)
	if _, err := m.ExportedFunction(instrument.ExportStopUnwind).Call(ctx); err != nil {
		t.Fatal(err)
	}
	mem.Write(p.data, p.saved)
	snapshot, _ := mem.Read(0, mem.Size())
	snapshot = bytes.Clone(snapshot)
	globals := map[string]uint64{}
	for _, g := range exported {
		globals[g.Export] = m.ExportedGlobal(g.Export).Get()
	}
	m.Close(ctx)

	// Restore into a new instance: memory, mutable globals, then rewind with
	// the blob in a region at another address.
	m, err = rt.InstantiateModule(ctx, compiled, cfg.WithName("second"))
	if err != nil {
		t.Fatal(err)
	}
	mem = m.Memory()
	if grow := (uint32(len(snapshot)) - mem.Size()) / 65536; grow > 0 {
		mem.Grow(grow)
	}
	mem.Write(0, snapshot)
	for _, g := range exported {
		if mg, ok := m.ExportedGlobal(g.Export).(api.MutableGlobal); ok {
			mg.Set(globals[g.Export])
		}
	}
	p.borrow(mem, mem.Size()-3*region, p.blob)
	if _, err := m.ExportedFunction(instrument.ExportStartRewind).Call(ctx, uint64(p.data)); err != nil {
		t.Fatal(err)
	}
	p.state = 2
	start(m)
	if p.state != 0 {
		t.Fatal("the rewind never reached the host call")
	}
	return out.String()
}
