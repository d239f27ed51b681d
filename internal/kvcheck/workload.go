package kvcheck

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Workload is a set of concurrent clients doing random SETs and GETs (and
// DELs, if asked) on a few keys, one request at a time each, over their own
// connections. Values are unique ("cCLIENT-SEQ"), so every read can be
// attributed to the write it saw. The server must start without the
// workload's keys (or use a fresh KeyPrefix).
type Workload struct {
	// Addrs are the server's addresses, tried in order: a client whose
	// connection fails connects again, starting with the address that last
	// worked and moving on to the next when dialing fails.
	Addrs []string
	// Dial dials a connection (nil: net.Dialer); netns.Host.DialContext
	// runs the clients from a test host.
	Dial DialFunc
	// Clients is the number of concurrent clients (0: 8).
	Clients int
	// Keys is the number of keys, KeyPrefix+"0" ... (0: 8; prefix "" : "k").
	Keys      int
	KeyPrefix string
	// Duration bounds the run; Ops bounds the number of operations over
	// all clients. With both zero the run lasts until ctx ends. When the
	// run ends, by any of these, each client's request in flight is
	// allowed to finish (within RequestTimeout) and no new one starts.
	Duration time.Duration
	Ops      int
	// ReadFraction is the share of GETs (0: 0.5; negative: none).
	// DelFraction is the share of DELs (0: none).
	ReadFraction, DelFraction float64
	// RequestTimeout bounds each request and each connection attempt
	// (0: 2 s). A request that runs out of it has an unknown outcome.
	RequestTimeout time.Duration
	// Seed makes the choice of operations reproducible.
	Seed int64
	// Logf, if set, is told about reconnections and the final tally.
	Logf func(format string, args ...any)
}

func (w *Workload) clients() int { return cmp0(w.Clients, 8) }
func (w *Workload) keys() int    { return cmp0(w.Keys, 8) }

func cmp0(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

// Key is the workload's i-th key.
func (w *Workload) Key(i int) string {
	p := w.KeyPrefix
	if p == "" {
		p = "k"
	}
	return fmt.Sprintf("%s%d", p, i)
}

func (w *Workload) logf(format string, args ...any) {
	if w.Logf != nil {
		w.Logf(format, args...)
	}
}

func (w *Workload) newClient() *Client {
	return &Client{Addrs: w.Addrs, Dial: w.Dial, Timeout: w.RequestTimeout}
}

// Run runs the clients until Duration, Ops or ctx ends them, and returns
// the history. Ending ctx stops the run gracefully: requests in flight get
// their answer (or time out) and are recorded as usual.
func (w *Workload) Run(ctx context.Context) *History {
	h := NewHistory()
	runCtx, cancel := ctx, context.CancelFunc(func() {})
	if w.Duration > 0 {
		runCtx, cancel = context.WithDeadline(ctx, h.Start.Add(w.Duration))
	}
	defer cancel()
	var budget atomic.Int64
	budget.Store(int64(w.Ops))
	n := w.clients()
	var wg sync.WaitGroup
	var dials, dialErrs atomic.Int64
	for id := 0; id < n; id++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := w.newClient()
			defer c.Close()
			ops := w.runClient(context.WithoutCancel(ctx), runCtx, h, id, c, &budget)
			h.Add(ops...)
			dials.Add(int64(c.Dials))
			dialErrs.Add(int64(c.DialErrors))
		}()
	}
	wg.Wait()
	h.mu.Lock()
	h.Dials, h.DialErrors = int(dials.Load()), int(dialErrs.Load())
	h.mu.Unlock()
	w.logf("kvcheck: %d clients, %v: %v; %d connections, %d failed dials", n, h.Now().Round(time.Millisecond), h.Counts(), h.Dials, h.DialErrors)
	return h
}

func (w *Workload) runClient(ctx, runCtx context.Context, h *History, id int, c *Client, budget *atomic.Int64) []Op {
	rng := rand.New(rand.NewPCG(uint64(w.Seed), uint64(id)))
	reads := w.ReadFraction
	if reads == 0 {
		reads = 0.5
	}
	var ops []Op
	seq := 0
	lastAddr := ""
	for runCtx.Err() == nil {
		if w.Ops > 0 && budget.Add(-1) < 0 {
			break
		}
		// Connect under runCtx: a client waiting for a server that does
		// not come back stops with the run.
		if err := c.Connect(runCtx); err != nil {
			break
		}
		if a := c.Addr(); a != lastAddr {
			if lastAddr != "" {
				w.logf("kvcheck: client %d reconnected to %s at %v", id, a, h.Now().Round(time.Millisecond))
			}
			lastAddr = a
		}
		op := Op{Client: id, Key: w.Key(rng.IntN(w.keys()))}
		var err error
		switch x := rng.Float64(); {
		case x < reads:
			op.Kind = Get
			op.Call = h.Now()
			op.Value, op.Found, err = c.Get(ctx, op.Key)
		case x < reads+w.DelFraction:
			op.Kind = Del
			op.Call = h.Now()
			err = c.Del(ctx, op.Key)
		default:
			op.Kind = Set
			seq++
			op.Value = fmt.Sprintf("c%d-%d", id, seq)
			op.Call = h.Now()
			err = c.Set(ctx, op.Key, op.Value)
		}
		op.Return = h.Now()
		var se *ServerError
		var ns *NotSentError
		switch {
		case err == nil:
			op.Outcome = OK
		case errors.As(err, &ns):
			continue // never sent
		case errors.As(err, &se):
			op.Outcome, op.Err = Failed, se.Reply
		default:
			op.Outcome, op.Err, op.Return = Unknown, err.Error(), Infinity
		}
		ops = append(ops, op)
	}
	return ops
}

// ReadBack GETs every key of the workload once, through its addresses, and
// adds the reads to h (as client Clients), so that h.Check also covers the
// final state. It returns the first error; reads before it are recorded.
func (w *Workload) ReadBack(ctx context.Context, h *History) error {
	c := w.newClient()
	defer c.Close()
	id := w.clients()
	for i := 0; i < w.keys(); i++ {
		op := Op{Client: id, Kind: Get, Key: w.Key(i), Call: h.Now()}
		var err error
		op.Value, op.Found, err = c.Get(ctx, op.Key)
		op.Return = h.Now()
		if err != nil {
			return fmt.Errorf("read back %s: %w", op.Key, err)
		}
		h.Add(op)
	}
	return nil
}

// Reader returns a read function for VerifyAcknowledged that reads through
// the workload's addresses with one connection; close it with the returned
// func.
func (w *Workload) Reader(ctx context.Context) (read func(key string) (string, bool, error), done func()) {
	c := w.newClient()
	return func(key string) (string, bool, error) { return c.Get(ctx, key) }, func() { c.Close() }
}
