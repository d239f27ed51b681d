package instrument

import (
	"bytes"
	"fmt"

	"github.com/ftvm/ftvm/wasi"
)

// Loop polls. A guest that computes without calling the host has no safe
// point: a checkpoint, a snapshot or a stop waits for its next host call,
// which may be minutes away; and the Go runtime of the host cannot stop the
// goroutine running it for a garbage collection either (compiled wasm has no
// preemption points), so every other goroutine of the process — heartbeats
// included — can freeze behind it.
//
// InsertPolls gives every loop a poll: each function that has a loop gets
// an i32 counter local, set to PollInterval at entry and decremented at the
// top of every loop iteration; when it reaches zero it is reset and the
// function calls the import ftvm.safepoint, which the machine makes a safe
// point like any host call (and which returns at once when no pause is
// pending). A back-edge thus costs a register decrement and a branch, and
// the host is visited at most once per PollInterval iterations of one
// activation's loops. Asyncify then treats ftvm.safepoint like the WASI
// imports, so the guest can be unwound there.
//
// Adding an import shifts the index of every defined function by one, so
// the rewrite renumbers function references everywhere: calls and ref.func
// in code, exports, the start function, element segments, constant
// expressions, and the name section.

// The poll import.
const (
	PollModule = wasi.PollModule
	PollName   = wasi.PollName
	// PollInterval is the loop iterations between two polls of one
	// function activation. Only loops that call or contain a loop are
	// polled (see pollWorthy), so an iteration is rarely cheaper than a
	// call: 1024 of them take microseconds at least, against ~50 ns for
	// the poll's host call.
	PollInterval = 1 << 10
)

// PollSafePoint is the poll import as Asyncify's import list names it.
const PollSafePoint = PollModule + "." + PollName

// YieldName is the second import, ftvm.yield, () -> (): what a leaf loop
// (no call, no inner loop) calls every LeafPollInterval iterations. It is
// not a safe point — Asyncify is not told about it, so the hot loop stays
// uninstrumented and runs at full speed — but it enters the host: the Go
// runtime can stop the guest's goroutine there for a garbage collection
// (which otherwise waits, with every other goroutine of the process, for
// the guest's next host call), and a stopping VM ends the guest there.
const (
	YieldName        = wasi.YieldName
	LeafPollInterval = 1 << 16
)

// InsertPolls returns mod with a poll at the top of every loop (see
// above). A module without loops comes back unchanged, and so does one
// that already imports ftvm.safepoint.
func InsertPolls(mod []byte) ([]byte, error) {
	m, err := parse(mod)
	if err != nil {
		return nil, err
	}
	for _, im := range m.imports {
		if im.module == PollModule && im.name == PollName {
			return mod, nil
		}
	}
	p := &polls{m: m}
	if err := p.scan(); err != nil {
		return nil, err
	}
	if !p.anyLoop {
		return mod, nil
	}
	return p.rewrite()
}

type polls struct {
	m          *module
	params     []int    // parameter count of each type
	funcTypes  []uint32 // type of each defined function
	funcImps   uint32   // imported functions: the poll's index
	pollType   uint32   // index of the () -> () type to add
	anyLoop    bool
	hasTypeSec bool
	hasImpSec  bool
}

// remap is a function index after the two imports are inserted.
func (p *polls) remap(f uint32) uint32 {
	if f >= p.funcImps {
		return f + 2
	}
	return f
}

