package machine

import (
	"errors"
	"fmt"
	"strings"

	"github.com/tetratelabs/wazero/api"

	"github.com/ftvm/ftvm/wasi"
)

// ModuleInfo is what a quick scan of a module binary tells before wazero
// compiles it: enough to give clear errors for modules ftvm cannot run.
type ModuleInfo struct {
	Imports       []Import
	Exports       []Export
	SharedMemory  bool
	Memory64      bool
	MemoryImports int
	Memories      int
	// MinPages is the initial size, in 64 KiB pages, of the (first) memory.
	MinPages uint64
	// Types are the function types; FuncTypes the type index of each
	// function defined in the module (imported ones come first in the
	// function index space and carry their type in Imports).
	Types     []FuncType
	FuncTypes []uint32
	// exportIdx is the index of each export, by name and kind.
	exportIdx map[string]uint32
}

// FuncType is a function signature; value types as in the binary format.
type FuncType struct {
	Params, Results []byte
}

// maxLocals bounds the locals of one function, as web engines do: wazero
// allocates them up front, so a declared 2^32 would exhaust host memory.
const maxLocals = 50000

// Import is one import of a module.
type Import struct {
	Module, Name string
	Kind         byte   // 0 func, 1 table, 2 memory, 3 global, 4 tag
	Type         uint32 // type index of a function import
}

// Export is one export of a module.
type Export struct {
	Name string
	Kind byte
}

const (
	kindFunc   = 0
	kindMemory = 2
)

var (
	errNotWasm   = errors.New("not a WebAssembly module (no \\0asm magic)")
	errTruncated = errors.New("truncated module")
)

// ScanModule reads the section headers, imports, memories and exports of a
// module binary. It never panics on hostile input; anything it does not
// understand is left to the compiler's full validation.
func ScanModule(b []byte) (*ModuleInfo, error) {
	if len(b) == 0 {
		return nil, errors.New("not a WebAssembly module: the file is empty")
	}
	if len(b) < 8 || string(b[:4]) != "\x00asm" {
		return nil, errNotWasm
	}
	switch v := string(b[4:8]); v {
	case "\x01\x00\x00\x00":
	case "\x0d\x00\x01\x00":
		return nil, errors.New("this is a WebAssembly component (WASI preview 2); ftvm runs WASI preview 1 core modules (build for wasm32-wasip1)")
	default:
		return nil, fmt.Errorf("unsupported WebAssembly binary version % x", []byte(v))
	}
	info := &ModuleInfo{}
	r := reader{b: b, off: 8}
	for r.off < len(r.b) {
		id, err := r.byte()
		if err != nil {
			return nil, err
		}
		sec, err := r.sized()
		if err != nil {
			return nil, fmt.Errorf("section %d: %w", id, err)
		}
		switch id {
		case 0:
			err = scanCustom(&sec)
		case 1:
			err = info.scanTypes(&sec)
		case 2:
			err = info.scanImports(&sec)
		case 3:
			err = info.scanFunctions(&sec)
		case 5:
			err = info.scanMemories(&sec)
		case 7:
			err = info.scanExports(&sec)
		case 10:
			err = scanCode(&sec)
		case 11:
			err = scanData(&sec)
		case 4, 6, 9:
			// Tables, globals, elements: only their counts matter here.
			_, err = sec.count()
		}
		if err != nil {
			return nil, fmt.Errorf("section %d: %w", id, err)
		}
	}
	return info, nil
}

func (info *ModuleInfo) scanImports(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		mod, err := r.name()
		if err != nil {
			return err
		}
		name, err := r.name()
		if err != nil {
			return err
		}
		kind, err := r.byte()
		if err != nil {
			return err
		}
		im := Import{Module: mod, Name: name, Kind: kind}
		switch kind {
		case 0: // type index
			im.Type, err = r.u32()
		case 1: // table: reftype + limits
			if _, err = r.byte(); err == nil {
				_, _, err = r.limits()
			}
		case 2:
			info.MemoryImports++
			var flags byte
			var min uint64
			if flags, min, err = r.limits(); err == nil {
				info.noteMemory(flags, min)
			}
		case 3: // global: valtype + mutability
			if _, err = r.byte(); err == nil {
				_, err = r.byte()
			}
		case 4: // tag: attribute + type index
			if _, err = r.byte(); err == nil {
				_, err = r.u32()
			}
		default:
			return fmt.Errorf("import %d: unknown kind %d", i, kind)
		}
		if err != nil {
			return err
		}
		info.Imports = append(info.Imports, im)
	}
	return nil
}

