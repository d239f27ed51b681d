package machine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

	"github.com/ftvm/ftvm/wasi"
)

// FuzzScanModule checks the pre-validation every untrusted module goes
// through before the compiler sees it:
//   - ScanModule and checkRunnable never panic, whatever the bytes;
//   - ScanModule never rejects a module wazero compiles (it would refuse a
//     runnable program), and what it reports about such a module (imports,
//     exported functions and memories, initial memory size) is what wazero
//     sees, since the machine's error messages and memory limit rely on it;
//   - what ScanModule calls "not wasm" wazero cannot compile either;
//   - ScanModule and checkRunnable (what machine.New runs before compiling)
//     reject allocation bombs: wazero v1.12's decoder allocates
//     every vector at its declared length before reading it, so a module of
//     a few bytes declaring 2^32 code bodies or globals makes the Go runtime
//     die ("fatal error: runtime: out of memory", not a recoverable panic),
//     taking the whole ftvm process with it. Such inputs are never given to
//     wazero here (it would kill the fuzzer); if ScanModule accepts one, the
//     machine would, and that is the failure reported.
func FuzzScanModule(f *testing.F) {
	for _, s := range fzModuleSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		info, scanErr := ScanModule(b)
		runErr := scanErr
		if scanErr == nil {
			if info == nil {
				t.Fatal("ScanModule returned neither info nor error")
			}
			runErr = info.checkRunnable(wasi.Names(), wasi.ModuleName)
		}
		switch verdict, why := fzAllocCheck(b); {
		case verdict == fzBomb && runErr == nil:
			t.Fatalf("machine.New would compile an allocation bomb (%s): wazero exhausts memory on it", why)
		case verdict != fzPlausible:
			return
		}
		cm, compileErr := fzCompile(b)
		if compileErr != nil {
			return
		}
		defer cm.Close(context.Background())
		if errors.Is(scanErr, errNotWasm) {
			t.Fatalf("ScanModule says not wasm, wazero compiles it")
		}
		if scanErr != nil {
			t.Fatalf("ScanModule rejects a module wazero compiles: %v", scanErr)
		}
		fzAgree(t, info, cm)
	})
}

var fzRuntime struct {
	once sync.Once
	rt   wazero.Runtime
}

// fzCompile compiles with wazero's interpreter: validation is the same as
// the compiler's, and much cheaper per input.
func fzCompile(b []byte) (wazero.CompiledModule, error) {
	fzRuntime.once.Do(func() {
		fzRuntime.rt = wazero.NewRuntimeWithConfig(context.Background(), wazero.NewRuntimeConfigInterpreter())
	})
	return fzRuntime.rt.CompileModule(context.Background(), b)
}

// fzAgree compares ScanModule's view of a valid module with wazero's.
func fzAgree(t *testing.T, info *ModuleInfo, cm wazero.CompiledModule) {
	t.Helper()
	var scanned, compiled []string
	for _, im := range info.Imports {
		if im.Kind == kindFunc {
			scanned = append(scanned, im.Module+"."+im.Name)
		}
	}
	for _, fn := range cm.ImportedFunctions() {
		mod, name, _ := fn.Import()
		compiled = append(compiled, mod+"."+name)
	}
	if fmt.Sprint(scanned) != fmt.Sprint(compiled) {
		t.Errorf("imported functions: scanned %q, wazero %q", scanned, compiled)
	}

	names := func(kind byte) []string {
		var out []string
		for _, e := range info.Exports {
			if e.Kind == kind {
				out = append(out, e.Name)
			}
		}
		sort.Strings(out)
		return out
	}
	keys := func(m map[string]api.FunctionDefinition) []string {
		var out []string
		for k := range m {
			out = append(out, k)
		}
		sort.Strings(out)
		return out
	}
	if s, w := names(kindFunc), keys(cm.ExportedFunctions()); fmt.Sprint(s) != fmt.Sprint(w) {
		t.Errorf("exported functions: scanned %q, wazero %q", s, w)
	}
	var mems []string
	for k := range cm.ExportedMemories() {
		mems = append(mems, k)
	}
	sort.Strings(mems)
	if s := names(kindMemory); fmt.Sprint(s) != fmt.Sprint(mems) {
		t.Errorf("exported memories: scanned %q, wazero %q", s, mems)
	}

	// The initial size of the module's memory, which the memory limit is
	// checked against before instantiation.
	var mem api.MemoryDefinition
	if ims := cm.ImportedMemories(); len(ims) > 0 {
		mem = ims[0]
	} else {
		for _, m := range cm.ExportedMemories() {
			mem = m
		}
	}
	if mem != nil && uint64(mem.Min()) != info.MinPages {
		t.Errorf("initial memory: scanned %d pages, wazero %d", info.MinPages, mem.Min())
	}
}

