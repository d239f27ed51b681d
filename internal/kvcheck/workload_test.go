package kvcheck

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// memKV is an in-process server of the KV protocol, for tests of the
// workload that need no guest.
type memKV struct {
	l     net.Listener
	mu    sync.Mutex
	m     map[string]string
	conns map[net.Conn]bool
}

func startMemKV(t *testing.T, m map[string]string) *memKV {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &memKV{l: l, m: m, conns: map[net.Conn]bool{}}
	go s.serve()
	t.Cleanup(s.Close)
	return s
}

func (s *memKV) Addr() string { return s.l.Addr().String() }

func (s *memKV) serve() {
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		go func() {
			defer c.Close()
			r := bufio.NewScanner(c)
			for r.Scan() {
				cmd, rest, _ := strings.Cut(r.Text(), " ")
				var reply string
				s.mu.Lock()
				switch cmd {
				case "SET":
					k, v, _ := strings.Cut(rest, " ")
					s.m[k] = v
					reply = "OK"
				case "GET":
					if v, ok := s.m[rest]; ok {
						reply = "VALUE " + v
					} else {
						reply = "NOTFOUND"
					}
				case "DEL":
					delete(s.m, rest)
					reply = "OK"
				default:
					reply = "ERR unknown command"
				}
				s.mu.Unlock()
				if _, err := c.Write([]byte(reply + "\n")); err != nil {
					return
				}
			}
		}()
	}
}

// Close stops listening and resets every connection: a crash.
func (s *memKV) Close() {
	s.l.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

func closedAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	return l.Addr().String()
}

// TestWorkloadInProcess: a correct server gives a linearizable history,
// also read back; clients skip an address that refuses connections.
func TestWorkloadInProcess(t *testing.T) {
	s := startMemKV(t, map[string]string{})
	w := &Workload{Addrs: []string{closedAddr(t), s.Addr()}, Clients: 8, Keys: 4, Ops: 4000,
		DelFraction: 0.1, Seed: 1, Logf: t.Logf}
	h := w.Run(context.Background())
	c := h.Counts()
	if c.Ops != 4000 || c.OK != 4000 || c.Dels == 0 || c.AckedWrites == 0 {
		t.Fatalf("%v", c)
	}
	if h.DialErrors < 8 || h.Dials != 8 {
		t.Fatalf("%d dials, %d failed; want 8 and at least 8", h.Dials, h.DialErrors)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
	if err := w.ReadBack(context.Background(), h); err != nil {
		t.Fatal(err)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
	// A check cut short by its timeout proves nothing and says so.
	if r := h.Check(time.Nanosecond, ""); r.Linearizable || !r.TimedOut || !strings.Contains(r.String(), "TIMED OUT") {
		t.Fatalf("1 ns check: %v", r)
	}
	read, done := w.Reader(context.Background())
	defer done()
	if err := VerifyAcknowledged(h, read); err != nil {
		t.Fatal(err)
	}
}

// TestWorkloadStaleBackup: the clients fail over from a server to a
// "backup" that never got its writes; the checker must see it.
func TestWorkloadStaleBackup(t *testing.T) {
	primary := startMemKV(t, map[string]string{})
	backup := startMemKV(t, map[string]string{})
	// Mostly reads, so that on nearly every run (all but about 0.2^8) some
	// key is read on the backup before it is written there again.
	w := &Workload{Addrs: []string{primary.Addr(), backup.Addr()}, Clients: 8, Keys: 8, ReadFraction: 0.8,
		Duration: 600 * time.Millisecond, Seed: 2, Logf: t.Logf}
	time.AfterFunc(300*time.Millisecond, primary.Close)
	h := w.Run(context.Background())
	c := h.Counts()
	t.Logf("%v", c)
	if h.Dials < 16 {
		t.Fatalf("%d connections: the clients did not fail over", h.Dials)
	}
	r := h.Check(time.Minute, t.TempDir())
	t.Logf("%v", r)
	if r.Linearizable || r.TimedOut || len(r.Illegal) == 0 || r.Visualization == "" {
		t.Fatal("a failover to a stale backup went unnoticed")
	}
	// Writes after the failover overwrite some keys; the ones acknowledged
	// by the primary and never rewritten are lost in the backup's state.
	read, done := w.Reader(context.Background())
	defer done()
	t.Logf("end state: %v", VerifyAcknowledged(h, read))
}

// TestWorkloadUnknownOutcomes: requests the server never answers are
// recorded as unknown (return time Infinity) and do not fail the check.
func TestWorkloadUnknownOutcomes(t *testing.T) {
	// A server that swallows every request whose value ends in 7 and
	// stops answering on that connection.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var mu sync.Mutex
	m := map[string]string{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewScanner(c)
				for r.Scan() {
					f := strings.Fields(r.Text())
					mu.Lock()
					reply := "OK"
					switch f[0] {
					case "SET":
						m[f[1]] = f[2]
					case "GET":
						if v, ok := m[f[1]]; ok {
							reply = "VALUE " + v
						} else {
							reply = "NOTFOUND"
						}
					}
					mu.Unlock()
					if f[0] == "SET" && strings.HasSuffix(f[2], "7") {
						time.Sleep(300 * time.Millisecond) // applied, never answered
						return
					}
					c.Write([]byte(reply + "\n"))
				}
			}()
		}
	}()
	w := &Workload{Addrs: []string{l.Addr().String()}, Clients: 4, Keys: 3, Ops: 400,
		RequestTimeout: 100 * time.Millisecond, Seed: 3}
	h := w.Run(context.Background())
	c := h.Counts()
	t.Logf("%v", c)
	if c.Unknown == 0 {
		t.Fatal("no unknown outcomes")
	}
	for _, op := range h.Ops() {
		if op.Outcome == Unknown && op.Return != Infinity {
			t.Fatalf("unknown op with a return time: %v", op)
		}
	}
	r := h.RequireLinearizable(t, 0, t.TempDir())
	if r.Unknown != c.Unknown {
		t.Fatalf("%d unknown writes checked, %d recorded", r.Unknown, c.Unknown)
	}
}
