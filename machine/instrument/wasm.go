package instrument

import (
	"fmt"
	"unicode/utf8"
)

// This file is a small decoder and encoder for the parts of the wasm binary
// format the instrumentation touches: the section structure, imports, globals
// and exports. Every other byte of a module is carried over untouched, so a
// rewrite cannot disturb code, data, names or debug information.

// ValType is a wasm value type as encoded in the binary format.
type ValType byte

// The value types a global can have (wasm 2.0).
const (
	I32       ValType = 0x7f
	I64       ValType = 0x7e
	F32       ValType = 0x7d
	F64       ValType = 0x7c
	V128      ValType = 0x7b
	FuncRef   ValType = 0x70
	ExternRef ValType = 0x6f
)

func (t ValType) String() string {
	switch t {
	case I32:
		return "i32"
	case I64:
		return "i64"
	case F32:
		return "f32"
	case F64:
		return "f64"
	case V128:
		return "v128"
	case FuncRef:
		return "funcref"
	case ExternRef:
		return "externref"
	}
	return fmt.Sprintf("valtype(0x%02x)", byte(t))
}

func validValType(b byte) bool {
	switch ValType(b) {
	case I32, I64, F32, F64, V128, FuncRef, ExternRef:
		return true
	}
	return false
}

// Section ids.
const (
	secCustom    = 0
	secType      = 1
	secImport    = 2
	secFunction  = 3
	secTable     = 4
	secMemory    = 5
	secGlobal    = 6
	secExport    = 7
	secStart     = 8
	secElement   = 9
	secCode      = 10
	secData      = 11
	secDataCount = 12
	secTag       = 13
)

// sectionRank is the position a known section must take among the
// non-custom sections (the tag section sits between memory and global).
var sectionRank = map[byte]int{
	secType: 1, secImport: 2, secFunction: 3, secTable: 4, secMemory: 5, secTag: 6,
	secGlobal: 7, secExport: 8, secStart: 9, secElement: 10, secDataCount: 11,
	secCode: 12, secData: 13,
}

// Export kinds.
const (
	kindFunc   = 0
	kindTable  = 1
	kindMemory = 2
	kindGlobal = 3
	kindTag    = 4
)

// FormatError is a module the decoder cannot accept.
type FormatError struct {
	Offset int // byte offset in the module where decoding failed
	Msg    string
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("malformed wasm module at offset %#x: %s", e.Offset, e.Msg)
}

// decoder reads the binary format with a bounds check on every read. base is
// the offset of b[0] in the module, for error messages.
type decoder struct {
	b    []byte
	off  int
	base int
}

func (d *decoder) fail(format string, args ...any) error {
	return &FormatError{Offset: d.base + d.off, Msg: fmt.Sprintf(format, args...)}
}

func (d *decoder) done() bool { return d.off >= len(d.b) }

func (d *decoder) byte() (byte, error) {
	if d.off >= len(d.b) {
		return 0, d.fail("unexpected end of input")
	}
	c := d.b[d.off]
	d.off++
	return c, nil
}

func (d *decoder) bytes(n int) ([]byte, error) {
	if n < 0 || n > len(d.b)-d.off {
		return nil, d.fail("unexpected end of input (want %d more bytes, have %d)", n, len(d.b)-d.off)
	}
	s := d.b[d.off : d.off+n]
	d.off += n
	return s, nil
}

// u32 reads an unsigned LEB128 of at most 5 bytes whose unused high bits are
// zero, as the spec requires.
func (d *decoder) u32() (uint32, error) {
	start := d.off
	var v uint32
	for i := 0; i < 5; i++ {
		c, err := d.byte()
		if err != nil {
			return 0, err
		}
		v |= uint32(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			if i == 4 && c > 0x0f {
				d.off = start
				return 0, d.fail("u32 out of range")
			}
			return v, nil
		}
	}
	d.off = start
	return 0, d.fail("u32 encoding longer than 5 bytes")
}

// u64 reads an unsigned LEB128 of at most 10 bytes.
func (d *decoder) u64() (uint64, error) {
	start := d.off
	var v uint64
	for i := 0; i < 10; i++ {
		c, err := d.byte()
		if err != nil {
			return 0, err
		}
		v |= uint64(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			if i == 9 && c > 0x01 {
				d.off = start
				return 0, d.fail("u64 out of range")
			}
			return v, nil
		}
	}
	d.off = start
	return 0, d.fail("u64 encoding longer than 10 bytes")
}

