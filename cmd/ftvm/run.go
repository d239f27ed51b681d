package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/remus"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/wasi"
)

type runFlags struct {
	dirs        []string
	env         []string
	listen      []string
	memoryLimit string
	apiSock     string
	cacheDir    string
	instrument  bool
	loopPolls   bool
	snapAtCall  uint64
	snapOut     string
	// Remus: protect the VM with a backup.
	protect string
	vmID    string
	repl    replFlags
	routes  []api.Route
	// beforeRun runs once the API serves, before the guest starts: the
	// API (status, snapshots) answers while a protected VM syncs.
	beforeRun func()
	// afterRun runs when the guest has ended, before the VM is closed.
	afterRun func(code uint32, err error)
}

func newRunCmd() *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run [flags] app.wasm [args...]",
		Short: "Run a WASI preview1 command module",
		Long: `Run a WASI preview1 command module on ftvm's own device layer.

The guest's exit code becomes ftvm's. ftvm's own failures use 125 (bad
flags or setup), 126 (the module cannot run), 134 (the guest trapped) and,
protected, 69 (fenced: the backup failed the VM over and runs it now).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return run(cmd.Context(), f, args) },
	}
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().StringArrayVar(&f.dirs, "dir", nil, "preopen host directory HOST as GUEST (HOST[:GUEST]; GUEST defaults to HOST)")
	cmd.Flags().StringArrayVar(&f.env, "env", nil, "set guest environment variable (K=V)")
	cmd.Flags().StringArrayVar(&f.listen, "listen", nil, "preopen a TCP listener ([FD=]HOST:PORT)")
	cmd.Flags().StringVar(&f.memoryLimit, "memory-limit", "", "cap guest linear memory (e.g. 64MiB)")
	cmd.Flags().StringVar(&f.apiSock, "api-sock", "", "serve the VM's HTTP API on this unix socket")
	cmd.Flags().BoolVar(&f.instrument, "instrument", true, "instrument the module (Asyncify) so the VM can be snapshotted at any host call; cached per module")
	cmd.Flags().BoolVar(&f.loopPolls, "loop-polls", false, "also put safe points in the guest's loops, so a guest computing without host calls can be paused (snapshot, checkpoint, stop) within about a millisecond; costs CPU-bound guests time")
	cmd.Flags().Uint64Var(&f.snapAtCall, "snapshot-at-call", 0, "stop at the safe point of the Nth host call and write a snapshot to --snapshot-out (deterministic checkpoints, for debugging and tests)")
	cmd.Flags().StringVar(&f.snapOut, "snapshot-out", "", "where --snapshot-at-call writes its snapshot")
	cmd.Flags().StringVar(&f.cacheDir, "cache-dir", "", "compiled-code cache (default $FTVM_CACHE_DIR or ~/.cache/ftvm/compiled; - for none)")
	cmd.Flags().StringVar(&f.protect, "protect", "", "protect the VM with the Remus backup at this address (ftvm backup --listen): checkpoints every epoch, output held until the backup has it")
	cmd.Flags().StringVar(&f.vmID, "vm-id", "", "with --protect: the VM's id on the backup (default: random)")
	f.repl.register(cmd.Flags(), true)
	return cmd
}

func usage(format string, a ...any) error {
	return &exitError{code: exitUsage, err: fmt.Errorf(format, a...)}
}

func parseDirs(specs []string) ([]wasi.Preopen, error) {
	var out []wasi.Preopen
	for _, s := range specs {
		host, guest, ok := strings.Cut(s, ":")
		if !ok {
			guest = host
		}
		if host == "" || guest == "" {
			return nil, usage("--dir %q: want HOST[:GUEST]", s)
		}
		fi, err := os.Stat(host)
		if err != nil {
			return nil, usage("--dir %q: %w", s, err)
		}
		if !fi.IsDir() {
			return nil, usage("--dir %q: not a directory", s)
		}
		out = append(out, wasi.Preopen{HostPath: host, GuestPath: guest})
	}
	return out, nil
}

func parseListen(specs []string) ([]wasi.Listener, error) {
	var out []wasi.Listener
	for _, s := range specs {
		var l wasi.Listener
		addr := s
		if fd, rest, ok := strings.Cut(s, "="); ok {
			n, err := strconv.ParseUint(fd, 10, 16)
			if err != nil || n < 3 {
				return nil, usage("--listen %q: FD must be a number >= 3", s)
			}
			l.Fd, addr = uint32(n), rest
		}
		if _, _, err := splitHostPort(addr); err != nil {
			return nil, usage("--listen %q: %v", s, err)
		}
		l.Addr = addr
		out = append(out, l)
	}
	return out, nil
}

// guestPaths are the preopens' guest paths, in order.
func guestPaths(dirs []wasi.Preopen) []string {
	var out []string
	for _, d := range dirs {
		out = append(out, d.GuestPath)
	}
	return out
}

// askedListeners are the listeners as --listen asks for them.
func askedListeners(ls []wasi.Listener) []wire.Listener {
	var out []wire.Listener
	for _, l := range ls {
		out = append(out, wire.Listener{Fd: l.Fd, Addr: l.Addr})
	}
	return out
}

func splitHostPort(addr string) (string, string, error) {
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		return "", "", errors.New("want HOST:PORT")
	}
	if _, err := strconv.ParseUint(addr[i+1:], 10, 16); err != nil {
		return "", "", errors.New("invalid port")
	}
	return addr[:i], addr[i+1:], nil
}

func run(ctx context.Context, f runFlags, args []string) error {
	path, guestArgs := args[0], args[1:]
	if (f.snapAtCall == 0) != (f.snapOut == "") {
		return usage("--snapshot-at-call and --snapshot-out go together")
	}
	if f.loopPolls && !f.instrument {
		return usage("--loop-polls needs --instrument")
	}
	if f.snapAtCall != 0 && !f.instrument {
		return usage("--snapshot-at-call needs --instrument")
	}
	for _, e := range f.env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return usage("--env %q: want K=V", e)
		}
	}
	dirs, err := parseDirs(f.dirs)
	if err != nil {
		return err
	}
	listen, err := parseListen(f.listen)
	if err != nil {
		return err
	}
	var limit uint64
	if f.memoryLimit != "" {
		if limit, err = machine.ParseSize(f.memoryLimit); err != nil {
			return usage("--memory-limit: %v", err)
		}
	}
	module, err := os.ReadFile(path)
	if err != nil {
		return &exitError{code: exitModule, err: err}
	}
	var primary *remus.Primary
	cfg := machine.Config{Module: module, Name: path, Args: guestArgs, Env: f.env,
		Dirs: dirs, Listen: listen, MemoryLimit: limit, CacheDir: f.cacheDir, Instrument: f.instrument, LoopPolls: f.loopPolls,
		SnapshotAtCall: f.snapAtCall, SnapshotPath: f.snapOut}
	if f.protect != "" {
		if !f.instrument {
			return usage("--protect needs --instrument")
		}
		ecfg, err := f.repl.engine()
		if err != nil {
			return err
		}
		tcfg, err := f.repl.tls(false, f.protect)
		if err != nil {
			return &exitError{code: exitUsage, err: err}
		}
		hold, err := machine.ParseSize(f.repl.holdLimit)
		if err != nil {
			return usage("--hold-limit: %v", err)
		}
		primary, err = remus.NewPrimary(remus.PrimaryConfig{Backup: f.protect, Engine: ecfg, TLS: tcfg, VM: f.vmID,
			HoldLimit: int(hold), Uncompressed: f.repl.raw})
		if err != nil {
			return usage("%v", err)
		}
		cfg.Gate, cfg.OnIdle = primary.Gate(), primary.OnIdle
	}
	ctx, sig := withSignals(ctx)
	if primary != nil {
		// The session with the backup comes up while the machine is
		// built (its compiled code loaded, host modules compiled).
		rctx, stopRepl := context.WithCancel(ctx)
		defer stopRepl()
		primary.Start(rctx, remus.Guest{Module: module, Name: path, Preopens: guestPaths(dirs), Listen: askedListeners(listen)})
	}
	m, err := machine.New(ctx, cfg)
	if primary != nil && primary.IsFenced() {
		// Fenced while the machine was built (the backup said so in
		// the handshake): that, not what the build met since (the
		// guest's address taken by the backup's failover, say), is why
		// this run stops.
		if err == nil {
			m.Close(ctx)
		}
		return fencedError(primary)
	}
	if err != nil {
		return setupError(err)
	}
	if primary != nil {
		return runProtected(ctx, primary, m, module, path, f, sig, limit)
	}
	return serveAndRun(ctx, m, f, sig, limit)
}

// setupError maps an error from machine.New to ftvm's exit codes.
func setupError(err error) error {
	var me *machine.ModuleError
	if errors.As(err, &me) {
		return &exitError{code: exitModule, err: err}
	}
	return &exitError{code: exitUsage, err: err}
}

// serveAndRun serves the VM's API (if asked), runs the VM to its end and
// maps how it ended to ftvm's exit code.
func serveAndRun(ctx context.Context, m *machine.Machine, f runFlags, sig *caught, limit uint64) error {
	defer m.Close(context.Background())
	for fd, addr := range m.Info().Listeners {
		slog.Info("listening", "fd", fd, "addr", addr)
	}
	if f.apiSock != "" {
		srv, err := api.Listen(f.apiSock, m, f.routes...)
		if err != nil {
			return &exitError{code: exitUsage, err: err}
		}
		defer srv.Close()
	}
	if f.beforeRun != nil {
		f.beforeRun()
	}
	code, err := m.Run(ctx)
	exit := exitCodeOf(code, err)
	if f.afterRun != nil {
		f.afterRun(exit, err)
	}
	switch {
	case errors.Is(err, context.Canceled):
		return &exitError{code: sig.exitCode()}
	case errors.Is(err, machine.ErrStopped):
		return nil // stopped at a snapshot's safe point, as asked
	case err != nil:
		return &exitError{code: int(exit), err: err}
	}
	if refused := m.MemoryRefused(); refused > 0 && code != 0 {
		fmt.Fprintf(os.Stderr, "ftvm: the guest was refused memory growth to %s by --memory-limit %s\n",
			machine.FormatSize(refused), machine.FormatSize(limit))
	}
	return exitOrNil(int(exit))
}

// exitCodeOf is the code ftvm exits with for a run that ended with the
// guest's code and err (but for a signal, whose code serveAndRun knows):
// serveAndRun exits with it, and a protected primary records it on its
// backup as the VM's exit, so a trap is 134 there as here, not the 0 a
// trapped guest never returned.
func exitCodeOf(code uint32, err error) uint32 {
	var te *machine.TrapError
	switch {
	case err == nil:
		return min(code, 255)
	case errors.As(err, &te):
		return exitTrap
	case errors.Is(err, machine.ErrStopped):
		return 0
	}
	return exitUsage
}

func exitOrNil(code int) error {
	if code == 0 {
		return nil
	}
	return &exitError{code: code}
}

// stopGrace is how long a signalled VM has to reach a host call and stop.
const stopGrace = 3 * time.Second

// caught remembers which signal stopped the VM, for the exit code.
type caught struct{ sig atomic.Value }

func (c *caught) exitCode() int {
	if s, ok := c.sig.Load().(os.Signal); ok && s == syscall.SIGTERM {
		return exitSigterm
	}
	return exitSigint
}

// withSignals cancels ctx on SIGINT or SIGTERM: the VM stops, its devices
// wake from any wait, and ftvm exits 130 or 143 as a shell would report.
func withSignals(ctx context.Context) (context.Context, *caught) {
	ctx, cancel := context.WithCancel(ctx)
	c := &caught{}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, os.Interrupt, syscall.SIGTERM)
	go func() {
		select {
		case s := <-ch:
			c.sig.Store(s)
			slog.Info("stopping the VM", "signal", s)
			cancel()
			// A guest that computes without making host calls does not
			// see the stop; don't wait for it forever.
			select {
			case <-time.After(stopGrace):
				slog.Warn("the guest did not reach a host call after the signal; exiting", "grace", stopGrace)
				os.Exit(c.exitCode())
			case <-ch:
				os.Exit(c.exitCode())
			}
		case <-ctx.Done():
		}
		signal.Stop(ch)
	}()
	return ctx, c
}