func (info *ModuleInfo) scanTypes(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		form, err := r.byte()
		if err != nil {
			return err
		}
		if form != 0x60 {
			return fmt.Errorf("type %d: form %#x is not a function type", i, form)
		}
		var ft FuncType
		if ft.Params, err = r.valtypes(); err != nil {
			return fmt.Errorf("type %d: %w", i, err)
		}
		if ft.Results, err = r.valtypes(); err != nil {
			return fmt.Errorf("type %d: %w", i, err)
		}
		info.Types = append(info.Types, ft)
	}
	return nil
}

func (info *ModuleInfo) scanFunctions(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	info.FuncTypes = make([]uint32, 0, n)
	for i := uint32(0); i < n; i++ {
		t, err := r.u32()
		if err != nil {
			return err
		}
		info.FuncTypes = append(info.FuncTypes, t)
	}
	return nil
}

// scanCode checks each function body's size and its declared locals.
func scanCode(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		body, err := r.sized()
		if err != nil {
			return fmt.Errorf("function body %d: %w", i, err)
		}
		groups, err := body.count()
		if err != nil {
			return fmt.Errorf("function body %d: %w", i, err)
		}
		total := uint64(0)
		for g := uint32(0); g < groups; g++ {
			k, err := body.u32()
			if err != nil {
				return fmt.Errorf("function body %d: %w", i, err)
			}
			if _, err := body.byte(); err != nil {
				return fmt.Errorf("function body %d: %w", i, err)
			}
			if total += uint64(k); total > maxLocals {
				return fmt.Errorf("function body %d declares more than %d locals", i, maxLocals)
			}
		}
	}
	return nil
}

// scanData checks that each data segment's length fits in the section.
func scanData(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		flags, err := r.u32()
		if err != nil {
			return err
		}
		switch flags {
		case 0:
			err = r.constExpr()
		case 1:
		case 2:
			if _, err = r.u32(); err == nil {
				err = r.constExpr()
			}
		default:
			return fmt.Errorf("data segment %d: unknown flags %d", i, flags)
		}
		if err != nil {
			return fmt.Errorf("data segment %d: %w", i, err)
		}
		size, err := r.u32()
		if err != nil {
			return err
		}
		if uint64(size) > uint64(len(r.b)-r.off) {
			return fmt.Errorf("data segment %d: %d bytes declared: %w", i, size, errTruncated)
		}
		r.off += int(size)
	}
	return nil
}

// scanCustom checks the counts of the "name" section, which the compiler
// decodes; other custom sections are opaque. It reads the name section as
// wazero's decoder does (decodeNameSection), so as to refuse no module the
// compiler accepts: a module name or a name map is decoded from where its
// subsection starts, whatever size the subsection declares; another
// subsection is skipped by its size; and reading stops once the declared
// sizes add up to the section's (counted as wazero counts them, modulo
// 2^64) or the section ends. What it decodes must fit in the section.
func scanCustom(r *reader) error {
	name, err := r.name()
	if err != nil || name != "name" {
		return err
	}
	for limit := uint64(len(r.b) - r.off); limit > 0 && r.off < len(r.b); {
		id, _ := r.byte()
		limit--
		start := r.off
		size, err := r.u32()
		if err != nil {
			return fmt.Errorf("name subsection %d: %w", id, err)
		}
		limit -= uint64(r.off - start)
		switch id {
		case 0: // the module name
			_, err = r.name()
		case 1: // function names: a name map
			err = r.nameMap()
		case 2: // local names: an indirect name map
			var n uint32
			if n, err = r.count(); err != nil {
				return fmt.Errorf("local names: %w", err)
			}
			for i := uint32(0); i < n && err == nil; i++ {
				if _, err = r.u32(); err == nil {
					err = r.nameMap()
				}
			}
		default:
			if uint64(size) > uint64(len(r.b)-r.off) {
				err = errTruncated
			} else {
				r.off += int(size)
			}
		}
		if err != nil {
			return fmt.Errorf("name subsection %d: %w", id, err)
		}
		limit -= uint64(size)
	}
	return nil
}

func (info *ModuleInfo) scanMemories(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		flags, min, err := r.limits()
		if err != nil {
			return err
		}
		info.Memories++
		info.noteMemory(flags, min)
	}
	return nil
}

func (info *ModuleInfo) noteMemory(flags byte, min uint64) {
	if info.Memories+info.MemoryImports == 1 {
		info.MinPages = min
	}
	if flags&2 != 0 {
		info.SharedMemory = true
	}
	if flags&4 != 0 {
		info.Memory64 = true
	}
}