// scan reads the type, import and function sections and looks for a loop.
func (p *polls) scan() error {
	for _, s := range p.m.sections {
		d := &decoder{b: s.body, base: s.off}
		switch s.id {
		case secType:
			p.hasTypeSec = true
			n, err := d.u32()
			if err != nil {
				return err
			}
			for i := uint32(0); i < n; i++ {
				form, err := d.byte()
				if err != nil {
					return err
				}
				if form != 0x60 {
					return d.fail("type %d is not a function type", i)
				}
				var params int
				for k := 0; k < 2; k++ { // params, then results
					c, err := d.u32()
					if err != nil {
						return err
					}
					if _, err := d.bytes(int(c)); err != nil {
						return err
					}
					if k == 0 {
						params = int(c)
					}
				}
				p.params = append(p.params, params)
			}
		case secImport:
			p.hasImpSec = true
		case secFunction:
			n, err := d.u32()
			if err != nil {
				return err
			}
			for i := uint32(0); i < n; i++ {
				t, err := d.u32()
				if err != nil {
					return err
				}
				if int(t) >= len(p.params) {
					return d.fail("function %d has type %d of %d", i, t, len(p.params))
				}
				p.funcTypes = append(p.funcTypes, t)
			}
		case secCode:
			// Any loop opcode byte at all? A cheap over-approximation;
			// the rewrite finds the real ones.
			p.anyLoop = bytes.IndexByte(s.body, opLoop) >= 0
		}
	}
	for _, im := range p.m.imports {
		if im.kind == kindFunc {
			p.funcImps++
		}
	}
	p.pollType = uint32(len(p.params))
	return nil
}

func (p *polls) rewrite() ([]byte, error) {
	out := append([]byte(nil), "\x00asm\x01\x00\x00\x00"...)
	var err error
	addedType, addedImport := false, false
	for _, s := range p.m.sections {
		// Sections that must exist for the poll come in at their place.
		if !p.hasTypeSec && !addedType && sectionRank[s.id] > sectionRank[secType] && s.id != secCustom {
			out = appendSection(out, secType, p.typeSection(nil))
			addedType = true
		}
		if !p.hasImpSec && !addedImport && sectionRank[s.id] > sectionRank[secImport] && s.id != secCustom {
			out = appendSection(out, secImport, p.importSection(nil))
			addedImport = true
		}
		var body []byte
		d := &decoder{b: s.body, base: s.off}
		switch s.id {
		case secType:
			body, addedType = p.typeSection(s.body), true
		case secImport:
			body, addedImport = p.importSection(s.body), true
		case secExport:
			body, err = p.exportSection(d)
		case secStart:
			body, err = p.startSection(d)
		case secElement:
			body, err = p.elementSection(d)
		case secGlobal:
			body, err = p.globalSection(d)
		case secCode:
			body, err = p.codeSection(d)
		case secCustom:
			body, err = p.customSection(d)
		default:
			out = append(out, s.raw...)
			continue
		}
		if err != nil {
			return nil, err
		}
		if body != nil {
			out = appendSection(out, s.id, body)
		}
	}
	if !addedType {
		out = appendSection(out, secType, p.typeSection(nil))
	}
	if !addedImport {
		out = appendSection(out, secImport, p.importSection(nil))
	}
	return out, nil
}

// typeSection appends the poll's type, () -> (), to the section body b.
func (p *polls) typeSection(b []byte) []byte {
	var rest []byte
	if b != nil {
		d := &decoder{b: b}
		d.u32() // already read by scan
		rest = b[d.off:]
	}
	out := appendU32(nil, uint32(len(p.params))+1)
	out = append(out, rest...)
	return append(out, 0x60, 0, 0)
}

// importSection appends the poll import to the section body b.
func (p *polls) importSection(b []byte) []byte {
	var n uint32
	var rest []byte
	if b != nil {
		d := &decoder{b: b}
		n, _ = d.u32()
		rest = b[d.off:]
	}
	out := appendU32(nil, n+2)
	out = append(out, rest...)
	for _, name := range []string{PollName, YieldName} {
		out = appendName(out, PollModule)
		out = appendName(out, name)
		out = append(out, kindFunc)
		out = appendU32(out, p.pollType)
	}
	return out
}

