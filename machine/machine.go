// Package machine is the ftvm virtual machine: a WASI preview1 command module
// run by wazero's compiler over ftvm's own device layer (package wasi), with
// linear memory in a mapping the machine owns. It is the library behind
// `ftvm run`.
package machine

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/sys"

	"github.com/ftvm/ftvm/internal/sysmon"
	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/machine/instrument"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

// Config describes one VM.
type Config struct {
	// Module is the wasm binary; Name is argv[0] (usually its path).
	Module []byte
	Name   string
	Args   []string // after argv[0]
	Env    []string // KEY=VALUE
	Dirs   []wasi.Preopen
	Listen []wasi.Listener
	// MemoryLimit caps the guest's linear memory in bytes (0: the wasm limit, 4 GiB).
	MemoryLimit uint64
	Stdin       io.Reader
	Stdout      io.Writer
	Stderr      io.Writer
	// CacheDir keeps compiled code across processes ("" = DefaultCacheDir(),
	// "-" = no cache).
	CacheDir string
	Tap      wasi.InputTap
	Gate     wasi.OutputGate
	// OnIdle is called when the guest is about to sleep in a blocking
	// call (see wasi.Config.OnIdle).
	OnIdle func() bool
	// Instrument applies Asyncify (machine/instrument) so that the VM can be
	// paused, captured and restored at any host call. InstrumentCacheDir
	// keeps instrumented modules ("" = instrument.DefaultCacheDir()).
	Instrument         bool
	InstrumentCacheDir string
	// LoopPolls, with Instrument, also puts safe points in the guest's
	// loops (instrument.Options.LoopPolls), so that a guest computing
	// without host calls can be paused within about a millisecond, at a
	// cost in CPU-bound speed. A restore follows the snapshot's choice.
	LoopPolls bool
	// Restore continues a captured VM instead of starting the module afresh.
	// Module must be the module it was captured from; Dirs and Listen then
	// optionally re-map the snapshot's directories and listeners.
	Restore *snapshot.Image
	// SnapshotAtCall, when non-zero, stops the VM at the safe point of its
	// Nth host call (counted from the start, or from the restore) and writes
	// a full snapshot to SnapshotPath: a deterministic checkpoint, for
	// reproducing and testing.
	SnapshotAtCall uint64
	SnapshotPath   string
	// Program, when set, is the module already prepared (Prepare): New
	// then neither instruments nor compiles, and Module is ignored.
	Program *Program
	// RestoreMemory, with Restore, is a MemoryImage holding Restore's
	// memory: the VM takes its pages over instead of copying them
	// (Restore.Memory must alias it). The image is empty afterwards.
	RestoreMemory *MemoryImage
}

// State is where a VM is in its life.
type State string

const (
	StateCreated State = "created"
	StateRunning State = "running"
	StateExited  State = "exited"
	StateTrapped State = "trapped"
	StateFailed  State = "failed"
	StateStopped State = "stopped"
)

