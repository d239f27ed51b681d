// Command ftvm runs WASI programs in a VM whose whole state it owns.
package main

import (
	"fmt"
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
	var files []*os.File
	var stops []func()
	stop = func() {
		for _, s := range stops {
			s()
		}
		for _, f := range files {
			f.Close()
		}
	}
	create := func(what, path string) (*os.File, error) {
		f, err := os.Create(path)
		if err != nil {
			stop()
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		files = append(files, f)
		return f, nil
	}
	if cpuPath != "" {
		f, err := create("FTVM_CPUPROFILE", cpuPath)
		if err != nil {
			return nil, err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			stop()
			return nil, fmt.Errorf("FTVM_CPUPROFILE: %w", err)
		}
		stops = append(stops, pprof.StopCPUProfile)
	}
	if tracePath != "" {
		f, err := create("FTVM_TRACE", tracePath)
		if err != nil {
			return nil, err
		}
		if err := trace.Start(f); err != nil {
			stop()
			return nil, fmt.Errorf("FTVM_TRACE: %w", err)
		}
		stops = append(stops, trace.Stop)
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