func (p *polls) exportSection(d *decoder) ([]byte, error) {
	n, err := d.u32()
	if err != nil {
		return nil, err
	}
	out := appendU32(nil, n)
	for i := uint32(0); i < n; i++ {
		name, err := d.name()
		if err != nil {
			return nil, err
		}
		kind, err := d.byte()
		if err != nil {
			return nil, err
		}
		idx, err := d.u32()
		if err != nil {
			return nil, err
		}
		if kind == kindFunc {
			idx = p.remap(idx)
		}
		out = appendName(out, name)
		out = append(out, kind)
		out = appendU32(out, idx)
	}
	return out, nil
}

func (p *polls) startSection(d *decoder) ([]byte, error) {
	f, err := d.u32()
	if err != nil {
		return nil, err
	}
	return appendU32(nil, p.remap(f)), nil
}

// constExpr copies a constant expression, renumbering ref.func.
func (p *polls) constExpr(d *decoder, out []byte) ([]byte, error) {
	start := d.off
	if err := d.constExpr(); err != nil {
		return nil, err
	}
	expr := d.b[start:d.off]
	if bytes.IndexByte(expr, 0xd2) < 0 {
		return append(out, expr...), nil
	}
	// Re-walk it, rewriting ref.func operands.
	e := &decoder{b: expr, base: d.base + start}
	return p.instructions(e, out, [2][]byte{}, nil, 0, true)
}