// Machine is one VM.
type Machine struct {
	cfg      Config
	info     *ModuleInfo
	hash     string
	rt       wazero.Runtime
	cache    wazero.CompilationCache
	compiled wazero.CompiledModule
	dev      *wasi.Devices
	alloc    *allocator

	compileTime    time.Duration
	instrumentTime time.Duration
	listeners      map[uint32]string

	// Safe points (checkpoint.go).
	inst       *instrument.Instrumented
	moduleHash snapshot.Hash
	// running is true while Run runs; runDone is closed when it returns.
	running atomic.Bool
	runDone chan struct{}
	// life orders Run's start against Close: ran and closed say whether
	// each has begun (a Machine runs once, and not after Close).
	life   sync.Mutex
	ran    bool
	closed bool
	// pausedAt is the call the guest last unwound at.
	pausedAt wasi.Call
	// instrumentation identifies the instrumented module, recorded in
	// every captured state.
	instrumentation *wasi.Instrumentation
	asy             asyncify
	globals         []global
	ctl             control
	unwinding       bool
	rewinding       bool
	stack           stackState
	scratchAddr     uint32
	scratchSaved    []byte // the guest's bytes of the scratch region
	scratchValid    bool   // scratchSaved equals the region but for pages written since
	scratchPages    []uint32
	rewindAddr      uint32
	rewindSaved     []byte
	keptLo, keptHi  uint32 // the scratch pages the tracker keeps hot (keepScratchHot)
	tracker         dirty.Tracker
	views           dirtyViews // per consumer of the tracker, under viewsMu
	viewsMu         sync.Mutex // pauses and CollectAhead, which runs while the guest does
	snaps           snapshotter
	calls           uint64 // safe points reached (host calls begun)
	autoSnap        bool   // the current unwind is SnapshotAtCall's
	pauseStart      time.Time
	warm            func()      // WarmDirty's walk; guarded by mu
	afterResume     []func()    // Paused.AfterResume's, run when the pause is over
	finished        []*pauseJob // jobs run in the last pause, told once it is over (finishJobs)
	onPaused        atomic.Pointer[func(time.Duration)]
	trackerKind     string // under mu: Info reads it from other goroutines
	pauses          pauseStats

	mu       sync.Mutex
	state    State
	started  time.Time
	ended    time.Time
	exitCode uint32
}

// DefaultCacheDir is where compiled modules are kept between runs.
func DefaultCacheDir() string {
	if d := os.Getenv("FTVM_CACHE_DIR"); d != "" {
		return d
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "ftvm", "compiled")
}

// Program is a module validated, instrumented and compiled, ready to become
// a VM without paying for either step again: a Remus backup prepares one as
// soon as a primary connects, so that failover starts the guest at once.
// A Program is used by one VM, which then owns it (Machine.Close closes it).
type Program struct {
	name           string
	module         []byte
	info           *ModuleInfo
	hash           string
	moduleHash     snapshot.Hash
	inst           *instrument.Instrumented
	rt             wazero.Runtime
	cache          wazero.CompilationCache
	compiled       wazero.CompiledModule
	host           *wasi.Host // the device layer's host modules, no devices attached yet
	compileTime    time.Duration
	instrumentTime time.Duration
	limit          uint64
	instHashOnce   sync.Once
	instHash       string
}

// ModuleHash is the SHA-256 of the original module.
func (p *Program) ModuleHash() snapshot.Hash { return p.moduleHash }

// instrumentedHash is the hex SHA-256 of the instrumented module, "" for
// an uninstrumented program.
func (p *Program) instrumentedHash() string {
	if p.inst == nil {
		return ""
	}
	p.instHashOnce.Do(func() {
		sum := sha256.Sum256(p.inst.Module)
		p.instHash = hex.EncodeToString(sum[:])
	})
	return p.instHash
}

// instrumentation describes the program's instrumented module, for the
// states captured from it.
func (p *Program) instrumentation() *wasi.Instrumentation {
	if p.inst == nil {
		return nil
	}
	return &wasi.Instrumentation{LoopPolls: p.inst.LoopPolls, Module: p.instrumentedHash()}
}

// noInstrumentation is why a state that does not name the instrumented
// module it was captured from is refused: its stack could be of any code.
const noInstrumentation = "the snapshot does not record the instrumented module it was captured from, " +
	"so its saved stack cannot be checked against this one (made by another tool?)"

func instrumentationMismatch(want *wasi.Instrumentation, p *Program) string {
	return fmt.Sprintf("was captured running an instrumented module (sha256 %.12s, loop polls %v) that differs from "+
		"the one instrumented here (sha256 %.12s, loop polls %v): the wasm-opt version or the instrumentation options "+
		"differ; restore with the same ftvm and binaryen as the snapshot was taken with",
		want.Module, want.LoopPolls, p.instrumentedHash(), p.inst != nil && p.inst.LoopPolls)
}

// Close releases a Program that was never turned into a VM.
func (p *Program) Close(ctx context.Context) error {
	var err error
	if p.rt != nil {
		err = p.rt.Close(ctx)
	}
	if p.cache != nil {
		p.cache.Close(ctx)
	}
	return err
}

