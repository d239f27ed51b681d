package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/remus"
)

// The remus group measures what Remus protection costs, always against the
// same guest run unprotected in the same run, interleaved: CPU-bound run
// time, KV throughput and latency under both epoch policies, the checkpoint
// pause against dirty pages, bytes replicated with and without compression,
// and failover time after kill -9 of the primary. Everything runs as `ftvm
// run --protect` / `ftvm backup` processes, as a user would run them, with
// the figures read from their API sockets (GET /status, GET /vm).

// remusSettings are the group's sizes.
type remusSettings struct {
	epochs   []time.Duration
	cpuScale int
	cpuRuns  int
	// cpuTargetRuns is how many pairs the rows the target is about (25
	// ms, both scales, and their A/A controls) get in all: extra rounds
	// of those rows alone follow the cpuRuns rounds of every row.
	cpuTargetRuns int
	// cpuLongTargetRuns is the same for the target's rows at the longer
	// scale (each run five times as long).
	cpuLongTargetRuns int
	kvRounds          int
	// kvTargetPairs is how many pairs (a start and its unprotected
	// partner) the row the target is about (output policy, 25 ms) gets in
	// all: extra pairs of it alone follow the kvRounds rounds. A median of
	// three pairs moved by a quarter between rows of the same setting.
	kvTargetPairs int
	kv            kvSettings
	kvWarm        time.Duration // the same load, unmeasured, before the throughput run
	minLatency    int           // sequential requests at least, however long the epoch
	dirty         []int
	dirtyMiB      int
	dirtyFor      time.Duration
	failTimeouts  []time.Duration
	failRuns      int
	timeout       time.Duration // detection timeout of the pairs in (a)-(e)
}

// remusEnv is what the group's measurements share.
type remusEnv struct {
	*env
	s     remusSettings
	cache string // compiled-code cache of every ftvm process here
	seq   int    // makes tags (logs, sockets, state directories) unique
	raw   bool   // `ftvm run` has --uncompressed
	comp  []compRow
}

// compRow is one line of (e): a workload with or without compression.
type compRow struct {
	workload string
	raw      bool
	bytes    float64 // per checkpoint
	cps      float64
	pages    float64 // dirty pages per checkpoint (median of samples)
	pause    float64 // mean, ns
	tput     string
}

func (r *remusEnv) tag(what string) string {
	r.seq++
	return fmt.Sprintf("remus-%s-%d", what, r.seq)
}

func runRemus(ctx context.Context, e *env) (string, error) {
	s := remusSettings{
		epochs:   []time.Duration{10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond},
		cpuScale: 8, cpuRuns: min(e.runs, 5), cpuTargetRuns: 4*e.runs - 1, cpuLongTargetRuns: 2*e.runs - 1,
		kvRounds: min(e.runs, 3), kvTargetPairs: 3 * e.runs,
		kv: kvSettings{conns: 32, depth: 16, loadFor: 1500 * time.Millisecond, maxLoad: 20_000_000,
			latencyFor: 1500 * time.Millisecond, maxLatency: 30000, keys: 1000},
		kvWarm:     time.Second,
		minLatency: 30, dirty: []int{10, 100, 1000, 10000}, dirtyMiB: 64, dirtyFor: 4 * time.Second,
		failTimeouts: []time.Duration{200 * time.Millisecond, 500 * time.Millisecond}, failRuns: min(e.runs, 3),
		timeout: 500 * time.Millisecond,
	}
	if e.quick {
		s.epochs = []time.Duration{25 * time.Millisecond}
		s.cpuScale, s.cpuRuns, s.cpuTargetRuns, s.cpuLongTargetRuns, s.kvRounds, s.kvTargetPairs = 1, 1, 1, 1, 1, 1
		s.kv.loadFor, s.kv.latencyFor, s.kv.maxLatency, s.kvWarm = 500*time.Millisecond, 500*time.Millisecond, 5000, 200*time.Millisecond
		s.minLatency, s.dirty, s.dirtyFor = 10, []int{100, 1000}, 700*time.Millisecond
		s.failTimeouts, s.failRuns = []time.Duration{500 * time.Millisecond}, 1
	}
	if err := e.buildBinaries(); err != nil {
		return "", err
	}
	r := &remusEnv{env: e, s: s, cache: filepath.Join(e.cache, "ftvm-compiled")}
	if help, _ := exec.Command(e.ftvmBin, "run", "--help").CombinedOutput(); bytes.Contains(help, []byte("--uncompressed")) {
		r.raw = true
	}

	var b strings.Builder
	b.WriteString("Command: `go run ./bench -only remus` (part of `make bench`). Every protected figure stands next to the ")
	b.WriteString("same guest unprotected, measured in the same run with the runs interleaved. A protected run is two ")
	fmt.Fprintf(&b, "processes on this machine: `ftvm backup --listen 127.0.0.1:R --state DIR --timeout %s --api-sock B.sock` ", s.timeout)
	fmt.Fprintf(&b, "and `ftvm run --protect 127.0.0.1:R --timeout %s --epoch E [--epoch-policy P] --api-sock P.sock ... GUEST.wasm`, ", s.timeout)
	b.WriteString("the replication stream over loopback TCP, sharing the 2 cores with the guest and the load generator (this ")
	b.WriteString("process). A fresh backup serves each protected run. Figures come from the primary's `GET /status` ")
	b.WriteString("(checkpoints, bytes replicated, the last pause and its dirty pages) and `GET /vm` (`pauses`: count, total, ")
	b.WriteString("p50/p99 over the last 1024) on its API socket, and the backup's `GET /status`.\n\n")

	var errs []string
	steps := []struct {
		name string
		f    func(context.Context, *remusEnv, *strings.Builder) error
	}{
		{"CPU-bound run time", remusCPU},
		{"KV throughput, latency and bytes replicated", remusKV},
		{"checkpoint pause vs dirty pages", remusDirty},
		{"bytes per checkpoint, compression", remusCompression},
		{"failover", remusFailover},
	}
	// FTVM_BENCH_REMUS=kv,failover runs only the steps whose names start
	// so (for working on one; make bench runs them all).
	only := strings.Split(os.Getenv("FTVM_BENCH_REMUS"), ",")
	for _, st := range steps {
		if only[0] != "" && !slices.ContainsFunc(only, func(p string) bool { return strings.HasPrefix(strings.ToLower(st.name), p) }) {
			continue
		}
		t0 := time.Now()
		err := st.f(ctx, r, &b)
		e.logf("remus: %s took %s", st.name, time.Since(t0).Round(time.Second))
		if err != nil {
			e.logf("remus: %s: %v", st.name, err)
			errs = append(errs, st.name)
			fmt.Fprintf(&b, "\n**%s not measured:** %s\n\n", st.name, mdEscape(err.Error()))
		}
	}
	if len(errs) > 0 && len(errs) == len(steps) {
		return "", fmt.Errorf("every remus measurement failed (see the harness log)")
	}
	return b.String(), nil
}

// --- processes -------------------------------------------------------------

// remusProc is an ftvm process with an API socket.
type remusProc struct {
	*child
	sock string
	addr string // a backup's replication address
	dir  string // a backup's state directory (removed on stop)
}

func (p *remusProc) stop() {
	if p == nil {
		return
	}
	p.child.stop()
	if p.dir != "" {
		os.RemoveAll(p.dir)
	}
}

// kill is kill -9.
func (p *remusProc) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// apiClients keeps one client (one kept-alive connection) per socket, so
// that polling does not open a connection per request.
var apiClients struct {
	sync.Mutex
	m map[string]*api.Client
}

func apiClient(sock string) *api.Client {
	apiClients.Lock()
	defer apiClients.Unlock()
	if apiClients.m == nil {
		apiClients.m = map[string]*api.Client{}
	}
	c := apiClients.m[sock]
	if c == nil {
		c = api.NewClient(sock)
		apiClients.m[sock] = c
	}
	return c
}

func apiGet(sock, path string, v any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return apiClient(sock).Get(ctx, path, v)
}

func primaryStatus(sock string) (remus.PrimaryStatus, error) {
	var st remus.PrimaryStatus
	err := apiGet(sock, "/status", &st)
	return st, err
}

func backupStatus(sock string) (remus.BackupStatus, error) {
	var st remus.BackupStatus
	err := apiGet(sock, "/status", &st)
	return st, err
}

func vmPauses(sock string) (machine.PauseStats, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	info, err := apiClient(sock).Info(ctx)
	if err != nil {
		return machine.PauseStats{}, err
	}
	if info.Pauses == nil {
		return machine.PauseStats{}, errors.New("GET /vm has no pauses (not instrumented?)")
	}
	return *info.Pauses, nil
}