type fzVerdict int

const (
	fzPlausible fzVerdict = iota
	fzBomb                // declares far more than its bytes can hold
	fzUnsure              // not parsed far enough to tell: not safe to compile
)

// fzHuge is where an allocation driven by a declared count is a bomb: 2^26
// entries of even one byte is 64 MiB, and wazero's entries are ~100 bytes.
// From fzLarge entries on, the fuzzer does not compile (gigabytes that may
// or may not be granted would make it flaky) but does not call it a bomb.
const (
	fzHuge  = 1 << 26
	fzLarge = 1 << 20
)

// fzOverstated judges a count or length n declared beyond the bytes that
// follow it, which wazero allocates before it finds them missing: a bomb
// from fzHuge on (why says what was declared), too large to compile from
// fzLarge on, else merely malformed (a small allocation, then an error).
func fzOverstated(n uint32, why string) (fzVerdict, string) {
	switch {
	case n >= fzHuge:
		return fzBomb, why
	case n >= fzLarge:
		return fzUnsure, why
	}
	return fzPlausible, ""
}

// fzAllocCheck tells whether wazero could be made to allocate far more than
// the module's size while decoding it: a vector count larger than its
// section can hold (every entry takes at least a byte) and huge, a function
// declaring a huge number of locals, or a huge data segment longer than its
// section. Smaller overstatements are merely malformed: wazero allocates a
// little and then fails, which is safe.
func fzAllocCheck(b []byte) (fzVerdict, string) {
	if len(b) < 8 || string(b[:4]) != "\x00asm" {
		return fzPlausible, "" // rejected by magic before any allocation
	}
	r := reader{b: b, off: 8}
	for r.off < len(r.b) {
		id, err := r.byte()
		if err != nil {
			return fzPlausible, ""
		}
		size, err := r.u32()
		if err != nil {
			return fzPlausible, ""
		}
		// wazero decodes a section's contents from a reader over the whole
		// rest of the file and only afterwards compares what it consumed
		// with the declared size: judge counts by what follows in the file.
		// A custom section, though, it reads into a buffer of its declared
		// size first (4 GiB for a few bytes).
		if left := len(r.b) - r.off; uint64(size) > uint64(left) {
			if id == 0 {
				if v, why := fzOverstated(size, fmt.Sprintf("custom section of %d bytes, %d follow", size, left)); v != fzPlausible {
					return v, why
				}
			}
			size = uint32(left)
		}
		sec := reader{b: r.b, off: r.off}
		content := r.b[r.off : r.off+int(size)]
		r.off += int(size)
		switch id {
		case 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13:
			n, err := (&reader{b: sec.b, off: sec.off}).u32()
			if err != nil {
				return fzPlausible, ""
			}
			if left := len(sec.b) - sec.off; uint64(n) > uint64(left) {
				if v, why := fzOverstated(n, fmt.Sprintf("section %d declares %d entries, %d bytes follow", id, n, left)); v != fzPlausible {
					return v, why
				}
				// Malformed, and wazero allocates a little for the count,
				// but it decodes the entries that are there before it
				// fails: they are looked at below all the same.
			}
			var v fzVerdict
			var why string
			body := reader{b: sec.b, off: sec.off}
			body.u32()
			switch id {
			case 2, 7:
				v, why = fzCheckNames(&body, n, id)
			case 10:
				v, why = fzCheckCode(&body, n)
			case 11:
				v, why = fzCheckData(&body, n)
			}
			if v != fzPlausible {
				return v, why
			}
		case 12:
			if n, err := (&reader{b: sec.b, off: sec.off}).u32(); err == nil && uint64(n) > uint64(len(b)) {
				return fzUnsure, "data count"
			}
		}
		switch id {
		case 0:
			// Custom sections are read into a buffer of their declared size
			// first; the name section is decoded from that.
			// wazero reads the name, and the name section, from the
			// rest of the file, whatever size the section declares.
			if v, why := fzCheckCustom(&reader{b: sec.b[sec.off:]}); v != fzPlausible {
				return v, why
			}
		case 1:
			if v, why := fzCheckTypes(&sec); v != fzPlausible {
				return v, why
			}
		case 9:
			// Element segments nest vectors in eight encodings; a huge
			// number anywhere in them is reason enough not to compile.
			if fzHugeLEBIn(content) {
				return fzUnsure, "element section"
			}
		}
	}
	return fzPlausible, ""
}

