package kvcheck

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/internal/netns"
)

var ftvmBin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if ftvmBin.dir != "" {
		os.RemoveAll(ftvmBin.dir)
	}
	os.Exit(code)
}

// ftvm builds ./cmd/ftvm once per test binary (the Go build cache makes
// that cheap), so the test runs the source under test; $FTVM_BINARY names
// a prebuilt one instead.
func ftvm(t *testing.T) string {
	t.Helper()
	ftvmBin.once.Do(func() {
		if p := os.Getenv("FTVM_BINARY"); p != "" {
			ftvmBin.path = p
			return
		}
		root, err := guest.Root()
		if err != nil {
			ftvmBin.err = err
			return
		}
		if ftvmBin.dir, err = os.MkdirTemp("", "kvcheck-ftvm-"); err != nil {
			ftvmBin.err = err
			return
		}
		out := filepath.Join(ftvmBin.dir, "ftvm")
		cmd := exec.Command("go", "build", "-o", out, "./cmd/ftvm")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			ftvmBin.err = fmt.Errorf("go build ./cmd/ftvm: %v\n%s", err, b)
			return
		}
		ftvmBin.path = out
	})
	if ftvmBin.err != nil {
		t.Fatal(ftvmBin.err)
	}
	return ftvmBin.path
}

// kvServer is the kvserver guest run by ftvm on one address, restartable.
type kvServer struct {
	t      *testing.T
	addr   string
	wasm   string
	cmd    *exec.Cmd
	done   chan struct{}
	out    *bytes.Buffer
	starts int
	// command makes the ftvm command (exec.Command, or a netns host's);
	// dial reaches addr (net.Dialer, or from a netns host).
	command func(name string, args ...string) *exec.Cmd
	dial    DialFunc
}

// newKVServer starts the server on a free loopback port.
func newKVServer(t *testing.T) *kvServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var d net.Dialer
	return newKVServerWith(t, addr, exec.Command, d.DialContext)
}

func newKVServerWith(t *testing.T, addr string, command func(string, ...string) *exec.Cmd, dial DialFunc) *kvServer {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the kvserver guest")
	}
	s := &kvServer{t: t, addr: addr, wasm: guest.MustGo(t, "testdata/guests/kvserver"), command: command, dial: dial}
	ftvm(t)
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("ftvm output (last start):\n%s", s.out)
		}
	})
	s.start()
	return s
}