// startBackup starts `ftvm backup` and waits until its API answers.
func (r *remusEnv) startBackup(ctx context.Context, timeout time.Duration) (*remusProc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	tag := r.tag("backup")
	p := &remusProc{sock: filepath.Join(r.work, tag+".sock"), addr: addr, dir: filepath.Join(r.work, tag+"-state")}
	p.child, err = startChild(ctx, r.env, tag, r.ftvmBin, "backup", "--listen", addr, "--state", p.dir,
		"--timeout", timeout.String(), "--api-sock", p.sock, "--cache-dir", r.cache, "--log-level", "info")
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := backupStatus(p.sock); err == nil {
			return p, nil
		}
		if p.exited() || time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("ftvm backup did not come up: %s", logTail(p.child))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startPrimary starts `ftvm run` with an API socket; args go between run's
// own flags and the module.
func (r *remusEnv) startPrimary(ctx context.Context, args ...string) (*remusProc, error) {
	tag := r.tag("run")
	p := &remusProc{sock: filepath.Join(r.work, tag+".sock")}
	full := append([]string{"run", "--api-sock", p.sock, "--cache-dir", r.cache, "--log-level", "info"}, args...)
	var err error
	p.child, err = startChild(ctx, r.env, tag, r.ftvmBin, full...)
	return p, err
}

// perCheckpoint is n per checkpoint at cps checkpoints a second (NaN, shown
// as a dash, without checkpoints).
func perCheckpoint(perSecond, cps float64) float64 {
	if cps <= 0 {
		return math.NaN()
	}
	return perSecond / cps
}

// waitProgramReady waits until a backup has prepared the guest's program
// (compiled the module), which it does once, after the first full
// checkpoint: a steady-state figure must not include that work.
func waitProgramReady(bk *remusProc, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		st, err := backupStatus(bk.sock)
		if err == nil && len(st.Slots) == 1 && st.Slots[0].ProgramReady {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the backup never reported program_ready: %+v (%v)", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitProtected waits until the primary reports state protected.
func waitProtected(p *remusProc, within time.Duration) error {
	deadline := time.Now().Add(within)
	var st remus.PrimaryStatus
	for time.Now().Before(deadline) {
		if p.exited() {
			return fmt.Errorf("the primary exited: %s", logTail(p.child))
		}
		var err error
		if st, err = primaryStatus(p.sock); err == nil && st.State == "protected" {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("the primary was not protected after %s (state %q, %s)", within, st.State, st.Reason)
}

// keepStall records what a protected primary that stopped answering was
// doing: its status, then its goroutines (SIGQUIT makes the Go runtime print
// them and exit), with both sides' whole logs copied out of the work
// directory, which the harness removes.
func (r *remusEnv) keepStall(label string, p, bk *remusProc) {
	st, err := primaryStatus(p.sock)
	r.logf("remus: kv %s stalled; the primary's status: %+v (err %v)", label, st, err)
	var vm json.RawMessage
	err = apiGet(p.sock, "/vm", &vm)
	r.logf("remus: kv %s stalled; the primary's VM (what the guest waits for under \"waiting\"): %s (err %v)", label, vm, err)
	p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-p.child.done:
	case <-time.After(5 * time.Second):
	}
	for name, c := range map[string]*child{"primary": p.child, "backup": bk.child} {
		b, _ := os.ReadFile(c.log)
		dst := filepath.Join(os.TempDir(), fmt.Sprintf("ftvm-bench-stall-%s-%s.log", time.Now().Format("150405"), name))
		if os.WriteFile(dst, b, 0o644) == nil {
			r.logf("remus: kv %s: the %s's log (goroutines at the end for the primary): %s", label, name, dst)
		}
	}
}

func logTail(c *child) string {
	b, _ := os.ReadFile(c.log)
	return tail(string(b))
}

// protectArgs are the replication flags of a protected run.
func protectArgs(backup *remusProc, timeout, epoch time.Duration, policy string, raw bool) []string {
	a := []string{"--protect", backup.addr, "--timeout", timeout.String(), "--epoch", epoch.String()}
	if policy != "" {
		a = append(a, "--epoch-policy", policy)
	}
	if raw {
		a = append(a, "--uncompressed")
	}
	return a
}

// --- (a) CPU-bound run time -------------------------------------------------

type remusCPUGuest struct {
	label, wasm string
}

type remusCPURun struct {
	elapsed     float64 // seconds
	stdout      string
	checkpoints float64
	pauses      machine.PauseStats
	state       string
}

func remusCPU(ctx context.Context, r *remusEnv, b *strings.Builder) error {
	var guests []remusCPUGuest
	if p, err := guest.Go("testdata/guests/gocpu"); err == nil {
		guests = append(guests, remusCPUGuest{"Go (testdata/guests/gocpu)", p})
	} else {
		r.logf("remus: gocpu: %v", err)
	}
	if p, err := guest.C("cpu", []string{"testdata/guests/c/cpu.c"}); err == nil {
		guests = append(guests, remusCPUGuest{"C (testdata/guests/c/cpu.c)", p})
	} else {
		r.logf("remus: C cpu: %v", err)
	}
	if len(guests) == 0 {
		return errors.New("no CPU guest could be built")
	}
	for i := range guests {
		dst := filepath.Join(r.work, filepath.Base(guests[i].wasm))
		if err := copyFile(guests[i].wasm, dst); err != nil {
			return err
		}
		guests[i].wasm = dst
	}
	arg := strconv.Itoa(r.s.cpuScale)
	// Warm the caches (instrumentation, compiled code).
	for _, g := range guests {
		if _, err := runCLI(ctx, r.ftvmBin, "run", "--cache-dir", r.cache, g.wasm, "1"); err != nil {
			return err
		}
	}
	// A long run: the same computation at longLonger times the scale,
	// unprotected and at 25 ms, to tell what protection costs once (the
	// backup session, the first full checkpoint, the heap's growth
	// arriving in one checkpoint, the module prepared on the backup)
	// from what it costs per second of computation.
	longArg := strconv.Itoa(r.s.cpuScale * longLonger)
	type key struct {
		g     int
		epoch time.Duration // 0: unprotected
		polls bool          // --loop-polls
		long  bool          // at longArg
		again bool          // a second unprotected run: the A/A control
	}
	var configs []key
	for _, ep := range append([]time.Duration{0}, r.s.epochs...) {
		configs = append(configs, key{epoch: ep})
	}
	configs = append(configs, key{again: true}, key{epoch: 25 * time.Millisecond, polls: true},
		key{long: true}, key{epoch: 25 * time.Millisecond, long: true}, key{long: true, again: true})
	for _, g := range guests { // warm the loop-polled instrumentation too
		if _, err := runCLI(ctx, r.ftvmBin, "run", "--loop-polls", "--cache-dir", r.cache, g.wasm, "1"); err != nil {
			return err
		}
	}
	res := map[key][]remusCPURun{}
	// partner holds, for every row but the unprotected one, an unprotected
	// run of the same computation taken right before or right after each
	// of the row's runs (the order alternating): the pair the paired ratio
	// is taken within.
	partner := map[key][]remusCPURun{}
	// The target's rows: after the rounds of every row, these alone get
	// rounds until they have cpuTargetRuns pairs each, cpuLongTargetRuns
	// at the longer scale (the machine's drift makes a median of five
	// pairs move by ±0.1, of nine by ±0.07: the C guest's rows at 10, 25
	// and 50 ms, the same computation checkpointed alike, ×1.07, ×1.14
	// and ×1.02 in one run).
	target := func(c key, run int) bool {
		if c.long && run >= r.s.cpuLongTargetRuns {
			return false
		}
		return c.epoch == 25*time.Millisecond && !c.polls || c.again
	}
	for run := 0; run < max(r.s.cpuRuns, r.s.cpuTargetRuns); run++ {
		for gi, g := range guests {
			for i := range configs {
				c := configs[(i+run)%len(configs)]
				if run >= r.s.cpuRuns && !target(c, run) {
					continue
				}
				epoch := c.epoch
				a := arg
				if c.long {
					a = longArg
				}
				one := func(epoch time.Duration, polls bool) (remusCPURun, error) {
					r.logf("remus: cpu %s run %d/%d, epoch %v, loop polls %v, scale %s", g.label, run+1, max(r.s.cpuRuns, r.s.cpuTargetRuns), epoch, polls, a)
					out, err := r.cpuRun(ctx, g.wasm, a, epoch, polls)
					if err != nil {
						return out, fmt.Errorf("%s, epoch %v, scale %s: %w", g.label, epoch, a, err)
					}
					return out, nil
				}
				k := key{gi, epoch, c.polls, c.long, c.again}
				if epoch == 0 && !c.again {
					out, err := one(0, false)
					if err != nil {
						return err
					}
					res[k] = append(res[k], out)
					continue
				}
				var out, pair remusCPURun
				var err error
				partnerFirst := (run+i)%2 == 0
				if partnerFirst {
					if pair, err = one(0, false); err != nil {
						return err
					}
				}
				if out, err = one(epoch, c.polls); err != nil {
					return err
				}
				if !partnerFirst {
					if pair, err = one(0, false); err != nil {
						return err
					}
				}
				res[k] = append(res[k], out)
				partner[k] = append(partner[k], pair)
			}
		}
	}

	fmt.Fprintf(b, "### (a) CPU-bound guests: run time protected vs unprotected\n\n")
	fmt.Fprintf(b, "Unprotected: `ftvm run --api-sock P.sock --cache-dir CACHE GUEST.wasm %s`. Protected: a fresh `ftvm backup` (not timed), then "+
		"`ftvm run --protect 127.0.0.1:R --timeout %s --epoch E --api-sock P.sock --cache-dir CACHE GUEST.wasm %s` "+
		"(default epoch policy, output), timed from fork to exit; the backup is stopped right after. %d run(s) per row "+
		"(%d for the 25 ms rows, the target's, and their A/A controls, %d at the longer scale: extra rounds of those rows alone follow), "+
		"the order rotating every run; median with min–max. **Checkpoints** and **pauses** are the primary's `GET /status` "+
		"and `GET /vm` as last polled (every 50 ms, so up to 50 ms before exit); the pause figures include the first, full, "+
		"checkpoint. The unprotected runs are polled alike (the harness shares the 2 cores with the guest), so that "+
		"the ratio holds no cost of the polling. The guests checkpoint only at host calls (the safe points): a computation that makes none runs "+
		"as one epoch, and the first, full, checkpoint waits for the first host call after the backup session is up; "+
		"the `--loop-polls` row adds safe points in the guest's loops, so epochs end on time (its ratio is against "+
		"the unprotected run without loop polls, so it includes their own cost). "+
		"**State at last poll**: protected = the backup had acknowledged a checkpoint; syncing = the first (full) "+
		"checkpoint was not acknowledged yet; unprotected = the pair gave each other up during the run. A run that "+
		"ends while syncing was, in effect, not protected: its time is not the cost of protection. **Output** compares "+
		"each run's stdout with the unprotected run's. The rows **scale %s** run the same computation %d times longer, "+
		"unprotected and at 25 ms: what protection costs once (the backup session, the first full checkpoint, the heap's "+
		"growth arriving in one checkpoint, the module prepared on the backup while the guest runs, all on this "+
		"machine's 2 cores) against what it costs per second of computation; **added** is the protected run's time "+
		"less the unprotected one's. **Paired** is the ratio within adjacent pairs: each run of a row is paired with "+
		"an unprotected run of the same computation taken right before or right after it (the order alternating; these "+
		"partner runs are not in the unprotected row), and the column gives the median of the pairs' ratios, min–max. "+
		"The rows **unprotected, again** are an unprotected run paired the same way, the A/A control: their ratios are "+
		"what this machine's drift alone makes of two identical runs side by side (its speed steps by up to ×2 for "+
		"seconds at a time, other tenants of the host), so a protected ratio within their spread is not told apart "+
		"from ×1.\n\n", arg, r.s.timeout, arg, r.s.cpuRuns, max(r.s.cpuRuns, r.s.cpuTargetRuns), max(r.s.cpuRuns, r.s.cpuLongTargetRuns), longArg, longLonger)
	b.WriteString("| guest | epoch | run time | ÷ unprotected | paired | added | checkpoints | pause p50 | pause p99 | state at last poll | output |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
	for gi, g := range guests {
		for _, c := range configs {
			epoch := c.epoch
			base := res[key{gi, 0, false, c.long, false}]
			want := ""
			if len(base) > 0 {
				want = base[0].stdout
			}
			baseT := sampleOf(base, func(x remusCPURun) float64 { return x.elapsed })
			runs := res[key{gi, epoch, c.polls, c.long, c.again}]
			t := sampleOf(runs, func(x remusCPURun) float64 { return x.elapsed })
			paired := pairedRatios(runs, partner[key{gi, epoch, c.polls, c.long, c.again}])
			label := "unprotected"
			if c.again {
				label += ", again"
			}
			if epoch > 0 {
				label = epoch.String()
			}
			if c.polls {
				label += ", --loop-polls"
			}
			if c.long {
				label += ", scale " + longArg
			}
			out := outputCheck(runs, want)
			if epoch == 0 && !c.again {
				fmt.Fprintf(b, "| %s | %s | %s | ×1 | — | — | — | — | — | — | %s |\n", g.label, label, fmtSecRange(t), out)
				continue
			}
			if c.again {
				fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | — | — | — | — | %s |\n", g.label, label, fmtSecRange(t),
					fmtRatio(t.median(), baseT.median()), fmtPaired(paired), fmtSeconds(t.median()-baseT.median()), out)
				continue
			}
			cps := sampleOf(runs, func(x remusCPURun) float64 { return x.checkpoints })
			p50 := sampleOf(runs, func(x remusCPURun) float64 { return float64(x.pauses.P50) })
			p99 := sampleOf(runs, func(x remusCPURun) float64 { return float64(x.pauses.P99) })
			states := map[string]int{}
			for _, x := range runs {
				states[orDash(x.state)]++
			}
			pause := func(s sample) string {
				if cps.median() == 0 {
					return "—"
				}
				return fmtNsDur(s.median())
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", g.label, label, fmtSecRange(t),
				fmtRatio(t.median(), baseT.median()), fmtPaired(paired), fmtSeconds(t.median()-baseT.median()), fmtNum(cps.median()),
				pause(p50), pause(p99), fmtCounts(states), out)
			if c.long {
				r.summarize("Remus, CPU-bound %s, %d times longer (scale %s): `ftvm run --protect` at 25 ms epochs takes %s vs "+
					"%s unprotected (%s, %s added; paired with an unprotected run right before or after %s, against %s for an unprotected run paired alike (A/A); target ≤ ×1.1); "+
					"checkpoints: %s; state at last poll: %s; output %s.",
					g.label, longLonger, longArg, fmtSeconds(t.median()), fmtSeconds(baseT.median()),
					fmtRatio(t.median(), baseT.median()), fmtSeconds(t.median()-baseT.median()), fmtPaired(paired),
					fmtPaired(pairedRatios(res[key{gi, 0, false, true, true}], partner[key{gi, 0, false, true, true}])), fmtNum(cps.median()),
					fmtCounts(states), out)
			} else if c.polls {
				r.summarize("Remus, CPU-bound %s with `--loop-polls` at 25 ms epochs: %s vs %s unprotected (%s); checkpoints: %s "+
					"(safe points inside the computation), pause p50 %s / p99 %s; state at last poll: %s; output %s.",
					g.label, fmtSeconds(t.median()), fmtSeconds(baseT.median()), fmtRatio(t.median(), baseT.median()),
					fmtNum(cps.median()), pause(p50), pause(p99), fmtCounts(states), out)
			} else if epoch == 25*time.Millisecond {
				r.summarize("Remus, CPU-bound %s: `ftvm run --protect` at 25 ms epochs takes %s vs %s unprotected (%s; paired with an unprotected run right before or after %s, "+
					"against %s for an unprotected run paired alike (A/A); target ≤ ×1.1); "+
					"checkpoints: %s, pause p50 %s / p99 %s; primary's state at its last poll: %s; output %s.", g.label, fmtSeconds(t.median()), fmtSeconds(baseT.median()),
					fmtRatio(t.median(), baseT.median()), fmtPaired(paired), fmtPaired(pairedRatios(res[key{gi, 0, false, false, true}], partner[key{gi, 0, false, false, true}])),
					fmtNum(cps.median()), pause(p50), pause(p99),
					fmtCounts(states), out)
			}
		}
	}
	b.WriteString("\n")
	return nil
}

// pairedRatios is each run's time over that of its partner, the
// unprotected run taken right before or after it (runs and partners are in
// the same order). The machine's speed drifts by up to ×2 for seconds at a
// time, so a ratio of two runs side by side is steadier than a ratio of
// medians taken across rounds.
func pairedRatios(runs, partners []remusCPURun) sample {
	return pairedBy(runs, partners, func(x remusCPURun) float64 { return x.elapsed })
}

// pairedBy is v of each run over v of its partner (same order), where the
// partner's is positive.
func pairedBy[T any](runs, partners []T, v func(T) float64) sample {
	var s sample
	for i := range min(len(runs), len(partners)) {
		if p := v(partners[i]); p > 0 {
			s = append(s, v(runs[i])/p)
		}
	}
	return s
}

// fmtPaired formats paired ratios: median (min–max).
func fmtPaired(s sample) string {
	if len(s) == 0 {
		return "—"
	}
	if len(s) == 1 {
		return fmt.Sprintf("×%.2f", s.median())
	}
	return fmt.Sprintf("×%.2f (%.2f–%.2f)", s.median(), s.min(), s.max())
}

// longLonger is how many times longer the long CPU-bound runs compute.
const longLonger = 5

// cpuRun times one run of a CPU-bound guest: protected at epoch, with a
// fresh backup, or unprotected (epoch 0). Both are polled alike on their
// API sockets (the harness shares the cores with the guest), so that the
// ratio is protection's cost, not the polling's.
func (r *remusEnv) cpuRun(ctx context.Context, wasm, arg string, epoch time.Duration, polls bool) (remusCPURun, error) {
	var out remusCPURun
	args := []string{"run"}
	if epoch > 0 {
		bk, err := r.startBackup(ctx, r.s.timeout)
		if err != nil {
			return out, err
		}
		defer bk.stop()
		args = append(args, protectArgs(bk, r.s.timeout, epoch, "", false)...)
	}
	sock := filepath.Join(r.work, r.tag("cpu")+".sock")
	if polls {
		args = append(args, "--loop-polls")
	}
	args = append(args, "--api-sock", sock, "--cache-dir", r.cache, wasm, arg)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, r.ftvmBin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return out, err
	}
	wg.Add(1)
	go func() { // poll the primary's figures until it exits
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			st, err1 := primaryStatus(sock)
			ps, err2 := vmPauses(sock)
			mu.Lock()
			if err1 == nil {
				out.checkpoints, out.state = float64(st.Checkpoints), st.State
			}
			if err2 == nil {
				out.pauses = ps
			}
			mu.Unlock()
		}
	}()
	err := cmd.Wait()
	out.elapsed = time.Since(t0).Seconds()
	close(stop)
	wg.Wait()
	out.stdout = stdout.String()
	if err != nil {
		return out, fmt.Errorf("ftvm %s: %w; stderr: %s", strings.Join(args[:len(args)-2], " "), err, tail(stderr.String()))
	}
	return out, nil
}

func sampleOf[T any](xs []T, f func(T) float64) sample {
	var s sample
	for _, x := range xs {
		s = append(s, f(x))
	}
	return s
}

// outputCheck compares every run's stdout with want.
func outputCheck(runs []remusCPURun, want string) string {
	wantLines := strings.Count(want, "\n")
	bad, minLines := 0, wantLines
	for _, x := range runs {
		if x.stdout != want {
			bad++
			minLines = min(minLines, strings.Count(x.stdout, "\n"))
		}
	}
	if bad == 0 {
		return "identical"
	}
	return fmt.Sprintf("**%d of %d runs differ** (as few as %d of %d lines printed)", bad, len(runs), minLines, wantLines)
}

// fmtCounts is "a" for {a: n}, "a ×2, b ×1" for more than one key.
func fmtCounts(m map[string]int) string {
	if len(m) == 1 {
		for k := range m {
			return k
		}
	}
	var parts []string
	for k, n := range m {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, n))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func orDash(s string) string {
	if s == "" {
		return "never reported"
	}
	return s
}

// --- (b), (c), (e) KV: throughput, latency, bytes per epoch -----------------

// remusKVConfig is one way to run the KV guest.
type remusKVConfig struct {
	key    string
	epoch  time.Duration // 0: unprotected
	policy string
	raw    bool
}

func (c remusKVConfig) label() string {
	if c.epoch == 0 {
		return "unprotected"
	}
	l := fmt.Sprintf("%s, %s", c.policy, c.epoch)
	if c.raw {
		l += ", --uncompressed"
	}
	return l
}

// remusKVRound is what one start of the KV guest measured.
type remusKVRound struct {
	rps              float64
	warmRPS          float64 // during the warm-up
	loadErrors       int64
	cps              float64 // checkpoints per second during the load
	bytesPerCP       float64
	pagesPerCP       float64 // median over the run's checkpoints
	commitP50        float64 // ns: pause end to ack, over the run's checkpoints
	commitP99        float64
	recorded         int     // checkpoints of the run read from GET /checkpoints
	recMissed        uint64  // and those it no longer kept when read
	unacked          int     // read, but not acknowledged when last read
	meanPause        float64 // ns, during the load
	stalls           float64
	resyncs          float64 // full checkpoints during the load
	primCPU, backCPU float64 // percent of a core during the load
	p50, p99, mean   float64 // seconds
	latN             int
	latCPS           float64 // checkpoints per second during the latency run
}

// kvTargetKey is the KV configuration the throughput target is
// about: the output policy at 25 ms epochs.
const kvTargetKey = "output-25ms"

func remusKV(ctx context.Context, r *remusEnv, b *strings.Builder) error {
	wasmPath, err := guest.Go("testdata/guests/kvserver")
	if err != nil {
		return err
	}
	wasm := filepath.Join(r.work, "kvserver.wasm")
	if err := copyFile(wasmPath, wasm); err != nil {
		return err
	}
	configs := []remusKVConfig{{key: "off"}}
	for _, ep := range r.s.epochs {
		for _, pol := range []string{"fixed", "output"} {
			configs = append(configs, remusKVConfig{key: fmt.Sprintf("%s-%s", pol, ep), epoch: ep, policy: pol})
		}
	}
	if r.raw {
		configs = append(configs, remusKVConfig{key: "fixed-25ms-raw", epoch: 25 * time.Millisecond, policy: "fixed", raw: true})
	}
	res := map[string][]remusKVRound{}
	// partner holds, for each output-policy configuration, an unprotected
	// start measured right before or right after each of its starts (the
	// order alternating): the pair its paired ratio is taken within, as
	// the machine's speed drifts over the minute and more between a
	// configuration and the round's own unprotected start.
	partner := map[string][]remusKVRound{}
	var echo []kvRound
	// start measures configuration c once, and, under the output policy,
	// an unprotected partner right before (partnerFirst) or after it.
	start := func(what string, c remusKVConfig, partnerFirst bool) error {
		measure := func(c remusKVConfig, role string) (remusKVRound, error) {
			r.logf("remus: kv %s: %s%s", what, c.label(), role)
			m, err := r.measureKV(ctx, wasm, c)
			if err != nil {
				return m, fmt.Errorf("%s: %w", c.label(), err)
			}
			return m, nil
		}
		measurePartner := func() error {
			m, err := measure(configs[0], " (partner of "+c.label()+")")
			if err == nil {
				partner[c.key] = append(partner[c.key], m)
			}
			return err
		}
		paired := c.policy == "output"
		if paired && partnerFirst {
			if err := measurePartner(); err != nil {
				return err
			}
		}
		m, err := measure(c, "")
		if err != nil {
			return err
		}
		res[c.key] = append(res[c.key], m)
		if paired && !partnerFirst {
			return measurePartner()
		}
		return nil
	}
	for round := 0; round < r.s.kvRounds; round++ {
		order := append([]remusKVConfig(nil), configs...)
		if round%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for i, c := range order {
			if err := start(fmt.Sprintf("round %d/%d", round+1, r.s.kvRounds), c, (round+i)%2 == 0); err != nil {
				return err
			}
		}
		es := r.s.kv
		es.loadFor = 200 * time.Millisecond
		ev, err := measureEcho(ctx, es)
		if err != nil {
			return fmt.Errorf("loopback echo: %w", err)
		}
		echo = append(echo, ev)
	}
	// The target's row alone, until it has kvTargetPairs pairs.
	for _, c := range configs {
		if c.key != kvTargetKey {
			continue
		}
		for n := len(partner[c.key]); n < r.s.kvTargetPairs; n++ {
			if err := start(fmt.Sprintf("target pair %d/%d", n+1, r.s.kvTargetPairs), c, n%2 == 0); err != nil {
				return err
			}
		}
	}
	pick := func(key string, f func(remusKVRound) float64) sample { return sampleOf(res[key], f) }
	rps := func(x remusKVRound) float64 { return x.rps }
	offRPS := pick("off", rps).median()
	offP50 := pick("off", func(x remusKVRound) float64 { return x.p50 }).median()

	fmt.Fprintf(b, "### (b) KV throughput: %d outstanding requests (%d connections × pipeline %d)\n\n", r.s.kv.conns*r.s.kv.depth, r.s.kv.conns, r.s.kv.depth)
	fmt.Fprintf(b, "Guest: testdata/guests/kvserver (Go), listener at guest fd 3. Unprotected: `ftvm run --api-sock P.sock --listen "+
		"127.0.0.1:PORT kvserver.wasm`; protected: `ftvm run --protect 127.0.0.1:R --timeout %s --epoch E --epoch-policy P "+
		"--api-sock P.sock --listen 127.0.0.1:PORT kvserver.wasm` with its own fresh backup. Per start: wait until it answers, "+
		"is protected and its backup has compiled the module (`program_ready`, a one-time cost), load %d keys, the same load for %s unmeasured "+
		"(a warm-up: the guest's heap grows in its first second under load, and a protected primary's first checkpoints carry that growth "+
		"and have no copies yet to send deltas against; its throughput is the **warm-up** column), then throughput for %s (the kv group's generator: 90%% GET / 10%% SET), then one "+
		"sequential client for %s (at least %d requests), stop. %d round(s), configuration order reversed every other "+
		"round, then pairs of the target's row (output, 25 ms) alone until it has %d (a median of three pairs moved by a "+
		"quarter between rows of one setting); medians with min–max. **Paired** (output policy): each start is paired with an unprotected start "+
		"measured right before or right after it (the order alternating; these partner starts are not in the unprotected "+
		"row), and the column gives the median of the pairs' throughput ratios, min–max: the machine's speed drifts over "+
		"the minute and more between a configuration and its round's unprotected start. Held output is released when the backup acknowledges the epoch's checkpoint, so "+
		"with the fixed policy a reply waits for its epoch to end. Checkpoints/s, bytes per checkpoint and mean pause are "+
		"over the throughput run (`GET /status` deltas of checkpoints and bytes_replicated; `GET /vm` pauses total/count); "+
		"**requests/checkpoint** = requests/s ÷ checkpoints/s; **dirty pages** and **commit p50/p99** are over every checkpoint of "+
		"the run, from the primary's `GET /checkpoints` (polled every 100 ms): commit is from the end of a checkpoint's pause to "+
		"the backup's acknowledgement, the time the epoch's output waits beyond the pause (the encoding, the stream, the "+
		"backup's decoding and commit, and the ack's way back). "+
		"CPU is each process's utime+stime over the run.\n\n",
		r.s.timeout, r.s.kv.keys, r.s.kvWarm, r.s.kv.loadFor, r.s.kv.latencyFor, r.s.minLatency, r.s.kvRounds, r.s.kvTargetPairs)
	b.WriteString("| configuration | requests/s | ÷ unprotected | paired | warm-up requests/s | ÷ unprotected | checkpoints/s | requests/checkpoint | bytes/checkpoint | dirty pages/checkpoint (median) | mean pause | commit p50 | commit p99 | primary CPU % | backup CPU % | stalls | full resyncs |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	pairedRPS := func(key string) sample { return pairedBy(res[key], partner[key], rps) }
	warmRPS := func(x remusKVRound) float64 { return x.warmRPS }
	offWarm := pick("off", warmRPS).median()
	for _, c := range configs {
		x := pick(c.key, rps)
		w := pick(c.key, warmRPS)
		if c.epoch == 0 {
			fmt.Fprintf(b, "| %s | %s | ×1 | — | %s | ×1 | — | — | — | — | — | — | — | %.0f | — | — | — |\n", c.label(), fmtNumRange(x), fmtNumRange(w),
				pick(c.key, func(x remusKVRound) float64 { return x.primCPU }).median())
			continue
		}
		med := func(f func(remusKVRound) float64) float64 { return pick(c.key, f).median() }
		cps := med(func(x remusKVRound) float64 { return x.cps })
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %.0f | %.0f | %s | %s |\n", c.label(), fmtNumRange(x),
			fmtRatio(x.median(), offRPS), fmtPaired(pairedRPS(c.key)), fmtNumRange(w), fmtRatio(w.median(), offWarm), cps, fmtNum(perCheckpoint(x.median(), cps)),
			fmtBytes(med(func(x remusKVRound) float64 { return x.bytesPerCP })),
			fmtNum(med(func(x remusKVRound) float64 { return x.pagesPerCP })),
			fmtNsDur(med(func(x remusKVRound) float64 { return x.meanPause })),
			fmtNsDur(med(func(x remusKVRound) float64 { return x.commitP50 })),
			fmtNsDur(med(func(x remusKVRound) float64 { return x.commitP99 })),
			med(func(x remusKVRound) float64 { return x.primCPU }), med(func(x remusKVRound) float64 { return x.backCPU }),
			fmtNum(med(func(x remusKVRound) float64 { return x.stalls })),
			fmtNum(pick(c.key, func(x remusKVRound) float64 { return x.resyncs }).max()))
	}
	var errsN int64
	var recorded, recMissed, unacked uint64
	for _, rs := range res {
		for _, x := range rs {
			errsN += x.loadErrors
			recorded += uint64(x.recorded)
			recMissed += x.recMissed
			unacked += uint64(x.unacked)
		}
	}
	fmt.Fprintf(b, "\nCheckpoints of the protected throughput runs read from `GET /checkpoints`: %d (of them not acknowledged "+
		"when last read, so out of the commit figures: %d); not read (no longer kept when polled): %d.\n", recorded, unacked, recMissed)
	if errsN > 0 {
		fmt.Fprintf(b, "\n**%d replies were malformed or errors** (see the harness log).\n", errsN)
	}
	for _, pol := range []string{"fixed", "output"} {
		k := pol + "-25ms"
		if len(res[k]) > 0 {
			x := pick(k, rps).median()
			w := pick(k, warmRPS).median()
			paired := ""
			if ps := pairedRPS(k); len(ps) > 0 {
				pairs := fmt.Sprintf("%d pairs", len(ps))
				if len(ps) == 1 {
					pairs = "1 pair"
				}
				paired = fmt.Sprintf(", in %s with an unprotected start right before or after %s", pairs, fmtPaired(ps))
			}
			r.summarize("Remus, KV server, 512 outstanding requests, %s policy at 25 ms, after a warm-up: %s req/s vs %s unprotected (%s%s; target ≥ ×0.8); during the warm-up (the first %s under load) %s vs %s (%s).",
				pol, fmtNum(x), fmtNum(offRPS), fmtRatio(x, offRPS), paired, r.s.kvWarm, fmtNum(w), fmtNum(offWarm), fmtRatio(w, offWarm))
		}
	}

	fmt.Fprintf(b, "\n### (c) KV latency: 1 sequential client\n\n")
	b.WriteString("Same starts as (b): after the throughput run, one client sends a request and waits for the reply, repeatedly. " +
		"**Added p50** = the configuration's p50 minus the unprotected p50 of the same round (for the target row's extra " +
		"pairs, of its partner; median over them). The " +
		"floors: the unprotected guest, and a raw loopback round trip (an in-process Go echo server, the kv group's floor).\n\n")
	b.WriteString("| configuration | p50 | p99 | mean | added p50 | requests | checkpoints/s |\n|---|---:|---:|---:|---:|---:|---:|\n")
	addedOf := func(key string) sample {
		var s sample
		for i, x := range res[key] {
			switch {
			case i < len(res["off"]):
				s = append(s, x.p50-res["off"][i].p50)
			case i < len(partner[key]): // the target row's extra pairs
				s = append(s, x.p50-partner[key][i].p50)
			}
		}
		return s
	}
	for _, c := range configs {
		if c.raw {
			continue
		}
		med := func(f func(remusKVRound) float64) float64 { return pick(c.key, f).median() }
		added, cps := "—", "—"
		if c.epoch > 0 {
			added = fmtSeconds(addedOf(c.key).median())
			cps = fmt.Sprintf("%.0f", med(func(x remusKVRound) float64 { return x.latCPS }))
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s |\n", c.label(),
			fmtSecRange(pick(c.key, func(x remusKVRound) float64 { return x.p50 })),
			fmtSecRange(pick(c.key, func(x remusKVRound) float64 { return x.p99 })),
			fmtSeconds(med(func(x remusKVRound) float64 { return x.mean })), added,
			fmtNum(med(func(x remusKVRound) float64 { return float64(x.latN) })), cps)
	}
	ep50 := sampleOf(echo, func(x kvRound) float64 { return x.p50 })
	ep99 := sampleOf(echo, func(x kvRound) float64 { return x.p99 })
	fmt.Fprintf(b, "| loopback echo in Go (floor: raw TCP round trip) | %s | %s | %s | — | %s | — |\n\n",
		fmtSecRange(ep50), fmtSecRange(ep99), fmtSeconds(sampleOf(echo, func(x kvRound) float64 { return x.mean }).median()),
		fmtNum(sampleOf(echo, func(x kvRound) float64 { return float64(x.latencyN) }).median()))
	if len(res[kvTargetKey]) > 0 {
		p50 := func(x remusKVRound) float64 { return x.p50 }
		p99 := func(x remusKVRound) float64 { return x.p99 }
		line := fmt.Sprintf("Remus, KV server, 1 sequential client at 25 ms epochs: output policy p50/p99 %s/%s (added p50 %s; target ≤ 2 ms)",
			fmtSeconds(pick(kvTargetKey, p50).median()), fmtSeconds(pick(kvTargetKey, p99).median()), fmtSeconds(addedOf(kvTargetKey).median()))
		if len(res["fixed-25ms"]) > 0 {
			line += fmt.Sprintf(", fixed policy %s/%s (added %s)", fmtSeconds(pick("fixed-25ms", p50).median()),
				fmtSeconds(pick("fixed-25ms", p99).median()), fmtSeconds(addedOf("fixed-25ms").median()))
		}
		line += fmt.Sprintf("; unprotected %s/%s, loopback round trip %s/%s.", fmtSeconds(offP50),
			fmtSeconds(pick("off", p99).median()), fmtSeconds(ep50.median()), fmtSeconds(ep99.median()))
		r.summarize("%s", line)
	}

	// (e) compression, the KV part.
	if r.raw {
		for _, k := range []string{"fixed-25ms", "fixed-25ms-raw"} {
			med := func(f func(remusKVRound) float64) float64 { return pick(k, f).median() }
			r.comp = append(r.comp, compRow{workload: "KV guest, 512 outstanding requests, fixed 25 ms", raw: strings.HasSuffix(k, "raw"),
				bytes: med(func(x remusKVRound) float64 { return x.bytesPerCP }), cps: med(func(x remusKVRound) float64 { return x.cps }),
				pages: med(func(x remusKVRound) float64 { return x.pagesPerCP }), pause: med(func(x remusKVRound) float64 { return x.meanPause }),
				tput: fmtNum(med(rps)) + " req/s"})
		}
	}
	return nil
}

// measureKV starts the KV guest in one configuration and measures it.
func (r *remusEnv) measureKV(ctx context.Context, wasm string, c remusKVConfig) (remusKVRound, error) {
	var out remusKVRound
	addr, err := freeAddr()
	if err != nil {
		return out, err
	}
	var bk *remusProc
	args := []string{}
	if c.epoch > 0 {
		if bk, err = r.startBackup(ctx, r.s.timeout); err != nil {
			return out, err
		}
		defer bk.stop()
		args = protectArgs(bk, r.s.timeout, c.epoch, c.policy, c.raw)
	}
	args = append(args, "--listen", addr, wasm)
	p, err := r.startPrimary(ctx, args...)
	if err != nil {
		return out, err
	}
	defer p.stop()
	if err := waitReady(ctx, addr, p.child, 120*time.Second); err != nil {
		return out, fmt.Errorf("%w; its output: %s", err, logTail(p.child))
	}
	if c.epoch > 0 {
		if err := waitProtected(p, 60*time.Second); err != nil {
			return out, err
		}
		if err := waitProgramReady(bk, 60*time.Second); err != nil {
			return out, err
		}
	}
	if err := populate(addr, r.s.kv.keys); err != nil {
		return out, fmt.Errorf("loading keys: %w", err)
	}
	// A warm-up, the same load unmeasured: the first second under load
	// differs (the guest's heap grows; a protected primary's first
	// checkpoints carry that growth, and it has no copies yet to send
	// deltas against). Its throughput is reported on its own.
	if r.s.kvWarm > 0 {
		warm := r.s.kv
		warm.loadFor = r.s.kvWarm
		lr, err := pipelinedLoad(addr, warm)
		if err != nil {
			return out, fmt.Errorf("warm-up: %w", err)
		}
		out.warmRPS = float64(lr.requests) / lr.elapsed.Seconds()
	}

	// Throughput, with the dirty-page count polled alongside.
	snap := func() (remus.PrimaryStatus, machine.PauseStats, time.Duration, time.Duration) {
		var st remus.PrimaryStatus
		var ps machine.PauseStats
		if c.epoch > 0 {
			st, _ = primaryStatus(p.sock)
			ps, _ = vmPauses(p.sock)
		}
		pc, _ := procCPU(p.cmd.Process.Pid)
		var bc time.Duration
		if bk != nil {
			bc, _ = procCPU(bk.cmd.Process.Pid)
		}
		return st, ps, pc, bc
	}
	st0, ps0, pc0, bc0 := snap()
	// Every checkpoint of the run, from GET /checkpoints, each poll from
	// the oldest record not yet seen acknowledged, so that a record read
	// before its ack is read again after it.
	recs := map[uint64]remus.CheckpointRecord{}
	var maxSeen uint64
	pollRecs := func() {
		from := max(maxSeen, st0.Checkpoints)
		for seq, x := range recs {
			if x.CommitUS == 0 {
				from = min(from, seq-1)
			}
		}
		var list remus.CheckpointsList
		if apiGet(p.sock, fmt.Sprintf("/checkpoints?since=%d", from), &list) != nil {
			return
		}
		for _, x := range list.Checkpoints {
			if x.Seq > st0.Checkpoints {
				recs[x.Seq] = x
			}
			maxSeen = max(maxSeen, x.Seq)
		}
	}
	stopPoll := make(chan struct{})
	var wg sync.WaitGroup
	if c.epoch > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stopPoll:
					time.Sleep(50 * time.Millisecond) // the last acks
					pollRecs()
					return
				case <-time.After(100 * time.Millisecond):
				}
				pollRecs()
			}
		}()
	}
	t0 := time.Now()
	lr, err := pipelinedLoad(addr, r.s.kv)
	close(stopPoll)
	wg.Wait()
	if err != nil {
		if c.epoch > 0 {
			r.keepStall(c.label(), p, bk)
		}
		return out, fmt.Errorf("throughput: %w", err)
	}
	st1, ps1, pc1, bc1 := snap()
	el := time.Since(t0).Seconds()
	out.rps = float64(lr.requests) / lr.elapsed.Seconds()
	out.loadErrors = lr.errors
	if lr.errors > 0 {
		r.logf("remus: kv %s: %d bad replies, first: %q", c.label(), lr.errors, lr.firstBad)
	}
	out.primCPU = 100 * (pc1 - pc0).Seconds() / el
	out.backCPU = 100 * (bc1 - bc0).Seconds() / el
	if c.epoch > 0 {
		n := float64(st1.Checkpoints - st0.Checkpoints)
		out.cps = n / el
		if n > 0 {
			out.bytesPerCP = float64(st1.BytesSent-st0.BytesSent) / n
		}
		if dn := ps1.Count - ps0.Count; dn > 0 {
			out.meanPause = float64((ps1.Total - ps0.Total).Nanoseconds()) / float64(dn)
		}
		out.stalls = float64(st1.Stalls - st0.Stalls)
		out.resyncs = float64(st1.FullCheckpoints - st0.FullCheckpoints)
		var pages, commit sample
		for seq := st0.Checkpoints + 1; seq <= min(st1.Checkpoints, maxSeen); seq++ {
			x, ok := recs[seq]
			if !ok {
				out.recMissed++ // no longer kept when polled
				continue
			}
			pages = append(pages, float64(x.DirtyPages))
			if x.CommitUS > 0 {
				commit = append(commit, x.CommitUS*1000)
			} else {
				out.unacked++
			}
		}
		out.pagesPerCP = pages.median()
		out.commitP50, out.commitP99 = commit.quantile(0.5), commit.quantile(0.99)
		out.recorded = len(pages)
	}

	// Latency: long enough for minLatency requests even at the longest epoch.
	ls := r.s.kv
	if c.epoch > 0 && c.policy == "fixed" {
		ls.latencyFor = max(ls.latencyFor, time.Duration(r.s.minLatency)*(c.epoch+5*time.Millisecond))
	}
	t1 := time.Now()
	lat, err := sequentialLatency(addr, ls, kvRequests(r.s.kv.keys, 1))
	if err != nil {
		return out, fmt.Errorf("latency: %w", err)
	}
	if c.epoch > 0 {
		if st2, err := primaryStatus(p.sock); err == nil {
			out.latCPS = float64(st2.Checkpoints-st1.Checkpoints) / time.Since(t1).Seconds()
		}
	}
	out.p50, out.p99, out.mean, out.latN = lat.quantile(0.5), lat.quantile(0.99), meanOf(lat), len(lat)
	if p.exited() {
		return out, fmt.Errorf("the primary exited during the run: %s", logTail(p.child))
	}
	if c.epoch > 0 {
		if st, err := primaryStatus(p.sock); err != nil || st.State != "protected" {
			return out, fmt.Errorf("the primary is no longer protected after the run: %q %s (%v)", st.State, st.Reason, err)
		}
	}
	return out, nil
}

