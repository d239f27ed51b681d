// Command ftvm runs WASI programs in a VM whose whole state it owns.
package main

import (
	"fmt"
	"os"
	"runtime/pprof"
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
	// finding where replication spends its time).
	if path := os.Getenv("FTVM_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			code := execute(os.Args[1:])
			pprof.StopCPUProfile()
			f.Close()
			os.Exit(code)
		}
	}
	os.Exit(execute(os.Args[1:]))
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