func (info *ModuleInfo) scanExports(r *reader) error {
	n, err := r.count()
	if err != nil {
		return err
	}
	info.exportIdx = map[string]uint32{}
	for i := uint32(0); i < n; i++ {
		name, err := r.name()
		if err != nil {
			return err
		}
		kind, err := r.byte()
		if err != nil {
			return err
		}
		idx, err := r.u32()
		if err != nil {
			return err
		}
		info.Exports = append(info.Exports, Export{Name: name, Kind: kind})
		info.exportIdx[fmt.Sprint(kind, name)] = idx
	}
	return nil
}

// Exported reports whether the module exports name with the given kind.
func (info *ModuleInfo) Exported(name string, kind byte) bool {
	for _, e := range info.Exports {
		if e.Name == name && e.Kind == kind {
			return true
		}
	}
	return false
}

// checkRunnable explains why ftvm cannot run a module, or returns nil.
func (info *ModuleInfo) checkRunnable(provided map[string]bool, module string) error {
	if info.SharedMemory {
		return &ModuleError{Reason: "uses shared memory (the threads proposal); ftvm runs single-threaded guests only"}
	}
	if info.Memory64 {
		return &ModuleError{Reason: "uses 64-bit memory (memory64), which ftvm does not support"}
	}
	var missing, mismatched []string
	for _, im := range info.Imports {
		switch {
		case im.Kind == kindFunc && im.Module == module && provided[im.Name]:
			if !info.typeMatches(im.Type, im.Name) {
				mismatched = append(mismatched, im.Module+"."+im.Name)
			}
		case im.Module == "wasi_unstable":
			return &ModuleError{Reason: "imports wasi_unstable (WASI preview 0); ftvm provides " + module}
		default:
			missing = append(missing, im.Module+"."+im.Name)
		}
	}
	if len(missing) > 0 {
		return &ModuleError{Reason: "imports what ftvm does not provide: " + strings.Join(missing, ", ")}
	}
	if len(mismatched) > 0 {
		return &ModuleError{Reason: "imports with the wrong signature: " + strings.Join(mismatched, ", ")}
	}
	if !info.Exported("_start", kindFunc) {
		if info.Exported("_initialize", kindFunc) {
			return &ModuleError{Reason: "is a WASI reactor (exports _initialize, not _start); ftvm runs command modules"}
		}
		return &ModuleError{Reason: "has no _start export: not a WASI command module"}
	}
	if t, ok := info.funcType(info.exportIdx[fmt.Sprint(kindFunc, "_start")]); !ok || len(t.Params) != 0 || len(t.Results) != 0 {
		return &ModuleError{Reason: "exports a _start that is not a function of no parameters and no results"}
	}
	if info.Memories+info.MemoryImports > 0 && !info.Exported("memory", kindMemory) {
		return &ModuleError{Reason: "does not export its memory as \"memory\", which WASI requires"}
	}
	return nil
}

// count reads a vector's length and refuses one that cannot fit in what is
// left of the section (every element takes at least a byte): a compiler
// that allocates a declared length up front must never see 2^32.
func (r *reader) count() (uint32, error) {
	n, err := r.u32()
	if err != nil {
		return 0, err
	}
	if uint64(n) > uint64(len(r.b)-r.off) {
		return 0, fmt.Errorf("%d entries declared in %d bytes", n, len(r.b)-r.off)
	}
	return n, nil
}

// sized reads a length and returns a reader over that many following bytes
// (a section, a function body, a subsection), which it skips.
func (r *reader) sized() (reader, error) {
	size, err := r.u32()
	if err != nil {
		return reader{}, err
	}
	if uint64(size) > uint64(len(r.b)-r.off) {
		return reader{}, errTruncated
	}
	sub := reader{b: r.b[:r.off+int(size)], off: r.off}
	r.off += int(size)
	return sub, nil
}

