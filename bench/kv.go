package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
)

// kvSettings are the load parameters of the KV group.
type kvSettings struct {
	rounds     int
	conns      int
	depth      int
	loadFor    time.Duration
	maxLoad    int64 // bound on requests of one throughput run
	latencyFor time.Duration
	maxLatency int // bound on requests of one latency run
	idleFor    time.Duration
	keys       int
}

// kvServer is one way of serving the KV protocol.
type kvServer struct {
	key, label string
	// command shows how it is started, for the report.
	command string
	start   func(ctx context.Context, addr string) (*child, error)
}

// child is a server process; done is closed once it has exited (and been
// waited for).
type child struct {
	cmd  *exec.Cmd
	log  string // its stdout and stderr
	done chan struct{}
}

func startCmd(cmd *exec.Cmd, log string) (*child, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, log: log, done: make(chan struct{})}
	go func() { cmd.Wait(); close(c.done) }()
	return c, nil
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop ends the server: SIGTERM, then SIGKILL after 5 s.
func (c *child) stop() {
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-c.done
	}
}

// kvRound is what one round measured of one server.
type kvRound struct {
	idleCPU    float64 // percent of one CPU
	rps        float64
	loadCPU    float64 // percent of one CPU during the throughput run
	cpuPerReq  float64 // server CPU seconds per request
	p50, p99   float64 // seconds
	mean       float64
	latencyN   int
	loadErrors int64
}

