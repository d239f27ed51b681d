package instrument_test

// A tiny wasm assembler for hand-made test modules: sections and vectors
// encoded byte by byte, so the tests do not depend on the code under test.

func uleb(v uint64) []byte {
	var b []byte
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func sleb(v int64) []byte {
	var b []byte
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if (v == 0 && c&0x40 == 0) || (v == -1 && c&0x40 != 0) {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func str(s string) []byte { return cat(uleb(uint64(len(s))), []byte(s)) }

// vec is a vector: count, then the items.
func vec(items ...[]byte) []byte { return cat(uleb(uint64(len(items))), cat(items...)) }

func sec(id byte, body []byte) []byte { return cat([]byte{id}, uleb(uint64(len(body))), body) }

func custom(name string, payload []byte) []byte { return sec(0, cat(str(name), payload)) }

func wasmModule(sections ...[]byte) []byte {
	return cat([]byte("\x00asm\x01\x00\x00\x00"), cat(sections...))
}

// Value types and a few opcodes.
const (
	tI32 = 0x7f
	tI64 = 0x7e
	tF32 = 0x7d
	tF64 = 0x7c
)

func functype(params, results []byte) []byte {
	return cat([]byte{0x60}, uleb(uint64(len(params))), params, uleb(uint64(len(results))), results)
}

func importFunc(mod, name string, typeIdx uint32) []byte {
	return cat(str(mod), str(name), []byte{0}, uleb(uint64(typeIdx)))
}

func importGlobal(mod, name string, t byte, mutable bool) []byte {
	m := byte(0)
	if mutable {
		m = 1
	}
	return cat(str(mod), str(name), []byte{3, t, m})
}

func importMemory(mod, name string, min uint32) []byte {
	return cat(str(mod), str(name), []byte{2, 0}, uleb(uint64(min)))
}

func global(t byte, mutable bool, init []byte) []byte {
	m := byte(0)
	if mutable {
		m = 1
	}
	return cat([]byte{t, m}, init, []byte{0x0b})
}

func i32const(v int32) []byte { return cat([]byte{0x41}, sleb(int64(v))) }
func i64const(v int64) []byte { return cat([]byte{0x42}, sleb(v)) }

func export(name string, kind byte, idx uint32) []byte {
	return cat(str(name), []byte{kind}, uleb(uint64(idx)))
}

// body is a function body: local declarations (none) and code, then end.
func body(code ...[]byte) []byte {
	b := cat([]byte{0}, cat(code...), []byte{0x0b})
	return cat(uleb(uint64(len(b))), b)
}

func dataActive(offset int32, data []byte) []byte {
	return cat([]byte{0}, i32const(offset), []byte{0x0b}, uleb(uint64(len(data))), data)
}

// wasiHello is a WASI command that writes msg to stdout with fd_write and
// has globals of several kinds (one already exported), plus whatever extra
// code runs first in _start. extraTypes are appended to the type section
// (type 0 is fd_write's, type 1 is () -> ()); extraFuncs to the functions,
// as (type index, body) pairs, indexed from 2.
func wasiHello(msg string, extraTypes [][]byte, extraFuncs [][2][]byte, startCode ...[]byte) []byte {
	types := append([][]byte{
		functype([]byte{tI32, tI32, tI32, tI32}, []byte{tI32}),
		functype(nil, nil),
	}, extraTypes...)
	funcs := [][]byte{uleb(1)}
	bodies := [][]byte{body(cat(startCode...),
		// fd_write(1, iovs=0, 1, nwritten=8); drop the errno
		i32const(1), i32const(0), i32const(1), i32const(8), []byte{0x10, 0, 0x1a})}
	for _, f := range extraFuncs {
		funcs = append(funcs, f[0])
		bodies = append(bodies, f[1])
	}
	iov := []byte{16, 0, 0, 0, byte(len(msg)), 0, 0, 0}
	return wasmModule(
		sec(1, vec(types...)),
		sec(2, vec(importFunc("wasi_snapshot_preview1", "fd_write", 0))),
		sec(3, vec(funcs...)),
		sec(5, vec([]byte{0, 1})),
		sec(6, vec(
			global(tI32, true, i32const(65536)),
			global(tI64, false, i64const(-42)),
			global(tF64, true, cat([]byte{0x44}, make([]byte, 8))),
			global(tI32, false, i32const(7)),
		)),
		sec(7, vec(export("memory", 2, 0), export("_start", 0, 1), export("seven", 3, 3))),
		sec(10, vec(bodies...)),
		sec(11, vec(dataActive(0, iov), dataActive(16, []byte(msg)))),
		custom("ftvm.test", []byte{1, 2, 3}),
	)
}