// fzCheckTypes looks at the parameter and result counts of function types.
func fzCheckTypes(r *reader) (fzVerdict, string) {
	n, err := r.u32()
	if err != nil {
		return fzPlausible, ""
	}
	for i := uint32(0); i < n; i++ {
		if form, err := r.byte(); err != nil || form != 0x60 {
			return fzPlausible, "" // wazero stops here too
		}
		for k := 0; k < 2; k++ {
			c, err := r.u32()
			if err != nil {
				return fzPlausible, ""
			}
			if uint64(r.off)+uint64(c) > uint64(len(r.b)) {
				if c >= fzHuge {
					return fzBomb, fmt.Sprintf("type %d declares %d parameters or results", i, c)
				}
				return fzPlausible, ""
			}
			for j := uint32(0); j < c; j++ {
				if vt, _ := r.byte(); vt == 0x63 || vt == 0x64 {
					// A reference type: wazero reads its heap type,
					// an s33, next.
					if err := r.skipLEB(5); err != nil {
						return fzPlausible, ""
					}
				}
			}
		}
	}
	return fzPlausible, ""
}

// fzCheckNames looks at the names of imports (section 2) and exports
// (section 7): wazero allocates a name at its declared length before it
// reads it (a 40-byte module declaring an import's module name of 3.9 GB
// made it allocate 3.7 GiB). Past an entry it cannot parse, a huge number
// anywhere after is reason enough not to compile.
func fzCheckNames(r *reader, n uint32, id byte) (fzVerdict, string) {
	name := func(i uint32) (fzVerdict, string, bool) {
		c, err := r.u32()
		if err != nil {
			return fzPlausible, "", false
		}
		if uint64(r.off)+uint64(c) > uint64(len(r.b)) {
			v, why := fzOverstated(c, fmt.Sprintf("section %d entry %d declares a name of %d bytes, %d follow", id, i, c, len(r.b)-r.off))
			return v, why, false
		}
		r.off += int(c)
		return fzPlausible, "", true
	}
	rest := func() (fzVerdict, string) {
		if fzHugeLEBIn(r.b[min(r.off, len(r.b)):]) {
			return fzUnsure, fmt.Sprintf("section %d", id)
		}
		return fzPlausible, ""
	}
	for i := uint32(0); i < n; i++ {
		names := 1
		if id == 2 {
			names = 2 // module and field
		}
		for range names {
			if v, why, ok := name(i); !ok {
				return v, why
			}
		}
		kind, err := r.byte()
		if err != nil {
			return fzPlausible, ""
		}
		var ok bool
		switch {
		case id == 7 || kind == 0: // an index
			_, err = r.u32()
			ok = err == nil
		case kind == 1: // table: reference type, limits
			if _, err = r.byte(); err == nil {
				_, _, err = r.limits()
			}
			ok = err == nil
		case kind == 2: // memory
			_, _, err = r.limits()
			ok = err == nil
		case kind == 3: // global: value type, mutability
			_, err = r.byte()
			if err == nil {
				_, err = r.byte()
			}
			ok = err == nil
		}
		if !ok {
			return rest()
		}
	}
	return fzPlausible, ""
}

