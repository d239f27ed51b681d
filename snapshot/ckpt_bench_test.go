package snapshot

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// kvCheckpoint is an incremental snapshot shaped like a protected KV
// server's checkpoint: 130 dirty pages of a 64 MiB memory, five in eight
// sent as deltas of a few dozen changed bytes against the receiver's copy,
// the rest whole.
func kvCheckpoint(tb testing.TB) (enc []byte, bases map[uint32][]byte) {
	rng := rand.New(rand.NewPCG(11, 12))
	s := testSnapshot(rng, Incremental, 64<<20, 130)
	bases = map[uint32][]byte{}
	for i := range s.Pages {
		p := &s.Pages[i]
		if i%8 < 5 {
			base := bytes.Clone(p.Data)
			for range 30 {
				p.Data[rng.IntN(PageSize)] ^= byte(1 + rng.IntN(255))
			}
			p.Base = base
			bases[p.Index] = base
		}
	}
	var b bytes.Buffer
	if err := s.EncodeOptions(&b, Options{Workers: 1}); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes(), bases
}

// BenchmarkDecodeCheckpoint: what a Remus backup does with each small
// checkpoint before it acknowledges it (decode, resolve the deltas), into
// fresh memory and into recycled memory (DecodeBytesInto).
func BenchmarkDecodeCheckpoint(b *testing.B) {
	enc, bases := kvCheckpoint(b)
	base := func(i uint32) []byte { return bases[i] }
	var free [][]byte // one checkpoint's buffers, recycled
	recycle := func(n int) []byte {
		for i, f := range free {
			if cap(f) >= n {
				free = append(free[:i], free[i+1:]...)
				return f[:n]
			}
		}
		return make([]byte, n)
	}
	for _, c := range []struct {
		name  string
		alloc func(int) []byte
	}{{"fresh", nil}, {"recycled", recycle}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(enc)))
			for b.Loop() {
				var got [][]byte
				alloc := c.alloc
				if alloc != nil {
					alloc = func(n int) []byte { d := recycle(n); got = append(got, d); return d }
				}
				s, err := DecodeBytesInto(enc, nil, 1, alloc)
				if err != nil {
					b.Fatal(err)
				}
				if err := s.Resolve(base); err != nil {
					b.Fatal(err)
				}
				free = append(free, got...)
			}
		})
	}
}
