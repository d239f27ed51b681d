package tests

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// faultProxy forwards TCP connections (a primary's, to its backup) and
// injects the faults the Remus tests need, one direction at a time:
//   - freeze holds back what the target sends (the backup's acks and
//     heartbeats) until thaw, while the other direction flows;
//   - stallToBackup holds back what the client sends for a while (a
//     silence one way);
//   - flapping (newFlappingProxy) cuts each new connection life after it
//     came up, and with swallow lets only its first reply through (the
//     backup's answer to the Hello), as a backup that accepts sessions
//     and acknowledges none would.
type faultProxy struct {
	ln      net.Listener
	target  string
	life    time.Duration
	swallow bool

	flapping atomic.Bool
	sessions atomic.Int64 // connections accepted while flapping
	passed   atomic.Int64 // bytes forwarded target -> client
	// stalled, if not nil, holds client -> target bytes until closed.
	stalled atomic.Pointer[chan struct{}]

	mu     sync.Mutex
	frozen chan struct{} // closed when thawed; nil when not frozen
	conns  []net.Conn
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	return newFlappingProxy(t, target, 0, false)
}

// newFlappingProxy is a faultProxy whose connections, once flap(true),
// last life each, and with swallow bring back only their first reply.
func newFlappingProxy(t *testing.T, target string, life time.Duration, swallow bool) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{ln: ln, target: target, life: life, swallow: swallow}
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

func (p *faultProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.forward(c)
	}
}

func (p *faultProxy) forward(c net.Conn) {
	b, err := net.DialTimeout("tcp", p.target, time.Second)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns = append(p.conns, c, b)
	p.mu.Unlock()
	closeBoth := func() { c.Close(); b.Close() }
	flapping := p.flapping.Load()
	if flapping {
		p.sessions.Add(1)
		time.AfterFunc(p.life, closeBoth)
	}
	go func() {
		defer closeBoth()
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if ch := p.stalled.Load(); ch != nil {
					<-*ch
				}
				if _, werr := b.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer closeBoth()
		buf := make([]byte, 32<<10)
		for first := true; ; first = false {
			n, err := b.Read(buf)
			if n > 0 && (!flapping || !p.swallow || first) {
				p.wait()
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
				p.passed.Add(int64(n))
			}
			if err != nil {
				return
			}
		}
	}()
}

// wait blocks while the proxy is frozen.
func (p *faultProxy) wait() {
	p.mu.Lock()
	ch := p.frozen
	p.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

// freeze holds back target -> client bytes from now on: a byte read from
// the target after freeze returns is written to the client only after
// thaw. It returns the moment the freeze took effect.
func (p *faultProxy) freeze() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.frozen == nil {
		p.frozen = make(chan struct{})
	}
	return time.Now()
}

// thaw lets held bytes go; it returns the moment before the first can.
func (p *faultProxy) thaw() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	at := time.Now()
	if p.frozen != nil {
		close(p.frozen)
		p.frozen = nil
	}
	return at
}

// stallToBackup holds every byte from client to target for d, new
// connections' too, while the target's bytes reach the client.
func (p *faultProxy) stallToBackup(d time.Duration) {
	ch := make(chan struct{})
	p.stalled.Store(&ch)
	time.Sleep(d)
	if p.stalled.CompareAndSwap(&ch, nil) { // else close let it go
		close(ch)
	}
}

// flap starts or stops flapping; either way the connections up now are
// cut, so that the next ones follow the new mode.
func (p *faultProxy) flap(on bool) {
	p.flapping.Store(on)
	p.cutAll()
}

func (p *faultProxy) cutAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *faultProxy) close() {
	p.thaw()
	if ch := p.stalled.Swap(nil); ch != nil {
		close(*ch)
	}
	p.ln.Close()
	p.cutAll()
}