func fmtBytes(v float64) string {
	switch {
	case math.IsNaN(v):
		return "—"
	case v >= 1<<20:
		return fmt.Sprintf("%.1f MiB", v/(1<<20))
	case v >= 1<<10:
		return fmt.Sprintf("%.1f KiB", v/(1<<10))
	}
	return fmt.Sprintf("%.0f B", v)
}

// --- (d) checkpoint pause vs dirty pages ------------------------------------

type remusDirtyRun struct {
	pause, pages sample // every checkpoint of the window (GET /checkpoints)
	ahead        sample // of each one's pages, those copied before its pause
	// pauseUpTo: the pauses of the checkpoints of at most targetPages
	// pages, the target's condition; over counts the others.
	pauseUpTo  sample
	over       int
	missed     uint64 // checkpoints of the window no longer kept when asked
	resyncs    uint64 // full checkpoints during the window
	meanPause  float64
	bytesPerCP float64
	cps        float64
	stalls     float64
}

func remusDirty(ctx context.Context, r *remusEnv, b *strings.Builder) error {
	p, err := guest.C("dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	if err != nil {
		return err
	}
	wasm := filepath.Join(r.work, "dirtier.wasm")
	if err := copyFile(p, wasm); err != nil {
		return err
	}
	// The guest writes N/rounds pages, then sleeps 5 ms: with the time the
	// writes, the timer and the pauses take, about 3 such rounds fit an
	// epoch (measured: the table shows the dirty pages actually seen).
	const rounds = 3
	epoch := 25 * time.Millisecond
	type row struct {
		n   int
		raw bool
		res remusDirtyRun
		err error
	}
	var rows []row
	todo := []row{}
	for _, n := range r.s.dirty {
		todo = append(todo, row{n: n})
		if n == 1000 && r.raw {
			todo = append(todo, row{n: n, raw: true})
		}
	}
	for _, t := range todo {
		r.logf("remus: dirtier, %d pages per epoch (uncompressed %v)", t.n, t.raw)
		t.res, t.err = r.dirtyRun(ctx, wasm, t.n, rounds, epoch, t.raw)
		if t.err != nil {
			r.logf("remus: dirtier, %d pages (uncompressed %v): %v", t.n, t.raw, t.err)
		}
		rows = append(rows, t)
	}

	fmt.Fprintf(b, "### (d) Checkpoint pause vs dirty pages, protected at %s\n\n", epoch)
	fmt.Fprintf(b, "Guest: testdata/guests/dirtier (C), %d MiB of memory; it writes N/%d random pages, sleeps 5 ms, and again, "+
		"so that a 25 ms epoch dirties about N pages (the table gives the count actually seen). `ftvm run --protect 127.0.0.1:R --timeout %s --epoch %s --epoch-policy fixed "+
		"--api-sock P.sock dirtier.wasm %d N/%d 0 5000`, each N with a fresh backup. Once protected (from the guest's first host call, while its memory is small), with the backup's module compiled (`program_ready`), "+
		"and past the checkpoint that carries its growth to the full memory, every checkpoint of the next %s is taken from the primary's "+
		"`GET /checkpoints?since=SEQ` (its pause — the guest's whole stop: unwind, capture, rewind and the hand-off to the sender — and dirty pages, as the primary recorded them; polled every 200 ms, and it keeps the last 1,024): "+
		"**pause p50/p99** are over all of them (nearest rank); **p99 at ≤ %d pages** is over those that carried at most %d dirty pages, the target's "+
		"condition (an epoch that ran long carries more: **over %d** counts those). **/vm mean** = the change of `GET /vm`'s pause "+
		"total ÷ count over the same window (a cross-check). **Copied ahead** = the median of the pages of a checkpoint "+
		"copied before its pause, while the guest ran (after a checkpoint of 256 pages or more, the primary collects and copies "+
		"the next one's pages before asking for its pause, and the pause copies only those written after: README, "+
		"\"Copying ahead of the pause\"). **Floor** = memcpy of "+
		"the same number of random 4 KiB pages out of a 256 MiB buffer, measured here. A pause also carries the guest's "+
		"scratch and stack pages and the device state. (%d MiB, not the snapshot group's 256: with 256 MiB the first, "+
		"full, checkpoint often took longer than --timeout to encode, the backup dropped the session as silent and "+
		"the pair resynchronised, with `--uncompressed` without end.)\n\n", r.s.dirtyMiB, rounds, r.s.timeout, epoch, r.s.dirtyMiB, rounds,
		r.s.dirtyFor, targetPages, targetPages, targetPages, r.s.dirtyMiB)
	fmt.Fprintf(b, "| N | dirty pages/checkpoint (median) | copied ahead (median) | checkpoints | pause p50 | pause p99 | over %d pages | pause p99 at ≤ %d pages | /vm mean | memcpy floor | checkpoints/s | bytes/checkpoint | stalls | full resyncs | p99 ≤ 1 ms at ≤ %d pages |\n",
		targetPages, targetPages, targetPages)
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	var rawRow, s2Row *row // N = 1000, for (e)
	for i := range rows {
		x := &rows[i]
		if x.err != nil {
			raw := ""
			if x.raw {
				raw = " (--uncompressed)"
			}
			fmt.Fprintf(b, "| %d%s | **not measured:** %s |||||||||||||\n", x.n, raw, mdEscape(x.err.Error()))
			continue
		}
		if x.raw {
			rawRow = x
			continue
		}
		if x.n == 1000 {
			s2Row = x
		}
		dn := int(x.res.pages.median())
		floor := memcpyFloor(dn, 50)
		p99 := x.res.pause.quantile(0.99)
		p99UpTo, ok := "—", "n/a"
		if len(x.res.pauseUpTo) > 0 {
			q := x.res.pauseUpTo.quantile(0.99)
			p99UpTo = fmtNsDur(q)
			if x.n <= targetPages {
				ok = "yes"
				if q > 1e6 {
					ok = "**no**"
				}
			}
		}
		fmt.Fprintf(b, "| %d | %s | %s | %d | %s | %s | %d | %s | %s | %s | %.0f | %s | %s | %d | %s |\n", x.n, fmtNum(x.res.pages.median()),
			fmtNum(x.res.ahead.median()), len(x.res.pause), fmtNsDur(x.res.pause.median()), fmtNsDur(p99), x.res.over, p99UpTo, fmtNsDur(x.res.meanPause),
			fmtNsDur(floor), x.res.cps, fmtBytes(x.res.bytesPerCP), fmtNum(x.res.stalls), x.res.resyncs, ok)
		if x.n == 1000 {
			r.summarize("Remus checkpoint pause at ~%d dirty pages per 25 ms epoch (a median %s of them copied ahead of the pause, while the guest ran): p50 %s, p99 %s over %d checkpoints; p99 %s over the %d that carried at most %d pages (target p99 ≤ 1 ms there; memcpy floor %s).",
				dn, fmtNum(x.res.ahead.median()), fmtNsDur(x.res.pause.median()), fmtNsDur(p99), len(x.res.pause), p99UpTo, len(x.res.pauseUpTo), targetPages, fmtNsDur(floor))
		}
	}
	missed := 0
	for _, x := range rows {
		missed += int(x.res.missed)
	}
	fmt.Fprintf(b, "\nCheckpoints of the windows that `GET /checkpoints` no longer kept when polled (so left out): %d.\n\n", missed)
	for _, x := range []*row{s2Row, rawRow} {
		if x != nil {
			r.comp = append(r.comp, compRow{workload: "dirtier, N = 1000, fixed 25 ms", raw: x.raw, bytes: x.res.bytesPerCP,
				cps: x.res.cps, pages: x.res.pages.median(), pause: x.res.meanPause, tput: "—"})
		}
	}
	return nil
}

