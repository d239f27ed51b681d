// Package tests holds end-to-end tests: real guests run by the ftvm binary,
// driven over real sockets.
package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/wasi"
)

// ftvmBinary builds the ftvm CLI once per test binary.
// freeAddr picks a loopback port nobody listens on.
// freeAddr picks a free loopback port for a child process to bind. It is
// below the kernel's ephemeral range (32768 up, by default), where the
// source ports of the tests' own client connections come from: a port
// from that range could be taken by a connection before the child binds
// it ("address already in use", seen in the chaos test).
func freeAddr(t *testing.T) string {
	t.Helper()
	for range 100 {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000)))
		if err != nil {
			continue
		}
		defer l.Close()
		return l.Addr().String()
	}
	t.Fatal("no free port found below the ephemeral range")
	return ""
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startKV runs the kvserver guest under ftvm, listening on addr, and waits
// until it answers with an empty store.
func startKV(t *testing.T, addr string) *proc {
	t.Helper()
	wasm := guest.MustGo(t, "testdata/guests/kvserver")
	// Devices are under test here, not snapshots: run the module as it is.
	p := startProc(t, ftvmBinary(t), "run", "--instrument=false", "--listen", "3="+addr, wasm)
	waitKV(t, p, addr)
	if got := request(t, addr, "COUNT"); got != "COUNT 0" {
		t.Fatalf("first reply %q", got)
	}
	return p
}

// cpuTicks is the process's user+system CPU time in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line.
	rest := string(b[bytes.LastIndexByte(b, ')')+2:])
	f := strings.Fields(rest)
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ut + st
}

// clkTck is USER_HZ, which is 100 on every Linux architecture Go supports.
const clkTck = 100

// kvClient runs one client's script, four requests per key: SET, GET, then
// either DEL and GET (NOTFOUND) or SET and GET of a new value. With pipeline > 1 it writes that many
// requests before reading their replies.
func kvClient(addr string, id, keys, pipeline int) (ops int, err error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var reqs, want []string
	for k := 0; k < keys; k++ {
		key, val := fmt.Sprintf("c%d-k%d", id, k), fmt.Sprintf("v%d.%d", id, k)
		reqs = append(reqs, "SET "+key+" "+val, "GET "+key)
		want = append(want, "OK", "VALUE "+val)
		if k%2 == 0 {
			reqs = append(reqs, "DEL "+key, "GET "+key)
			want = append(want, "OK", "NOTFOUND")
		} else {
			reqs = append(reqs, "SET "+key+" "+val+"b", "GET "+key)
			want = append(want, "OK", "VALUE "+val+"b")
		}
	}
	r := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	for i := 0; i < len(reqs); i += pipeline {
		end := min(i+pipeline, len(reqs))
		for _, q := range reqs[i:end] {
			w.WriteString(q)
			w.WriteByte('\n')
		}
		if err := w.Flush(); err != nil {
			return ops, err
		}
		for j := i; j < end; j++ {
			line, err := r.ReadString('\n')
			if err != nil {
				return ops, fmt.Errorf("client %d, %q: %w", id, reqs[j], err)
			}
			if got := strings.TrimSuffix(line, "\n"); got != want[j] {
				return ops, fmt.Errorf("client %d, %q: got %q, want %q", id, reqs[j], got, want[j])
			}
			ops++
		}
	}
	return ops, nil
}

func request(t *testing.T, addr, req string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "%s\n", req)
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s: %v", req, err)
	}
	return strings.TrimSuffix(line, "\n")
}

