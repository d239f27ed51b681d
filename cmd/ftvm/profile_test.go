package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestProfilingFiles: FTVM_CPUPROFILE and FTVM_TRACE each leave a file
// that holds a profile and a trace once the process stops them, and a path
// that cannot be written is an error naming the variable, not a silent
// run without the profile that was asked for.
func TestProfilingFiles(t *testing.T) {
	dir := t.TempDir()
	cpu, tr := filepath.Join(dir, "cpu.prof"), filepath.Join(dir, "run.trace")
	stop, err := startProfiling(cpu, tr)
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for i := range 1_000_000 {
		x += i % 7
	}
	_ = x
	stop()
	for _, p := range []string{cpu, tr} {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v, %v bytes", p, err, fi)
		}
	}
	if b, _ := os.ReadFile(tr); !strings.HasPrefix(string(b), "go 1.") {
		t.Errorf("the trace file does not start as a Go execution trace: %q", b[:min(len(b), 16)])
	}
	_, err = startProfiling("", filepath.Join(dir, "no", "such", "dir", "run.trace"))
	if err == nil || !strings.Contains(err.Error(), "FTVM_TRACE") {
		t.Fatalf("an unwritable trace path gave %v", err)
	}
	// Nothing asked for: nothing started, and stopping is harmless.
	stop, err = startProfiling("", "")
	if err != nil {
		t.Fatal(err)
	}
	stop()
}
