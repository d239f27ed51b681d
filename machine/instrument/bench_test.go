package instrument_test

import (
	"bytes"
	"context"
	"flag"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/machine"
)

var (
	benchScale = flag.Int("cpuscale", 4, "scale argument of the CPU-bound benchmark guests")
	variants   = flag.String("variants", "", "comma-separated instrumented builds of the -variants-of guest, for BenchmarkVariants")
	variantsOf = flag.String("variants-of", "go", "the guest -variants are builds of: go (testdata/guests/gocpu) or c (testdata/guests/c/cpu.c)")
)

type cpuBench struct {
	name       string
	orig, inst []byte
	args       []string
}

// cpuBenches builds the CPU-bound Go and C guests and their instrumented
// versions, and checks that both builds print the same.
func cpuBenches(b *testing.B) []cpuBench {
	var benches []cpuBench
	for _, g := range []struct {
		name string
		mod  func(testing.TB) []byte
	}{
		{"go", func(t testing.TB) []byte { return goGuest(t, "testdata/guests/gocpu") }},
		{"c", func(t testing.TB) []byte { return cGuest(t, "cpu", "testdata/guests/c/cpu.c") }},
	} {
		orig := g.mod(b)
		c := cpuBench{name: g.name, orig: orig, inst: instrumentCached(b, orig).Module,
			args: []string{strconv.Itoa(*benchScale)}}
		// These runs also fill the compilation cache, so that compiling is
		// not part of any timed run.
		want := run(b, c.orig, "", c.args...)
		if got := run(b, c.inst, "", c.args...); got != want {
			b.Fatalf("%s: instrumented output differs:\n%+v\nwant\n%+v", g.name, got, want)
		}
		benches = append(benches, c)
	}
	return benches
}

// runTimed runs a guest under the machine and returns the wall and CPU time
// of the run alone: machine.New (compilation, from the warm cache) is not
// included. The CPU time is that of the thread running the guest, which
// other processes on a shared machine disturb much less than wall time.
func runTimed(b *testing.B, mod []byte, args []string) (wall, cpu time.Duration) {
	var out bytes.Buffer
	m, err := machine.New(context.Background(), machine.Config{Module: mod, Name: "bench",
		Args: args, Stdout: &out, Stderr: &out})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close(context.Background())
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0, t0 := threadCPU(), time.Now()
	code, err := m.Run(context.Background())
	wall, cpu = time.Since(t0), threadCPU()-c0
	if err != nil || code != 0 {
		b.Fatalf("code %d err %v: %s", code, err, out.String())
	}
	return wall, cpu
}

// BenchmarkCPU times the CPU-bound Go and C guests, original and
// instrumented, under the machine. module-bytes is the binary's size.
func BenchmarkCPU(b *testing.B) {
	for _, c := range cpuBenches(b) {
		for _, v := range []struct {
			name string
			mod  []byte
		}{{"original", c.orig}, {"instrumented", c.inst}} {
			b.Run(c.name+"/"+v.name, func(b *testing.B) {
				b.ReportMetric(float64(len(v.mod)), "module-bytes")
				b.StopTimer()
				var wall, cpu time.Duration
				for i := 0; i < b.N; i++ {
					w, c := runTimed(b, v.mod, c.args)
					wall, cpu = wall+w, cpu+c
				}
				b.ReportMetric(float64(wall.Nanoseconds())/float64(b.N), "ns/op")
				b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
			})
		}
	}
}

// BenchmarkOverhead measures Asyncify's run-time cost directly: each
// iteration runs the original and the instrumented guest back to back (in
// alternating order), so both see the same load, and the metrics are the
// median of the per-pair CPU-time ratios and the ratio of the fastest runs.
func BenchmarkOverhead(b *testing.B) {
	for _, c := range cpuBenches(b) {
		b.Run(c.name, func(b *testing.B) { benchPairs(b, c.orig, c.inst, c.args) })
	}
}

// BenchmarkVariants is BenchmarkOverhead for other instrumentations of a
// guest (made by hand with wasm-opt, see RESULTS.md), listed with -variants.
func BenchmarkVariants(b *testing.B) {
	if *variants == "" {
		b.Skip("no -variants given")
	}
	orig := goGuest(b, "testdata/guests/gocpu")
	if *variantsOf == "c" {
		orig = cGuest(b, "cpu", "testdata/guests/c/cpu.c")
	}
	args := []string{strconv.Itoa(*benchScale)}
	want := run(b, orig, "", args...)
	for _, path := range strings.Split(*variants, ",") {
		v := readGuest(b, path)
		if got := run(b, v, "", args...); got != want {
			b.Fatalf("%s: output differs:\n%+v\nwant\n%+v", path, got, want)
		}
		b.Run(filepath.Base(path), func(b *testing.B) {
			b.ReportMetric(float64(len(v)), "module-bytes")
			benchPairs(b, orig, v, args)
		})
	}
}

func benchPairs(b *testing.B, orig, inst []byte, args []string) {
	b.StopTimer()
	var ratios []float64
	var wall time.Duration
	minOrig, minInst := time.Duration(1<<62), time.Duration(1<<62)
	for i := 0; i < b.N; i++ {
		var o, n, wo, wn time.Duration
		if i%2 == 0 {
			wo, o = runTimed(b, orig, args)
			wn, n = runTimed(b, inst, args)
		} else {
			wn, n = runTimed(b, inst, args)
			wo, o = runTimed(b, orig, args)
		}
		wall += wo + wn
		ratios = append(ratios, float64(n)/float64(o))
		minOrig, minInst = min(minOrig, o), min(minInst, n)
	}
	sort.Float64s(ratios)
	b.ReportMetric(float64(wall.Nanoseconds())/float64(b.N), "ns/op") // one pair
	b.ReportMetric(100*(ratios[len(ratios)/2]-1), "median-overhead-%")
	b.ReportMetric(100*(float64(minInst)/float64(minOrig)-1), "best-overhead-%")
	b.ReportMetric(float64(minOrig.Nanoseconds()), "best-original-cpu-ns")
	b.ReportMetric(float64(minInst.Nanoseconds()), "best-instrumented-cpu-ns")
}

// threadCPU is the CPU time the calling thread has used. wazero runs the
// guest on the calling goroutine, so with the goroutine locked to its thread
// this is the guest's CPU time (plus its host calls).
func threadCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