// fzCheckCustom looks at a custom section's name, allocated at its declared
// length, and into the name section, which wazero decodes: a subsection's
// name count is allocated in full.
func fzCheckCustom(r *reader) (fzVerdict, string) {
	if n, err := (&reader{b: r.b, off: r.off}).u32(); err == nil && uint64(n) > uint64(len(r.b)) {
		if v, why := fzOverstated(n, fmt.Sprintf("custom section name of %d bytes in %d", n, len(r.b))); v != fzPlausible {
			return v, why
		}
	}
	name, err := r.name()
	if err != nil || name != "name" {
		return fzPlausible, ""
	}
	for r.off < len(r.b) {
		id, err := r.byte()
		if err != nil {
			return fzPlausible, ""
		}
		size, err := r.u32()
		if err != nil {
			return fzPlausible, ""
		}
		if id <= 2 {
			// wazero decodes the module name and the name maps from
			// here, whatever size the subsection declares: judge the
			// count by what is left of the section, and past it, any
			// huge number is reason enough not to compile.
			rest := r.b[r.off:]
			c, err := (&reader{b: rest}).u32()
			if id > 0 && err == nil && uint64(c) > uint64(len(rest)) && c >= fzHuge {
				return fzBomb, fmt.Sprintf("name subsection %d declares %d names in %d bytes", id, c, len(rest))
			}
			if fzHugeLEBIn(rest) {
				return fzUnsure, "name section"
			}
			return fzPlausible, ""
		}
		if uint64(r.off)+uint64(size) > uint64(len(r.b)) {
			return fzPlausible, ""
		}
		if fzHugeLEBIn(r.b[r.off : r.off+int(size)]) {
			return fzUnsure, "name section"
		}
		r.off += int(size)
	}
	return fzPlausible, ""
}

// fzHugeLEBIn reports whether any offset of b starts a LEB128 number that is
// huge and larger than b: a count or length the decoder might allocate.
func fzHugeLEBIn(b []byte) bool {
	for i := range b {
		r := reader{b: b, off: i}
		if v, err := r.u32(); err == nil && v >= fzLarge && uint64(v) > uint64(len(b)) {
			return true
		}
	}
	return false
}

func fzCheckCode(r *reader, n uint32) (fzVerdict, string) {
	for i := uint32(0); i < n; i++ {
		size, err := r.u32()
		if err != nil || uint64(r.off)+uint64(size) > uint64(len(r.b)) {
			return fzPlausible, ""
		}
		body := reader{b: r.b[:r.off+int(size)], off: r.off}
		r.off += int(size)
		decls, err := body.u32()
		if err != nil {
			return fzPlausible, ""
		}
		var sum uint64
		for j := uint32(0); j < decls; j++ {
			c, err := body.u32()
			if err != nil {
				return fzPlausible, ""
			}
			if _, err := body.byte(); err != nil {
				return fzPlausible, ""
			}
			if sum += uint64(c); sum >= fzHuge {
				return fzBomb, fmt.Sprintf("function %d declares %d+ locals", i, sum)
			}
		}
	}
	return fzPlausible, ""
}

func fzCheckData(r *reader, n uint32) (fzVerdict, string) {
	for i := uint32(0); i < n; i++ {
		flag, err := r.u32()
		if err != nil {
			return fzPlausible, ""
		}
		if flag == 2 {
			if _, err := r.u32(); err != nil {
				return fzPlausible, ""
			}
		}
		if flag != 1 {
			// An offset expression: only the usual one-instruction forms are
			// skipped; anything else is not worth the risk.
			op, err := r.byte()
			if err != nil {
				return fzPlausible, ""
			}
			switch op {
			case 0x41, 0x23: // i32.const, global.get
				if _, err := r.u64(); err != nil {
					return fzPlausible, ""
				}
			default:
				return fzUnsure, "data offset expression"
			}
			if end, err := r.byte(); err != nil || end != 0x0b {
				return fzUnsure, "data offset expression"
			}
		}
		l, err := r.u32()
		if err != nil {
			return fzPlausible, ""
		}
		if uint64(r.off)+uint64(l) > uint64(len(r.b)) {
			if l < fzHuge {
				return fzPlausible, ""
			}
			return fzBomb, fmt.Sprintf("data segment %d declares %d bytes, %d remain", i, l, len(r.b)-r.off)
		}
		r.off += int(l)
	}
	return fzPlausible, ""
}