// start runs the server and waits until it answers.
func (s *kvServer) start() {
	s.t.Helper()
	s.starts++
	s.out = &bytes.Buffer{}
	s.cmd = s.command(ftvm(s.t), "run", "--instrument=false", "--listen", "3="+s.addr, s.wasm)
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	t0 := time.Now()
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	done := make(chan struct{})
	s.done = done
	go func() { s.cmd.Wait(); close(done) }()
	for deadline := time.Now().Add(time.Minute); ; {
		select {
		case <-done:
			s.t.Fatalf("ftvm exited: %v\n%s", s.cmd.ProcessState, s.out)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := s.dial(ctx, "tcp", s.addr)
		cancel()
		if err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(c, "COUNT\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil && strings.HasPrefix(line, "COUNT ") {
				break
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("kvserver not answering on %s", s.addr)
		}
		time.Sleep(5 * time.Millisecond)
	}
	s.t.Logf("kvserver start %d (pid %d) answers on %s after %v", s.starts, s.cmd.Process.Pid, s.addr,
		time.Since(t0).Round(time.Millisecond))
}

// kill kills the server with SIGKILL, as a crash would.
func (s *kvServer) kill() {
	select {
	case <-s.done:
	default:
		s.cmd.Process.Kill()
		<-s.done
	}
}

// TestRealServerLinearizable: 8 clients for 2 s against the KV guest under
// ftvm give a linearizable history, final reads included, and lose no
// acknowledged write.
func TestRealServerLinearizable(t *testing.T) {
	s := newKVServer(t)
	w := &Workload{Addrs: []string{s.addr}, Clients: 8, Keys: 8, Duration: 2 * time.Second, Seed: 42, Logf: t.Logf}
	h := w.Run(context.Background())
	c := h.Counts()
	if c.OK < 1000 || c.Unknown != 0 || c.Failed != 0 {
		t.Fatalf("%v", c)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
	if err := w.ReadBack(context.Background(), h); err != nil {
		t.Fatal(err)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
	read, done := w.Reader(context.Background())
	defer done()
	if err := VerifyAcknowledged(h, read); err != nil {
		t.Fatal(err)
	}
}

// TestRealServerCrashDetected: the KV guest keeps its data in memory only,
// so killing it with SIGKILL mid-run and starting it again loses every
// acknowledged write. The checker must say so: the history is not
// linearizable, and after another crash the end state has lost writes.
func TestRealServerCrashDetected(t *testing.T) {
	s := newKVServer(t)
	// Mostly reads, so that on nearly every run (all but about 0.2^8) some
	// key is read after the restart before it is written again.
	w := &Workload{Addrs: []string{s.addr}, Clients: 8, Keys: 8, ReadFraction: 0.8, RequestTimeout: time.Second,
		Seed: 7, Logf: t.Logf}
	var h *History
	ran := make(chan struct{})
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go func() { h = w.Run(ctx); close(ran) }()
	// About 2 s in all, as timed on an idle machine; the restart's time
	// varies with the machine's load, so the run goes on for a fixed
	// time after it.
	time.Sleep(time.Second)
	s.kill()
	t.Log("kvserver killed with SIGKILL")
	s.start()
	time.Sleep(800 * time.Millisecond)
	stop()
	<-ran
	c := h.Counts()
	if c.OK < 1000 || h.Dials < 2*w.Clients {
		t.Fatalf("%v; %d connections", c, h.Dials)
	}
	r := h.Check(time.Minute, t.TempDir())
	t.Logf("%v", r)
	if r.Linearizable || r.TimedOut || len(r.Illegal) == 0 {
		t.Fatal("the checker did not notice the writes lost in the crash")
	}
	fi, err := os.Stat(r.Visualization)
	if err != nil || fi.Size() == 0 {
		t.Fatalf("visualization %q: %v", r.Visualization, err)
	}
	t.Logf("visualization: %d KiB", fi.Size()>>10)
	for _, k := range r.Illegal {
		// No DELs in this workload: what cannot be placed is a read that
		// missed an acknowledged value.
		if k.Stuck.Kind != Get || k.Stuck.Call < 900*time.Millisecond {
			t.Errorf("key %s: unexpected culprit %v", k.Key, k.Stuck)
		}
	}

	// The end state after a second crash: every acknowledged write is gone.
	s.kill()
	s.start()
	read, done := w.Reader(context.Background())
	defer done()
	err = VerifyAcknowledged(h, read)
	t.Logf("after a second crash: %v", err)
	lw, ok := err.(*LostWritesError)
	if !ok || len(lw.Violations) != w.Keys {
		t.Fatalf("VerifyAcknowledged: %v, want all %d keys lost", err, w.Keys)
	}
}

// TestRealServerInNetns: the server runs in one network namespace, the
// clients dial from another; a partition between them for a while makes
// requests time out (unknown outcomes), which the history must absorb:
// the server kept every write, so it stays linearizable.
func TestRealServerInNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the kvserver guest")
	}
	if err := netns.Available(); err != nil {
		t.Skip(err)
	}
	n := netns.New(t, "kvcheck", "server", "client")
	srv, cli := n.Host("server"), n.Host("client")
	ctx := context.Background()
	s := newKVServerWith(t, srv.Addr(7000), func(name string, args ...string) *exec.Cmd {
		return srv.Command(ctx, name, args...)
	}, cli.DialContext)
	w := &Workload{Addrs: []string{s.addr}, Dial: cli.DialContext, Clients: 8, Keys: 8,
		Duration: 2 * time.Second, RequestTimeout: 200 * time.Millisecond, Seed: 9, Logf: t.Logf}
	time.AfterFunc(700*time.Millisecond, func() {
		n.Partition("server", "client")
		time.Sleep(500 * time.Millisecond)
		n.Heal("server", "client")
	})
	h := w.Run(ctx)
	c := h.Counts()
	if c.Unknown < w.Clients || c.OK < 1000 {
		t.Fatalf("%v: want some unknown outcomes from the partition", c)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
	if err := w.ReadBack(ctx, h); err != nil {
		t.Fatal(err)
	}
	h.RequireLinearizable(t, 0, t.TempDir())
}
