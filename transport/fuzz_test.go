package transport

import (
	"bytes"
	"errors"
	"hash/crc32"
	"io"
	"testing"
)

// FuzzRecv feeds arbitrary bytes to Recv: it never panics, every payload it
// delivers is exactly the bytes of a well-formed frame whose CRC matches,
// io.EOF comes only at the end of the input on a frame boundary, and every
// other error is an *Error of a known kind.
func FuzzRecv(f *testing.F) {
	f.Add([]byte{})
	f.Add(AppendFrame(nil, 1, nil))
	f.Add(AppendFrame(AppendFrame(nil, 2, []byte("hello")), 3, bytes.Repeat([]byte{0xee}, 300)))
	f.Fuzz(func(t *testing.T, data []byte) {
		const limit = 1 << 12
		c := readerConn(data, Options{MaxPayload: limit, ReadBufferSize: 16, WriteBufferSize: 16})
		off := 0
		for {
			typ, p, err := c.Recv()
			if err == io.EOF {
				if off != len(data) {
					t.Fatalf("io.EOF at offset %d of %d", off, len(data))
				}
				return
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("error of another type: %T %v", err, err)
				}
				switch e.Kind {
				case ErrBadMagic, ErrVersion, ErrFlags, ErrChecksum, ErrTooLarge:
				case ErrTruncated:
					if !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("truncation without io.ErrUnexpectedEOF: %v", err)
					}
				default:
					t.Fatalf("unknown kind: %v", err)
				}
				if e.Offset != int64(off) {
					t.Fatalf("error offset %d, frame at %d: %v", e.Offset, off, err)
				}
				return
			}
			h := data[off:]
			if len(h) < HeaderSize+len(p) || string(h[:4]) != Magic || h[4] != Version || h[5] != typ ||
				h[6] != 0 || h[7] != 0 || int(le.Uint32(h[8:12])) != len(p) || len(p) > limit {
				t.Fatalf("delivered a frame with a bad header at offset %d", off)
			}
			if !bytes.Equal(p, h[HeaderSize:HeaderSize+len(p)]) {
				t.Fatalf("delivered payload differs from the frame's bytes at offset %d", off)
			}
			crc := crc32.Update(crc32.Checksum(h[:12], castagnoli), castagnoli, p)
			if crc != le.Uint32(h[12:16]) {
				t.Fatalf("delivered a payload whose CRC does not match at offset %d", off)
			}
			off += HeaderSize + len(p)
		}
	})
}