// fzBombs are small modules that would pass every check ScanModule makes
// today but declare vectors wazero allocates in full before decoding them.
func fzBombs() map[string][]byte {
	types := fzSec(1, fzVec([]byte{0x60, 0, 0}))
	funcs := fzSec(3, fzVec(fzLEB(0)))
	mem := fzSec(5, fzVec([]byte{0, 1}))
	exports := fzSec(7, fzVec(fzCat(fzName("_start"), []byte{0, 0}), fzCat(fzName("memory"), []byte{2, 0})))
	body := fzSec(10, fzVec([]byte{2, 0, 0x0b}))
	names := fzCat(fzLEB(0xffffffff), []byte{0})
	return map[string][]byte{
		"type parameters": fzMod(fzSec(1, fzCat([]byte{1, 0x60}, fzLEB(0xffffffff), []byte{0x7f})), funcs, mem, exports, body),
		"name section": fzMod(types, funcs, mem, exports, body,
			fzSec(0, fzCat(fzName("name"), []byte{1}, fzLEB(uint64(len(names))), names))),
		"code count":   fzMod(types, funcs, mem, exports, fzSec(10, fzCat(fzLEB(0xffffffff), []byte{2, 0, 0x0b}))),
		"global count": fzMod(types, funcs, mem, fzSec(6, fzCat(fzLEB(0xffffffff), []byte{0x7f, 0, 0x41, 0, 0x0b})), exports, body),
		"locals":       fzMod(types, funcs, mem, exports, fzSec(10, fzVec(fzCat([]byte{7, 1}, fzLEB(0xffffffff), []byte{0x7f, 0x0b})))),
		"data length": fzMod(types, funcs, mem, exports, body,
			fzSec(11, fzVec(fzCat([]byte{0, 0x41, 0, 0x0b}, fzLEB(0xfffffff0), []byte{1})))),
		// A parameter of type (ref null 2): a reader that does not know
		// the heap type follows takes it (2) for the result count, and
		// what follows for two result types.
		"reference type's heap type": fzMod(fzSec(1, fzCat([]byte{2, 0x60, 0, 0, 0x60, 1, 0x63, 2}, fzLEB(0xffffffff))),
			funcs, mem, exports, body),
	}
}

// TestScanModuleRejectsAllocationBombs: each of these 50-byte modules makes
// wazero's decoder allocate gigabytes. A code or global count of 2^32, 2^32
// locals, a function type with 2^32 parameters or a name section declaring
// 2^32 names kill the process with "fatal error: runtime: out of memory"
// (checked with ftvm run: exit 2 and a Go runtime trace); a 4 GiB data
// segment survives only where the kernel overcommits. ScanModule must
// refuse them before the compiler sees them. (They are never compiled here.)
func TestScanModuleRejectsAllocationBombs(t *testing.T) {
	for name, b := range fzBombs() {
		if v, why := fzAllocCheck(b); v != fzBomb {
			t.Fatalf("%s: the test's own check does not see a bomb (%v %s)", name, v, why)
		}
		info, err := ScanModule(b)
		if err == nil {
			err = info.checkRunnable(wasi.Names(), wasi.ModuleName)
			if err == nil {
				t.Errorf("%s: ScanModule and checkRunnable accept it; machine.New would hand it to wazero", name)
			}
		}
	}
}

// A minimal encoder of the binary format for the seeds.

