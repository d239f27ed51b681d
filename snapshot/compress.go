package snapshot

import (
	"bytes"
	"crypto/subtle"
	"fmt"

	"github.com/klauspost/compress/s2"
)

// Pages are compressed with S2 (klauspost/compress), a batch of pages per
// block. Measured on a Go guest's heap (COMPRESSION.md), S2 costs about a
// third of zstd-fastest's CPU to encode and two thirds to decode, for 28%
// more bytes. A checkpoint's encode and decode times bound a Remus epoch
// and a migration's downtime, and from about 550 Mbit/s up the link is not
// what limits, so CPU wins. Batching lifts S2's ratio on that heap from 2.2
// (one page per block) to 3.2 (1024 pages): a heap's pages share structure.

// compressBatch encodes a batch's raw page data into a buffer from the
// pool. A batch that does not shrink (random data) is stored raw, so the
// decoder then does a copy instead of running S2 over noise.
func compressBatch(raw []byte) (Codec, []byte) {
	z := s2.Encode(getBuf(s2.MaxEncodedLen(len(raw))), raw)
	if len(z) >= len(raw) {
		return CodecNone, append(z[:0], raw...)
	}
	return CodecS2, z
}

// decompressBatch fills dst, whose length is exactly the batch's raw size
// and which is all zero (fresh memory: the sparse codec writes only its
// runs), from src. The block's stated length is checked before decoding, and S2
// decodes into dst itself: a hostile block cannot make it allocate.
func decompressBatch(c Codec, src, dst []byte) error {
	switch c {
	case CodecNone, CodecDeltaNone:
		if len(src) != len(dst) {
			return fmt.Errorf("raw page data is %d bytes, want %d", len(src), len(dst))
		}
		copy(dst, src)
		return nil
	case CodecS2, CodecDeltaS2:
		n, err := s2.DecodedLen(src)
		if err != nil {
			return err
		}
		if n != len(dst) {
			return fmt.Errorf("s2 block of %d bytes, want %d", n, len(dst))
		}
		out, err := s2.Decode(dst, src)
		if err != nil {
			return err
		}
		if len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
			return fmt.Errorf("s2 block decodes to %d bytes, want %d", len(out), len(dst))
		}
		return nil
	case CodecDeltaSparse:
		return decodeSparse(src, dst, nil)
	}
	return fmt.Errorf("unknown codec %d", c)
}

var zeroPage [PageSize]byte

// isZero reports whether a page is all zeros.
func isZero(p []byte) bool { return bytes.Equal(p, zeroPage[:]) }

// xorPage sets dst to a XOR b (all three PageSize bytes). XOR is its own
// inverse: the receiver XORs the same base back.
func xorPage(dst, a, b []byte) { subtle.XORBytes(dst[:PageSize], a[:PageSize], b[:PageSize]) }
