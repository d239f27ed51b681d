package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"hash/crc32"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Options tune a Conn. The zero value is usable.
type Options struct {
	// MaxPayload is the largest payload Recv accepts and Send writes
	// (default DefaultMaxPayload; at most 4 GiB - 1). A received header
	// stating more is ErrTooLarge before anything is allocated for it.
	MaxPayload int
	// ReadBufferSize and WriteBufferSize size the buffers between the Conn
	// and the connection (default 64 KiB each). Payloads larger than the
	// write buffer are written straight through.
	ReadBufferSize  int
	WriteBufferSize int
}

const defaultBufferSize = 64 << 10

// minGrow is the first allocation for a payload the read buffer cannot
// hold: the buffer grows with the bytes that actually arrive, so a header
// that states a large payload and never sends it costs little.
const minGrow = 64 << 10

// Stats are a Conn's counters: bytes as they crossed the underlying
// connection (headers included; received bytes include read-ahead) and
// whole frames.
type Stats struct {
	BytesSent      uint64
	BytesReceived  uint64
	FramesSent     uint64
	FramesReceived uint64
}

// Conn is a stream of frames over a net.Conn. Send, Flush and SendFlush may
// be called from several goroutines at once (each frame is written whole);
// Recv is for one reader at a time, concurrently with senders. Every error
// other than a timeout or I/O error at a frame boundary leaves the read
// side broken: later Recvs return the same error.
type Conn struct {
	nc         net.Conn
	maxPayload int

	wmu sync.Mutex
	bw  *bufio.Writer

	br   *bufio.Reader
	hdr  [HeaderSize]byte
	rbuf []byte
	rpos int64 // stream offset of the next frame
	rerr error // sticky read error

	bytesSent, bytesRecv   atomic.Uint64
	framesSent, framesRecv atomic.Uint64

	closeOnce sync.Once
	closeErr  error
}

// NewConn frames c. The Conn owns c from now on: Close closes it.
func NewConn(c net.Conn, opts Options) *Conn {
	limit := opts.MaxPayload
	if limit <= 0 {
		limit = DefaultMaxPayload
	}
	if uint64(limit) > maxPayloadLimit {
		limit = maxPayloadLimit
	}
	rsize, wsize := opts.ReadBufferSize, opts.WriteBufferSize
	if rsize <= 0 {
		rsize = defaultBufferSize
	}
	if wsize <= 0 {
		wsize = defaultBufferSize
	}
	t := &Conn{nc: c, maxPayload: limit}
	t.bw = bufio.NewWriterSize(countingWriter{c, &t.bytesSent}, wsize)
	t.br = bufio.NewReaderSize(countingReader{c, &t.bytesRecv}, rsize)
	return t
}

type countingWriter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(uint64(n))
	return n, err
}

type countingReader struct {
	r io.Reader
	n *atomic.Uint64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(uint64(n))
	return n, err
}

// MaxPayload is the limit this Conn enforces.
func (c *Conn) MaxPayload() int { return c.maxPayload }

// Send writes one frame into the write buffer (payload is not retained).
// It returns ErrTooLarge, writing nothing, for a payload over MaxPayload.
// The frame reaches the peer at the next Flush, or earlier when the buffer
// fills. After a write error every later Send and Flush fails.
func (c *Conn) Send(typ uint8, payload []byte) error {
	return c.send(typ, payload, false)
}

// SendFlush is Send then Flush, with no other sender's frame in between.
func (c *Conn) SendFlush(typ uint8, payload []byte) error {
	return c.send(typ, payload, true)
}

func (c *Conn) send(typ uint8, payload []byte, flush bool) error {
	if len(payload) > c.maxPayload {
		return &Error{Kind: ErrTooLarge, Offset: -1, Type: typ, Want: uint64(c.maxPayload), Got: uint64(len(payload))}
	}
	var h [HeaderSize]byte
	putHeader(&h, typ, payload) // the CRC is computed outside the lock
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.bw.Write(h[:]); err != nil {
		return err
	}
	if _, err := c.bw.Write(payload); err != nil {
		return err
	}
	c.framesSent.Add(1)
	if flush {
		return c.bw.Flush()
	}
	return nil
}

// Flush writes out whatever Send has buffered.
func (c *Conn) Flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.bw.Flush()
}