func runKV(ctx context.Context, e *env) (string, error) {
	s := kvSettings{rounds: min(e.runs, 3), conns: 32, depth: 16, loadFor: 3 * time.Second, maxLoad: 20_000_000,
		latencyFor: 3 * time.Second, maxLatency: 30000, idleFor: 3 * time.Second, keys: 1000}
	if e.quick {
		s.loadFor, s.latencyFor, s.maxLatency, s.idleFor = time.Second, time.Second, 5000, time.Second
	}
	if err := e.buildBinaries(); err != nil {
		return "", err
	}
	wasmPath, err := guest.Go("testdata/guests/kvserver")
	if err != nil {
		return "", err
	}
	kvWasm := filepath.Join(e.work, "kvserver.wasm")
	if err := copyFile(wasmPath, kvWasm); err != nil {
		return "", err
	}
	nativeBin := filepath.Join(e.work, "kvserver-native")
	nativeErr := goBuild(e, nativeBin, "./testdata/guests/kvserver", []string{"GOOS=", "GOARCH=", "CGO_ENABLED=0"})

	ftvmCache := filepath.Join(e.cache, "ftvm-compiled")
	wzCache := filepath.Join(e.cache, "wazero-compiled")
	servers := []kvServer{
		{key: "ftvm", label: "ftvm",
			command: "ftvm run --listen 127.0.0.1:PORT kvserver.wasm",
			start: func(ctx context.Context, addr string) (*child, error) {
				return startChild(ctx, e, "ftvm", e.ftvmBin, "run", "--cache-dir", ftvmCache, "--listen", addr, kvWasm)
			}},
		{key: "ftvm-noinst", label: "ftvm --instrument=false",
			command: "ftvm run --instrument=false --listen 127.0.0.1:PORT kvserver.wasm",
			start: func(ctx context.Context, addr string) (*child, error) {
				return startChild(ctx, e, "ftvm-noinst", e.ftvmBin, "run", "--instrument=false", "--cache-dir", ftvmCache, "--listen", addr, kvWasm)
			}},
		{key: "wazero", label: "wazero WASI",
			command: "wazerowasi -listen 127.0.0.1:PORT kvserver.wasm",
			start: func(ctx context.Context, addr string) (*child, error) {
				return startChild(ctx, e, "wazero", e.wzBin, "-cache", wzCache, "-listen", addr, kvWasm)
			}},
	}
	if nativeErr == nil {
		servers = append(servers, kvServer{key: "native", label: "native Go (floor)",
			command: "kvserver (go build, listener passed as fd 3)",
			start: func(ctx context.Context, addr string) (*child, error) {
				return startNativeKV(ctx, e, nativeBin, addr)
			}})
	} else {
		e.logf("kv: native kvserver not built: %v", nativeErr)
	}

	results := map[string][]kvRound{}
	for r := 0; r < s.rounds; r++ {
		order := servers
		if r%2 == 1 { // alternate the order so drift hits all alike
			order = make([]kvServer, len(servers))
			for i := range servers {
				order[i] = servers[len(servers)-1-i]
			}
		}
		for _, srv := range order {
			e.logf("kv: round %d/%d: %s", r+1, s.rounds, srv.label)
			res, err := measureKVServer(ctx, e, srv, s)
			if err != nil {
				return "", fmt.Errorf("%s: %w", srv.label, err)
			}
			results[srv.key] = append(results[srv.key], res)
		}
		// The floor of the network path, every round: a loopback echo of
		// request lines in this process (no KV logic, no separate process).
		e.logf("kv: round %d/%d: loopback echo floor", r+1, s.rounds)
		echo, err := measureEcho(ctx, s)
		if err != nil {
			return "", fmt.Errorf("loopback echo: %w", err)
		}
		results["echo"] = append(results["echo"], echo)
	}

	pick := func(key string, f func(kvRound) float64) sample {
		var out sample
		for _, r := range results[key] {
			out = append(out, f(r))
		}
		return out
	}
	var b strings.Builder
	b.WriteString("Command: `go run ./bench -only kv` (part of `make bench`). ")
	b.WriteString("Guest: testdata/guests/kvserver (Go, GOOS=wasip1), listener preopened at guest fd 3 on 127.0.0.1. ")
	b.WriteString("Each server runs as its own child process, one at a time (an idle wazero server would otherwise ")
	b.WriteString("steal a core from the others): ")
	for i, srv := range servers {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s = `%s`", srv.label, srv.command)
	}
	fmt.Fprintf(&b, ". Per round and server: start, wait until it answers, idle %s, load %d keys, ", s.idleFor, s.keys)
	fmt.Fprintf(&b, "throughput for %s, latency for %s (at most %d requests), stop. ", s.loadFor, s.latencyFor, s.maxLatency)
	fmt.Fprintf(&b, "%d round(s), server order alternating; figures are medians with min–max. ", s.rounds)
	b.WriteString("Requests: 90% `GET kN` / 10% `SET kN <16 bytes>` over the loaded keys. ")
	b.WriteString("The load generator is this process (Go), on the same 2 cores as the server. ")
	b.WriteString("CPU figures are the server process's utime+stime from /proc/PID/stat (10 ms ticks).\n\n")

	fmt.Fprintf(&b, "### Throughput: %d outstanding requests (%d connections × pipeline depth %d)\n\n", s.conns*s.depth, s.conns, s.depth)
	b.WriteString("| server | requests/s | ÷ ftvm | server CPU % during load | server CPU µs/request |\n|---|---:|---:|---:|---:|\n")
	ftvmRPS := pick("ftvm", func(r kvRound) float64 { return r.rps }).median()
	for _, srv := range servers {
		rps := pick(srv.key, func(r kvRound) float64 { return r.rps })
		cpu := pick(srv.key, func(r kvRound) float64 { return r.loadCPU })
		per := pick(srv.key, func(r kvRound) float64 { return r.cpuPerReq * 1e6 })
		fmt.Fprintf(&b, "| %s | %s | %s | %.0f | %.1f |\n", srv.label, fmtNumRange(rps), fmtRatio(rps.median(), ftvmRPS), cpu.median(), per.median())
	}
	echoRPS := pick("echo", func(r kvRound) float64 { return r.rps })
	fmt.Fprintf(&b, "| loopback echo in Go, same load (floor, no KV, in-process) | %s | %s | — | — |\n",
		fmtNumRange(echoRPS), fmtRatio(echoRPS.median(), ftvmRPS))

	b.WriteString("\n### Latency: 1 sequential client (request, wait for the reply, repeat)\n\n")
	b.WriteString("| server | p50 | p99 | mean | requests | p50 ÷ ftvm |\n|---|---:|---:|---:|---:|---:|\n")
	ftvmP50 := pick("ftvm", func(r kvRound) float64 { return r.p50 }).median()
	for _, srv := range servers {
		p50 := pick(srv.key, func(r kvRound) float64 { return r.p50 })
		p99 := pick(srv.key, func(r kvRound) float64 { return r.p99 })
		mean := pick(srv.key, func(r kvRound) float64 { return r.mean })
		n := pick(srv.key, func(r kvRound) float64 { return float64(r.latencyN) })
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", srv.label, fmtSecRange(p50), fmtSecRange(p99),
			fmtSeconds(mean.median()), fmtNum(n.median()), fmtRatio(p50.median(), ftvmP50))
	}
	{
		p50 := pick("echo", func(r kvRound) float64 { return r.p50 })
		p99 := pick("echo", func(r kvRound) float64 { return r.p99 })
		mean := pick("echo", func(r kvRound) float64 { return r.mean })
		n := pick("echo", func(r kvRound) float64 { return float64(r.latencyN) })
		fmt.Fprintf(&b, "| loopback echo in Go (floor: raw TCP round trip, in-process) | %s | %s | %s | %s | %s |\n",
			fmtSecRange(p50), fmtSecRange(p99), fmtSeconds(mean.median()), fmtNum(n.median()), fmtRatio(p50.median(), ftvmP50))
	}

	fmt.Fprintf(&b, "\n### Idle: server CPU over %s with no traffic\n\n", s.idleFor)
	b.WriteString("| server | CPU % of one core |\n|---|---:|\n")
	for _, srv := range servers {
		idle := pick(srv.key, func(r kvRound) float64 { return r.idleCPU })
		fmt.Fprintf(&b, "| %s | %s |\n", srv.label, fmtPctRange(idle))
	}
	med := func(key string, f func(kvRound) float64) float64 { return pick(key, f).median() }
	rps := func(r kvRound) float64 { return r.rps }
	p50 := func(r kvRound) float64 { return r.p50 }
	p99 := func(r kvRound) float64 { return r.p99 }
	idle := func(r kvRound) float64 { return r.idleCPU }
	perReq := func(r kvRound) float64 { return r.cpuPerReq * 1e6 }
	line := fmt.Sprintf("KV server, %d outstanding requests: ftvm %s req/s vs wazero's WASI %s (ftvm %s)",
		s.conns*s.depth, fmtNum(med("ftvm", rps)), fmtNum(med("wazero", rps)), fmtRatio(med("ftvm", rps), med("wazero", rps)))
	if len(results["native"]) > 0 {
		line += fmt.Sprintf(" and native Go %s (ftvm %s)", fmtNum(med("native", rps)), fmtRatio(med("ftvm", rps), med("native", rps)))
	}
	line += fmt.Sprintf("; server CPU per request %.1f µs on ftvm, %.1f µs on wazero's WASI", med("ftvm", perReq), med("wazero", perReq))
	if len(results["native"]) > 0 {
		line += fmt.Sprintf(", %.1f µs native", med("native", perReq))
	}
	line += fmt.Sprintf("; without Asyncify (`--instrument=false`) ftvm serves %s req/s at %.1f µs per request",
		fmtNum(med("ftvm-noinst", rps)), med("ftvm-noinst", perReq))
	e.summarize("%s.", line)
	e.summarize("KV server, 1 sequential client: p50/p99 %s/%s on ftvm (%s/%s uninstrumented), %s/%s on wazero's WASI; "+
		"raw loopback round trip in Go %s/%s.",
		fmtSeconds(med("ftvm", p50)), fmtSeconds(med("ftvm", p99)), fmtSeconds(med("ftvm-noinst", p50)), fmtSeconds(med("ftvm-noinst", p99)),
		fmtSeconds(med("wazero", p50)), fmtSeconds(med("wazero", p99)),
		fmtSeconds(med("echo", p50)), fmtSeconds(med("echo", p99)))
	why := ""
	if med("wazero", idle) > 20 {
		why = " (wazero's poll_oneoff reports a read subscription on any non-blocking descriptor but stdin as " +
			"ready at once, so the guest's netpoller spins on EAGAIN; ftvm sleeps until a descriptor is ready, in an epoll set that Go's own poller watches)"
	}
	e.summarize("KV server idle (%s, no traffic): ftvm %.1f%% of a core (%.1f%% uninstrumented), wazero's WASI %.1f%%%s%s.",
		s.idleFor, med("ftvm", idle), med("ftvm-noinst", idle), med("wazero", idle), nativeIdle(results, med, idle), why)

	var errs int64
	for _, rs := range results {
		for _, r := range rs {
			errs += r.loadErrors
		}
	}
	if errs > 0 {
		fmt.Fprintf(&b, "\n**%d replies were malformed or errors** (see the harness log).\n", errs)
	}
	if nativeErr != nil {
		fmt.Fprintf(&b, "\nNative kvserver not measured: %s\n", mdEscape(nativeErr.Error()))
	}
	return b.String(), nil
}

