package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ftvm/ftvm/internal/guest"
)

// cpuGuest is one CPU-bound workload in its wasm and native builds.
type cpuGuest struct {
	label  string
	wasm   string // path
	module []byte
	native string // path of the native binary
	// how each was built, for the report
	wasmBuild, nativeBuild string
}

func runCPU(ctx context.Context, e *env) (string, error) {
	// Scale 8 takes ~0.3 s natively and a few times that in wasm; the whole
	// group must fit the `make bench` budget.
	scale := 8
	if e.quick {
		scale = 1
	}
	cliRuns := min(e.runs, 3)
	if err := e.buildBinaries(); err != nil {
		return "", err
	}
	arg := strconv.Itoa(scale)
	var guests []*cpuGuest
	var notes []string

	// Go: testdata/guests/gocpu.
	if p, err := guest.Go("testdata/guests/gocpu"); err != nil {
		notes = append(notes, "Go guest not measured: "+err.Error())
	} else {
		g := &cpuGuest{label: "Go (testdata/guests/gocpu)", wasm: filepath.Join(e.work, "gocpu.wasm"),
			native:      filepath.Join(e.work, "gocpu-native"),
			wasmBuild:   "GOOS=wasip1 GOARCH=wasm go build",
			nativeBuild: "go build"}
		if g.module, err = os.ReadFile(p); err != nil {
			return "", err
		}
		if err := os.WriteFile(g.wasm, g.module, 0o644); err != nil {
			return "", err
		}
		if err := goBuild(e, g.native, "./testdata/guests/gocpu", []string{"GOOS=", "GOARCH=", "CGO_ENABLED=0"}); err != nil {
			notes = append(notes, "Go guest not measured: "+err.Error())
		} else {
			guests = append(guests, g)
		}
	}
	// C: testdata/guests/c/cpu.c.
	if p, err := guest.C("cpu", []string{"testdata/guests/c/cpu.c"}); err != nil {
		notes = append(notes, "C guest not measured: "+err.Error())
	} else {
		g := &cpuGuest{label: "C (testdata/guests/c/cpu.c)", wasm: filepath.Join(e.work, "cpu.wasm"),
			native:      filepath.Join(e.work, "cpu-native"),
			wasmBuild:   "clang --target=wasm32-wasi -O2",
			nativeBuild: "cc -O2"}
		if g.module, err = os.ReadFile(p); err != nil {
			return "", err
		}
		if err := os.WriteFile(g.wasm, g.module, 0o644); err != nil {
			return "", err
		}
		cmd := exec.Command("cc", "-O2", "-o", g.native, filepath.Join(e.root, "testdata/guests/c/cpu.c"))
		if b, err := cmd.CombinedOutput(); err != nil {
			notes = append(notes, fmt.Sprintf("C guest not measured: cc: %v\n%s", err, b))
		} else {
			guests = append(guests, g)
		}
	}
	if len(guests) == 0 {
		return "", fmt.Errorf("%s", strings.Join(notes, "; "))
	}

	ftvmCache := filepath.Join(e.cache, "ftvm-compiled")
	wzCache := filepath.Join(e.cache, "wazero-compiled")
	type key struct {
		g      *cpuGuest
		system string
	}
	times := map[key]sample{}
	outputs := map[key]map[string]bool{}
	record := func(k key, res runResult) {
		times[k] = append(times[k], res.elapsed.Seconds())
		if outputs[k] == nil {
			outputs[k] = map[string]bool{}
		}
		outputs[k][strings.TrimSpace(res.stdout)] = true
	}

	// Warm the instrumentation and compilation caches (and check the guests
	// run).
	for _, g := range guests {
		for _, system := range callSystems {
			e.logf("cpu: preparing %s on %s", g.label, system)
			if _, err := runSystem(ctx, e, system, guestRun{module: g.module, name: filepath.Base(g.wasm), args: []string{"1"}}); err != nil {
				return "", err
			}
		}
	}

	for _, g := range guests { // and with loop polls
		if _, err := runSystem(ctx, e, "ftvm-polls", guestRun{module: g.module, name: filepath.Base(g.wasm), args: []string{"1"}}); err != nil {
			return "", err
		}
	}
	systems := []string{"ftvm", "ftvm-noinst", "ftvm-polls", "wazero", "native", "ftvm-cli", "ftvm-noinst-cli", "wazero-cli"}
	for r := 0; r < e.runs; r++ {
		for _, g := range guests {
			// Rotate the order every run so drift hits all systems alike.
			for i := range systems {
				system := systems[(i+r)%len(systems)]
				if strings.HasSuffix(system, "-cli") && r >= cliRuns {
					continue
				}
				e.logf("cpu: %s run %d/%d on %s", g.label, r+1, e.runs, system)
				var res runResult
				var err error
				switch system {
				case "native":
					res, err = runNative(ctx, g.native, arg)
				case "ftvm-cli":
					res, err = runCLI(ctx, e.ftvmBin, "run", "--cache-dir", ftvmCache, g.wasm, arg)
				case "ftvm-noinst-cli":
					res, err = runCLI(ctx, e.ftvmBin, "run", "--instrument=false", "--cache-dir", ftvmCache, g.wasm, arg)
				case "wazero-cli":
					res, err = runCLI(ctx, e.wzBin, "-cache", wzCache, g.wasm, arg)
				default:
					res, err = runSystem(ctx, e, system, guestRun{module: g.module, name: filepath.Base(g.wasm), args: []string{arg}})
				}
				if err != nil {
					return "", err
				}
				record(key{g, system}, res)
			}
		}
	}

	// Asyncify's cost, measured in adjacent pairs: the machine's speed
	// steps by up to ×2 for seconds at a time, so the medians above, of
	// runs up to several seconds apart, can put one system's runs in a
	// slow phase and the other's in a fast one. Each round runs the
	// instrumented module, the uninstrumented one and the uninstrumented
	// one again (the A/A control: what drift alone makes of two identical
	// runs), back to back, the order of the first two alternating.
	pairRounds := max(e.runs, 9)
	if e.quick {
		pairRounds = 1
	}
	instPaired := map[*cpuGuest]sample{}
	aaPaired := map[*cpuGuest]sample{}
	for r := 0; r < pairRounds; r++ {
		for _, g := range guests {
			order := []string{"ftvm", "ftvm-noinst"}
			if r%2 == 1 {
				order = []string{"ftvm-noinst", "ftvm"}
			}
			order = append(order, "ftvm-noinst")
			got := map[string][]float64{}
			for _, system := range order {
				e.logf("cpu: %s pair %d/%d on %s", g.label, r+1, pairRounds, system)
				res, err := runSystem(ctx, e, system, guestRun{module: g.module, name: filepath.Base(g.wasm), args: []string{arg}})
				if err != nil {
					return "", err
				}
				record(key{g, system + "-pair"}, res)
				got[system] = append(got[system], res.elapsed.Seconds())
			}
			inst, plain := got["ftvm"][0], got["ftvm-noinst"]
			instPaired[g] = append(instPaired[g], inst/plain[0])
			aaPaired[g] = append(aaPaired[g], plain[1]/plain[0])
		}
	}

	var b strings.Builder
	b.WriteString("Command: `go run ./bench -only cpu` (part of `make bench`). ")
	fmt.Fprintf(&b, "Both guests compute the same four workloads (SHA-256 chain, integer matmul, sieve, n-body) at scale %s ", arg)
	b.WriteString("and print the same lines ending in a checksum; every run's output is compared with the native build's. ")
	fmt.Fprintf(&b, "%d run(s) per system, interleaved, rotating the order; median with min–max.\n\n", e.runs)
	b.WriteString("**Run time** is from instantiation to exit, in this process: compilation (and Asyncify instrumentation) ")
	b.WriteString("happen before the clock starts, from warmed caches. ftvm = package machine with `Instrument: true` ")
	fmt.Fprintf(&b, "(`machine.New`, timed `m.Run`: what `ftvm run GUEST.wasm %s` does by default); ", arg)
	b.WriteString("ftvm --instrument=false = the same without Asyncify (the module as built, as wazero runs it); ")
	fmt.Fprintf(&b, "wazero WASI = bench/internal/wzrun (`wazerowasi GUEST.wasm %s`); ", arg)
	fmt.Fprintf(&b, "native = the same source built natively, `./GUEST %s` timed from fork to exit as a child process.\n\n", arg)
	b.WriteString("| guest | ftvm | ftvm --instrument=false | wazero WASI | native (floor) | ftvm ÷ wazero | ftvm --instrument=false ÷ wazero | ftvm ÷ native | wazero ÷ native | output |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, g := range guests {
		f, u, w, n := times[key{g, "ftvm"}], times[key{g, "ftvm-noinst"}], times[key{g, "wazero"}], times[key{g, "native"}]
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", g.label,
			fmtSecRange(f), fmtSecRange(u), fmtSecRange(w), fmtSecRange(n),
			fmtRatio(f.median(), w.median()), fmtRatio(u.median(), w.median()),
			fmtRatio(f.median(), n.median()), fmtRatio(w.median(), n.median()),
			checkOutputs(func(s string) map[string]bool { return outputs[key{g, s}] },
				"ftvm", "ftvm-noinst", "wazero", "ftvm-cli", "ftvm-noinst-cli", "wazero-cli"))
	}
	fmt.Fprintf(&b, "\n**Asyncify's cost in adjacent pairs** (%d round(s); the issue's ≤ ×1.25): in each round, back to back, ", pairRounds)
	b.WriteString("the instrumented module (`ftvm`), the uninstrumented one (`ftvm --instrument=false`; the first two in alternating order) ")
	b.WriteString("and the uninstrumented one again. **Paired** = instrumented ÷ uninstrumented within the round; **A/A** = the second ")
	b.WriteString("uninstrumented run ÷ the first, the control: the spread that this machine's drift alone gives two identical runs. ")
	b.WriteString("Median (min–max) over the rounds. The medians of the table above, of runs up to several seconds apart, ")
	b.WriteString("are more exposed to the machine's slow phases than these.\n\n")
	b.WriteString("| guest | ftvm | ftvm --instrument=false | paired | A/A | output |\n|---|---:|---:|---:|---:|---|\n")
	for _, g := range guests {
		f, u := times[key{g, "ftvm-pair"}], times[key{g, "ftvm-noinst-pair"}]
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", g.label, fmtSecRange(f), fmtSecRange(u),
			fmtPaired(instPaired[g]), fmtPaired(aaPaired[g]),
			checkOutputs(func(s string) map[string]bool { return outputs[key{g, s}] }, "ftvm-pair", "ftvm-noinst-pair"))
		e.summarize("Asyncify's cost, %s, in %d adjacent pairs: %s paired, against %s for two "+
			"uninstrumented runs (A/A); target ≤ ×1.25.", g.label, len(instPaired[g]), fmtPaired(instPaired[g]),
			fmtPaired(aaPaired[g]))
	}
	fmt.Fprintf(&b, "\n**Whole process** (%d run(s) each), warm caches: wall time of the command from fork to exit, ", cliRuns)
	b.WriteString("i.e. run time plus process start, loading the instrumented module and the compiled code from their ")
	b.WriteString("caches, and teardown.\n\n")
	b.WriteString("| guest | command | wall time | ÷ native process |\n|---|---|---:|---:|\n")
	for _, g := range guests {
		n := times[key{g, "native"}]
		base := filepath.Base(g.wasm)
		rows := []struct{ cmd, system string }{
			{fmt.Sprintf("`ftvm run --cache-dir CACHE %s %s`", base, arg), "ftvm-cli"},
			{fmt.Sprintf("`ftvm run --instrument=false --cache-dir CACHE %s %s`", base, arg), "ftvm-noinst-cli"},
			{fmt.Sprintf("`wazerowasi -cache CACHE %s %s`", base, arg), "wazero-cli"},
			{fmt.Sprintf("`./%s %s` (%s)", filepath.Base(g.native), arg, g.nativeBuild), "native"},
		}
		for _, row := range rows {
			t := times[key{g, row.system}]
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.label, row.cmd, fmtSecRange(t), fmtRatio(t.median(), n.median()))
		}
	}
	b.WriteString("\n**Loop polls** (`ftvm run --loop-polls`): the same run with a safe point in every loop that calls or " +
		"contains a loop and a visit to the host in every other (machine/instrument/polls.go), so that a guest computing without host calls can still be " +
		"paused, checkpointed or stopped within about a millisecond; off by default because of this cost.\n\n")
	b.WriteString("| guest | ftvm | ftvm --loop-polls | ÷ ftvm | ftvm --instrument=false |\n|---|---:|---:|---:|---:|\n")
	for _, g := range guests {
		f, pl, u := times[key{g, "ftvm"}], times[key{g, "ftvm-polls"}], times[key{g, "ftvm-noinst"}]
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", g.label, fmtSecRange(f), fmtSecRange(pl),
			fmtRatio(pl.median(), f.median()), fmtSecRange(u))
		e.summarize("Loop polls (`--loop-polls`), %s: %s vs %s without (%s).", g.label, fmtSeconds(pl.median()),
			fmtSeconds(f.median()), fmtRatio(pl.median(), f.median()))
	}
	for _, g := range guests {
		f, u, w, n := times[key{g, "ftvm"}].median(), times[key{g, "ftvm-noinst"}].median(),
			times[key{g, "wazero"}].median(), times[key{g, "native"}].median()
		e.summarize("CPU-bound, %s: ftvm %s vs wazero's WASI %s (%s) and native %s (%s); "+
			"without Asyncify (`--instrument=false`) ftvm takes %s (%s wazero), so instrumentation costs %s.",
			g.label, fmtSeconds(f), fmtSeconds(w), fmtRatio(f, w), fmtSeconds(n), fmtRatio(f, n),
			fmtSeconds(u), fmtRatio(u, w), fmtRatio(f, u))
	}
	b.WriteString("\nBuilds: ")
	for i, g := range guests {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: wasm by `%s` (internal/guest), native by `%s`", g.label, g.wasmBuild, g.nativeBuild)
	}
	b.WriteString(".\n")
	for _, n := range notes {
		fmt.Fprintf(&b, "\n**%s**\n", mdEscape(n))
	}
	return b.String(), nil
}

// checkOutputs reports whether every run of each of systems printed exactly
// what the native build printed, naming the checksum.
func checkOutputs(of func(system string) map[string]bool, systems ...string) string {
	native := of("native")
	if len(native) != 1 {
		return "**native runs disagree**"
	}
	var want string
	for s := range native {
		want = s
	}
	for _, system := range systems {
		outs := of(system)
		if len(outs) != 1 || !outs[want] {
			return fmt.Sprintf("**%s output differs from native**", system)
		}
	}
	sum := "?"
	for _, line := range strings.Split(want, "\n") {
		if v, ok := strings.CutPrefix(line, "checksum: "); ok {
			sum = v
		}
	}
	return "identical in all runs, checksum " + sum
}