// Recv reads the next frame. payload is valid until the next Recv (the
// buffer is reused). A clean end of stream between frames is io.EOF; one in
// the middle of a frame is an *Error of kind ErrTruncated that also matches
// io.ErrUnexpectedEOF. Damaged frames are *Error (ErrBadMagic, ErrVersion,
// ErrFlags, ErrTooLarge, ErrChecksum) and never deliver a payload.
func (c *Conn) Recv() (typ uint8, payload []byte, err error) {
	if c.rerr != nil {
		return 0, nil, c.rerr
	}
	off := c.rpos
	n, err := io.ReadFull(c.br, c.hdr[:])
	if err != nil {
		switch {
		case n == 0:
			// Nothing consumed: the stream is still in step, so a
			// timeout can be retried. A clean EOF stays EOF.
			if err == io.EOF {
				c.rerr = io.EOF
			}
			return 0, nil, err
		case err == io.ErrUnexpectedEOF:
			err = truncated(off, &c.hdr, HeaderSize, n, false)
		}
		c.rerr = err
		return 0, nil, err
	}
	if err := checkHeader(&c.hdr, off, c.maxPayload); err != nil {
		c.rerr = err
		return 0, nil, err
	}
	length := int(le.Uint32(c.hdr[8:12]))
	buf, got, err := c.readPayload(length)
	if err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			err = truncated(off, &c.hdr, HeaderSize+length, HeaderSize+got, true)
		}
		c.rerr = err
		return 0, nil, err
	}
	crc := crc32.Update(crc32.Checksum(c.hdr[:12], castagnoli), castagnoli, buf)
	if stated := le.Uint32(c.hdr[12:16]); crc != stated {
		err := &Error{Kind: ErrChecksum, Offset: off, Type: c.hdr[5], Length: uint32(length), Want: uint64(crc), Got: uint64(stated)}
		c.rerr = err
		return 0, nil, err
	}
	c.rpos += int64(HeaderSize + length)
	c.framesRecv.Add(1)
	return c.hdr[5], buf, nil
}

// readPayload reads n bytes into the reused buffer, growing it only as the
// bytes arrive.
func (c *Conn) readPayload(n int) ([]byte, int, error) {
	if n <= cap(c.rbuf) {
		buf := c.rbuf[:n]
		m, err := io.ReadFull(c.br, buf)
		return buf, m, err
	}
	buf := c.rbuf[:0]
	for len(buf) < n {
		if len(buf) == cap(buf) {
			nc := min(max(2*cap(buf), minGrow), n)
			nb := make([]byte, len(buf), nc)
			copy(nb, buf)
			buf = nb
			c.rbuf = nb
		}
		m, err := io.ReadFull(c.br, buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		if err != nil {
			return buf, len(buf), err
		}
	}
	return buf, n, nil
}

// Stats reads the counters (safe at any time, from any goroutine).
func (c *Conn) Stats() Stats {
	return Stats{
		BytesSent:      c.bytesSent.Load(),
		BytesReceived:  c.bytesRecv.Load(),
		FramesSent:     c.framesSent.Load(),
		FramesReceived: c.framesRecv.Load(),
	}
}

// Close closes the connection without flushing (a Flush could block on a
// peer that stopped reading); it unblocks any Send or Recv in progress.
// Calls after the first return the first's result.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.nc.Close() })
	return c.closeErr
}

// CloseWrite flushes and then shuts down the sending side, so the peer's
// Recv sees io.EOF after the last frame, when the connection supports it
// (TCP, TLS); otherwise it only flushes.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.bw.Flush(); err != nil {
		return err
	}
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Handshake runs the TLS handshake now if the connection is TLS and has not
// done it yet (a server's accepted connections handshake lazily otherwise);
// it is a no-op on a plain connection.
func (c *Conn) Handshake(ctx context.Context) error {
	if tc, ok := c.nc.(*tls.Conn); ok {
		return tc.HandshakeContext(ctx)
	}
	return nil
}

// TLSState is the connection's TLS state (peer certificates and so on);
// ok is false on a plain connection.
func (c *Conn) TLSState() (state tls.ConnectionState, ok bool) {
	if tc, ok := c.nc.(*tls.Conn); ok {
		return tc.ConnectionState(), true
	}
	return tls.ConnectionState{}, false
}

// SetDeadline, SetReadDeadline and SetWriteDeadline pass through to the
// connection. A deadline that expires while nothing of a frame has been
// read can be retried; one that expires mid-frame breaks the read side.
func (c *Conn) SetDeadline(t time.Time) error      { return c.nc.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.nc.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.nc.SetWriteDeadline(t) }

// RemoteAddr and LocalAddr are the connection's addresses.
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }
func (c *Conn) LocalAddr() net.Addr  { return c.nc.LocalAddr() }

// NetConn is the underlying connection (a *tls.Conn for TLS).
func (c *Conn) NetConn() net.Conn { return c.nc }