// Prepare validates, instruments (with cfg.Instrument or cfg.Restore) and
// compiles cfg.Module. Only Module, Name, MemoryLimit, CacheDir,
// Instrument and InstrumentCacheDir matter here.
func Prepare(ctx context.Context, cfg Config) (*Program, error) {
	// The memory's allocation asks it (newLinearMemory); found out
	// meanwhile, it costs no VM the 0.4 ms it takes.
	go dirty.HugePagesCoarsen()
	info, err := ScanModule(cfg.Module)
	if err != nil {
		return nil, &ModuleError{Module: cfg.Name, Reason: "is invalid: " + err.Error()}
	}
	if err := info.checkRunnable(wasi.Names(), wasi.ModuleName); err != nil {
		err.(*ModuleError).Module = cfg.Name
		return nil, err
	}
	if cfg.MemoryLimit > 0 {
		if cfg.MemoryLimit%65536 != 0 {
			return nil, fmt.Errorf("memory limit %s is not a multiple of the 64KiB wasm page", FormatSize(cfg.MemoryLimit))
		}
		if info.MinPages*65536 > cfg.MemoryLimit {
			return nil, &ModuleError{Module: cfg.Name, Reason: fmt.Sprintf(
				"needs %s of memory at start, more than the memory limit %s",
				FormatSize(info.MinPages*65536), FormatSize(cfg.MemoryLimit))}
		}
	}
	sum := sha256.Sum256(cfg.Module)
	if cfg.Restore != nil && cfg.Restore.Module != sum {
		return nil, &ModuleError{Module: cfg.Name, Reason: fmt.Sprintf(
			"is not the module the snapshot was taken of (module %s, snapshot of %s)",
			snapshot.Hash(sum).Short(), cfg.Restore.Module.Short())}
	}
	p := &Program{name: cfg.Name, module: cfg.Module, info: info, hash: hex.EncodeToString(sum[:]),
		moduleHash: sum, limit: cfg.MemoryLimit}
	code := cfg.Module
	if cfg.Instrument || cfg.Restore != nil {
		dir := cfg.InstrumentCacheDir
		t0 := time.Now()
		// wasm-opt takes about a minute on a Go module the first time;
		// say so rather than seem to hang.
		notice := time.AfterFunc(time.Second, func() {
			slog.Warn("instrumenting the module for safe points (once per module; cached afterwards)",
				"module", cfg.Name)
		})
		polls := cfg.LoopPolls
		var want *wasi.Instrumentation
		if cfg.Restore != nil {
			if want = wasi.InstrumentationOf(cfg.Restore.Devices); want == nil {
				notice.Stop()
				return nil, &ModuleError{Module: cfg.Name, Reason: noInstrumentation}
			}
			polls = want.LoopPolls
		}
		p.inst, err = instrument.InstrumentWith(ctx, cfg.Module, dir, instrument.Options{LoopPolls: polls})
		notice.Stop()
		if err == nil && want != nil && want.Module != p.instrumentedHash() {
			return nil, &ModuleError{Module: cfg.Name, Reason: instrumentationMismatch(want, p)}
		}
		if err != nil {
			var missing *instrument.MissingToolError
			if errors.As(err, &missing) || ctx.Err() != nil {
				return nil, fmt.Errorf("instrumenting %s: %w", cfg.Name, err)
			}
			// wasm-opt validates the module as it reads it: what it
			// refuses, the compiler would refuse too.
			return nil, &ModuleError{Module: cfg.Name, Reason: "does not compile (instrumenting it failed): " + err.Error()}
		}
		p.instrumentTime = time.Since(t0)
		code = p.inst.Module
	}

	// No WithCloseOnContextDone: its checks in every loop make CPU-bound
	// guests up to 9x slower. A stopping VM ends at its next host call
	// instead (every blocking wait is woken), and the CLI exits outright if
	// a guest computes on without making one.
	rc := wazero.NewRuntimeConfigCompiler()
	if cfg.CacheDir != "-" {
		dir := cfg.CacheDir
		if dir == "" {
			dir = DefaultCacheDir()
		}
		if cache, err := wazero.NewCompilationCacheWithDir(dir); err == nil {
			p.cache = cache
			rc = rc.WithCompilationCache(cache)
		}
	}
	p.rt = wazero.NewRuntimeWithConfig(ctx, rc)
	t0 := time.Now()
	p.compiled, err = compile(ctx, p.rt, code)
	p.compileTime = time.Since(t0)
	if err != nil {
		p.Close(ctx)
		return nil, &ModuleError{Module: cfg.Name, Reason: "does not compile: " + err.Error()}
	}
	// The host modules too, here rather than when the VM is set up: a
	// restore's or a failover's VM then only attaches its devices.
	if p.host, err = wasi.RegisterHost(ctx, p.rt); err != nil {
		p.Close(ctx)
		return nil, fmt.Errorf("registering the device layer: %w", err)
	}
	return p, nil
}

