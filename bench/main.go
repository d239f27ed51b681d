// Command bench is ftvm's benchmark harness, behind `make bench`: it measures
// ftvm against the same guests on wazero's own WASI (bench/wazerowasi) and
// against native builds of the same sources, side by side in one run, and
// writes the figures as Markdown with the machine facts, the physical floors
// and the command behind each table.
//
//	go run ./bench [-out BENCHMARKS.md] [-only cpu,calls,kv] [-quick] [-runs N] [-cpuprofile FILE]
//
// Groups:
//
//	cpu    CPU-bound guests (Go and C): run time, ftvm vs wazero vs native
//	calls  host-call overhead in ns per call, measured inside the guest
//	kv     the KV server guest: throughput, latency and idle CPU
//	snapshot  checkpoint pause vs dirty pages, restore time, dirty tracking
//	remus  Remus protection vs none: CPU and KV overhead, latency, pauses, failover
//
// Performance claims about ftvm come from this harness, never from timed tests.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
)

// env is what every group gets: the repository, a scratch directory, the
// binaries the harness built and the settings.
type env struct {
	root    string
	work    string
	cache   string // persistent compiled-code caches live under here
	quick   bool
	runs    int
	ftvmBin string // built from ./cmd/ftvm
	wzBin   string // built from ./bench/wazerowasi
	log     io.Writer
	// summary collects the groups' headline findings, computed from the
	// figures, for the report's summary section.
	summary []string
}

func (e *env) summarize(format string, a ...any) {
	e.summary = append(e.summary, fmt.Sprintf(format, a...))
}

func (e *env) logf(format string, a ...any) {
	fmt.Fprintf(e.log, "bench: "+format+"\n", a...)
}

// group is one benchmark group: it returns a Markdown section.
type group struct {
	name  string
	title string
	run   func(ctx context.Context, e *env) (string, error)
}

var groups = []group{
	{"cpu", "CPU-bound guests", runCPU},
	{"calls", "Host-call overhead", runCalls},
	{"kv", "KV server guest over loopback TCP", runKV},
	{"snapshot", "Checkpoints: pause, restore, dirty tracking", runSnapshot},
	{"remus", "Remus replication: overhead, latency, pauses, failover", runRemus},
}

