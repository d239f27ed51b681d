package wasi

// Arguments and environment: static data the guest reads at start.

func argsGet(d *Devices, m Mem, p []uint64) Errno {
	return putStrings(m, d.args, uint32(p[0]), uint32(p[1]))
}

func argsSizesGet(d *Devices, m Mem, p []uint64) Errno {
	return putSizes(m, d.args, uint32(p[0]), uint32(p[1]))
}

func environGet(d *Devices, m Mem, p []uint64) Errno {
	return putStrings(m, d.env, uint32(p[0]), uint32(p[1]))
}

func environSizesGet(d *Devices, m Mem, p []uint64) Errno {
	return putSizes(m, d.env, uint32(p[0]), uint32(p[1]))
}

// putStrings writes the pointer array at ptrs and the NUL-terminated strings
// back to back at buf.
func putStrings(m Mem, list []string, ptrs, buf uint32) Errno {
	size := uint32(0)
	for _, s := range list {
		size += uint32(len(s)) + 1
	}
	dst, ok := m.Slice(buf, size)
	if !ok {
		return EFAULT
	}
	if _, ok := m.Slice(ptrs, uint32(len(list))*4); !ok {
		return EFAULT
	}
	off := uint32(0)
	for i, s := range list {
		copy(dst[off:], s)
		dst[off+uint32(len(s))] = 0
		m.PutU32(ptrs+uint32(i)*4, buf+off)
		off += uint32(len(s)) + 1
	}
	return ESUCCESS
}

func putSizes(m Mem, list []string, countPtr, sizePtr uint32) Errno {
	size := uint32(0)
	for _, s := range list {
		size += uint32(len(s)) + 1
	}
	if !m.PutU32(countPtr, uint32(len(list))) || !m.PutU32(sizePtr, size) {
		return EFAULT
	}
	return ESUCCESS
}
