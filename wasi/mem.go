package wasi

import "encoding/binary"

// Mem is the one way the device layer touches guest memory. Every guest pointer
// and length goes through its bounds-checked methods; nothing else in this
// package indexes guest memory directly. A failed check means the guest passed
// a bad pointer and the call returns EFAULT.
//
// A Mem is valid only for the duration of one host call: the guest cannot grow
// its memory while the host is running, but may do so afterwards.
type Mem struct {
	b []byte
}

// NewMem wraps a linear-memory buffer (for tests and fuzzing).
func NewMem(b []byte) Mem { return Mem{b: b} }

// Len is the size of guest memory in bytes (4 GiB at most, which does not
// fit a uint32).
func (m Mem) Len() uint64 { return uint64(len(m.b)) }

// Slice returns the n bytes at ptr, aliased to guest memory.
func (m Mem) Slice(ptr, n uint32) ([]byte, bool) {
	end := uint64(ptr) + uint64(n)
	if end > uint64(len(m.b)) {
		return nil, false
	}
	return m.b[ptr:end:end], true
}

// String copies n bytes at ptr into a Go string.
func (m Mem) String(ptr, n uint32) (string, bool) {
	b, ok := m.Slice(ptr, n)
	if !ok {
		return "", false
	}
	return string(b), true
}

// Write copies data to ptr.
func (m Mem) Write(ptr uint32, data []byte) bool {
	b, ok := m.Slice(ptr, uint32(len(data)))
	if !ok || uint64(len(data)) > 1<<32-1 {
		return false
	}
	copy(b, data)
	return true
}

// U8 reads a byte.
func (m Mem) U8(ptr uint32) (uint8, bool) {
	if uint64(ptr) >= uint64(len(m.b)) {
		return 0, false
	}
	return m.b[ptr], true
}

// U16 reads a little-endian uint16.
func (m Mem) U16(ptr uint32) (uint16, bool) {
	b, ok := m.Slice(ptr, 2)
	if !ok {
		return 0, false
	}
	return binary.LittleEndian.Uint16(b), true
}

// U32 reads a little-endian uint32.
func (m Mem) U32(ptr uint32) (uint32, bool) {
	b, ok := m.Slice(ptr, 4)
	if !ok {
		return 0, false
	}
	return binary.LittleEndian.Uint32(b), true
}

// U64 reads a little-endian uint64.
func (m Mem) U64(ptr uint32) (uint64, bool) {
	b, ok := m.Slice(ptr, 8)
	if !ok {
		return 0, false
	}
	return binary.LittleEndian.Uint64(b), true
}

// PutU8 writes a byte.
func (m Mem) PutU8(ptr uint32, v uint8) bool {
	if uint64(ptr) >= uint64(len(m.b)) {
		return false
	}
	m.b[ptr] = v
	return true
}

// PutU16 writes a little-endian uint16.
func (m Mem) PutU16(ptr uint32, v uint16) bool {
	b, ok := m.Slice(ptr, 2)
	if ok {
		binary.LittleEndian.PutUint16(b, v)
	}
	return ok
}

// PutU32 writes a little-endian uint32.
func (m Mem) PutU32(ptr uint32, v uint32) bool {
	b, ok := m.Slice(ptr, 4)
	if ok {
		binary.LittleEndian.PutUint32(b, v)
	}
	return ok
}

// PutU64 writes a little-endian uint64.
func (m Mem) PutU64(ptr uint32, v uint64) bool {
	b, ok := m.Slice(ptr, 8)
	if ok {
		binary.LittleEndian.PutUint64(b, v)
	}
	return ok
}

// Iovecs resolves an array of n iovec/ciovec structs at ptr into byte slices
// aliased to guest memory, appending to dst (so callers can reuse a buffer).
// Every buffer is checked; a bad one fails the whole call with EFAULT, too many
// with EINVAL. Past maxIOBytes in all they are cut short (and dropped): the
// call moves that much at most.
func (m Mem) Iovecs(dst [][]byte, ptr, n uint32) ([][]byte, Errno) {
	if n > maxIovecs {
		return dst, EINVAL
	}
	vec, ok := m.Slice(ptr, n*sizeIovec)
	if !ok {
		return dst, EFAULT
	}
	left := uint32(maxIOBytes)
	for i := uint32(0); i < n; i++ {
		p := binary.LittleEndian.Uint32(vec[i*sizeIovec:])
		l := binary.LittleEndian.Uint32(vec[i*sizeIovec+4:])
		b, ok := m.Slice(p, l)
		if !ok {
			return dst, EFAULT
		}
		if left > 0 {
			b = b[:min(uint32(len(b)), left)]
			left -= uint32(len(b))
			dst = append(dst, b)
		}
	}
	return dst, ESUCCESS
}

// putLE helpers for building structs in a host-side buffer before one checked
// copy into the guest.
func le16(b []byte, off int, v uint16) { binary.LittleEndian.PutUint16(b[off:], v) }
func le32(b []byte, off int, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
func le64(b []byte, off int, v uint64) { binary.LittleEndian.PutUint64(b[off:], v) }