// TestKVServer runs the Go KV server guest under ftvm: many concurrent
// clients, some pipelining, get correct answers; then, idle with open
// connections, the VM must sleep in the kernel instead of spinning; and it
// stops promptly on SIGTERM.
func TestKVServer(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a guest")
	}
	addr := freeAddr(t)
	p := startKV(t, addr)

	const clients, keys = 50, 50 // 200 requests per client
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	var mu sync.Mutex
	total := 0
	t0 := time.Now()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(id int) {
			defer wg.Done()
			pipeline := 1
			if id%2 == 0 {
				pipeline = 16
			}
			n, err := kvClient(addr, id, keys, pipeline)
			mu.Lock()
			total += n
			mu.Unlock()
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	el := time.Since(t0)
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d clients, %d requests in %v: %.0f req/s", clients, total, el.Round(time.Millisecond),
		float64(total)/el.Seconds())
	if want := clients * keys * 4; total != want {
		t.Fatalf("%d requests answered, want %d", total, want)
	}
	if got, want := request(t, addr, "COUNT"), fmt.Sprintf("COUNT %d", clients*keys/2); got != want {
		t.Fatalf("%q, want %q", got, want)
	}

	// Idle, with connections open: the guest's poll_oneoff must block.
	var idle []net.Conn
	for i := 0; i < 10; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	time.Sleep(300 * time.Millisecond) // let the accepts and the runtime settle
	pid := p.cmd.Process.Pid
	c0, w0 := cpuTicks(t, pid), time.Now()
	time.Sleep(2 * time.Second)
	c1, w1 := cpuTicks(t, pid), time.Now()
	cpu := float64(c1-c0) / clkTck / w1.Sub(w0).Seconds() * 100
	t.Logf("idle CPU over %v: %.2f%% of one core (%d ticks)", w1.Sub(w0).Round(time.Millisecond), cpu, c1-c0)
	if cpu >= 5 {
		t.Fatalf("idle VM uses %.1f%% CPU, want < 5%%", cpu)
	}
	// Still serving, on an idle connection too.
	if got := request(t, addr, "GET c1-k1"); got != "VALUE v1.1b" {
		t.Fatalf("after idle: %q", got)
	}
	fmt.Fprintf(idle[0], "GET c3-k3\n")
	idle[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if line, err := bufio.NewReader(idle[0]).ReadString('\n'); err != nil || line != "VALUE v3.3b\n" {
		t.Fatalf("idle connection: %q %v", line, err)
	}

	// SIGTERM stops a VM blocked in poll_oneoff promptly.
	t0 = time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("ftvm did not exit within 10s of SIGTERM")
	}
	t.Logf("stopped %v after SIGTERM, exit code %d", time.Since(t0).Round(time.Millisecond),
		p.cmd.ProcessState.ExitCode())
	if code := p.cmd.ProcessState.ExitCode(); code != 143 {
		t.Fatalf("exit code %d after SIGTERM, want 143", code)
	}
}

// TestWaitingGuestShowsWhatItWaitsFor: a guest blocked in poll_oneoff is
// reported by GET /vm with what it waits for (its listener, and a
// connection whose request has not been completed), none of it ready; once
// the request is complete it is answered and no longer waited for. This is
// how a hung guest's own wait is told from a wake-up the host lost.
func TestWaitingGuestShowsWhatItWaitsFor(t *testing.T) {
	wasm := guest.MustGo(t, "testdata/guests/kvserver")
	addr := freeAddr(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	p := startProc(t, ftvmBinary(t), "run", "--api-sock", sock, "--listen", "3="+addr, wasm)
	waitKV(t, p, addr)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "SET half") // no newline: the server waits for the rest
	ctx := context.Background()
	client := api.NewClient(sock)
	// The guest goes through a few waits (accepting, reading the first
	// half) before the one that lasts: look until a wait lists both the
	// listener and the connection, neither ready (a descriptor also reads
	// as ready for a moment at every ordinary wake-up).
	settled := func(w *wasi.PollWait) bool {
		if w == nil || len(w.Fds) != 2 || w.Fds[0].Fd == w.Fds[1].Fd || (w.Fds[0].Fd != 3 && w.Fds[1].Fd != 3) {
			return false
		}
		for _, f := range w.Fds {
			if f.Event != "read" || f.ReadyNow || f.HostFd < 0 {
				return false
			}
		}
		return true
	}
	var w *wasi.PollWait
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		info, err := client.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if w = info.Waiting; settled(w) {
			break
		}
	}
	if !settled(w) {
		t.Fatalf("GET /vm waiting = %+v, want reads of the listener (3) and the connection, neither ready", w)
	}
	fmt.Fprintf(c, " v\n")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "OK\n" {
		t.Fatalf("completed request: %q %v", line, err)
	}
}
