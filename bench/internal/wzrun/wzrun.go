// Package wzrun runs a WASI preview1 command module on wazero's compiler with
// wazero's OWN wasi_snapshot_preview1 host module (and its experimental
// socket support), configured as close to ftvm as wazero allows: real clocks,
// real sleep, crypto/rand, runtime.Gosched for sched_yield. It is the
// comparison point of the benchmarks; nothing of ftvm is used.
package wzrun

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"

	"github.com/tetratelabs/wazero"
	experimentalsock "github.com/tetratelabs/wazero/experimental/sock"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"github.com/tetratelabs/wazero/sys"
)

// Options describe one module run.
type Options struct {
	Module []byte
	Name   string   // argv[0]
	Args   []string // after argv[0]
	Env    []string // KEY=VALUE
	// Dirs are HOST:GUEST directory mounts (preopens, from fd 3 on).
	Dirs []string
	// Listen are HOST:PORT TCP listeners, preopened after the directories.
	Listen []string
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// CacheDir keeps compiled code ("" = none).
	CacheDir string
	// CloseOnContextDone compiles in wazero's termination checks (an exit
	// to Go at every loop iteration); off by default, as in a plain wazero
	// embedding.
	CloseOnContextDone bool
}

// Runner is a compiled module ready to be run (any number of times, one at a
// time).
type Runner struct {
	opts     Options
	rt       wazero.Runtime
	cache    wazero.CompilationCache
	compiled wazero.CompiledModule
	sockCfg  experimentalsock.Config
}

// New compiles the module and instantiates wazero's WASI host module.
func New(ctx context.Context, opts Options) (*Runner, error) {
	r := &Runner{opts: opts}
	rc := wazero.NewRuntimeConfigCompiler().WithCloseOnContextDone(opts.CloseOnContextDone)
	if opts.CacheDir != "" {
		cache, err := wazero.NewCompilationCacheWithDir(opts.CacheDir)
		if err != nil {
			return nil, err
		}
		r.cache = cache
		rc = rc.WithCompilationCache(cache)
	}
	r.rt = wazero.NewRuntimeWithConfig(ctx, rc)
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, r.rt); err != nil {
		r.Close(ctx)
		return nil, err
	}
	var err error
	if r.compiled, err = r.rt.CompileModule(ctx, opts.Module); err != nil {
		r.Close(ctx)
		return nil, err
	}
	if len(opts.Listen) > 0 {
		cfg := experimentalsock.NewConfig()
		for _, l := range opts.Listen {
			host, port, err := net.SplitHostPort(l)
			if err != nil {
				r.Close(ctx)
				return nil, fmt.Errorf("listen %q: %w", l, err)
			}
			p, err := strconv.Atoi(port)
			if err != nil {
				r.Close(ctx)
				return nil, fmt.Errorf("listen %q: bad port", l)
			}
			cfg = cfg.WithTCPListener(host, p)
		}
		r.sockCfg = cfg
	}
	return r, nil
}

// Run instantiates the module and runs _start to its end, returning the exit
// code. A trap is an error.
func (r *Runner) Run(ctx context.Context) (uint32, error) {
	o := r.opts
	mc := wazero.NewModuleConfig().WithName("").WithStartFunctions().
		WithArgs(append([]string{o.Name}, o.Args...)...).
		WithSysWalltime().WithSysNanotime().WithSysNanosleep().
		WithRandSource(rand.Reader).WithOsyield(runtime.Gosched)
	for _, e := range o.Env {
		k, v, ok := strings.Cut(e, "=")
		if !ok {
			return 0, fmt.Errorf("env %q: want KEY=VALUE", e)
		}
		mc = mc.WithEnv(k, v)
	}
	if o.Stdin != nil {
		mc = mc.WithStdin(o.Stdin)
	}
	if o.Stdout != nil {
		mc = mc.WithStdout(o.Stdout)
	}
	if o.Stderr != nil {
		mc = mc.WithStderr(o.Stderr)
	}
	if len(o.Dirs) > 0 {
		fc := wazero.NewFSConfig()
		for _, d := range o.Dirs {
			host, guest, ok := strings.Cut(d, ":")
			if !ok {
				guest = host
			}
			fc = fc.WithDirMount(host, guest)
		}
		mc = mc.WithFSConfig(fc)
	}
	if r.sockCfg != nil {
		ctx = experimentalsock.WithConfig(ctx, r.sockCfg)
	}
	mod, err := r.rt.InstantiateModule(ctx, r.compiled, mc)
	if err != nil {
		return exit(err)
	}
	defer mod.Close(ctx)
	start := mod.ExportedFunction("_start")
	if start == nil {
		return 0, errors.New("module has no _start")
	}
	_, err = start.Call(ctx)
	return exit(err)
}

func exit(err error) (uint32, error) {
	if err == nil {
		return 0, nil
	}
	var ee *sys.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	return 0, err
}

// Close releases the runtime.
func (r *Runner) Close(ctx context.Context) {
	if r.rt != nil {
		r.rt.Close(ctx)
	}
	if r.cache != nil {
		r.cache.Close(ctx)
	}
}
