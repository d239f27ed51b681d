// Command ftvm runs WASI programs in a VM whose whole state it owns.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"runtime/trace"
	"time"

	"github.com/ftvm/ftvm/internal/sysmon"
	"github.com/ftvm/ftvm/machine"
)

func main() {
	// Garbage collection must not stop the world while a guest computes:
	// the stop would wait for its next host call, freezing heartbeats and
	// every other goroutine (machine.CollectAtSafePoints).
	machine.CollectAtSafePoints()
	relaxMonitor()
	// FTVM_CPUPROFILE=FILE writes a CPU profile of this process (for
	// finding where replication spends its time), FTVM_TRACE=FILE a Go
	// execution trace (for what its goroutines wait for: a guest short of
	// input, a hand-off waiting for a core).
	stop, err := startProfiling(os.Getenv("FTVM_CPUPROFILE"), os.Getenv("FTVM_TRACE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "ftvm:", err)
		os.Exit(125)
	}
	code := execute(os.Args[1:])
	stop()
	os.Exit(code)
}

// startProfiling starts what the profiling variables ask for (either may be
// empty) and returns what stops them and writes the files out.
func startProfiling(cpuPath, tracePath string) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for _, s := range stops {
			s()
		}
	}
	for _, p := range []struct {
		name, path string
		start      func(io.Writer) error
		end        func()
	}{
		{"FTVM_CPUPROFILE", cpuPath, pprof.StartCPUProfile, pprof.StopCPUProfile},
		{"FTVM_TRACE", tracePath, trace.Start, trace.Stop},
	} {
		if p.path == "" {
			continue
		}
		f, err := os.Create(p.path)
		if err == nil {
			if err = p.start(f); err != nil {
				f.Close()
			}
		}
		if err != nil {
			stop()
			return nil, fmt.Errorf("%s: %w", p.name, err)
		}
		stops = append(stops, func() { p.end(); f.Close() })
	}
	return stop, nil
}

// relaxMonitor lengthens the Go runtime monitor's sleeps (package sysmon):
// FTVM_SYSMON_SLACK sets the slack (a duration; "off" leaves the monitor
// alone).
func relaxMonitor() {
	v := os.Getenv("FTVM_SYSMON_SLACK")
	if v == "off" {
		return
	}
	d, err := time.ParseDuration(v)
	if v != "" && (err != nil || d <= 0) {
		fmt.Fprintf(os.Stderr, "ftvm: FTVM_SYSMON_SLACK=%q is neither a positive duration nor \"off\": using %v\n", v, sysmon.DefaultSlack)
		d = 0
	}
	sysmon.Relax(d)
}
