package machine

import (
	"errors"
	"fmt"
	"strings"
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
}

// Import is one import of a module.
type Import struct {
	Module, Name string
	Kind         byte // 0 func, 1 table, 2 memory, 3 global, 4 tag
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
		size, err := r.u32()
		if err != nil {
			return nil, err
		}
		if uint64(r.off)+uint64(size) > uint64(len(r.b)) {
			return nil, fmt.Errorf("section %d: %w", id, errTruncated)
		}
		sec := reader{b: r.b[:r.off+int(size)], off: r.off}
		r.off += int(size)
		switch id {
		case 2:
			err = info.scanImports(&sec)
		case 5:
			err = info.scanMemories(&sec)
		case 7:
			err = info.scanExports(&sec)
		}
		if err != nil {
			return nil, fmt.Errorf("section %d: %w", id, err)
		}
	}
	return info, nil
}

func (info *ModuleInfo) scanImports(r *reader) error {
	n, err := r.u32()
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
		info.Imports = append(info.Imports, Import{Module: mod, Name: name, Kind: kind})
		switch kind {
		case 0: // type index
			_, err = r.u32()
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
	}
	return nil
}

func (info *ModuleInfo) scanMemories(r *reader) error {
	n, err := r.u32()
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
	n, err := r.u32()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		name, err := r.name()
		if err != nil {
			return err
		}
		kind, err := r.byte()
		if err != nil {
			return err
		}
		if _, err := r.u32(); err != nil {
			return err
		}
		info.Exports = append(info.Exports, Export{Name: name, Kind: kind})
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
	var missing []string
	for _, im := range info.Imports {
		switch {
		case im.Kind == kindFunc && im.Module == module && provided[im.Name]:
		case im.Module == "wasi_unstable":
			return &ModuleError{Reason: "imports wasi_unstable (WASI preview 0); ftvm provides " + module}
		default:
			missing = append(missing, im.Module+"."+im.Name)
		}
	}
	if len(missing) > 0 {
		return &ModuleError{Reason: "imports what ftvm does not provide: " + strings.Join(missing, ", ")}
	}
	if !info.Exported("_start", kindFunc) {
		if info.Exported("_initialize", kindFunc) {
			return &ModuleError{Reason: "is a WASI reactor (exports _initialize, not _start); ftvm runs command modules"}
		}
		return &ModuleError{Reason: "has no _start export: not a WASI command module"}
	}
	if info.Memories+info.MemoryImports > 0 && !info.Exported("memory", kindMemory) {
		return &ModuleError{Reason: "does not export its memory as \"memory\", which WASI requires"}
	}
	return nil
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
