package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/internal/guest"
)

// callGuest is one build of the callbench guest.
type callGuest struct {
	label  string // table title
	name   string // argv[0]
	module []byte
	// rows: the guest's benchmark name, how to show it, and its floor.
	rows []callRow
}

type callRow struct {
	bench string // name the guest prints
	label string
	floor string // key into the floors
	sink  string // "" or "discard" / "devnull": which run the figure comes from
}

// callSystems are the runtimes the callbench guests run on: ftvm as `ftvm
// run` runs it (Asyncify-instrumented), ftvm without instrumentation, and
// wazero's WASI.
var callSystems = []string{"ftvm", "ftvm-noinst", "wazero"}

// floor is a native operation measured in this process, the physical lower
// bound of a guest call.
type floor struct {
	key, label string
	op         func(n int) error
}

func runCalls(ctx context.Context, e *env) (string, error) {
	n := 300000
	rounds := min(e.runs, 3)
	if e.quick {
		n = 30000
	}
	dataDir := filepath.Join(e.work, "data")
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return "", err
	}
	small := filepath.Join(dataDir, "small.bin")
	blob := make([]byte, 64<<10)
	rand.Read(blob)
	if err := os.WriteFile(small, blob, 0o644); err != nil {
		return "", err
	}

	var guests []*callGuest
	var notes []string
	if mod, err := readModule(guest.C("callbench", []string{"testdata/guests/c/callbench.c"})); err != nil {
		notes = append(notes, "C callbench guest not measured: "+mdEscape(err.Error()))
	} else {
		guests = append(guests, &callGuest{label: "C guest, raw imports (testdata/guests/c/callbench.c)",
			name: "callbench.wasm", module: mod, rows: []callRow{
				{"clock_time_get(monotonic)", "clock_time_get(MONOTONIC)", "since", ""},
				{"clock_time_get(realtime)", "clock_time_get(REALTIME)", "now", ""},
				{"random_get(8B)", "random_get, 8 bytes", "rand", ""},
				{"args_sizes_get", "args_sizes_get", "nop", ""},
				{"sched_yield", "sched_yield", "gosched", ""},
				{"poll_oneoff(clock,0)", "poll_oneoff, one clock of 0 ns", "nop", ""},
				{"fd_write(1B,stdout)", "fd_write 1 byte, stdout = io.Discard", "nop", "discard"},
				{"fd_write(1B,stdout)", "fd_write 1 byte, stdout = /dev/null", "write", "devnull"},
				{"fd_pread(64B,file)", "fd_pread 64 bytes of a file (--dir)", "pread", ""},
				{"fd_read(64B,file)", "fd_read 64 bytes of a file (--dir)", "read", ""},
				{"path_open+fd_close", "path_open + fd_close of a file (--dir)", "openat", ""},
			}})
	}
	if mod, err := readModule(guest.Go("testdata/guests/callbench")); err != nil {
		notes = append(notes, "Go callbench guest not measured: "+mdEscape(err.Error()))
	} else {
		guests = append(guests, &callGuest{label: "Go guest (testdata/guests/callbench)",
			name: "callbench.wasm", module: mod, rows: []callRow{
				{"raw clock_time_get(monotonic)", "clock_time_get(MONOTONIC) via //go:wasmimport", "since", ""},
				{"raw random_get(8B)", "random_get 8 bytes via //go:wasmimport", "rand", ""},
				{"raw args_sizes_get", "args_sizes_get via //go:wasmimport", "nop", ""},
				{"time.Now", "time.Now() (2 clock_time_get)", "now", ""},
				{"crypto/rand.Read(8B)", "crypto/rand.Read, 8 bytes", "rand", ""},
				{"os.Stdout.Write(1B)", "os.Stdout.Write 1 byte, stdout = io.Discard", "nop", "discard"},
				{"os.Stdout.Write(1B)", "os.Stdout.Write 1 byte, stdout = /dev/null", "gowrite", "devnull"},
				{"File.ReadAt(64B)", "(*os.File).ReadAt 64 bytes", "goreadat", ""},
				{"File.Read(64B)", "(*os.File).Read 64 bytes", "goread", ""},
				{"os.Open+Close", "os.Open + Close", "goopen", ""},
			}})
	}
	if len(guests) == 0 {
		return "", fmt.Errorf("no callbench guest built: %s", strings.Join(notes, "; "))
	}

	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	defer devnull.Close()

	// results[guest][system][sink+bench] = ns per call, one per round.
	type key struct {
		g      *callGuest
		system string
		bench  string
	}
	results := map[key]sample{}
	args := []string{strconv.Itoa(n), "/data/small.bin"}
	dirs := [][2]string{{dataDir, "/data"}}
	// Warm the instrumentation and compilation caches.
	for _, g := range guests {
		for _, system := range callSystems {
			e.logf("calls: preparing %s on %s", g.label, system)
			if _, err := runSystem(ctx, e, system, guestRun{module: g.module, name: g.name, args: []string{"10"}, stdout: io.Discard}); err != nil {
				return "", err
			}
		}
	}
	// One guest run per row, system and round, with CALLBENCH_ONLY selecting
	// the row's benchmark, so that the systems alternate every few hundred
	// milliseconds and drifting load hits them alike.
	for r := 0; r < rounds; r++ {
		for _, g := range guests {
			e.logf("calls: %s round %d/%d", g.label, r+1, rounds)
			for ri, row := range g.rows {
				for i := range callSystems {
					system := callSystems[(i+r+ri)%len(callSystems)] // rotate the order
					gr := guestRun{module: g.module, name: g.name, args: args, dirs: dirs, stdout: io.Discard,
						env: []string{"CALLBENCH_ONLY=" + row.bench}}
					if row.sink == "devnull" {
						gr.stdout = devnull
					}
					res, err := runSystem(ctx, e, system, gr)
					if err != nil {
						return "", err
					}
					ns, ok := parseCallbench(res.stderr)[row.bench]
					if !ok {
						return "", fmt.Errorf("%s on %s: no result for %q in: %s", g.label, system, row.bench, tail(res.stderr))
					}
					k := key{g, system, row.bench}
					if row.sink != "" {
						k.bench = row.sink + " " + row.bench
					}
					results[k] = append(results[k], ns)
				}
			}
		}
	}

	e.logf("calls: native floors")
	floors, err := measureFloors(e, n, rounds, small)
	if err != nil {
		return "", err
	}

	var b strings.Builder
	fmt.Fprintf(&b, "Command: `go run ./bench -only calls` (part of `make bench`). ")
	fmt.Fprintf(&b, "Each guest loops over one call %d times (a tenth of that for poll_oneoff, path_open and os.Open) ", n)
	b.WriteString("and reports ns per call from the guest's monotonic clock around the loop, so instantiation and ")
	b.WriteString("compilation are excluded. The guest runs once per row, system and round (selecting the row with ")
	b.WriteString("CALLBENCH_ONLY), in this process, through package machine (what ")
	fmt.Fprintf(&b, "`ftvm run --dir DATA:/data callbench.wasm %d /data/small.bin` does) and through bench/internal/wzrun ", n)
	fmt.Fprintf(&b, "(`wazerowasi -dir DATA:/data callbench.wasm %d /data/small.bin`), stdout on `io.Discard` ", n)
	fmt.Fprintf(&b, "(or /dev/null where the row says so), the systems alternating row by row; figures are the median of %d round(s), ", rounds)
	b.WriteString("min–max in brackets. All figures in ns per call. \"ftvm\" is the module Asyncify-instrumented, as `ftvm run` ")
	b.WriteString("runs it by default; \"ftvm --instrument=false\" the module as built, like wazero's, so that its ratio is the ")
	b.WriteString("device layer's cost alone. The floor is the same operation done natively in Go in this process ")
	b.WriteString("(see the floors table); for calls that need no OS work the floor is wazero's bare cost of calling ")
	b.WriteString("a no-op Go host function.\n")
	for _, g := range guests {
		fmt.Fprintf(&b, "\n### %s\n\n", g.label)
		b.WriteString("| call | ftvm | ftvm --instrument=false | wazero WASI | ftvm ÷ wazero | ftvm --instrument=false ÷ wazero | floor | ftvm ÷ floor |\n")
		b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, row := range g.rows {
			bench := row.bench
			if row.sink != "" {
				bench = row.sink + " " + bench
			}
			f := results[key{g, "ftvm", bench}]
			u := results[key{g, "ftvm-noinst", bench}]
			w := results[key{g, "wazero", bench}]
			fl := floors[row.floor]
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s (%s) | %s |\n", row.label, fmtRange(f), fmtRange(u), fmtRange(w),
				fmtRatio(f.median(), w.median()), fmtRatio(u.median(), w.median()),
				fmtNs(fl.ns.median()), fl.label, fmtRatio(f.median(), fl.ns.median()))
		}
	}

	// Headline: the pure calls of the first guest (the C one when built).
	g := guests[0]
	med := func(system, bench string) float64 { return results[key{g, system, bench}].median() }
	var rf, ru, extra sample
	for _, bench := range []string{"clock_time_get(monotonic)", "clock_time_get(realtime)", "random_get(8B)",
		"args_sizes_get", "discard fd_write(1B,stdout)", "raw clock_time_get(monotonic)", "raw random_get(8B)",
		"raw args_sizes_get"} {
		f, u, w := med("ftvm", bench), med("ftvm-noinst", bench), med("wazero", bench)
		if f > 0 && u > 0 && w > 0 {
			rf, ru, extra = append(rf, f/w), append(ru, u/w), append(extra, u-w)
		}
	}
	if len(rf) > 0 {
		layer := "ftvm's device layer adds no measurable cost per call"
		if x := extra.median(); x > 5 {
			layer = fmt.Sprintf("ftvm's device layer adds about %s ns per call", fmtNs(x))
		}
		e.summarize("Host calls (%s, calls that do no I/O, median over %d calls): ftvm costs %s wazero's WASI per call, "+
			"%s without Asyncify instrumentation (`--instrument=false`): %s.",
			g.label, len(rf), fmtRatio(rf.median(), 1), fmtRatio(ru.median(), 1), layer)
	}
	if f, w := med("ftvm-noinst", "poll_oneoff(clock,0)"), med("wazero", "poll_oneoff(clock,0)"); f > 0 && w > 0 && f/w > 2 {
		e.summarize("poll_oneoff with a single 0 ns clock costs %s ns on ftvm (uninstrumented) vs %s ns on wazero's WASI: "+
			"worth a look (an expired clock alone needs no system call).", fmtNs(f), fmtNs(w))
	}
	var fr sample
	for _, bench := range []string{"fd_pread(64B,file)", "fd_read(64B,file)", "path_open+fd_close"} {
		if f, w := med("ftvm", bench), med("wazero", bench); f > 0 && w > 0 {
			fr = append(fr, f/w)
		}
	}
	if len(fr) > 0 {
		note := ""
		if fr.max() < 1.3 {
			note = ": the syscall dominates"
		}
		e.summarize("File calls (fd_pread, fd_read, path_open+fd_close on a --dir file): ftvm ÷ wazero's WASI %s–%s%s.",
			fmtRatio(fr.min(), 1), fmtRatio(fr.max(), 1), note)
	}

	b.WriteString("\n### Floors (native, this process)\n\n")
	b.WriteString("| operation | ns/op |\n|---|---:|\n")
	for _, k := range floorOrder {
		fl := floors[k]
		fmt.Fprintf(&b, "| %s | %s |\n", fl.label, fmtRange(fl.ns))
	}
	for _, note := range notes {
		fmt.Fprintf(&b, "\n**%s**\n", note)
	}
	return b.String(), nil
}