// New validates and compiles the module (or takes cfg.Program, prepared
// before) and sets up its devices. Nothing of the guest runs yet.
func New(ctx context.Context, cfg Config) (*Machine, error) {
	prog := cfg.Program
	// A Program the caller gave stays the caller's if New fails (it may
	// try again: a failover waiting for an address to be free).
	given := prog != nil
	if prog == nil {
		var err error
		if prog, err = Prepare(ctx, cfg); err != nil {
			return nil, err
		}
	} else if cfg.Restore != nil && prog.inst == nil {
		return nil, errors.New("restoring needs an instrumented program")
	} else if cfg.Restore != nil {
		// A program prepared in advance (a Remus backup's) must be the
		// instrumented code the state was captured from.
		want := wasi.InstrumentationOf(cfg.Restore.Devices)
		if want == nil {
			return nil, &ModuleError{Module: prog.name, Reason: noInstrumentation}
		}
		if want.Module != prog.instrumentedHash() {
			return nil, &ModuleError{Module: prog.name, Reason: instrumentationMismatch(want, prog)}
		}
	}
	cfg.Program = nil
	cfg.Module, cfg.MemoryLimit = prog.module, prog.limit
	if cfg.Name == "" {
		cfg.Name = prog.name
	}
	m := &Machine{cfg: cfg, runDone: make(chan struct{}), info: prog.info, hash: prog.hash, moduleHash: prog.moduleHash, state: StateCreated,
		alloc: &allocator{limit: cfg.MemoryLimit}, inst: prog.inst, rt: prog.rt, cache: prog.cache,
		compiled: prog.compiled, compileTime: prog.compileTime, instrumentTime: prog.instrumentTime,
		instrumentation: prog.instrumentation()}
	m.cfg.Instrument = prog.inst != nil
	if cfg.Restore != nil && cfg.Restore.Module != m.moduleHash {
		m.closeFailed(ctx, given)
		return nil, &ModuleError{Module: cfg.Name, Reason: fmt.Sprintf(
			"is not the module the snapshot was taken of (module %s, snapshot of %s)",
			m.moduleHash.Short(), cfg.Restore.Module.Short())}
	}
	var err error
	args := append([]string{cfg.Name}, cfg.Args...)
	dcfg := wasi.Config{Args: args, Env: cfg.Env, Preopens: cfg.Dirs, Listen: cfg.Listen,
		Stdin: cfg.Stdin, Stdout: cfg.Stdout, Stderr: cfg.Stderr, Tap: cfg.Tap, Gate: cfg.Gate, OnIdle: cfg.OnIdle,
		OnWake: collectAtHostCall}
	if m.inst != nil {
		dcfg.SafePoint = m.safePoint
	} else {
		dcfg.SafePoint = func(context.Context, api.Module, wasi.Call) bool {
			if steward.wanted.Load() {
				collectAtHostCall()
			}
			return false
		}
	}
	if cfg.Restore != nil {
		var st wasi.State
		if err = json.Unmarshal(cfg.Restore.Devices, &st); err != nil {
			m.closeFailed(ctx, given)
			return nil, fmt.Errorf("snapshot device state: %w", err)
		}
		m.dev, err = wasi.Restore(dcfg, &st)
	} else {
		m.dev, err = wasi.New(dcfg)
	}
	if err != nil {
		m.closeFailed(ctx, given)
		return nil, err
	}
	m.listeners = m.dev.ListenerAddrs()
	prog.host.Attach(m.dev)
	return m, nil
}