// targetPages is the dirty-page count (d)'s target holds at.
const targetPages = 1000

func (r *remusEnv) dirtyRun(ctx context.Context, wasm string, n, rounds int, epoch time.Duration, raw bool) (remusDirtyRun, error) {
	var out remusDirtyRun
	bk, err := r.startBackup(ctx, r.s.timeout)
	if err != nil {
		return out, err
	}
	defer bk.stop()
	args := protectArgs(bk, r.s.timeout, epoch, "fixed", raw)
	per := max(1, n/rounds)
	args = append(args, wasm, strconv.Itoa(r.s.dirtyMiB), strconv.Itoa(per), "0", "5000")
	p, err := r.startPrimary(ctx, args...)
	if err != nil {
		return out, err
	}
	defer p.stop()
	if err := waitProtected(p, 30*time.Second); err != nil {
		return out, err
	}
	if err := waitProgramReady(bk, 60*time.Second); err != nil {
		return out, err
	}
	// The guest is protected from its first host call, while its memory
	// is small; it then grows to its size and writes all of it, which the
	// next checkpoint carries whole. The window starts past that one.
	if err := waitSettled(p.sock, uint64(r.s.dirtyMiB)<<20, 30*time.Second); err != nil {
		return out, err
	}
	time.Sleep(200 * time.Millisecond) // past the next few incremental checkpoints
	st0, err := primaryStatus(p.sock)
	if err != nil {
		return out, err
	}
	ps0, err := vmPauses(p.sock)
	if err != nil {
		return out, err
	}
	t0 := time.Now()
	since := st0.Checkpoints
	polls, failed := 0, 0
	var lastErr error
	for done := false; !done; {
		time.Sleep(200 * time.Millisecond)
		done = time.Since(t0) >= r.s.dirtyFor
		polls++
		var list remus.CheckpointsList
		if err := apiGet(p.sock, fmt.Sprintf("/checkpoints?since=%d", since), &list); err != nil {
			failed++
			lastErr = err
			continue
		}
		out.missed += list.Missed
		for _, c := range list.Checkpoints {
			since = c.Seq
			out.pause = append(out.pause, c.PauseUS*1000)
			out.pages = append(out.pages, float64(c.DirtyPages))
			out.ahead = append(out.ahead, float64(c.AheadPages))
			if c.DirtyPages <= targetPages {
				out.pauseUpTo = append(out.pauseUpTo, c.PauseUS*1000)
			} else {
				out.over++
			}
		}
	}
	st1, err := primaryStatus(p.sock)
	if err != nil {
		return out, err
	}
	ps1, err := vmPauses(p.sock)
	if err != nil {
		return out, err
	}
	el := time.Since(t0).Seconds()
	if st1.State != "protected" {
		r.logf("remus: dirtier, %d pages: the primary's log ends:\n%s\nthe backup's:\n%s", n, logTail(p.child), logTail(bk.child))
		return out, fmt.Errorf("the primary is no longer protected: %q %s", st1.State, st1.Reason)
	}
	if len(out.pause) == 0 {
		return out, fmt.Errorf("no checkpoint listed: %d polls, %d failed (%v), checkpoints %d → %d in %.1f s",
			polls, failed, lastErr, st0.Checkpoints, st1.Checkpoints, el)
	}
	nc := float64(st1.Checkpoints - st0.Checkpoints)
	out.cps = nc / el
	if nc > 0 {
		out.bytesPerCP = float64(st1.BytesSent-st0.BytesSent) / nc
	}
	if dn := ps1.Count - ps0.Count; dn > 0 {
		out.meanPause = float64((ps1.Total - ps0.Total).Nanoseconds()) / float64(dn)
	}
	out.stalls = float64(st1.Stalls - st0.Stalls)
	out.resyncs = st1.FullCheckpoints - st0.FullCheckpoints
	return out, nil
}