func fmtRange(s sample) string {
	if len(s) == 0 {
		return "—"
	}
	if len(s) == 1 {
		return fmtNs(s[0])
	}
	return fmt.Sprintf("%s (%s–%s)", fmtNs(s.median()), fmtNs(s.min()), fmtNs(s.max()))
}

// parseCallbench reads "callbench NAME NS CALLS" lines.
func parseCallbench(out string) map[string]float64 {
	m := map[string]float64{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[0] != "callbench" {
			continue
		}
		ns, err := strconv.ParseFloat(f[len(f)-2], 64)
		if err != nil {
			continue
		}
		m[strings.Join(f[1:len(f)-2], " ")] = ns
	}
	return m
}

type floorResult struct {
	label string
	ns    sample
}

var floorOrder = []string{"nop", "nopterm", "spin", "spinterm", "getpid", "since", "now", "rand", "gosched", "write", "gowrite",
	"pread", "read", "goreadat", "goread", "openat", "goopen"}

// measureFloors times the native operations, n times each (a tenth for
// opens), rounds times.
func measureFloors(e *env, n, rounds int, small string) (map[string]floorResult, error) {
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	dnfd := int(devnull.Fd())
	f, err := os.Open(small)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ffd := int(f.Fd())
	dir, err := os.Open(filepath.Dir(small))
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	dirfd := int(dir.Fd())
	base := filepath.Base(small)
	buf := make([]byte, 64)
	one := []byte{'x'}
	var sinkI int64

	var loops [4]*loopCaller
	for i, m := range [][]byte{nopModule, nopModule, spinModule, spinModule} {
		if loops[i], err = newLoopCaller(m, i%2 == 1); err != nil {
			return nil, err
		}
		defer loops[i].close()
	}

	list := []floor{
		{"nop", "wazero → no-op Go host function (api.GoModuleFunc), per call", loops[0].call},
		{"nopterm", "the same with wazero's `WithCloseOnContextDone(true)` checks", loops[1].call},
		{"spin", "empty wasm loop, per iteration", func(n int) error { return loops[2].call(10 * n) }},
		{"spinterm", "empty wasm loop with wazero's `WithCloseOnContextDone(true)` checks (an exit to Go per iteration)", func(n int) error { return loops[3].call(10 * n) }},
		{"getpid", "getpid(2), a plain syscall", func(n int) error {
			for i := 0; i < n; i++ {
				syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0)
			}
			return nil
		}},
		{"since", "time.Since (vDSO clock_gettime MONOTONIC)", func(n int) error {
			t0 := time.Now()
			for i := 0; i < n; i++ {
				sinkI += int64(time.Since(t0))
			}
			return nil
		}},
		{"now", "time.Now (vDSO clock_gettime)", func(n int) error {
			for i := 0; i < n; i++ {
				sinkI += time.Now().UnixNano()
			}
			return nil
		}},
		{"rand", "crypto/rand.Read, 8 bytes", func(n int) error {
			var r [8]byte
			for i := 0; i < n; i++ {
				if _, err := rand.Read(r[:]); err != nil {
					return err
				}
			}
			return nil
		}},
		{"gosched", "runtime.Gosched", func(n int) error {
			for i := 0; i < n; i++ {
				runtime.Gosched()
			}
			return nil
		}},
		{"write", "write(2) 1 byte to /dev/null", func(n int) error {
			for i := 0; i < n; i++ {
				if _, err := unix.Write(dnfd, one); err != nil {
					return err
				}
			}
			return nil
		}},
		{"gowrite", "(*os.File).Write 1 byte to /dev/null", func(n int) error {
			for i := 0; i < n; i++ {
				if _, err := devnull.Write(one); err != nil {
					return err
				}
			}
			return nil
		}},
		{"pread", "pread(2) 64 bytes", func(n int) error {
			for i := 0; i < n; i++ {
				if _, err := unix.Pread(ffd, buf, 0); err != nil {
					return err
				}
			}
			return nil
		}},
		{"read", "read(2) 64 bytes, lseek at end of file", func(n int) error {
			for i := 0; i < n; i++ {
				m, err := unix.Read(ffd, buf)
				if err != nil {
					return err
				}
				if m == 0 {
					if _, err := unix.Seek(ffd, 0, 0); err != nil {
						return err
					}
				}
			}
			return nil
		}},
		{"goreadat", "(*os.File).ReadAt 64 bytes", func(n int) error {
			for i := 0; i < n; i++ {
				if _, err := f.ReadAt(buf, 0); err != nil {
					return err
				}
			}
			return nil
		}},
		{"goread", "(*os.File).Read 64 bytes, Seek at end of file", func(n int) error {
			for i := 0; i < n; i++ {
				if _, err := f.Read(buf); err == io.EOF {
					if _, err := f.Seek(0, io.SeekStart); err != nil {
						return err
					}
				} else if err != nil {
					return err
				}
			}
			return nil
		}},
		{"openat", "openat(2) + close(2)", func(n int) error {
			for i := 0; i < n/10; i++ {
				fd, err := unix.Openat(dirfd, base, unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					return err
				}
				unix.Close(fd)
			}
			return nil
		}},
		{"goopen", "os.Open + Close", func(n int) error {
			for i := 0; i < n/10; i++ {
				g, err := os.Open(small)
				if err != nil {
					return err
				}
				g.Close()
			}
			return nil
		}},
	}
	out := map[string]floorResult{}
	for r := 0; r < rounds; r++ {
		for _, fl := range list {
			t0 := time.Now()
			if err := fl.op(n); err != nil {
				return nil, fmt.Errorf("floor %s: %w", fl.label, err)
			}
			el := time.Since(t0)
			calls := n
			switch fl.key {
			case "openat", "goopen":
				calls = n / 10
			case "spin", "spinterm":
				calls = 10 * n
			}
			res := out[fl.key]
			res.label = fl.label
			res.ns = append(res.ns, float64(el.Nanoseconds())/float64(calls))
			out[fl.key] = res
		}
	}
	_ = sinkI
	return out, nil
}