func nativeIdle(results map[string][]kvRound, med func(string, func(kvRound) float64) float64, idle func(kvRound) float64) string {
	if len(results["native"]) == 0 {
		return ""
	}
	return fmt.Sprintf(", native Go %.1f%%", med("native", idle))
}

func meanOf(s sample) float64 {
	if len(s) == 0 {
		return 0
	}
	t := 0.0
	for _, v := range s {
		t += v
	}
	return t / float64(len(s))
}

func fmtNumRange(s sample) string {
	if len(s) <= 1 {
		return fmtNum(s.median())
	}
	return fmt.Sprintf("%s (%s–%s)", fmtNum(s.median()), fmtNum(s.min()), fmtNum(s.max()))
}

func fmtSecRange(s sample) string {
	if len(s) <= 1 {
		return fmtSeconds(s.median())
	}
	return fmt.Sprintf("%s (%s–%s)", fmtSeconds(s.median()), fmtSeconds(s.min()), fmtSeconds(s.max()))
}

func fmtPctRange(s sample) string {
	if len(s) <= 1 {
		return fmt.Sprintf("%.1f", s.median())
	}
	return fmt.Sprintf("%.1f (%.1f–%.1f)", s.median(), s.min(), s.max())
}

// measureKVServer starts the server, measures it and stops it.
func measureKVServer(ctx context.Context, e *env, srv kvServer, s kvSettings) (res kvRound, err error) {
	addr, err := freeAddr()
	if err != nil {
		return res, err
	}
	ch, err := srv.start(ctx, addr)
	if err != nil {
		return res, err
	}
	defer ch.stop()
	pid := ch.cmd.Process.Pid
	if err := waitReady(ctx, addr, ch, 120*time.Second); err != nil {
		log, _ := os.ReadFile(ch.log)
		return res, fmt.Errorf("%w; its output: %s", err, tail(string(log)))
	}

	// Idle.
	time.Sleep(500 * time.Millisecond)
	c0, err := procCPU(pid)
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	time.Sleep(s.idleFor)
	c1, err := procCPU(pid)
	if err != nil {
		return res, err
	}
	res.idleCPU = 100 * (c1 - c0).Seconds() / time.Since(t0).Seconds()

	if err := populate(addr, s.keys); err != nil {
		return res, fmt.Errorf("loading keys: %w", err)
	}

	// Throughput.
	c0, _ = procCPU(pid)
	lr, err := pipelinedLoad(addr, s)
	if err != nil {
		return res, fmt.Errorf("throughput: %w", err)
	}
	c1, _ = procCPU(pid)
	res.rps = float64(lr.requests) / lr.elapsed.Seconds()
	res.loadCPU = 100 * (c1 - c0).Seconds() / lr.elapsed.Seconds()
	res.cpuPerReq = (c1 - c0).Seconds() / float64(lr.requests)
	res.loadErrors = lr.errors
	if lr.errors > 0 {
		e.logf("kv: %s: %d bad replies, first: %q", srv.label, lr.errors, lr.firstBad)
	}

	// Latency.
	lat, err := sequentialLatency(addr, s, kvRequests(s.keys, 1))
	if err != nil {
		return res, fmt.Errorf("latency: %w", err)
	}
	res.p50, res.p99, res.mean, res.latencyN = lat.quantile(0.5), lat.quantile(0.99), meanOf(lat), len(lat)
	if ch.exited() {
		return res, fmt.Errorf("server exited during the run")
	}
	return res, nil
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

// freeAddr finds a free loopback port (the usual bind-and-close race with
// other programs is acceptable here). It never hands out a port twice in
// one run: two calls in a row (a KV server's address, then its backup's)
// were once given the same port by the kernel, and the server, started
// second, could not bind it.
func freeAddr() (string, error) {
	handedMu.Lock()
	defer handedMu.Unlock()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		addr := ln.Addr().String()
		ln.Close()
		if !handed[addr] {
			handed[addr] = true
			return addr, nil
		}
	}
	return "", errors.New("no loopback port not handed out before")
}

