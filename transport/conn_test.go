package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// streamConn is a net.Conn over a reader and a writer, for feeding Recv
// hand-made streams.
type streamConn struct {
	io.Reader
	io.Writer
}

type nopAddr struct{}

func (nopAddr) Network() string { return "stream" }
func (nopAddr) String() string  { return "stream" }

func (streamConn) Close() error                     { return nil }
func (streamConn) LocalAddr() net.Addr              { return nopAddr{} }
func (streamConn) RemoteAddr() net.Addr             { return nopAddr{} }
func (streamConn) SetDeadline(time.Time) error      { return nil }
func (streamConn) SetReadDeadline(time.Time) error  { return nil }
func (streamConn) SetWriteDeadline(time.Time) error { return nil }

func readerConn(b []byte, opts Options) *Conn {
	return NewConn(streamConn{Reader: bytes.NewReader(b), Writer: io.Discard}, opts)
}

type frame struct {
	typ     uint8
	payload []byte
}

func randFrames(r *rand.Rand, n, maxSize int) []frame {
	fs := make([]frame, n)
	for i := range fs {
		size := r.IntN(maxSize + 1)
		if r.IntN(8) == 0 {
			size = 0
		}
		p := make([]byte, size)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		fs[i] = frame{typ: uint8(r.Uint32()), payload: p}
	}
	return fs
}

func encodeFrames(fs []frame) (stream []byte, starts []int) {
	for _, f := range fs {
		starts = append(starts, len(stream))
		stream = AppendFrame(stream, f.typ, f.payload)
	}
	return stream, starts
}

// tcpPair is a plain TCP connection on loopback, through Listen and Dial.
func tcpPair(t testing.TB, opts Options) (client, server *Conn) {
	return pair(t, nil, nil, opts)
}

func tlsPair(t testing.TB, scfg, ccfg *tls.Config) (client, server *Conn) {
	return pair(t, scfg, ccfg, Options{})
}