func (p *polls) globalSection(d *decoder) ([]byte, error) {
	n, err := d.u32()
	if err != nil {
		return nil, err
	}
	out := appendU32(nil, n)
	for i := uint32(0); i < n; i++ {
		t, err := d.bytes(2) // valtype, mutability
		if err != nil {
			return nil, err
		}
		out = append(out, t...)
		if out, err = p.constExpr(d, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (p *polls) elementSection(d *decoder) ([]byte, error) {
	n, err := d.u32()
	if err != nil {
		return nil, err
	}
	out := appendU32(nil, n)
	for i := uint32(0); i < n; i++ {
		flags, err := d.u32()
		if err != nil {
			return nil, err
		}
		if flags > 7 {
			return nil, d.fail("element segment %d: flags %d", i, flags)
		}
		out = appendU32(out, flags)
		if flags&3 == 2 { // explicit table index
			t, err := d.u32()
			if err != nil {
				return nil, err
			}
			out = appendU32(out, t)
		}
		if flags&1 == 0 { // active: offset expression
			if out, err = p.constExpr(d, out); err != nil {
				return nil, err
			}
		}
		if flags&3 != 0 { // elemkind or reftype
			k, err := d.byte()
			if err != nil {
				return nil, err
			}
			out = append(out, k)
		}
		cnt, err := d.u32()
		if err != nil {
			return nil, err
		}
		out = appendU32(out, cnt)
		for j := uint32(0); j < cnt; j++ {
			if flags&4 != 0 {
				if out, err = p.constExpr(d, out); err != nil {
					return nil, err
				}
				continue
			}
			f, err := d.u32()
			if err != nil {
				return nil, err
			}
			out = appendU32(out, p.remap(f))
		}
	}
	return out, nil
}

// customSection renumbers the name section's function and local names;
// any other custom section is kept as it is. A name section that does not
// parse is dropped (names are for traces only).
func (p *polls) customSection(d *decoder) ([]byte, error) {
	name, err := d.name()
	if err != nil {
		return nil, err
	}
	if name != "name" {
		return d.b, nil
	}
	out := appendName(nil, name)
	for !d.done() {
		id, err := d.byte()
		if err != nil {
			return nil, nil
		}
		size, err := d.u32()
		if err != nil {
			return nil, nil
		}
		sub, err := d.bytes(int(size))
		if err != nil {
			return nil, nil
		}
		if id == 1 || id == 2 {
			sd := &decoder{b: sub}
			if sub, err = p.nameSubsection(sd, id); err != nil {
				return nil, nil
			}
		}
		out = append(out, id)
		out = appendU32(out, uint32(len(sub)))
		out = append(out, sub...)
	}
	return out, nil
}

// nameSubsection renumbers function names (1) or local names (2): a vector
// of (function index, name) or (function index, name map).
func (p *polls) nameSubsection(d *decoder, id byte) ([]byte, error) {
	n, err := d.u32()
	if err != nil {
		return nil, err
	}
	out := appendU32(nil, n)
	for i := uint32(0); i < n; i++ {
		f, err := d.u32()
		if err != nil {
			return nil, err
		}
		out = appendU32(out, p.remap(f))
		start := d.off
		if id == 1 {
			if _, err := d.name(); err != nil {
				return nil, err
			}
		} else {
			k, err := d.u32()
			if err != nil {
				return nil, err
			}
			for j := uint32(0); j < k; j++ {
				if _, err := d.u32(); err != nil {
					return nil, err
				}
				if _, err := d.name(); err != nil {
					return nil, err
				}
			}
		}
		out = append(out, d.b[start:d.off]...)
	}
	if !d.done() {
		return nil, d.fail("name subsection %d: trailing bytes", id)
	}
	return out, nil
}

func (p *polls) codeSection(d *decoder) ([]byte, error) {
	n, err := d.u32()
	if err != nil {
		return nil, err
	}
	if int(n) != len(p.funcTypes) {
		return nil, d.fail("%d function bodies for %d functions", n, len(p.funcTypes))
	}
	out := appendU32(nil, n)
	var fn []byte
	for i := uint32(0); i < n; i++ {
		size, err := d.u32()
		if err != nil {
			return nil, err
		}
		start := d.off
		body, err := d.bytes(int(size))
		if err != nil {
			return nil, err
		}
		bd := &decoder{b: body, base: d.base + start}
		if fn, err = p.function(bd, fn[:0], p.params[p.funcTypes[i]]); err != nil {
			return nil, fmt.Errorf("function %d: %w", p.funcImps+i, err)
		}
		out = appendU32(out, uint32(len(fn)))
		out = append(out, fn...)
	}
	return out, nil
}

// function rewrites one body: a counter local if it has a loop, its
// initialization, a poll at every loop top, renumbered calls.
func (p *polls) function(d *decoder, out []byte, params int) ([]byte, error) {
	groups, err := d.u32()
	if err != nil {
		return nil, err
	}
	declStart := d.off
	locals := uint64(params)
	for g := uint32(0); g < groups; g++ {
		c, err := d.u32()
		if err != nil {
			return nil, err
		}
		if _, err := d.byte(); err != nil {
			return nil, err
		}
		locals += uint64(c)
	}
	decls := d.b[declStart:d.off]
	code := d.b[d.off:]
	cd := &decoder{b: code, base: d.base + d.off}
	var which []bool // per loop: a safe point (true) or a yield
	if bytes.IndexByte(code, opLoop) >= 0 && locals < maxLocals {
		if which, err = pollWorthy(&decoder{b: code, base: cd.base}); err != nil {
			return nil, err
		}
	}
	if len(which) == 0 { // no loop (or no room for another local)
		out = appendU32(out, groups)
		out = append(out, decls...)
		return p.instructions(cd, out, [2][]byte{}, nil, 0, false)
	}
	counter := uint32(locals)
	out = appendU32(out, groups+1)
	out = append(out, decls...)
	out = append(out, 1, byte(I32))
	out = append(out, 0x41)
	out = appendSleb(out, PollInterval)
	out = append(out, 0x21)
	out = appendU32(out, counter)
	polls := [2][]byte{p.pollCode(counter, p.funcImps+1, LeafPollInterval), p.pollCode(counter, p.funcImps, PollInterval)}
	return p.instructions(cd, out, polls, which, 0, false)
}

// maxLocals is where a function gets no counter local (and no polls):
// engines refuse functions with more than 50000 locals.
const maxLocals = 50000

// pollWorthy says, for each loop of a body in order, whether it gets the
// safe point: only loops that contain a call or another loop. A leaf loop
// (no call, no inner loop) gets a yield instead: a safe point there would
// make Asyncify instrument the hottest code of the guest (its rewind
// guards cost a tight loop up to half its speed), while the loop around
// it, or the caller's loop, reaches a safe point soon enough.
func pollWorthy(d *decoder) ([]bool, error) {
	var worthy []bool
	var open []int // per open block: its loop number, or -1
	mark := func() {
		for _, l := range open {
			if l >= 0 {
				worthy[l] = true
			}
		}
	}
	for !d.done() {
		op, _ := d.byte()
		switch op {
		case 0x02, 0x03, 0x04:
			if err := blockType(d); err != nil {
				return nil, err
			}
			if op == opLoop {
				mark()
				open = append(open, len(worthy))
				worthy = append(worthy, false)
			} else {
				open = append(open, -1)
			}
			continue
		case 0x0b:
			if len(open) > 0 {
				open = open[:len(open)-1]
			}
			continue
		case 0x10, 0x11, 0x12, 0x13:
			mark()
		}
		if op == 0x10 || op == 0x12 || op == 0xd2 {
			if _, err := d.u32(); err != nil {
				return nil, err
			}
			continue
		}
		if err := skipImmediates(d, op); err != nil {
			return nil, err
		}
	}
	return worthy, nil
}

// pollCode is the sequence put at the top of a loop, calling import fn
// every interval iterations:
//
//	local.get c; i32.const 1; i32.sub; local.tee c; i32.eqz
//	if; i32.const interval; local.set c; call fn; end
func (p *polls) pollCode(c, fn uint32, interval int64) []byte {
	b := []byte{0x20}
	b = appendU32(b, c)
	b = append(b, 0x41, 0x01, 0x6b, 0x22)
	b = appendU32(b, c)
	b = append(b, 0x45, 0x04, 0x40, 0x41)
	b = appendSleb(b, interval)
	b = append(b, 0x21)
	b = appendU32(b, c)
	b = append(b, 0x10)
	b = appendU32(b, fn)
	return append(b, 0x0b)
}

const opLoop = 0x03

// instructions copies code from d to out up to the end of the body (or of
// a constant expression), inserting after the block type of each loop its
// poll (polls[1], a safe point, where which marks it, else polls[0], a
// yield), and renumbering function indices. depth counts open blocks.
func (p *polls) instructions(d *decoder, out []byte, polls [2][]byte, which []bool, depth int, constant bool) ([]byte, error) {
	loops := 0
	for {
		if d.done() {
			return nil, d.fail("code ends without an end instruction")
		}
		start := d.off
		op, _ := d.byte()
		switch {
		case op == 0x02 || op == 0x03 || op == 0x04: // block, loop, if
			if err := blockType(d); err != nil {
				return nil, err
			}
			out = append(out, d.b[start:d.off]...)
			if op == opLoop {
				if loops < len(which) {
					if which[loops] {
						out = append(out, polls[1]...) // a safe point
					} else {
						out = append(out, polls[0]...) // a yield
					}
				}
				loops++
			}
			depth++
			continue
		case op == 0x0b: // end
			out = append(out, op)
			if depth == 0 {
				if !d.done() && !constant {
					return nil, d.fail("code continues after the function's end")
				}
				return out, nil
			}
			depth--
			continue
		case op == 0x10 || op == 0x12 || op == 0xd2: // call, return_call, ref.func
			f, err := d.u32()
			if err != nil {
				return nil, err
			}
			out = append(out, op)
			out = appendU32(out, p.remap(f))
			continue
		}
		if err := skipImmediates(d, op); err != nil {
			return nil, err
		}
		out = append(out, d.b[start:d.off]...)
	}
}

// blockType skips a block type: empty, a value type, or a type index (s33).
func blockType(d *decoder) error {
	if d.done() {
		return d.fail("unexpected end of input")
	}
	c := d.b[d.off]
	if c == 0x40 || validValType(c) {
		d.off++
		return nil
	}
	return d.sleb(33)
}

// skipImmediates skips the immediates of op (every opcode of wasm 2.0 plus
// the tail-call, threads and SIMD proposals); an unknown opcode is an
// error, so that nothing is ever misread.
func skipImmediates(d *decoder, op byte) error {
	u := func(n int) error {
		for i := 0; i < n; i++ {
			if _, err := d.u32(); err != nil {
				return err
			}
		}
		return nil
	}
	switch {
	case op == 0x00 || op == 0x01 || op == 0x05 || op == 0x0f || op == 0x1a || op == 0x1b || op == 0xd1:
		return nil // unreachable, nop, else, return, drop, select, ref.is_null
	case op == 0x0c || op == 0x0d: // br, br_if
		return u(1)
	case op == 0x0e: // br_table
		n, err := d.u32()
		if err != nil {
			return err
		}
		if uint64(n) > uint64(len(d.b)-d.off) {
			return d.fail("br_table of %d labels", n)
		}
		return u(int(n) + 1)
	case op == 0x11 || op == 0x13: // call_indirect, return_call_indirect
		return u(2)
	case op == 0x1c: // select t*
		n, err := d.u32()
		if err != nil {
			return err
		}
		_, err = d.bytes(int(n))
		return err
	case op >= 0x20 && op <= 0x26: // local.*, global.*, table.get/set
		return u(1)
	case op >= 0x28 && op <= 0x3e: // loads, stores: memarg
		return u(2)
	case op == 0x3f || op == 0x40: // memory.size, memory.grow
		return u(1)
	case op == 0x41:
		return d.sleb(32)
	case op == 0x42:
		return d.sleb(64)
	case op == 0x43:
		_, err := d.bytes(4)
		return err
	case op == 0x44:
		_, err := d.bytes(8)
		return err
	case op >= 0x45 && op <= 0xc4: // numeric, no immediates
		return nil
	case op == 0xd0: // ref.null t
		_, err := d.byte()
		return err
	case op == 0xfc:
		sub, err := d.u32()
		if err != nil {
			return err
		}
		switch {
		case sub <= 7: // trunc_sat
			return nil
		case sub == 8: // memory.init data mem
			return u(2)
		case sub == 9: // data.drop
			return u(1)
		case sub == 10: // memory.copy mem mem
			return u(2)
		case sub == 11: // memory.fill mem
			return u(1)
		case sub == 12 || sub == 14: // table.init, table.copy
			return u(2)
		case sub == 13 || sub == 15 || sub == 16 || sub == 17: // elem.drop, table.grow/size/fill
			return u(1)
		}
		return d.fail("unknown instruction 0xfc %d", sub)
	case op == 0xfd:
		sub, err := d.u32()
		if err != nil {
			return err
		}
		switch {
		case sub <= 11 || sub == 92 || sub == 93: // loads, stores, load_zero: memarg
			return u(2)
		case sub == 12 || sub == 13: // v128.const, i8x16.shuffle
			_, err := d.bytes(16)
			return err
		case sub >= 21 && sub <= 34: // extract/replace lane
			_, err := d.byte()
			return err
		case sub >= 84 && sub <= 91: // load/store lane: memarg, lane
			if err := u(2); err != nil {
				return err
			}
			_, err := d.byte()
			return err
		case sub <= 0x113: // the rest take no immediates
			return nil
		}
		return d.fail("unknown instruction 0xfd %d", sub)
	case op == 0xfe: // threads
		sub, err := d.u32()
		if err != nil {
			return err
		}
		if sub == 3 { // atomic.fence
			_, err := d.byte()
			return err
		}
		if sub <= 0x4e {
			return u(2)
		}
		return d.fail("unknown instruction 0xfe %d", sub)
	}
	return d.fail("unknown instruction %#02x", op)
}

// appendSleb appends a signed LEB128.
func appendSleb(b []byte, v int64) []byte {
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if (v == 0 && c&0x40 == 0) || (v == -1 && c&0x40 != 0) {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}
