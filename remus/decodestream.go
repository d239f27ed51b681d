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
// wait for the whole decode. The bytes it reads are the checkpoint buffer
// the receiver appends to (never changing what it already holds), so
// nothing is copied twice.
type decodeStream struct {
	mu      sync.Mutex
	more    sync.Cond
	buf     []byte // what arrived so far
	pos     int    // read up to here
	end     bool   // the checkpoint's end arrived
	aborted bool

	done chan struct{}
	snap *snapshot.Snapshot
	err  error
}

var errDecodeAborted = errors.New("checkpoint abandoned while decoding")

// startDecodeStream starts decoding buf, the checkpoint so far, on all
// cores; feed it the buffer as it grows, then finish or abort it.
func startDecodeStream(buf []byte, module *snapshot.Hash) *decodeStream {
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
	for d.pos == len(d.buf) && !d.end && !d.aborted {
		d.more.Wait()
	}
	avail, aborted, pos := d.buf[d.pos:], d.aborted, d.pos
	d.mu.Unlock()
	switch {
	case aborted:
		return 0, errDecodeAborted
	case len(avail) == 0:
		return 0, io.EOF
	}
	// Bytes already received never change: copied without the lock, so
	// the receiver is not held up meanwhile. Only this goroutine moves pos.
	n := copy(p, avail)
	d.mu.Lock()
	d.pos = pos + n
	d.mu.Unlock()
	return n, nil
}

// feed hands over the grown buffer (the old one with more appended).
func (d *decodeStream) feed(buf []byte) {
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

// abort ends the decode early (a broken stream); it does not wait.
func (d *decodeStream) abort() {
	d.mu.Lock()
	d.aborted = true
	d.mu.Unlock()
	d.more.Signal()
}