var (
	handedMu sync.Mutex
	handed   = map[string]bool{} // addresses freeAddr returned
)

// startChild starts a server process with its output in a log file.
func startChild(ctx context.Context, e *env, tag, bin string, args ...string) (*child, error) {
	logf, err := os.Create(filepath.Join(e.work, tag+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	return startCmd(cmd, logf.Name())
}

// startNativeKV starts the natively built kvserver with a listener passed as
// its fd 3.
func startNativeKV(ctx context.Context, e *env, bin, addr string) (*child, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	f, err := ln.(*net.TCPListener).File()
	ln.Close()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	logf, err := os.Create(filepath.Join(e.work, "native.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{f}
	return startCmd(cmd, logf.Name())
}

// waitReady waits until the server answers a request.
func waitReady(ctx context.Context, addr string, ch *child, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if ch.exited() {
			return fmt.Errorf("server exited before answering (%v)", ch.cmd.ProcessState)
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Write([]byte("GET ready\n"))
			if err == nil {
				var line string
				line, err = bufio.NewReader(c).ReadString('\n')
				if err == nil && !strings.HasPrefix(line, "NOTFOUND") && !strings.HasPrefix(line, "VALUE") {
					err = fmt.Errorf("unexpected reply %q", line)
				}
			}
			c.Close()
			if err == nil {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("server at %s not answering after %s", addr, limit)
}

// procCPU is a process's utime+stime.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("bad /proc stat fields")
	}
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clkTck, nil
}

// kvRequests is a pool of request lines: 90% GET, 10% SET, over keys.
func kvRequests(keys int, seed uint64) [][]byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	pool := make([][]byte, 4096)
	for i := range pool {
		k := rng.IntN(keys)
		if rng.IntN(10) == 0 {
			pool[i] = fmt.Appendf(nil, "SET k%d v%015d\n", k, rng.IntN(1e15))
		} else {
			pool[i] = fmt.Appendf(nil, "GET k%d\n", k)
		}
	}
	return pool
}

// populate SETs every key, pipelined.
func populate(addr string, keys int) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	var buf []byte
	for k := 0; k < keys; k++ {
		buf = fmt.Appendf(buf, "SET k%d v%015d\n", k, k)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Write(buf); errc <- err }()
	r := bufio.NewReader(c)
	for k := 0; k < keys; k++ {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if line != "OK\n" {
			return fmt.Errorf("SET: reply %q", line)
		}
	}
	return <-errc
}

type loadResult struct {
	requests int64
	errors   int64
	firstBad string
	elapsed  time.Duration
}

// okReply accepts the KV protocol's replies (and, for the echo floor, the
// echoed requests).
func okReply(line []byte) bool {
	return bytes.HasPrefix(line, []byte("OK")) || bytes.HasPrefix(line, []byte("VALUE ")) ||
		bytes.HasPrefix(line, []byte("NOTFOUND")) || bytes.HasPrefix(line, []byte("GET ")) ||
		bytes.HasPrefix(line, []byte("SET "))
}

// pipelinedLoad keeps s.depth requests outstanding on each of s.conns
// connections for s.loadFor (or s.maxLoad requests in all), refilling the
// window with one write per batch of replies read. Every connection drains
// its window before closing; elapsed runs until the last one is done.
func pipelinedLoad(addr string, s kvSettings) (loadResult, error) {
	var (
		mu  sync.Mutex
		res loadResult
		wg  sync.WaitGroup
	)
	conns := make([]net.Conn, s.conns)
	for i := range conns {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return res, err
		}
		conns[i] = c
	}
	perConn := s.maxLoad / int64(s.conns)
	start := time.Now()
	deadline := start.Add(s.loadFor)
	errc := make(chan error, s.conns)
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(deadline.Add(30 * time.Second))
			pool := kvRequests(s.keys, uint64(i+1))
			r := bufio.NewReaderSize(c, 64<<10)
			var (
				wbuf            []byte
				sent, done, bad int64
				firstBad        string
				next            int
			)
			stop := false
			for {
				if !stop {
					for sent-done < int64(s.depth) && sent < perConn {
						wbuf = append(wbuf, pool[next]...)
						next = (next + 1) % len(pool)
						sent++
					}
					if len(wbuf) > 0 {
						if _, err := c.Write(wbuf); err != nil {
							errc <- err
							return
						}
						wbuf = wbuf[:0]
					}
				}
				if done == sent {
					break
				}
				// One reply (blocking), then every complete one buffered.
				for {
					line, err := r.ReadSlice('\n')
					if err != nil {
						errc <- fmt.Errorf("reading reply %d: %w", done, err)
						return
					}
					if !okReply(line) {
						bad++
						if firstBad == "" {
							firstBad = string(line)
						}
					}
					done++
					if done == sent || bytes.IndexByte(peekBuffered(r), '\n') < 0 {
						break
					}
				}
				if !stop && (sent >= perConn || time.Now().After(deadline)) {
					stop = true
				}
			}
			mu.Lock()
			res.requests += done
			res.errors += bad
			if res.firstBad == "" {
				res.firstBad = firstBad
			}
			mu.Unlock()
		}(i, c)
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	select {
	case err := <-errc:
		return res, err
	default:
	}
	return res, nil
}

