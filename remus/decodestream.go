package remus

import (
	"errors"
	"io"
	"runtime"
	"sync"

	"github.com/ftvm/ftvm/snapshot"
)

// decodeStream decodes a large checkpoint while the rest of it still
// arrives: the primary encodes and sends it a chunk at a time, and decoding
// only after the last chunk left the backup's core idle meanwhile, then
// made the primary's output (at the end of a computing guest, its exit)
// wait for the whole decode. It reads the pieces the receiver keeps (see
// staged.raw), each copied once, into the decoder's own buffers.
//
// A piece never changes once handed over, and the receiver only appends
// pieces: the decoder copies out of them without holding the lock.
type decodeStream struct {
	mu      sync.Mutex
	more    sync.Cond
	buf     chunks // what arrived so far
	at, pos int    // read up to buf[at][pos:]
	end     bool   // the checkpoint's end arrived
	aborted bool

	done chan struct{}
	snap *snapshot.Snapshot
	err  error
}

var errDecodeAborted = errors.New("checkpoint abandoned while decoding")

// startDecodeStream starts decoding buf, the checkpoint so far, on all
// cores; feed it the buffer as it grows, then finish or abort it.
func startDecodeStream(buf chunks, module *snapshot.Hash) *decodeStream {
	d := &decodeStream{buf: buf, done: make(chan struct{})}
	d.more.L = &d.mu
	go func() {
		defer close(d.done)
		d.snap, d.err = snapshot.DecodeReaderWorkers(d, module, runtime.GOMAXPROCS(0))
		if d.err != nil {
			// A corrupt checkpoint: the rest need not be kept for it.
			d.abort()
		}
	}()
	return d
}

// Read implements io.Reader for the decoder: it waits for more bytes, and
// ends (io.EOF) where the checkpoint did.
func (d *decodeStream) Read(p []byte) (int, error) {
	d.mu.Lock()
	for d.at == len(d.buf) && !d.end && !d.aborted {
		d.more.Wait()
	}
	at, pos, aborted := d.at, d.pos, d.aborted
	var piece []byte
	if at < len(d.buf) {
		piece = d.buf[at][pos:]
	}
	d.mu.Unlock()
	switch {
	case aborted:
		return 0, errDecodeAborted
	case piece == nil:
		return 0, io.EOF
	}
	n := copy(p, piece)
	if pos += n; n == len(piece) {
		at, pos = at+1, 0
	}
	d.mu.Lock()
	d.at, d.pos = at, pos
	d.mu.Unlock()
	return n, nil
}

// feed hands over the pieces so far (those it had, and more).
func (d *decodeStream) feed(buf chunks) {
	d.mu.Lock()
	d.buf = buf
	d.mu.Unlock()
	d.more.Signal()
}

// finish says the checkpoint is complete and waits for the decode.
func (d *decodeStream) finish() (*snapshot.Snapshot, error) {
	d.mu.Lock()
	d.end = true
	d.mu.Unlock()
	d.more.Signal()
	<-d.done
	return d.snap, d.err
}

// failed returns the decode's error if it has already ended with one (a
// corrupt checkpoint, found before all of it arrived).
func (d *decodeStream) failed() error {
	select {
	case <-d.done:
		return d.err
	default:
		return nil
	}
}

// abort ends the decode early (a broken stream); it does not wait.
func (d *decodeStream) abort() {
	d.mu.Lock()
	d.aborted = true
	d.mu.Unlock()
	d.more.Signal()
}

// chunks is a byte stream kept as the pieces it arrived in, none empty.
type chunks [][]byte

func (c chunks) len() int {
	n := 0
	for _, b := range c {
		n += len(b)
	}
	return n
}

// bytes returns the stream in one slice: the piece itself if there is one.
func (c chunks) bytes() []byte {
	switch len(c) {
	case 0:
		return nil
	case 1:
		return c[0]
	}
	out := make([]byte, 0, c.len())
	for _, b := range c {
		out = append(out, b...)
	}
	return out
}