func fzLEB(v uint64) []byte {
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

func fzCat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func fzName(s string) []byte { return append(fzLEB(uint64(len(s))), s...) }

func fzVec(items ...[]byte) []byte { return fzCat(fzLEB(uint64(len(items))), fzCat(items...)) }

func fzSec(id byte, content []byte) []byte {
	return fzCat([]byte{id}, fzLEB(uint64(len(content))), content)
}

func fzMod(secs ...[]byte) []byte { return fzCat([]byte("\x00asm\x01\x00\x00\x00"), fzCat(secs...)) }

// fzModuleSeeds are modules of every shape ScanModule distinguishes, valid
// and not: the mutator starts from each.
func fzModuleSeeds() [][]byte {
	voidType := []byte{0x60, 0, 0}
	i32Type := []byte{0x60, 1, 0x7f, 0}
	types := fzSec(1, fzVec(voidType, i32Type))
	procExit := fzCat(fzName("wasi_snapshot_preview1"), fzName("proc_exit"), []byte{0}, fzLEB(1))
	fdWrite := fzCat(fzName("wasi_snapshot_preview1"), fzName("fd_write"), []byte{0}, fzLEB(1))
	funcs := fzSec(3, fzVec(fzLEB(0)))
	mem := fzSec(5, fzVec([]byte{0, 1}))
	start := func(idx uint64) []byte {
		return fzSec(7, fzVec(fzCat(fzName("_start"), []byte{0}, fzLEB(idx)), fzCat(fzName("memory"), []byte{2, 0})))
	}
	code := fzSec(10, fzVec([]byte{2, 0, 0x0b}))
	command := fzMod(types, fzSec(2, fzVec(procExit, fdWrite)), funcs, mem, start(2), code)

	seeds := [][]byte{
		command,
		fzMod(types, funcs, mem, start(0), code), // no imports
		fzMod(types, fzSec(2, fzVec(fzCat(fzName("env"), fzName("foo"), []byte{0}, fzLEB(0)))), funcs, mem, start(1), code),
		fzMod(types, funcs, fzSec(5, fzVec([]byte{3, 1, 1})), start(0), code),          // shared memory
		fzMod(types, funcs, fzSec(5, fzVec([]byte{4, 1})), start(0), code),             // memory64
		fzMod(types, funcs, fzSec(5, fzVec([]byte{1, 2, 0x80, 0x02})), start(0), code), // min 2, max 256
		// Imported memory, table, global and tag.
		fzMod(types, fzSec(2, fzVec(
			fzCat(fzName("env"), fzName("memory"), []byte{2, 0, 17}),
			fzCat(fzName("env"), fzName("table"), []byte{1, 0x70, 0, 1}),
			fzCat(fzName("env"), fzName("g"), []byte{3, 0x7f, 0}),
			fzCat(fzName("env"), fzName("tag"), []byte{4, 0, 0}))), funcs, start(1), code),
		// A reactor: _initialize, no _start.
		fzMod(types, funcs, mem, fzSec(7, fzVec(fzCat(fzName("_initialize"), []byte{0, 0}),
			fzCat(fzName("memory"), []byte{2, 0}))), code),
		// Custom and name sections around the others.
		fzMod(fzSec(0, fzName("producers")), command[8:], fzSec(0, fzCat(fzName("name"), []byte{1, 4, 1, 0, 1, 's'}))),
		// Headers only, and broken ones.
		[]byte("\x00asm\x01\x00\x00\x00"),
		[]byte("\x00asm\x0d\x00\x01\x00"),
		[]byte("\x00asm\x02\x00\x00\x00"),
		[]byte("\x00asm"),
		[]byte("#!/bin/sh\n"),
		command[:len(command)/2],
		fzMod(fzSec(2, []byte{0xff, 0xff, 0xff, 0xff, 0x7f})), // import count too large
		fzMod([]byte{2, 0x80, 0x80, 0x80, 0x80, 0x10}),        // section size LEB too long
	}
	return seeds
}

// TestFuzzScanModuleSeeds is the fuzz target's property on the seeds and on
// real guests, so that plain `go test` checks them; FTVM_WRITE_FUZZ_SEEDS=1
// also writes the seeds to testdata/fuzz/FuzzScanModule.
func TestFuzzScanModuleSeeds(t *testing.T) {
	seeds := fzModuleSeeds()
	valid := 0
	for i, s := range seeds {
		info, err := ScanModule(s)
		cm, cerr := fzCompile(s)
		if cerr == nil {
			valid++
			if err != nil {
				t.Errorf("seed %d: ScanModule rejects a module wazero compiles: %v", i, err)
			} else {
				fzAgree(t, info, cm)
			}
			cm.Close(context.Background())
		}
	}
	if valid < 5 {
		t.Errorf("only %d seeds compile: the encoder is broken", valid)
	}
	if os.Getenv("FTVM_WRITE_FUZZ_SEEDS") != "" {
		dir := filepath.Join("testdata", "fuzz", "FuzzScanModule")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s)) + ")\n"
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The committed corpus holds real toolchain output too (a clang
	// reactor): every file there must be a readable corpus entry.
	ents, _ := os.ReadDir(filepath.Join("testdata", "fuzz", "FuzzScanModule"))
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzScanModule", e.Name()))
		if err != nil || !strings.HasPrefix(string(b), "go test fuzz v1\n") {
			t.Errorf("corpus file %s is not a fuzz corpus entry", e.Name())
		}
	}
}