func pair(t testing.TB, scfg, ccfg *tls.Config, opts Options) (client, server *Conn) {
	t.Helper()
	l, err := Listen("127.0.0.1:0", scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *Conn, 1)
	go func() {
		nc, err := l.Accept()
		if err != nil {
			t.Error(err)
			accepted <- nil
			return
		}
		c := NewConn(nc, opts)
		if err := c.Handshake(context.Background()); err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	client, err = Dial(context.Background(), l.Addr().String(), ccfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.FailNow()
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	fs := randFrames(r, 1500, 64<<10)
	// A few large ones, up to the limit.
	fs = append(fs, frame{7, bytes.Repeat([]byte{0xa5}, 1<<20)}, frame{8, make([]byte, DefaultMaxPayload)}, frame{9, nil})
	client, server := tcpPair(t, Options{})
	go func() {
		for i, f := range fs {
			var err error
			if i%17 == 0 {
				err = client.SendFlush(f.typ, f.payload)
			} else {
				err = client.Send(f.typ, f.payload)
			}
			if err != nil {
				t.Error(err)
				return
			}
		}
		if err := client.CloseWrite(); err != nil {
			t.Error(err)
		}
	}()
	var want uint64
	for i, f := range fs {
		typ, p, err := server.Recv()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if typ != f.typ || !bytes.Equal(p, f.payload) {
			t.Fatalf("frame %d: got type %d, %d bytes; want type %d, %d bytes", i, typ, len(p), f.typ, len(f.payload))
		}
		want += uint64(HeaderSize + len(f.payload))
	}
	if _, _, err := server.Recv(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	if _, _, err := server.Recv(); err != io.EOF {
		t.Fatalf("io.EOF is not sticky: %v", err)
	}
	cs, ss := client.Stats(), server.Stats()
	if cs.BytesSent != want || ss.BytesReceived != want || cs.FramesSent != uint64(len(fs)) || ss.FramesReceived != uint64(len(fs)) {
		t.Fatalf("stats: client %+v, server %+v; want %d bytes, %d frames", cs, ss, want, len(fs))
	}
}

// TestCorruption damages every byte of a stream in every possible way
// (all 255 nonzero XOR masks): the frames before the damaged one arrive
// intact, the damaged one never does, and the error says what is wrong.
func TestCorruption(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	fs := []frame{{1, nil}, {2, []byte("x")}}
	fs = append(fs, randFrames(r, 6, 100)...)
	fs = append(fs, frame{3, []byte("the last frame")})
	stream, starts := encodeFrames(fs)
	t.Logf("%d frames, %d bytes, %d corruptions", len(fs), len(stream), len(stream)*255)
	kinds := map[error]int{}
	damaged := make([]byte, len(stream))
	for pos := range stream {
		fi := 0
		for fi+1 < len(starts) && starts[fi+1] <= pos {
			fi++
		}
		field := pos - starts[fi]
		for mask := 1; mask < 256; mask++ {
			copy(damaged, stream)
			damaged[pos] ^= byte(mask)
			c := readerConn(damaged, Options{MaxPayload: 1 << 10, ReadBufferSize: 16 + pos%64, WriteBufferSize: 16})
			var err error
			for i := 0; ; i++ {
				var typ uint8
				var p []byte
				typ, p, err = c.Recv()
				if err != nil {
					if i != fi {
						t.Fatalf("byte %d ^ %#x: error at frame %d, want at frame %d: %v", pos, mask, i, fi, err)
					}
					break
				}
				if i >= fi {
					t.Fatalf("byte %d ^ %#x: damaged frame %d delivered (%d bytes)", pos, mask, i, len(p))
				}
				if typ != fs[i].typ || !bytes.Equal(p, fs[i].payload) {
					t.Fatalf("byte %d ^ %#x: frame %d delivered wrong", pos, mask, i)
				}
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("byte %d ^ %#x: %T %v, want *Error", pos, mask, err, err)
			}
			kinds[e.Kind]++
			var want []error
			switch {
			case field < 4:
				want = []error{ErrBadMagic}
			case field == 4:
				want = []error{ErrVersion}
			case field == 6 || field == 7:
				want = []error{ErrFlags}
			case field >= 8 && field < 12:
				// A longer length reads into the next frame or past the
				// end; a much longer one is over the limit.
				want = []error{ErrChecksum, ErrTruncated, ErrTooLarge}
			default: // type, CRC, payload
				want = []error{ErrChecksum}
			}
			ok := false
			for _, w := range want {
				ok = ok || e.Kind == w
			}
			if !ok {
				t.Fatalf("byte %d (header byte %d) ^ %#x: %v, want one of %v", pos, field, mask, err, want)
			}
			if e.Offset != int64(starts[fi]) {
				t.Fatalf("byte %d ^ %#x: error offset %d, want %d", pos, mask, e.Offset, starts[fi])
			}
			if _, _, err2 := c.Recv(); err2 != err {
				t.Fatalf("the read error is not sticky: %v then %v", err, err2)
			}
		}
	}
	t.Logf("error kinds: %v", kinds)
}

// TestTruncation cuts a stream at every byte: whole frames arrive, then
// io.EOF exactly at frame boundaries and ErrTruncated (also
// io.ErrUnexpectedEOF) anywhere else.
func TestTruncation(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	fs := append([]frame{{1, nil}}, randFrames(r, 8, 200)...)
	stream, starts := encodeFrames(fs)
	boundary := map[int]int{len(stream): len(fs)}
	for i, s := range starts {
		boundary[s] = i
	}
	for cut := 0; cut <= len(stream); cut++ {
		c := readerConn(stream[:cut], Options{})
		n := 0
		var err error
		for {
			var typ uint8
			var p []byte
			typ, p, err = c.Recv()
			if err != nil {
				break
			}
			if typ != fs[n].typ || !bytes.Equal(p, fs[n].payload) {
				t.Fatalf("cut %d: frame %d wrong", cut, n)
			}
			n++
		}
		if i, ok := boundary[cut]; ok {
			if err != io.EOF || n != i {
				t.Fatalf("cut %d (boundary before frame %d): %d frames then %v, want io.EOF", cut, i, n, err)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Kind != ErrTruncated || !errors.Is(err, ErrTruncated) || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("cut %d: %v, want ErrTruncated wrapping io.ErrUnexpectedEOF", cut, err)
		}
		if e.Offset != int64(starts[n]) || e.Got != uint64(cut-starts[n]) {
			t.Fatalf("cut %d: %v: wrong offset or count", cut, err)
		}
	}
}

func allocatedDuring(f func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	f()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

func TestTooLarge(t *testing.T) {
	// A header stating 4 GiB - 1: refused with nothing allocated for it.
	var h [HeaderSize]byte
	putHeader(&h, 5, nil)
	binary.LittleEndian.PutUint32(h[8:12], 1<<32-1)
	stream := append(h[:], make([]byte, 100)...)
	var err error
	n := allocatedDuring(func() { _, _, err = readerConn(stream, Options{}).Recv() })
	var e *Error
	if !errors.As(err, &e) || e.Kind != ErrTooLarge || e.Got != 1<<32-1 || e.Want != DefaultMaxPayload {
		t.Fatalf("%v, want ErrTooLarge", err)
	}
	if n > 1<<20 {
		t.Fatalf("refusing an oversize frame allocated %d bytes", n)
	}
	t.Logf("oversize refused: %v (%d bytes allocated, buffers included)", err, n)

	// One byte over a small limit.
	stream = AppendFrame(nil, 1, make([]byte, 1001))
	if _, _, err := readerConn(stream, Options{MaxPayload: 1000}).Recv(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("1001 bytes with limit 1000: %v", err)
	}
	if _, p, err := readerConn(stream, Options{MaxPayload: 1001}).Recv(); err != nil || len(p) != 1001 {
		t.Fatalf("1001 bytes with limit 1001: %v", err)
	}

	// A header stating the full 16 MiB that then sends 100 bytes: the
	// buffer grows with what arrives, not with what was promised.
	binary.LittleEndian.PutUint32(h[8:12], DefaultMaxPayload)
	stream = append(h[:], make([]byte, 100)...)
	n = allocatedDuring(func() { _, _, err = readerConn(stream, Options{}).Recv() })
	if !errors.Is(err, ErrTruncated) {
		t.Fatalf("%v, want ErrTruncated", err)
	}
	if n > 1<<20 {
		t.Fatalf("a 16 MiB promise with 100 bytes behind it allocated %d bytes", n)
	}

	// Send refuses, writing nothing.
	var out bytes.Buffer
	c := NewConn(streamConn{Reader: bytes.NewReader(nil), Writer: &out}, Options{MaxPayload: 10})
	if err := c.SendFlush(1, make([]byte, 11)); !errors.Is(err, ErrTooLarge) ||
		err.Error() != "transport: frame payload too large: frame type 1 states a 11-byte payload, limit 10" {
		t.Fatalf("Send of 11 bytes with limit 10: %v", err)
	}
	if err := c.SendFlush(1, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	if out.Len() != HeaderSize+10 {
		t.Fatalf("wrote %d bytes, want one 10-byte frame", out.Len())
	}
}

// TestConcurrentSenders: frames of many goroutines arrive whole and, per
// sender, in order.
func TestConcurrentSenders(t *testing.T) {
	const senders, perSender = 8, 400
	client, server := tcpPair(t, Options{})
	var wg sync.WaitGroup
	for s := range senders {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(s), 7))
			for i := range perSender {
				size := 8 + r.IntN(20000)
				p := make([]byte, size)
				binary.LittleEndian.PutUint32(p[0:], uint32(s))
				binary.LittleEndian.PutUint32(p[4:], uint32(i))
				for j := 8; j < size; j++ {
					p[j] = byte(s*31 + i + j)
				}
				var err error
				if r.IntN(4) == 0 {
					err = client.SendFlush(uint8(s), p)
				} else {
					err = client.Send(uint8(s), p)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	go func() {
		wg.Wait()
		if err := client.CloseWrite(); err != nil {
			t.Error(err)
		}
	}()
	next := make([]int, senders)
	for n := 0; ; n++ {
		typ, p, err := server.Recv()
		if err == io.EOF {
			if n != senders*perSender {
				t.Fatalf("%d frames, want %d", n, senders*perSender)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		s, i := int(binary.LittleEndian.Uint32(p)), int(binary.LittleEndian.Uint32(p[4:]))
		if s != int(typ) || s >= senders || i != next[s] {
			t.Fatalf("frame %d: sender %d (type %d) seq %d, want seq %d", n, s, typ, i, next[s])
		}
		for j := 8; j < len(p); j++ {
			if p[j] != byte(s*31+i+j) {
				t.Fatalf("frame %d: sender %d seq %d: byte %d wrong: frames interleaved", n, s, i, j)
			}
		}
		next[s]++
	}
}

// TestTimeoutBetweenFrames: a read deadline that expires before a frame
// starts can be retried.
func TestTimeoutBetweenFrames(t *testing.T) {
	a, b := net.Pipe()
	ca, cb := NewConn(a, Options{}), NewConn(b, Options{})
	defer ca.Close()
	defer cb.Close()
	cb.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, _, err := cb.Recv()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%v, want a timeout", err)
	}
	cb.SetReadDeadline(time.Time{})
	go func() {
		if err := ca.SendFlush(4, []byte("after the timeout")); err != nil {
			t.Error(err)
		}
	}()
	typ, p, err := cb.Recv()
	if err != nil || typ != 4 || string(p) != "after the timeout" {
		t.Fatalf("after a timeout: %d %q %v", typ, p, err)
	}
	if ca.RemoteAddr() == nil || cb.MaxPayload() != DefaultMaxPayload {
		t.Fatal("accessors")
	}
}

func TestErrorMessages(t *testing.T) {
	good := AppendFrame(nil, 9, []byte("hello"))
	for _, tc := range []struct {
		name   string
		damage func(b []byte)
		want   string
	}{
		{"magic", func(b []byte) { copy(b, "HTTP") }, `transport: bad frame magic at stream offset 0: want "FTVT", found "HTTP"`},
		{"version", func(b []byte) { b[4] = 2 }, "transport: unsupported frame version at stream offset 0: want version 1, found 2"},
		{"flags", func(b []byte) { b[6] = 1 }, "transport: reserved frame flags set at stream offset 0: found flags 0x0001"},
		{"crc", func(b []byte) { b[len(b)-1] ^= 1 }, "transport: frame checksum mismatch at stream offset 0: frame type 9, 5-byte payload: computed crc32c"},
	} {
		b := bytes.Clone(good)
		tc.damage(b)
		_, _, err := readerConn(b, Options{}).Recv()
		if err == nil || !bytes.HasPrefix([]byte(err.Error()), []byte(tc.want)) {
			t.Errorf("%s: %v\nwant prefix %s", tc.name, err, tc.want)
		}
	}
	_, _, err := readerConn(good[:10], Options{}).Recv()
	if want := "transport: truncated frame at stream offset 0: got 10 of 16 bytes: unexpected EOF"; fmt.Sprint(err) != want {
		t.Errorf("truncated: %v, want %s", err, want)
	}
}