func main() {
	out := flag.String("out", "-", "write the report here (- for stdout)")
	only := flag.String("only", "", "run only these groups (comma-separated: cpu,calls,kv,snapshot,remus)")
	quick := flag.Bool("quick", false, "fast smoke run: fewer runs, smaller counts")
	runs := flag.Int("runs", 0, "runs per measurement (default 5, 1 with -quick; the calls and kv groups and the CLI rows use at most 3)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the harness (and the in-process guests) here")
	flag.Parse()

	e := &env{quick: *quick, runs: *runs, log: os.Stderr}
	if e.runs <= 0 {
		e.runs = 5
		if e.quick {
			e.runs = 1
		}
	}
	selected := map[string]bool{}
	for _, n := range strings.Split(*only, ",") {
		if n = strings.TrimSpace(n); n != "" {
			selected[n] = true
		}
	}
	for n := range selected {
		if !knownGroup(n) {
			fatalf("-only %q: no such group (cpu, calls, kv, snapshot, remus)", n)
		}
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fatalf("%v", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatalf("%v", err)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	if err := run(context.Background(), e, selected, *only, *out); err != nil {
		pprof.StopCPUProfile()
		fatalf("%v", err)
	}
}

func knownGroup(n string) bool {
	for _, g := range groups {
		if g.name == n {
			return true
		}
	}
	return false
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	os.Exit(1)
}

func run(ctx context.Context, e *env, selected map[string]bool, only, out string) error {
	var err error
	if e.root, err = guest.Root(); err != nil {
		return err
	}
	if e.work, err = os.MkdirTemp("", "ftvm-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(e.work)
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	e.cache = filepath.Join(base, "ftvm", "bench")
	start := time.Now()
	meter := newCPUMeter()
	facts := machineFacts(e)

	var body strings.Builder
	for _, g := range groups {
		if len(selected) > 0 && !selected[g.name] {
			continue
		}
		e.logf("group %s", g.name)
		t0 := time.Now()
		gm := newCPUMeter()
		section, err := g.run(ctx, e)
		fmt.Fprintf(&body, "\n## %s\n\n", g.title)
		fmt.Fprintf(&body, "_Took %s; other processes used %.0f%% of the machine's CPU meanwhile._\n\n",
			time.Since(t0).Round(time.Second), 100*gm.foreign())
		if err != nil {
			e.logf("group %s failed: %v", g.name, err)
			fmt.Fprintf(&body, "**Not measured:** %s\n", mdEscape(err.Error()))
			continue
		}
		body.WriteString(section)
		e.logf("group %s took %s", g.name, time.Since(t0).Round(time.Second))
	}

	var doc strings.Builder
	doc.WriteString("# ftvm benchmarks\n\n")
	doc.WriteString("Written by the benchmark harness (bench/); do not edit by hand. ")
	doc.WriteString("Regenerate everything with `make bench` (`go run ./bench -out BENCHMARKS.md`), ")
	doc.WriteString("one group with `go run ./bench -only NAME` (cpu, calls, kv, snapshot, remus; prints to stdout), ")
	doc.WriteString("a fast smoke run with `go run ./bench -quick`.\n\n")
	doc.WriteString("Every table compares ftvm (wazero's compiler over ftvm's own device layer, package wasi; the module ")
	doc.WriteString("Asyncify-instrumented as `ftvm run` does by default, and as built with `--instrument=false`) with ")
	doc.WriteString("the same guest on wazero's own `wasi_snapshot_preview1` (bench/wazerowasi, real clocks, ")
	doc.WriteString("crypto/rand, `runtime.Gosched` for sched_yield, sockets through `experimental/sock`) ")
	doc.WriteString("and with a physical floor measured in the same run. Runs of the systems are interleaved ")
	doc.WriteString("so that load drifting on the machine hits them alike.\n\n")
	doc.WriteString(facts)
	mode := "full"
	if e.quick {
		mode = "quick (smoke run: small counts, figures are indicative only)"
	}
	fmt.Fprintf(&doc, "| run | %s; %d run(s) per measurement; groups: %s; took %s |\n",
		mode, e.runs, groupList(only), time.Since(start).Round(time.Second))
	busy := meter.foreign()
	fmt.Fprintf(&doc, "| other processes' CPU use during the run | %.0f%% of the machine (from /proc/stat, less the harness's own and its children's) |\n", 100*busy)
	if busy > 0.1 {
		doc.WriteString("\n**The machine was busy with other work during this run: absolute figures are inflated and noisy; ")
		doc.WriteString("the interleaved ratios are the meaningful part. Each group's share is given under its heading.**\n")
	}
	if len(e.summary) > 0 {
		doc.WriteString("\n## Summary\n\n")
		for _, line := range e.summary {
			fmt.Fprintf(&doc, "- %s\n", line)
		}
	}
	doc.WriteString(body.String())

	if out == "-" {
		_, err = os.Stdout.WriteString(doc.String())
		return err
	}
	if err := os.WriteFile(out, []byte(doc.String()), 0o644); err != nil {
		return err
	}
	e.logf("wrote %s in %s", out, time.Since(start).Round(time.Second))
	return nil
}

func groupList(only string) string {
	if only == "" {
		return "all"
	}
	return only
}

// buildBinaries builds ftvm and wazerowasi into the scratch directory, once;
// the groups that run them as commands call it.
func (e *env) buildBinaries() error {
	if e.ftvmBin != "" {
		return nil
	}
	e.logf("building ftvm and wazerowasi")
	ftvm, wz := filepath.Join(e.work, "ftvm"), filepath.Join(e.work, "wazerowasi")
	for _, b := range [][2]string{{ftvm, "./cmd/ftvm"}, {wz, "./bench/wazerowasi"}} {
		if err := goBuild(e, b[0], b[1], nil); err != nil {
			return err
		}
	}
	e.ftvmBin, e.wzBin = ftvm, wz
	return nil
}

// goBuild builds pkg (relative to the repository root) into out; extraEnv
// adds to the environment (e.g. GOOS).
func goBuild(e *env, out, pkg string, extraEnv []string) error {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = e.root
	cmd.Env = append(os.Environ(), extraEnv...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

// machineFacts is the report's header table.
func machineFacts(e *env) string {
	var b strings.Builder
	b.WriteString("| machine | |\n|---|---|\n")
	cpu, virt := cpuModel()
	fmt.Fprintf(&b, "| CPU | %s, %d logical CPUs (nproc)%s |\n", cpu, runtime.NumCPU(), virt)
	fmt.Fprintf(&b, "| memory | %s |\n", memTotal())
	fmt.Fprintf(&b, "| kernel | Linux %s |\n", readTrim("/proc/sys/kernel/osrelease"))
	fmt.Fprintf(&b, "| Go | %s %s/%s |\n", runtime.Version(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "| wazero | %s (compiler) |\n", moduleVersion("github.com/tetratelabs/wazero"))
	fmt.Fprintf(&b, "| C | %s (wasm32-wasi), %s (native) |\n", firstLine("clang", "--version"), firstLine("cc", "--version"))
	fmt.Fprintf(&b, "| ftvm | %s |\n", gitRev(e.root))
	fmt.Fprintf(&b, "| date | %s |\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "| load average at start | %s |\n", loadAvg())
	return b.String()
}

// loadAvg is the 1, 5 and 15 minute load averages.
func loadAvg() string {
	f := strings.Fields(readTrim("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() (string, string) {
	data, _ := os.ReadFile("/proc/cpuinfo")
	model, virt := "unknown CPU", ""
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			model = strings.TrimSpace(v)
		case "flags":
			if strings.Contains(" "+v+" ", " hypervisor ") {
				virt = "; virtual machine (cpuinfo flag `hypervisor`)"
			}
		}
	}
	return model, virt
}

func memTotal() string {
	data, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "MemTotal:") {
			var kb int64
			fmt.Sscanf(strings.TrimPrefix(line, "MemTotal:"), "%d", &kb)
			return fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func firstLine(name string, args ...string) string {
	b, err := exec.Command(name, args...).Output()
	if err != nil {
		return name + " (not found)"
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

func moduleVersion(path string) string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == path {
				return d.Version
			}
		}
	}
	return "unknown"
}

func gitRev(root string) string {
	cmd := exec.Command("git", "rev-parse", "--short", "HEAD")
	cmd.Dir = root
	b, err := cmd.Output()
	if err != nil {
		return "unknown revision"
	}
	rev := strings.TrimSpace(string(b))
	cmd = exec.Command("git", "status", "--porcelain", "--untracked-files=no")
	cmd.Dir = root
	if s, err := cmd.Output(); err == nil && len(strings.TrimSpace(string(s))) > 0 {
		rev += " + uncommitted changes"
	}
	return "commit " + rev
}

func mdEscape(s string) string {
	s = strings.ReplaceAll(s, "|", "\\|")
	return strings.ReplaceAll(s, "\n", " ")
}

// cpuMeter measures how much CPU other processes used while the harness
// ran: the machine's busy time (/proc/stat) minus this process's own and its
// waited-for children's (/proc/self/stat), as a share of all CPUs.
type cpuMeter struct {
	busy, own float64 // seconds
	at        time.Time
}

func newCPUMeter() cpuMeter {
	return cpuMeter{busy: machineBusy(), own: selfCPU(), at: time.Now()}
}

// foreign is the share (0..1) of the machine's CPU time used by other
// processes since the meter started.
func (m cpuMeter) foreign() float64 {
	wall := time.Since(m.at).Seconds() * float64(runtime.NumCPU())
	if wall <= 0 {
		return 0
	}
	other := (machineBusy() - m.busy) - (selfCPU() - m.own)
	return max(0, other/wall)
}

// machineBusy is the non-idle time of all CPUs, in seconds.
func machineBusy() float64 {
	data, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0
	}
	var total, idle float64
	for i, v := range f[1:] {
		if i >= 8 { // guest time is already counted in user
			break
		}
		var n float64
		fmt.Sscan(v, &n)
		total += n
		if i == 3 || i == 4 { // idle, iowait
			idle += n
		}
	}
	return (total - idle) / 100 // USER_HZ
}

// selfCPU is this process's CPU time plus its waited-for children's, in
// seconds.
func selfCPU() float64 {
	data, _ := os.ReadFile("/proc/self/stat")
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return 0
	}
	var t float64
	for _, v := range f[11:15] { // utime stime cutime cstime
		var n float64
		fmt.Sscan(v, &n)
		t += n
	}
	return t / 100
}