func peekBuffered(r *bufio.Reader) []byte {
	b, _ := r.Peek(r.Buffered())
	return b
}

// sequentialLatency sends one request at a time and times each round trip.
func sequentialLatency(addr string, s kvSettings, pool [][]byte) (sample, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	deadline := time.Now().Add(s.latencyFor)
	c.SetDeadline(deadline.Add(30 * time.Second))
	r := bufio.NewReader(c)
	lat := make(sample, 0, s.maxLatency)
	for i := 0; i < s.maxLatency && time.Now().Before(deadline); i++ {
		req := pool[i%len(pool)]
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			return nil, err
		}
		line, err := r.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		lat = append(lat, time.Since(t0).Seconds())
		if !okReply(line) {
			return nil, fmt.Errorf("reply %q", line)
		}
	}
	return lat, nil
}

// measureEcho runs the same load against an in-process loopback server
// that echoes each request line back: the network floor.
func measureEcho(ctx context.Context, s kvSettings) (kvRound, error) {
	var res kvRound
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				r := bufio.NewReaderSize(c, 16<<10)
				w := bufio.NewWriterSize(c, 16<<10)
				for {
					line, err := r.ReadSlice('\n')
					if err != nil {
						return
					}
					w.Write(line)
					if r.Buffered() == 0 && w.Flush() != nil {
						return
					}
				}
			}(c)
		}
	}()
	addr := ln.Addr().String()
	lr, err := pipelinedLoad(addr, s)
	if err != nil {
		return res, err
	}
	lat, err := sequentialLatency(addr, s, kvRequests(s.keys, 1))
	if err != nil {
		return res, err
	}
	res.rps = float64(lr.requests) / lr.elapsed.Seconds()
	res.p50, res.p99, res.mean, res.latencyN = lat.quantile(0.5), lat.quantile(0.99), meanOf(lat), len(lat)
	return res, nil
}
