package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ftvm/ftvm/bench/internal/wzrun"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/wasi"
)

// guestRun is one run of a guest module, in this process.
type guestRun struct {
	module []byte
	name   string // argv[0]
	args   []string
	env    []string
	dirs   [][2]string // host, guest
	stdout io.Writer   // nil: captured
	// noInstrument runs ftvm without Asyncify instrumentation, as
	// `ftvm run --instrument=false` does (ftvm runs only; by default ftvm
	// runs instrument, as `ftvm run` does).
	noInstrument bool
	// loopPolls runs ftvm with --loop-polls.
	loopPolls bool
}

// runResult is what a run produced. elapsed runs from instantiation to the
// guest's exit (compilation excluded: it happens before, from a warm cache).
type runResult struct {
	stdout, stderr string
	elapsed        time.Duration
}

// runFtvm runs the guest on ftvm (package machine, as `ftvm run` does:
// Asyncify-instrumented unless g.noInstrument).
func runFtvm(ctx context.Context, e *env, g guestRun) (runResult, error) {
	var stdout, stderr bytes.Buffer
	cfg := machine.Config{Module: g.module, Name: g.name, Args: g.args, Env: g.env,
		Stdout: g.stdout, Stderr: &stderr, Stdin: strings.NewReader(""),
		CacheDir: filepath.Join(e.cache, "ftvm-compiled"),
		// Instrumented modules go to the default cache, shared with `ftvm run`.
		Instrument: !g.noInstrument, LoopPolls: g.loopPolls}
	if cfg.Stdout == nil {
		cfg.Stdout = &stdout
	}
	for _, d := range g.dirs {
		cfg.Dirs = append(cfg.Dirs, wasi.Preopen{HostPath: d[0], GuestPath: d[1]})
	}
	m, err := machine.New(ctx, cfg)
	if err != nil {
		return runResult{}, fmt.Errorf("ftvm: %w", err)
	}
	defer m.Close(ctx)
	t0 := time.Now()
	code, err := m.Run(ctx)
	el := time.Since(t0)
	res := runResult{stdout: stdout.String(), stderr: stderr.String(), elapsed: el}
	if err == nil && code != 0 {
		err = fmt.Errorf("exit code %d", code)
	}
	if err != nil {
		return res, fmt.Errorf("ftvm %s: %w; stderr: %s", g.name, err, tail(res.stderr))
	}
	return res, nil
}

// runWazero runs the guest on wazero's own WASI (bench/internal/wzrun).
func runWazero(ctx context.Context, e *env, g guestRun) (runResult, error) {
	var stdout, stderr bytes.Buffer
	o := wzrun.Options{Module: g.module, Name: g.name, Args: g.args, Env: g.env,
		Stdout: g.stdout, Stderr: &stderr, Stdin: strings.NewReader(""),
		CacheDir: filepath.Join(e.cache, "wazero-compiled")}
	if o.Stdout == nil {
		o.Stdout = &stdout
	}
	for _, d := range g.dirs {
		o.Dirs = append(o.Dirs, d[0]+":"+d[1])
	}
	r, err := wzrun.New(ctx, o)
	if err != nil {
		return runResult{}, fmt.Errorf("wazero: %w", err)
	}
	defer r.Close(ctx)
	t0 := time.Now()
	code, err := r.Run(ctx)
	el := time.Since(t0)
	res := runResult{stdout: stdout.String(), stderr: stderr.String(), elapsed: el}
	if err == nil && code != 0 {
		err = fmt.Errorf("exit code %d", code)
	}
	if err != nil {
		return res, fmt.Errorf("wazero %s: %w; stderr: %s", g.name, err, tail(res.stderr))
	}
	return res, nil
}

// runNative runs a native binary as a child process; elapsed is from start
// to exit (fork and exec included).
func runNative(ctx context.Context, bin string, args ...string) (runResult, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	err := cmd.Run()
	el := time.Since(t0)
	res := runResult{stdout: stdout.String(), stderr: stderr.String(), elapsed: el}
	if err != nil {
		return res, fmt.Errorf("%s: %w; stderr: %s", filepath.Base(bin), err, tail(res.stderr))
	}
	return res, nil
}

// runCLI runs a command (e.g. `ftvm run x.wasm`) as a child process and
// times it from start to exit.
func runCLI(ctx context.Context, name string, args ...string) (runResult, error) {
	return runNative(ctx, name, args...)
}

func tail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 400 {
		s = "…" + s[len(s)-400:]
	}
	return s
}

// readModule builds (or finds cached) and reads a guest module.
func readModule(path string, err error) ([]byte, error) {
	if err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// runSystem runs the guest on one of "ftvm" (instrumented, as `ftvm run`),
// "ftvm-noinst" (`ftvm run --instrument=false`) or "wazero".
func runSystem(ctx context.Context, e *env, system string, g guestRun) (runResult, error) {
	switch system {
	case "ftvm":
		return runFtvm(ctx, e, g)
	case "ftvm-noinst":
		g.noInstrument = true
		return runFtvm(ctx, e, g)
	case "ftvm-polls":
		g.loopPolls = true
		return runFtvm(ctx, e, g)
	case "wazero":
		return runWazero(ctx, e, g)
	}
	return runResult{}, fmt.Errorf("unknown system %q", system)
}