// Run runs the guest to its end. It returns the guest's exit code, or an
// error: *TrapError when the guest trapped, a context error when ctx ended
// first, ErrStopped when a pauser stopped it.
func (m *Machine) Run(ctx context.Context) (code uint32, err error) {
	m.life.Lock()
	switch {
	case m.closed:
		m.life.Unlock()
		return 0, ErrClosed
	case m.ran:
		m.life.Unlock()
		return 0, ErrRan
	}
	m.ran = true
	m.running.Store(true)
	m.life.Unlock()
	guestRunning(m, true)
	defer func() {
		guestRunning(m, false)
		m.running.Store(false)
		close(m.runDone)
	}()
	m.setState(StateRunning)
	stop := context.AfterFunc(ctx, m.dev.Stop)
	defer stop()
	defer m.endControl()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal error running guest: %v", r)
			m.finish(StateFailed, 0)
		}
	}()
	actx := experimental.WithMemoryAllocator(ctx, m.alloc)
	mod, err := m.rt.InstantiateModule(actx, m.compiled,
		wazero.NewModuleConfig().WithName("").WithStartFunctions())
	if err != nil {
		m.finish(StateFailed, 0)
		return 0, m.runError(fmt.Errorf("instantiating: %w", err))
	}
	defer mod.Close(ctx)
	if m.inst != nil {
		if err := m.bindInstrumented(mod); err != nil {
			m.finish(StateFailed, 0)
			return 0, err
		}
		if m.cfg.Restore != nil {
			if err := m.restoreState(ctx, mod, m.cfg.Restore); err != nil {
				m.finish(StateFailed, 0)
				return 0, fmt.Errorf("restoring: %w", err)
			}
		}
		m.startTracking()
	}
	start := mod.ExportedFunction("_start")
	for {
		_, err = start.Call(ctx)
		if err != nil || !m.unwinding {
			if m.cfg.SnapshotAtCall > m.calls {
				slog.Warn("the guest ended before the host call asked for: no snapshot written",
					"snapshot_at_call", m.cfg.SnapshotAtCall, "host_calls", m.calls)
			}
			return m.exit(ctx, err)
		}
		// The guest unwound to a safe point: it is stopped.
		if err := m.afterUnwind(ctx); err != nil {
			m.finish(StateFailed, 0)
			return 0, err
		}
		if m.autoSnap {
			m.autoSnap = false
			m.finish(StateStopped, 0)
			if err := m.writeAutoSnapshot(); err != nil {
				return 0, fmt.Errorf("snapshot at host call %d: %w", m.calls, err)
			}
			return 0, ErrStopped
		}
		if m.stopped(ctx) {
			m.runAfterResume()
			m.finish(StateStopped, 0)
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			return 0, ErrStopped
		}
		if err := m.beforeRewind(ctx); err != nil {
			m.runAfterResume()
			m.finish(StateFailed, 0)
			return 0, err
		}
	}
}

// ErrStopped says the VM was stopped (at a safe point after a snapshot with
// --stop, or by Close) rather than ending by itself.
var ErrStopped = errors.New("the VM was stopped at a safe point")

func (m *Machine) exit(ctx context.Context, err error) (uint32, error) {
	if err == nil {
		m.finish(StateExited, 0)
		return 0, nil
	}
	var ee *sys.ExitError
	if errors.As(err, &ee) {
		switch ee.ExitCode() {
		case sys.ExitCodeContextCanceled, sys.ExitCodeDeadlineExceeded:
			if ctx.Err() != nil {
				m.finish(StateFailed, 0)
				return 0, ctx.Err()
			}
			if ee.ExitCode() == sys.ExitCodeContextCanceled && m.dev.Stopping() {
				// Ended by Stop or Close where it had no safe point to
				// stop at (uninstrumented, or computing): stopped,
				// not exited.
				m.finish(StateStopped, 0)
				return 0, ErrStopped
			}
		}
		m.finish(StateExited, ee.ExitCode())
		return ee.ExitCode(), nil
	}
	m.finish(StateTrapped, 0)
	return 0, m.runError(err)
}

