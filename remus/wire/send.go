package wire

import (
	"sync"

	"github.com/ftvm/ftvm/transport"
)

// bufs holds encoding buffers for Send; a buffer that grew past
// maxPooledBuf is left to the garbage collector.
var bufs = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledBuf = 4 << 20

// Send validates m and writes it to c as one frame, buffered (see
// transport.Conn.Send; Flush or SendFlush to push it out). A message that
// Validate refuses is an error and nothing is written.
func Send(c *transport.Conn, m Message) error { return send(c, m, false) }

// SendFlush is Send, then a flush of c.
func SendFlush(c *transport.Conn, m Message) error { return send(c, m, true) }

func send(c *transport.Conn, m Message, flush bool) error {
	if err := Validate(m); err != nil {
		return err
	}
	bp := bufs.Get().(*[]byte)
	b := AppendMarshal((*bp)[:0], m)
	var err error
	if flush {
		err = c.SendFlush(uint8(m.Type()), b)
	} else {
		err = c.Send(uint8(m.Type()), b)
	}
	if cap(b) <= maxPooledBuf {
		*bp = b
		bufs.Put(bp)
	}
	return err
}

// Recv reads the next frame from c and decodes it. The message owns its
// memory: it outlives the next Recv. Transport errors (io.EOF between
// frames, *transport.Error) are returned as they are; a payload that does
// not decode is a *Error.
func Recv(c *transport.Conn) (Message, error) {
	t, p, err := c.Recv()
	if err != nil {
		return nil, err
	}
	return Unmarshal(Type(t), p)
}