// nopModule imports env.nop () -> () and exports loop(n i32), which calls
// nop n times:
//
//	(module
//	  (import "env" "nop" (func $nop))
//	  (func (export "loop") (param i32)
//	    (block (loop
//	      (br_if 1 (i32.eqz (local.get 0)))
//	      (call $nop)
//	      (local.set 0 (i32.sub (local.get 0) (i32.const 1)))
//	      (br 0)))))
var nopModule = []byte{
	0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
	0x01, 0x08, 0x02, 0x60, 0x00, 0x00, 0x60, 0x01, 0x7f, 0x00, // types: ()->(), (i32)->()
	0x02, 0x0b, 0x01, 0x03, 'e', 'n', 'v', 0x03, 'n', 'o', 'p', 0x00, 0x00, // import env.nop
	0x03, 0x02, 0x01, 0x01, // one function of type 1
	0x07, 0x08, 0x01, 0x04, 'l', 'o', 'o', 'p', 0x00, 0x01, // export "loop"
	0x0a, 0x1a, 0x01, 0x18, 0x00, // code: one body of 24 bytes, no locals
	0x02, 0x40, 0x03, 0x40, // block, loop
	0x20, 0x00, 0x45, 0x0d, 0x01, // local.get 0, i32.eqz, br_if 1
	0x10, 0x00, // call 0
	0x20, 0x00, 0x41, 0x01, 0x6b, 0x21, 0x00, // local.get 0, i32.const 1, i32.sub, local.set 0
	0x0c, 0x00, 0x0b, 0x0b, 0x0b, // br 0, end, end, end
}

