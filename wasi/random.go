package wasi

import (
	"crypto/rand"
	"io"
)

// maxRandom bounds one random_get; larger requests are filled in chunks.
const maxRandom = 1 << 20

func randomGet(d *Devices, m Mem, p []uint64) Errno {
	buf, ok := m.Slice(uint32(p[0]), uint32(p[1]))
	if !ok {
		return EFAULT
	}
	src := d.rand
	if src == nil {
		src = rand.Reader
	}
	for off := 0; off < len(buf); off += maxRandom {
		end := min(off+maxRandom, len(buf))
		if _, err := io.ReadFull(src, buf[off:end]); err != nil {
			return EIO
		}
	}
	d.input(Input{Kind: InputRandom, Call: CallRandomGet, Fd: -1, Data: buf})
	return ESUCCESS
}