// valtypes reads a vector of value types.
func (r *reader) valtypes() ([]byte, error) {
	n, err := r.count()
	if err != nil {
		return nil, err
	}
	out := make([]byte, n)
	for i := range out {
		if out[i], err = r.byte(); err != nil {
			return nil, err
		}
		// A reference type (ref null ht, ref ht) is followed by its heap
		// type, an s33, as the compiler decodes it: read past it, or the
		// counts after would be read from the middle of it (wazero then
		// allocated 2 GiB for a type section of 14 bytes ScanModule had
		// passed).
		if out[i] == 0x63 || out[i] == 0x64 {
			if err := r.skipLEB(5); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// skipLEB reads past a LEB128 number of at most max bytes.
func (r *reader) skipLEB(max int) error {
	for i := 0; i < max; i++ {
		b, err := r.byte()
		if err != nil {
			return err
		}
		if b < 0x80 {
			return nil
		}
	}
	return errors.New("LEB128 number too long")
}

// nameMap reads a vector of (index, name) pairs.
func (r *reader) nameMap() error {
	n, err := r.count()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		if _, err := r.u32(); err != nil {
			return err
		}
		if _, err := r.name(); err != nil {
			return err
		}
	}
	return nil
}

// constExpr skips a constant expression up to its end opcode.
func (r *reader) constExpr() error {
	for {
		op, err := r.byte()
		if err != nil {
			return err
		}
		switch op {
		case 0x0b: // end
			return nil
		case 0x41, 0x23: // i32.const, global.get
			_, err = r.u64()
		case 0x42: // i64.const
			_, err = r.u64()
		case 0x43: // f32.const
			r.off += 4
		case 0x44: // f64.const
			r.off += 8
		case 0x6a, 0x6b, 0x6c, 0x7c, 0x7d, 0x7e: // extended-const arithmetic
		default:
			return fmt.Errorf("unsupported opcode %#x in a constant expression", op)
		}
		if err != nil {
			return err
		}
		if r.off > len(r.b) {
			return errTruncated
		}
	}
}

// reader decodes the binary format with bounds checks on every read.
type reader struct {
	b   []byte
	off int
}

func (r *reader) byte() (byte, error) {
	if r.off >= len(r.b) {
		return 0, errTruncated
	}
	c := r.b[r.off]
	r.off++
	return c, nil
}

// u32 reads an unsigned LEB128 of at most 5 bytes.
func (r *reader) u32() (uint32, error) {
	var v uint32
	for shift := 0; shift < 35; shift += 7 {
		c, err := r.byte()
		if err != nil {
			return 0, err
		}
		v |= uint32(c&0x7f) << shift
		if c&0x80 == 0 {
			if shift == 28 && c > 0x0f {
				return 0, errors.New("integer too large")
			}
			return v, nil
		}
	}
	return 0, errors.New("integer representation too long")
}

// u64 reads an unsigned LEB128 of at most 10 bytes.
func (r *reader) u64() (uint64, error) {
	var v uint64
	for shift := 0; shift < 70; shift += 7 {
		c, err := r.byte()
		if err != nil {
			return 0, err
		}
		v |= uint64(c&0x7f) << shift
		if c&0x80 == 0 {
			return v, nil
		}
	}
	return 0, errors.New("integer representation too long")
}

func (r *reader) name() (string, error) {
	n, err := r.u32()
	if err != nil {
		return "", err
	}
	if uint64(r.off)+uint64(n) > uint64(len(r.b)) {
		return "", errTruncated
	}
	s := string(r.b[r.off : r.off+int(n)])
	r.off += int(n)
	return s, nil
}

// limits reads a limits structure and returns its flags byte and minimum.
func (r *reader) limits() (flags byte, min uint64, err error) {
	if flags, err = r.byte(); err != nil {
		return 0, 0, err
	}
	read := func() (uint64, error) { v, err := r.u32(); return uint64(v), err }
	if flags&4 != 0 {
		read = r.u64
	}
	if min, err = read(); err != nil {
		return 0, 0, err
	}
	if flags&1 != 0 {
		if _, err := read(); err != nil {
			return 0, 0, err
		}
	}
	return flags, min, nil
}

// funcType is the type of function idx (imports first), if known.
func (info *ModuleInfo) funcType(idx uint32) (FuncType, bool) {
	var t uint32
	for _, im := range info.Imports {
		if im.Kind != kindFunc {
			continue
		}
		if idx == 0 {
			t = im.Type
			goto found
		}
		idx--
	}
	if uint64(idx) >= uint64(len(info.FuncTypes)) {
		return FuncType{}, false
	}
	t = info.FuncTypes[idx]
found:
	if uint64(t) >= uint64(len(info.Types)) {
		return FuncType{}, false
	}
	return info.Types[t], true
}

// typeMatches reports whether type index t is the signature of the WASI
// function name.
func (info *ModuleInfo) typeMatches(t uint32, name string) bool {
	params, results, ok := wasi.Signature(name)
	if !ok || uint64(t) >= uint64(len(info.Types)) {
		return false
	}
	ft := info.Types[t]
	return sameTypes(ft.Params, params) && sameTypes(ft.Results, results)
}

func sameTypes(a []byte, b []api.ValueType) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