// spinModule exports loop(n i32), which counts n down and does nothing else:
//
//	(module
//	  (func (export "loop") (param i32)
//	    (block (loop
//	      (br_if 1 (i32.eqz (local.get 0)))
//	      (local.set 0 (i32.sub (local.get 0) (i32.const 1)))
//	      (br 0)))))
var spinModule = []byte{
	0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
	0x01, 0x05, 0x01, 0x60, 0x01, 0x7f, 0x00, // types: (i32)->()
	0x03, 0x02, 0x01, 0x00, // one function of type 0
	0x07, 0x08, 0x01, 0x04, 'l', 'o', 'o', 'p', 0x00, 0x00, // export "loop"
	0x0a, 0x18, 0x01, 0x16, 0x00, // code: one body of 22 bytes, no locals
	0x02, 0x40, 0x03, 0x40, // block, loop
	0x20, 0x00, 0x45, 0x0d, 0x01, // local.get 0, i32.eqz, br_if 1
	0x20, 0x00, 0x41, 0x01, 0x6b, 0x21, 0x00, // local.get 0, i32.const 1, i32.sub, local.set 0
	0x0c, 0x00, 0x0b, 0x0b, 0x0b, // br 0, end, end, end
}

// loopCaller runs a module's loop(n) export; term compiles it with
// WithCloseOnContextDone(true).
type loopCaller struct {
	rt   wazero.Runtime
	loop api.Function
}

func newLoopCaller(module []byte, term bool) (*loopCaller, error) {
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigCompiler().WithCloseOnContextDone(term))
	_, err := rt.NewHostModuleBuilder("env").NewFunctionBuilder().
		WithGoModuleFunction(api.GoModuleFunc(func(context.Context, api.Module, []uint64) {}), nil, nil).
		Export("nop").Instantiate(ctx)
	if err != nil {
		rt.Close(ctx)
		return nil, err
	}
	mod, err := rt.Instantiate(ctx, module)
	if err != nil {
		rt.Close(ctx)
		return nil, fmt.Errorf("loop module: %w", err)
	}
	return &loopCaller{rt: rt, loop: mod.ExportedFunction("loop")}, nil
}

func (c *loopCaller) call(n int) error {
	_, err := c.loop.Call(context.Background(), uint64(n))
	return err
}

func (c *loopCaller) close() { c.rt.Close(context.Background()) }