func (m *Machine) runError(err error) error {
	te := newTrapError(err)
	te.Instrumented = m.inst != nil
	if m.unwinding {
		// Asyncify writes the stack upward from the borrowed region's
		// start and checks no bound: the end of the memory is the guard.
		te.PausedAt = m.pausedAt.String()
		if mem := m.alloc.memory(); mem != nil {
			te.Borrowed = scratchFor(len(mem.Bytes()))
		}
	}
	if m.alloc.memory() != nil {
		te.MemoryRefused = m.alloc.memory().refused.Load()
	}
	return te
}

func (m *Machine) setState(s State) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state = s
	if s == StateRunning {
		m.started = time.Now()
	}
}

func (m *Machine) finish(s State, code uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state, m.exitCode, m.ended = s, code, time.Now()
}

// MemoryRefused is the largest memory size (bytes) the limit refused, or 0.
func (m *Machine) MemoryRefused() uint64 {
	if m.alloc.memory() == nil {
		return 0
	}
	return m.alloc.memory().refused.Load()
}

// Devices is the VM's device layer.
func (m *Machine) Devices() *wasi.Devices { return m.dev }

// closeFailed undoes a New that failed: everything, or, when the Program
// was the caller's, everything but the Program.
func (m *Machine) closeFailed(ctx context.Context, keepProgram bool) {
	if !keepProgram {
		m.Close(ctx)
		return
	}
	if m.dev != nil {
		m.dev.Close()
	}
}

// Close releases the VM's resources.
//
// A guest still running is stopped first (every blocking wait is woken and
// the guest ends at its next host call or loop poll), and Close waits for
// Run to return before it frees anything: the guest's memory and
// descriptors must outlive its last host call. If the guest does not end
// within closeWait (it computes without host calls), or ctx ends first,
// Close returns an error and leaves the VM's resources allocated.
func (m *Machine) Close(ctx context.Context) error {
	m.life.Lock()
	m.closed = true
	running := m.running.Load()
	m.life.Unlock()
	if m.dev != nil && running {
		m.dev.Stop()
		t := time.NewTimer(closeWait)
		defer t.Stop()
		select {
		case <-m.runDone:
		case <-ctx.Done():
			return fmt.Errorf("closing the VM: %w (the guest is still running)", ctx.Err())
		case <-t.C:
			return fmt.Errorf("closing the VM: the guest did not stop within %v (it computes without host calls); its resources stay allocated", closeWait)
		}
	}
	if m.dev != nil {
		m.dev.Close()
	}
	var err error
	if m.rt != nil {
		err = m.rt.Close(ctx) // frees the memory, which closes the tracker first
	}
	if m.cache != nil {
		m.cache.Close(ctx)
	}
	if m.tracker != nil {
		m.tracker.Close()
	}
	return err
}

// closeWait bounds how long Close waits for a running guest to stop.
const closeWait = 10 * time.Second

// Run is New, Run and Close in one call.
func Run(ctx context.Context, cfg Config) (uint32, error) {
	m, err := New(ctx, cfg)
	if err != nil {
		return 0, err
	}
	defer m.Close(ctx)
	return m.Run(ctx)
}

