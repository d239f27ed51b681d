// Package transport carries framed, versioned, checksummed messages between
// ftvm hosts over any net.Conn (plain TCP or mutual TLS). Every replication
// mode speaks through it; what the frames mean is the protocol's business
// (remus/wire), not this package's.
//
// # Frame (version 1, little-endian)
//
//	magic "FTVT" | u8 version (1) | u8 type | u16 flags (0) |
//	u32 payload length | u32 crc32c(previous 12 bytes ‖ payload) | payload
//
// The checksum covers the header and the payload, so a damaged frame is an
// error and never a wrong payload. Frames carry no sequence number: the
// protocol above carries its own. A receiver refuses a payload longer than
// its MaxPayload before allocating anything for it.
//
// One checksum covers the whole frame, so a damaged length field is caught
// only once the payload it states has been read: on a live connection a
// length damaged upwards makes Recv wait for bytes that never come, until a
// read deadline or the peer closing ends it. (TCP and TLS already protect
// the bytes in transit; the CRC guards against everything else.)
package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
)

const (
	// Magic opens every frame.
	Magic = "FTVT"
	// Version is the frame format version this build writes and reads.
	Version = 1
	// HeaderSize is the fixed header that precedes every payload.
	HeaderSize = 16
	// DefaultMaxPayload is the largest payload a Conn accepts when
	// Options.MaxPayload is unset.
	DefaultMaxPayload = 16 << 20
	// maxPayloadLimit is what the u32 length field can state.
	maxPayloadLimit = 1<<32 - 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Kinds of *Error (test with errors.Is).
var (
	// ErrBadMagic: the bytes where a frame should start are not "FTVT" —
	// not an ftvm peer, or a stream out of step.
	ErrBadMagic = errors.New("bad frame magic")
	// ErrVersion: a frame of a format version this build does not read.
	ErrVersion = errors.New("unsupported frame version")
	// ErrFlags: the reserved flags field is not zero.
	ErrFlags = errors.New("reserved frame flags set")
	// ErrChecksum: the frame's CRC-32C does not match its header and
	// payload.
	ErrChecksum = errors.New("frame checksum mismatch")
	// ErrTooLarge: a payload longer than MaxPayload (received: refused
	// before allocating; sent: refused before writing anything).
	ErrTooLarge = errors.New("frame payload too large")
	// ErrTruncated: the stream ended in the middle of a frame. The error
	// also matches io.ErrUnexpectedEOF.
	ErrTruncated = errors.New("truncated frame")
)

// Error is every error this package returns about a frame's bytes. Kind is
// one of the Err* values above; Want and Got say what was expected and what
// was found (magic as a little-endian u32, version, flags, CRC, length
// limit vs stated length, or bytes expected vs bytes read for a truncated
// frame). I/O errors of the underlying connection are returned as they are.
type Error struct {
	Kind   error
	Offset int64 // stream offset of the frame's first byte; -1 from Send
	Type   uint8 // the frame's type, when the header got that far
	Length uint32
	Want   uint64
	Got    uint64
	Cause  error // io.ErrUnexpectedEOF for ErrTruncated; else nil
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("transport: ")
	b.WriteString(e.Kind.Error())
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " at stream offset %d", e.Offset)
	}
	switch e.Kind {
	case ErrBadMagic:
		var w, g [4]byte
		binary.LittleEndian.PutUint32(w[:], uint32(e.Want))
		binary.LittleEndian.PutUint32(g[:], uint32(e.Got))
		fmt.Fprintf(&b, ": want %q, found %q", w[:], g[:])
	case ErrVersion:
		fmt.Fprintf(&b, ": want version %d, found %d", e.Want, e.Got)
	case ErrFlags:
		fmt.Fprintf(&b, ": found flags %#04x", e.Got)
	case ErrChecksum:
		fmt.Fprintf(&b, ": frame type %d, %d-byte payload: computed crc32c %#08x, frame says %#08x", e.Type, e.Length, e.Want, e.Got)
	case ErrTooLarge:
		fmt.Fprintf(&b, ": frame type %d states a %d-byte payload, limit %d", e.Type, e.Got, e.Want)
	case ErrTruncated:
		fmt.Fprintf(&b, ": got %d of %d bytes", e.Got, e.Want)
	}
	if e.Cause != nil {
		b.WriteString(": ")
		b.WriteString(e.Cause.Error())
	}
	return b.String()
}

// Unwrap gives the kind and the cause, so errors.Is(err, ErrTruncated) and
// errors.Is(err, io.ErrUnexpectedEOF) both hold for a truncated frame.
func (e *Error) Unwrap() []error {
	if e.Cause != nil {
		return []error{e.Kind, e.Cause}
	}
	return []error{e.Kind}
}

var le = binary.LittleEndian

// putHeader fills h for a frame of typ carrying payload, checksum included.
func putHeader(h *[HeaderSize]byte, typ uint8, payload []byte) {
	copy(h[0:4], Magic)
	h[4] = Version
	h[5] = typ
	le.PutUint16(h[6:8], 0)
	le.PutUint32(h[8:12], uint32(len(payload)))
	crc := crc32.Update(crc32.Checksum(h[:12], castagnoli), castagnoli, payload)
	le.PutUint32(h[12:16], crc)
}

// AppendFrame appends one whole frame to dst: what Conn.Send writes. For
// tests and tools that build streams by hand.
func AppendFrame(dst []byte, typ uint8, payload []byte) []byte {
	var h [HeaderSize]byte
	putHeader(&h, typ, payload)
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// checkHeader validates everything in h that can be checked before the
// payload is read. off is the frame's stream offset.
func checkHeader(h *[HeaderSize]byte, off int64, maxPayload int) error {
	if string(h[0:4]) != Magic {
		return &Error{Kind: ErrBadMagic, Offset: off, Want: uint64(le.Uint32([]byte(Magic))), Got: uint64(le.Uint32(h[0:4]))}
	}
	if h[4] != Version {
		return &Error{Kind: ErrVersion, Offset: off, Want: Version, Got: uint64(h[4])}
	}
	if f := le.Uint16(h[6:8]); f != 0 {
		return &Error{Kind: ErrFlags, Offset: off, Type: h[5], Got: uint64(f)}
	}
	if n := le.Uint32(h[8:12]); uint64(n) > uint64(maxPayload) {
		return &Error{Kind: ErrTooLarge, Offset: off, Type: h[5], Length: n, Want: uint64(maxPayload), Got: uint64(n)}
	}
	return nil
}

func truncated(off int64, h *[HeaderSize]byte, want, got int, headerDone bool) *Error {
	e := &Error{Kind: ErrTruncated, Offset: off, Want: uint64(want), Got: uint64(got), Cause: io.ErrUnexpectedEOF}
	if headerDone {
		e.Type = h[5]
		e.Length = le.Uint32(h[8:12])
	}
	return e
}