// waitSettled waits until the VM's memory has reached size and the
// primary has taken two checkpoints since (the first of them carries the
// growth).
func waitSettled(sock string, size uint64, within time.Duration) error {
	deadline := time.Now().Add(within)
	for ; time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		info, err := apiClient(sock).Info(ctx)
		cancel()
		if err != nil || info.MemoryBytes < size {
			continue
		}
		st, err := primaryStatus(sock)
		if err != nil {
			continue
		}
		for from := st.Checkpoints; time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if st, err := primaryStatus(sock); err == nil && st.Checkpoints >= from+2 {
				return nil
			}
		}
	}
	return fmt.Errorf("the guest's memory did not reach %d MiB and two checkpoints within %v", size>>20, within)
}

// remusCompression writes (e) from the rows the KV and dirtier steps left.
func remusCompression(ctx context.Context, r *remusEnv, b *strings.Builder) error {
	fmt.Fprintf(b, "### (e) Bytes replicated per checkpoint, with and without compression\n\n")
	if !r.raw {
		return errors.New("this `ftvm run` has no --uncompressed flag (remus.PrimaryConfig.Uncompressed is not exposed)")
	}
	if len(r.comp) == 0 {
		return errors.New("no measurement to report (see (b) and (d))")
	}
	b.WriteString("Pages travel S2-compressed by default, and a page sent in one of the last checkpoints goes as a delta against that copy (the 8-byte words that differ from it, snapshot format version 4's sparse codec); `ftvm run --protect ... --uncompressed` sends them raw and whole. Rows from " +
		"the runs of (b) (KV guest under the throughput load, fixed policy at 25 ms, same starts and rounds) and of (d) " +
		"(dirtier, N = 1000). **Bytes/checkpoint** = the change of the primary's `bytes_replicated` (checkpoint framing " +
		"included) ÷ checkpoints taken over the run. The dirtier writes one random byte per page into otherwise " +
		"constant pages, so it compresses far better than real data: the KV rows are the realistic figure. Where the raw " +
		"stream cannot keep up, epochs stretch under back-pressure (`--max-inflight`) and checkpoints grow.\n\n")
	b.WriteString("| workload | pages | bytes/checkpoint | ÷ compressed | checkpoints/s | replicated/s | dirty pages/checkpoint (median) | mean pause | guest throughput |\n")
	b.WriteString("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
	base := map[string]float64{}
	for _, c := range r.comp {
		if !c.raw {
			base[c.workload] = c.bytes
		}
	}
	for _, c := range r.comp {
		how := "S2 and deltas (default)"
		if c.raw {
			how = "`--uncompressed`"
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s | %.0f | %s/s | %s | %s | %s |\n", c.workload, how, fmtBytes(c.bytes),
			fmtRatio(c.bytes, base[c.workload]), c.cps, fmtBytes(c.bytes*c.cps), fmtNum(c.pages), fmtNsDur(c.pause), c.tput)
		if c.raw && strings.HasPrefix(c.workload, "KV") {
			r.summarize("Remus, bytes per checkpoint (KV guest under load, fixed 25 ms): %s compressed vs %s with --uncompressed (S2 and deltas send %s fewer bytes).",
				fmtBytes(base[c.workload]), fmtBytes(c.bytes), fmtRatio(c.bytes, base[c.workload]))
		}
	}
	b.WriteString("\n")
	return nil
}

// --- (f) failover -------------------------------------------------------------

type remusFailRun struct {
	detect    float64 // seconds from kill -9 until the backup's status says failed-over
	connect   float64 // seconds from kill -9 to the first connection accepted
	total     float64 // seconds from kill -9 to the first good reply
	backupMS  float64 // the backup's own failover_ms
	probes    int
	committed uint64
}

func remusFailover(ctx context.Context, r *remusEnv, b *strings.Builder) error {
	wasm := filepath.Join(r.work, "kvserver.wasm")
	if _, err := os.Stat(wasm); err != nil {
		p, err := guest.Go("testdata/guests/kvserver")
		if err != nil {
			return err
		}
		if err := copyFile(p, wasm); err != nil {
			return err
		}
	}
	res := map[time.Duration][]remusFailRun{}
	for run := 0; run < r.s.failRuns; run++ {
		for i := range r.s.failTimeouts {
			to := r.s.failTimeouts[(i+run)%len(r.s.failTimeouts)]
			r.logf("remus: failover run %d/%d, timeout %s", run+1, r.s.failRuns, to)
			x, err := r.failoverRun(ctx, wasm, to)
			if err != nil {
				return fmt.Errorf("timeout %s: %w", to, err)
			}
			res[to] = append(res[to], x)
		}
	}
	fmt.Fprintf(b, "### (f) Failover: kill -9 of the primary to the first good reply\n\n")
	fmt.Fprintf(b, "`ftvm backup --listen 127.0.0.1:R --timeout T --api-sock B.sock ...` and `ftvm run --protect 127.0.0.1:R "+
		"--timeout T --listen 127.0.0.1:PORT kvserver.wasm` (default epoch 25 ms, output policy). Once the primary is "+
		"protected, the backup has compiled the module (`program_ready`) and a client has done a few requests, the "+
		"primary gets SIGKILL; from that instant a client dials 127.0.0.1:PORT and sends `GET`, retrying every "+
		"millisecond, until a reply arrives (the backup binds the same address), while another polls the backup's "+
		"`GET /status` every 2 ms for the slot's state to become failed-over. **Backup's failover_ms** is its own "+
		"figure from `GET /status`: from deciding the primary failed to the VM resumed (detection not included). "+
		"%d run(s) per timeout, interleaved.\n\n", r.s.failRuns)
	b.WriteString("| timeout T | kill → first reply p50 | max | T + 50 ms (target) | met | kill → backup status failed-over p50 | kill → first connection accepted p50 | backup's failover_ms p50 | committed checkpoint at failover |\n")
	b.WriteString("|---:|---:|---:|---:|---|---:|---:|---:|---:|\n")
	for _, to := range r.s.failTimeouts {
		xs := res[to]
		tot := sampleOf(xs, func(x remusFailRun) float64 { return x.total })
		bms := sampleOf(xs, func(x remusFailRun) float64 { return x.backupMS })
		cm := sampleOf(xs, func(x remusFailRun) float64 { return float64(x.committed) })
		target := (to + 50*time.Millisecond).Seconds()
		met := "yes"
		if tot.max() > target {
			met = "**no**"
			if tot.median() <= target {
				met = "p50 yes, max **no**"
			}
		}
		det := sampleOf(xs, func(x remusFailRun) float64 { return x.detect })
		con := sampleOf(xs, func(x remusFailRun) float64 { return x.connect })
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %.1f ms | %s |\n", to, fmtSeconds(tot.median()), fmtSeconds(tot.max()),
			fmtSeconds(target), met, fmtSeconds(det.median()), fmtSeconds(con.median()), bms.median(), fmtNum(cm.median()))
		r.summarize("Remus failover with --timeout %s: kill -9 of the primary to the first good reply p50 %s, max %s over %d runs "+
			"(target ≤ timeout + 50 ms = %s); the backup's own failover_ms p50 %.1f ms.", to, fmtSeconds(tot.median()),
			fmtSeconds(tot.max()), len(xs), fmtSeconds(target), bms.median())
	}
	b.WriteString("\n")
	return nil
}