// sleb skips a signed LEB128 of at most bits bits, checking its length and
// that the unused bits of the last byte are a sign extension.
func (d *decoder) sleb(bits int) error {
	start := d.off
	max := (bits + 6) / 7
	for i := 0; i < max; i++ {
		c, err := d.byte()
		if err != nil {
			return err
		}
		if c&0x80 == 0 {
			if i == max-1 {
				// Bits of the last byte beyond the value must all equal its sign bit.
				used := bits - 7*i // 1..7
				rest := c >> (used - 1) & 0x7f
				if rest != 0 && rest != 0x7f>>(used-1) {
					d.off = start
					return d.fail("s%d out of range", bits)
				}
			}
			return nil
		}
	}
	d.off = start
	return d.fail("s%d encoding longer than %d bytes", bits, max)
}

func (d *decoder) name() (string, error) {
	n, err := d.u32()
	if err != nil {
		return "", err
	}
	start := d.off
	b, err := d.bytes(int(n))
	if err != nil {
		return "", err
	}
	if !utf8.Valid(b) {
		d.off = start
		return "", d.fail("name is not valid UTF-8")
	}
	return string(b), nil
}

// limits skips a table or memory limits structure.
func (d *decoder) limits() error {
	flags, err := d.byte()
	if err != nil {
		return err
	}
	if flags > 7 {
		d.off--
		return d.fail("invalid limits flags %#x", flags)
	}
	read := func() error { _, err := d.u32(); return err }
	if flags&4 != 0 { // memory64
		read = func() error { _, err := d.u64(); return err }
	}
	if err := read(); err != nil {
		return err
	}
	if flags&1 != 0 {
		return read()
	}
	return nil
}

// constExpr skips a constant expression up to and including its end opcode.
// It accepts what wasm 2.0 and the extended-const proposal allow.
func (d *decoder) constExpr() error {
	for {
		op, err := d.byte()
		if err != nil {
			return err
		}
		switch op {
		case 0x0b: // end
			return nil
		case 0x41: // i32.const
			err = d.sleb(32)
		case 0x42: // i64.const
			err = d.sleb(64)
		case 0x43: // f32.const
			_, err = d.bytes(4)
		case 0x44: // f64.const
			_, err = d.bytes(8)
		case 0x23, 0xd2: // global.get, ref.func
			_, err = d.u32()
		case 0xd0: // ref.null
			var t byte
			if t, err = d.byte(); err == nil && ValType(t) != FuncRef && ValType(t) != ExternRef {
				d.off--
				err = d.fail("invalid ref.null type %#x", t)
			}
		case 0xfd: // v128.const
			var sub uint32
			if sub, err = d.u32(); err == nil {
				if sub != 12 {
					err = d.fail("instruction 0xfd %d not allowed in a constant expression", sub)
				} else {
					_, err = d.bytes(16)
				}
			}
		case 0x6a, 0x6b, 0x6c, 0x7c, 0x7d, 0x7e: // extended-const add, sub, mul
		default:
			d.off--
			return d.fail("instruction %#02x not allowed in a constant expression", op)
		}
		if err != nil {
			return err
		}
	}
}

// section is one section of a module: raw holds its id, size and contents
// exactly as they appear in the module.
type section struct {
	id   byte
	raw  []byte
	body []byte
	off  int // offset of body in the module
}

// module is the decoded outline of a binary.
type module struct {
	sections []section
	imports  []importEntry
	globals  []Global // every global, imported ones first, with Export set when exported
	exports  []exportEntry
}

type importEntry struct {
	module, name string
	kind         byte
}

type exportEntry struct {
	name  string
	kind  byte
	index uint32
}

// parse splits a module into sections and decodes its imports, globals and
// exports. It checks section order and that every decoded section is used
// up exactly.
func parse(b []byte) (*module, error) {
	if len(b) < 8 || string(b[:4]) != "\x00asm" {
		return nil, &FormatError{Msg: "not a WebAssembly module (no \\0asm magic)"}
	}
	if string(b[4:8]) != "\x01\x00\x00\x00" {
		return nil, &FormatError{Offset: 4, Msg: fmt.Sprintf("unsupported binary version % x (want 01 00 00 00: a core module)", b[4:8])}
	}
	m := &module{}
	d := &decoder{b: b, off: 8}
	lastRank := 0
	for !d.done() {
		start := d.off
		id, _ := d.byte()
		size, err := d.u32()
		if err != nil {
			return nil, err
		}
		bodyOff := d.off
		body, err := d.bytes(int(size))
		if err != nil {
			return nil, &FormatError{Offset: start, Msg: fmt.Sprintf("section %d: size %d runs past the end of the module", id, size)}
		}
		if id != secCustom {
			rank, ok := sectionRank[id]
			if !ok {
				return nil, &FormatError{Offset: start, Msg: fmt.Sprintf("unknown section id %d", id)}
			}
			if rank <= lastRank {
				return nil, &FormatError{Offset: start, Msg: fmt.Sprintf("section %d is duplicated or out of order", id)}
			}
			lastRank = rank
		}
		m.sections = append(m.sections, section{id: id, raw: b[start:d.off], body: body, off: bodyOff})
		sd := &decoder{b: body, base: bodyOff}
		switch id {
		case secCustom:
			_, err = sd.name()
			sd.off = len(body) // the rest is the custom payload
		case secImport:
			err = m.parseImports(sd)
		case secGlobal:
			err = m.parseGlobals(sd)
		case secExport:
			err = m.parseExports(sd)
		default:
			sd.off = len(body)
		}
		if err != nil {
			return nil, err
		}
		if !sd.done() {
			return nil, sd.fail("section %d has %d bytes left over after its contents", id, len(body)-sd.off)
		}
	}
	return m, m.linkExports()
}

