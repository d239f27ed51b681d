package snapshot

import (
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Delta pages (codecs CodecDeltaNone, CodecDeltaS2, CodecDeltaSparse). A
// Remus primary writes mostly the same pages, a little changed, every
// checkpoint: a server's heap, stack and buffers. Sent as the XOR with the
// copy the backup already holds, such a page is mostly zeros. S2 of it
// took a third of the time and bytes of S2 of the page (a KV server under
// load: 59 µs and 6.9 KB per checkpoint of 48 pages, against 191 µs and
// 22.8 KB whole), but decoding it was still a quarter of the backup's CPU:
// S2 writes a zero run as overlapping copies, a few bytes at a time. The
// sparse codec stores only the words that differ, found a word at a time
// without writing the XOR out, and decodes as a few copies: about a fifth
// more bytes than S2 of the XOR, a fifth less CPU on the backup, and its
// acknowledgements sooner. The snapshot's ID still names the pages'
// contents: the section lists each page's checksum as resolved, Decode
// hashes those, and Resolve checks every resolved page against its own, so
// a receiver whose copy differs from the one the sender meant gets an
// error, never a wrong page.

// HasDeltas reports whether s holds pages still to Resolve.
func (s *Snapshot) HasDeltas() bool {
	for _, p := range s.Pages {
		if p.Delta {
			return true
		}
	}
	return false
}

// Resolve turns the delta pages of a decoded snapshot into whole pages:
// each is XORed with base(index), the receiver's current copy of the page
// (nil or short: a page it does not have, all zeros), and must then match
// the checksum the sender listed (ErrCorrupt if not, naming the page).
// The pages are changed in place, so on error the snapshot must be
// dropped. A snapshot without delta pages is left as it is.
func (s *Snapshot) Resolve(base func(index uint32) []byte) error {
	for i := range s.Pages {
		p := &s.Pages[i]
		if !p.Delta {
			continue
		}
		b := base(p.Index)
		switch {
		case p.runs != nil:
			// Kept as its runs (DecodeBytesInto): the page is its base
			// (zero if none) with them applied, written once.
			if len(b) >= PageSize {
				copy(p.Data[:PageSize], b)
			} else {
				clear(p.Data[:PageSize])
			}
			xorRuns(p.Data, p.runs)
			p.runs = nil
		case len(b) >= PageSize:
			xorPage(p.Data, p.Data, b)
		}
		if got := crc(p.Data); got != p.Sum {
			return newError(ErrCorrupt, "page %d sent as a delta resolves to checksum %08x, not the %08x it was sent with: the receiver's copy of it is not the one the sender meant", p.Index, got, p.Sum)
		}
		p.Delta, p.Sum = false, 0
	}
	return nil
}

// xorRuns XORs a page's runs, checked by decodeSparse, onto page.
func xorRuns(page, runs []byte) {
	at := 0
	for len(runs) > 0 {
		gap, n := int(le.Uint16(runs)), int(le.Uint16(runs[2:]))
		at += gap
		subtle.XORBytes(page[at:at+n], page[at:at+n], runs[4:4+n])
		at += n
		runs = runs[4+n:]
	}
}

// maxSparseRuns bounds a page's runs in CodecDeltaSparse: the encoder's
// runs are whole words with a word between them, so a page has at most
// PageSize/16 of them; the decoder allows PageSize/2 (runs of a byte with
// a byte between), and checks that they fit the page.
const maxSparseRuns = PageSize / 2

// appendSparse appends page XOR base in CodecDeltaSparse's form to out,
// unless out would then pass limit bytes (ok is false). A run is a maximal
// sequence of 8-byte words that differ; equal words are skipped four at a
// time, read in place (a page and its base are whole pages), so a page
// changed in a few places costs little more than reading it.
func appendSparse(out, page, base []byte, limit int) (_ []byte, ok bool) {
	const words = PageSize / 8
	a := (*[words]uint64)(unsafe.Pointer(&page[:PageSize][0]))
	b := (*[words]uint64)(unsafe.Pointer(&base[:PageSize][0]))
	countAt := len(out)
	out = append(out, 0, 0)
	runs, end := 0, 0 // end: the byte after the last run
	for w := 0; w < words; {
		if w <= words-4 && (a[w]^b[w])|(a[w+1]^b[w+1])|(a[w+2]^b[w+2])|(a[w+3]^b[w+3]) == 0 {
			w += 4
			continue
		}
		if a[w] == b[w] {
			w++
			continue
		}
		start := w
		for w++; w < words && a[w] != b[w]; w++ {
		}
		from, to := 8*start, 8*w
		if len(out)+4+(to-from) > limit {
			return out, false
		}
		out = le.AppendUint32(out, uint32(from-end)|uint32(to-from)<<16)
		for i := start; i < w; i++ {
			// The XOR of the words as they lie in memory: the bytes' XOR.
			out = binary.NativeEndian.AppendUint64(out, a[i]^b[i])
		}
		runs++
		end = to
	}
	le.PutUint16(out[countAt:], uint16(runs))
	return out, len(out) <= limit
}

// decodeSparse fills dst (whole pages, all zero: fresh memory) from src in
// CodecDeltaSparse's form, writing only the runs; src must be used up
// exactly. With keep (one per page of dst), it writes nothing: it checks
// the runs and sets keep[i] to page i's, for Resolve to apply onto the
// base (xorRuns) — one write of the page instead of three (clearing it,
// the runs, the XOR with the base).
func decodeSparse(src, dst []byte, keep [][]byte) error {
	for p := 0; p < len(dst); p += PageSize {
		page := dst[p : p+PageSize]
		start := src
		if len(src) < 2 {
			return fmt.Errorf("sparse page %d: truncated run count", p/PageSize)
		}
		runs := int(le.Uint16(src))
		src = src[2:]
		if runs > maxSparseRuns {
			return fmt.Errorf("sparse page %d: %d runs, at most %d", p/PageSize, runs, maxSparseRuns)
		}
		at := 0
		for r := 0; r < runs; r++ {
			if len(src) < 4 {
				return fmt.Errorf("sparse page %d: run %d truncated", p/PageSize, r)
			}
			gap, n := int(le.Uint16(src)), int(le.Uint16(src[2:]))
			src = src[4:]
			if n == 0 || at+gap+n > PageSize || len(src) < n {
				return fmt.Errorf("sparse page %d: run %d (gap %d, %d bytes at byte %d) does not fit", p/PageSize, r, gap, n, at)
			}
			at += gap
			if keep == nil {
				copy(page[at:at+n], src[:n])
			}
			at += n
			src = src[n:]
		}
		if keep != nil {
			keep[p/PageSize] = start[2 : len(start)-len(src) : len(start)-len(src)]
		}
	}
	if len(src) != 0 {
		return fmt.Errorf("sparse pages: %d bytes left over", len(src))
	}
	return nil
}