func (r *remusEnv) failoverRun(ctx context.Context, wasm string, to time.Duration) (remusFailRun, error) {
	var out remusFailRun
	addr, err := freeAddr()
	if err != nil {
		return out, err
	}
	bk, err := r.startBackup(ctx, to)
	if err != nil {
		return out, err
	}
	defer bk.stop()
	p, err := r.startPrimary(ctx, "--protect", bk.addr, "--timeout", to.String(), "--listen", addr, wasm)
	if err != nil {
		return out, err
	}
	defer p.stop()
	if err := waitReady(ctx, addr, p.child, 120*time.Second); err != nil {
		return out, fmt.Errorf("%w; its output: %s", err, logTail(p.child))
	}
	if err := waitProtected(p, 60*time.Second); err != nil {
		return out, err
	}
	if err := waitProgramReady(bk, 60*time.Second); err != nil {
		return out, err
	}
	if err := populate(addr, 100); err != nil {
		return out, err
	}
	time.Sleep(100 * time.Millisecond)

	t0 := time.Now()
	p.kill()
	detected := make(chan float64, 1)
	stopPoll := make(chan struct{})
	go func() { // when does the backup's status say it failed over?
		defer close(detected)
		for {
			select {
			case <-stopPoll:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if st, err := backupStatus(bk.sock); err == nil && len(st.Slots) == 1 && st.Slots[0].State == "failed-over" {
				detected <- time.Since(t0).Seconds()
				return
			}
		}
	}()
	defer close(stopPoll)
	limit := t0.Add(to + 20*time.Second)
	for {
		out.probes++
		connected, ok := kvProbe(addr, time.Until(limit))
		if connected && out.connect == 0 {
			out.connect = time.Since(t0).Seconds()
		}
		if ok {
			out.total = time.Since(t0).Seconds()
			break
		}
		if time.Now().After(limit) {
			return out, fmt.Errorf("no reply from %s %s after the kill; backup: %s", addr, time.Since(t0), logTail(bk.child))
		}
		time.Sleep(time.Millisecond)
	}
	st, err := backupStatus(bk.sock)
	if err != nil || len(st.Slots) != 1 {
		return out, fmt.Errorf("backup status after failover: %+v %v", st, err)
	}
	out.backupMS, out.committed = st.Slots[0].FailoverMS, st.Slots[0].Committed
	select {
	case d, ok := <-detected:
		if ok {
			out.detect = d
		}
	case <-time.After(time.Second):
	}
	if out.detect == 0 {
		out.detect = math.NaN()
	}
	return out, nil
}

// kvProbe dials addr and does one GET; it reports whether a valid reply
// came back. A connection accepted by the kernel is given until limit to
// answer: the reply comes once the resumed guest serves it.
func kvProbe(addr string, limit time.Duration) (connected, ok bool) {
	c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
	if err != nil {
		return false, false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(limit))
	if _, err := c.Write([]byte("GET k1\n")); err != nil {
		return true, false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return true, err == nil && okReply([]byte(line))
}