func (m *module) parseImports(d *decoder) error {
	n, err := d.u32()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		mod, err := d.name()
		if err != nil {
			return err
		}
		name, err := d.name()
		if err != nil {
			return err
		}
		kind, err := d.byte()
		if err != nil {
			return err
		}
		switch kind {
		case kindFunc:
			_, err = d.u32()
		case kindTable:
			var t byte
			if t, err = d.byte(); err == nil {
				if ValType(t) != FuncRef && ValType(t) != ExternRef {
					d.off--
					return d.fail("import %d: invalid table element type %#x", i, t)
				}
				err = d.limits()
			}
		case kindMemory:
			err = d.limits()
		case kindGlobal:
			var g Global
			if g, err = d.globalType(); err == nil {
				g.Index, g.Imported = uint32(len(m.globals)), true
				m.globals = append(m.globals, g)
			}
		case kindTag:
			var attr byte
			if attr, err = d.byte(); err == nil {
				if attr != 0 {
					d.off--
					return d.fail("import %d: invalid tag attribute %#x", i, attr)
				}
				_, err = d.u32()
			}
		default:
			d.off--
			return d.fail("import %d: unknown import kind %#x", i, kind)
		}
		if err != nil {
			return err
		}
		m.imports = append(m.imports, importEntry{module: mod, name: name, kind: kind})
	}
	return nil
}

func (d *decoder) globalType() (Global, error) {
	t, err := d.byte()
	if err != nil {
		return Global{}, err
	}
	if !validValType(t) {
		d.off--
		return Global{}, d.fail("unsupported global type %#x", t)
	}
	mut, err := d.byte()
	if err != nil {
		return Global{}, err
	}
	if mut > 1 {
		d.off--
		return Global{}, d.fail("invalid global mutability %#x", mut)
	}
	return Global{Type: ValType(t), Mutable: mut == 1}, nil
}

func (m *module) parseGlobals(d *decoder) error {
	n, err := d.u32()
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		g, err := d.globalType()
		if err != nil {
			return err
		}
		if err := d.constExpr(); err != nil {
			return err
		}
		g.Index = uint32(len(m.globals))
		m.globals = append(m.globals, g)
	}
	return nil
}

func (m *module) parseExports(d *decoder) error {
	n, err := d.u32()
	if err != nil {
		return err
	}
	seen := make(map[string]bool)
	for i := uint32(0); i < n; i++ {
		start := d.off
		name, err := d.name()
		if err != nil {
			return err
		}
		if seen[name] {
			d.off = start
			return d.fail("duplicate export name %q", name)
		}
		seen[name] = true
		kind, err := d.byte()
		if err != nil {
			return err
		}
		if kind > kindTag {
			d.off--
			return d.fail("export %q: unknown export kind %#x", name, kind)
		}
		idx, err := d.u32()
		if err != nil {
			return err
		}
		m.exports = append(m.exports, exportEntry{name: name, kind: kind, index: idx})
	}
	return nil
}

// linkExports records each global's first export name. It runs after all
// sections are read because the global section precedes the export section
// but the check needs the final global count.
func (m *module) linkExports() error {
	for _, e := range m.exports {
		if e.kind != kindGlobal {
			continue
		}
		if e.index >= uint32(len(m.globals)) {
			return &FormatError{Offset: m.sectionOffset(secExport), Msg: fmt.Sprintf(
				"export %q refers to global %d, but the module has %d globals", e.name, e.index, len(m.globals))}
		}
		if g := &m.globals[e.index]; g.Export == "" {
			g.Export = e.name
		}
	}
	return nil
}

func (m *module) sectionOffset(id byte) int {
	for _, s := range m.sections {
		if s.id == id {
			return s.off
		}
	}
	return 0
}

func (m *module) exportNames() map[string]bool {
	names := make(map[string]bool, len(m.exports))
	for _, e := range m.exports {
		names[e.name] = true
	}
	return names
}

func appendU32(b []byte, v uint32) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func appendName(b []byte, s string) []byte {
	return append(appendU32(b, uint32(len(s))), s...)
}

func appendSection(b []byte, id byte, body []byte) []byte {
	b = append(b, id)
	b = appendU32(b, uint32(len(body)))
	return append(b, body...)
}