// Info is a point-in-time description of a VM, served by the API.
type Info struct {
	State         State             `json:"state"`
	Module        string            `json:"module"`
	ModuleSHA256  string            `json:"module_sha256"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	ExitCode      *uint32           `json:"exit_code,omitempty"`
	MemoryBytes   uint64            `json:"memory_bytes"`
	MemoryLimit   uint64            `json:"memory_limit,omitempty"`
	CompileMillis float64           `json:"compile_ms"`
	Listeners     map[uint32]string `json:"listeners,omitempty"`
	Counters      Counters          `json:"counters"`
	// Snapshots-related: whether the VM has safe points, its dirty-page
	// tracker, and its pauses so far.
	Instrumented bool        `json:"instrumented"`
	DirtyTracker string      `json:"dirty_tracker,omitempty"`
	Pauses       *PauseStats `json:"pauses,omitempty"`
	// GC is how this process collects garbage (CollectAtSafePoints).
	GC GCStats `json:"gc"`
	// RuntimeMonitor is whether the Go runtime monitor's sleeps were
	// lengthened (package internal/sysmon).
	RuntimeMonitor sysmon.Status `json:"runtime_monitor"`
	// Waiting is what the guest waits for while it is blocked in
	// poll_oneoff (nil otherwise): to tell a hung guest's own wait from
	// a wake-up the device layer lost.
	Waiting *wasi.PollWait `json:"waiting,omitempty"`
}

// Counters are the device layer's totals.
type Counters struct {
	HostCalls uint64            `json:"host_calls"`
	Calls     map[string]uint64 `json:"calls"`
	BytesIn   uint64            `json:"bytes_in"`
	BytesOut  uint64            `json:"bytes_out"`
	Accepted  uint64            `json:"connections_accepted"`
	Effects   uint64            `json:"effects"`
	PollWaits uint64            `json:"poll_waits"`
}

// Info describes the VM now. Safe to call while the guest runs.
func (m *Machine) Info() Info {
	m.mu.Lock()
	info := Info{State: m.state, Module: m.cfg.Name, ModuleSHA256: m.hash, MemoryLimit: m.cfg.MemoryLimit,
		CompileMillis: float64(m.compileTime.Microseconds()) / 1000}
	switch {
	case m.state == StateRunning:
		info.UptimeSeconds = time.Since(m.started).Seconds()
	case !m.started.IsZero():
		info.UptimeSeconds = m.ended.Sub(m.started).Seconds()
	}
	if m.state == StateExited {
		code := m.exitCode
		info.ExitCode = &code
	}
	m.mu.Unlock()
	if m.alloc.memory() != nil {
		info.MemoryBytes = m.alloc.memory().size.Load()
	}
	c := m.dev.Counters()
	info.Counters = Counters{Calls: map[string]uint64{}, BytesIn: c.BytesIn.Load(), BytesOut: c.BytesOut.Load(),
		Accepted: c.Accepted.Load(), Effects: c.Effects.Load(), PollWaits: c.PollWaits.Load()}
	for i := range c.Calls {
		if n := c.Calls[i].Load(); n > 0 {
			info.Counters.Calls[wasi.Call(i).String()] = n
			info.Counters.HostCalls += n
		}
	}
	info.Listeners = m.listeners
	info.Instrumented = m.inst != nil
	if m.inst != nil {
		ps := m.PauseStats()
		info.Pauses = &ps
	}
	m.mu.Lock()
	info.DirtyTracker = m.trackerKind
	m.mu.Unlock()
	info.GC = ReadGCStats()
	info.RuntimeMonitor = sysmon.Read()
	info.Waiting = m.dev.PollWait()
	return info
}

// compile runs wazero's compiler, turning a panic of its decoder on a
// hostile module (it has had such bugs) into an error: bad input must never
// take the host process down.
func compile(ctx context.Context, rt wazero.Runtime, code []byte) (c wazero.CompiledModule, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("the compiler failed on it: %v", r)
		}
	}()
	return rt.CompileModule(ctx, code)
}

// OnMemoryGrow has fn told of every growth of the guest's memory, from
// oldBytes to newBytes, as it happens: inside the guest's memory.grow, on
// its goroutine, so fn must be quick and must not block. A Remus primary
// uses it to have staging memory faulted in while the guest runs on, for
// the grown pages the next checkpoint will carry. nil stops it.
func (m *Machine) OnMemoryGrow(fn func(oldBytes, newBytes uint64)) {
	if fn == nil {
		m.alloc.onGrow.Store(nil)
		return
	}
	m.alloc.onGrow.Store(&fn)
}
