// Package instrument prepares a WASI command module for capture and restore:
// it applies binaryen's Asyncify (through wasm-opt) so that the guest's call
// stack can be unwound into memory at a host call and rewound later, in this
// or another process, and exports every global so that the host can read and
// write them. Instrumented modules are cached by content hash, because
// wasm-opt takes up to a minute on a Go module.
//
// See NOTES.md for the Asyncify protocol the machine must follow.
package instrument

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/wasi"
)

// The functions Asyncify adds and exports.
const (
	ExportStartUnwind = "asyncify_start_unwind" // (data i32): begin unwinding from the current host call
	ExportStopUnwind  = "asyncify_stop_unwind"  // (): unwinding reached the host; back to normal
	ExportStartRewind = "asyncify_start_rewind" // (data i32): the next call of the entry point rewinds
	ExportStopRewind  = "asyncify_stop_rewind"  // (): rewinding reached the host call; back to normal
	ExportGetState    = "asyncify_get_state"    // () i32: 0 normal, 1 unwinding, 2 rewinding
)

// AsyncifyExports lists the functions an instrumented module must export.
var AsyncifyExports = []string{ExportStartUnwind, ExportStopUnwind, ExportStartRewind, ExportStopRewind, ExportGetState}

// Features are the wasm-opt feature flags: the union of what Go (bulk-memory,
// sign-ext, nontrapping-float-to-int; mutable-globals for exported mutable
// globals), Rust (its wasm32-wasip1 default adds multivalue and
// reference-types) and clang 14 (MVP) emit. wasm-opt rejects a module that
// uses a feature not enabled; everything here is in wazero's wasm 2.0 set,
// so what the optimizer may emit with them still compiles. SIMD stays off because no
// default build emits it (a module built with -msimd128 is refused by
// wasm-opt's validator, with its message); threads, tail calls, exceptions,
// GC and memory64 because wazero or Asyncify cannot take them.
var Features = []string{
	"--enable-bulk-memory",
	"--enable-sign-ext",
	"--enable-nontrapping-float-to-int",
	"--enable-mutable-globals",
	"--enable-multivalue",
	"--enable-reference-types",
}

// Version is part of every cache key; bump it when the output of Instrument
// changes for the same input and tool.
const Version = "3"

// WasmOpt is the wasm-opt binary, looked up in PATH unless it has a slash.
var WasmOpt = "wasm-opt"

// Timeout bounds one wasm-opt run. A 3 MB Go module takes about a minute
// on two cores and 0.5 GB; time grows about linearly with size.
var Timeout = 20 * time.Minute

// Instrumented is a module ready for capture and restore.
type Instrumented struct {
	// Module is the instrumented binary.
	Module []byte
	// Globals is every global of Module (Asyncify's own included), each with
	// the name it is exported under.
	Globals []Global
	// SafePoints are the imports ("module.name") at which the guest can be
	// unwound. Unwinding at any other import corrupts the guest.
	SafePoints []string
	// Key is the hex SHA-256 the result is cached under.
	Key string
	// Cached is true when Module came from the cache.
	Cached bool
	// LoopPolls is true when the loops have polls (Options.LoopPolls, and
	// the module could be rewritten).
	LoopPolls bool
}

// MissingToolError is returned when wasm-opt cannot be run.
type MissingToolError struct{ Err error }

func (e *MissingToolError) Error() string {
	return fmt.Sprintf("instrumenting needs binaryen's wasm-opt, which cannot be run (%v): install the Debian package binaryen (apt-get install binaryen)", e.Err)
}

func (e *MissingToolError) Unwrap() error { return e.Err }

// DefaultCacheDir is where instrumented modules are kept between runs.
func DefaultCacheDir() string {
	if d := os.Getenv("FTVM_INSTRUMENT_CACHE"); d != "" {
		return d
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "ftvm", "instrumented")
}

// Instrument applies Asyncify to mod, optimizes the result with -O4 and
// exports every global. Optimizing after Asyncify is essential (unoptimized,
// a Go module doubles in size and runs several times slower); -O4 rather
// than -O2 because Asyncify costs a CPU-bound Go guest +48 % after -O2, +15 %
// after -O3 and +10 % after -O4, for 1.7 times wasm-opt's CPU time (RESULTS.md).
// cacheDir "" means DefaultCacheDir(), "-" no cache. Concurrent callers, in
// this process or others, instrument a given module once.
func Instrument(ctx context.Context, mod []byte, cacheDir string) (*Instrumented, error) {
	return InstrumentWith(ctx, mod, cacheDir, Options{})
}

// Options choose what Instrument adds beyond Asyncify and the global exports.
type Options struct {
	// LoopPolls puts a safe point in the guest's loops (InsertPolls), so
	// that a guest computing without host calls can still be paused,
	// checkpointed and stopped within about a millisecond. It costs
	// CPU-bound code time (BENCHMARKS.md): Asyncify must then be able to
	// resume inside those loops.
	LoopPolls bool
}

// InstrumentWith is Instrument with options.
func InstrumentWith(ctx context.Context, mod []byte, cacheDir string, o Options) (*Instrumented, error) {
	m, err := parse(mod)
	if err != nil {
		return nil, err
	}
	for _, e := range m.exports {
		if e.name == ExportStartUnwind {
			return nil, errors.New("module is already instrumented (it exports " + ExportStartUnwind + ")")
		}
	}
	safePoints := m.safePoints()
	// With LoopPolls, loops get polls (polls.go), so that a guest
	// computing without host calls still reaches safe points. A module the
	// poll rewrite cannot read (an instruction it does not know) is
	// instrumented without them (Instrumented.LoopPolls says).
	polls := false
	if o.LoopPolls {
		if polled, err := InsertPolls(mod); err == nil && !bytes.Equal(polled, mod) {
			mod, polls = polled, true
			safePoints = append(safePoints, PollSafePoint)
		}
	}
	args := wasmOptArgs(safePoints)
	if cacheDir == "" {
		cacheDir = DefaultCacheDir()
	}
	version, err := toolVersion(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	key := cacheKey(mod, version, args)
	if cacheDir == "-" {
		out, err := runWasmOpt(ctx, mod, args)
		if err != nil {
			return nil, err
		}
		in, err := finish(out, safePoints, key, false)
		if in != nil {
			in.LoopPolls = polls
		}
		return in, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("instrument cache: %w", err)
	}
	path := filepath.Join(cacheDir, key+".wasm")
	if in, err := load(path, safePoints, key); err == nil {
		in.LoopPolls = polls
		return in, nil
	}
	lockPath := filepath.Join(cacheDir, key+".lock")
	unlock, err := lockFile(ctx, lockPath)
	if err != nil {
		return nil, fmt.Errorf("instrument cache: %w", err)
	}
	defer unlock()
	// Another caller may have finished while we waited for the lock.
	if in, err := load(path, safePoints, key); err == nil {
		in.LoopPolls = polls
		return in, nil
	}
	out, err := runWasmOpt(ctx, mod, args)
	if err != nil {
		return nil, err
	}
	in, err := finish(out, safePoints, key, false)
	if err != nil {
		return nil, err
	}
	in.LoopPolls = polls
	if err := writeAtomic(path, in.Module); err != nil {
		return nil, fmt.Errorf("instrument cache: %w", err)
	}
	// Callers still waiting on this lock file re-check the cache once they
	// hold it; later ones find the module first. So it can go.
	os.Remove(lockPath)
	return in, nil
}

// safePoints lists the WASI function imports Asyncify may unwind at: every
// one the device layer provides but proc_exit, which never returns, so there
// is nothing to resume. (Only known names: they need no escaping in
// wasm-opt's comma-separated list, where '*' would also be a wildcard.)
func (m *module) safePoints() []string {
	var list []string
	seen := map[string]bool{}
	provided := wasi.Names()
	for _, im := range m.imports {
		if im.kind != kindFunc || im.module != wasi.ModuleName || !provided[im.name] || im.name == "proc_exit" {
			continue
		}
		full := im.module + "." + im.name
		if !seen[full] {
			seen[full] = true
			list = append(list, full)
		}
	}
	return list
}

// wasmOptArgs are wasm-opt's arguments after the input file. Only the listed
// imports may unwind; with none, no import may (an empty list would mean all).
func wasmOptArgs(safePoints []string) []string {
	args := append([]string(nil), Features...)
	// DWARF would describe the code before instrumentation; drop it rather
	// than let wazero print wrong source lines. Names stay (-g) for traps.
	args = append(args, "-g", "--strip-dwarf", "--asyncify")
	if len(safePoints) == 0 {
		args = append(args, "--pass-arg=asyncify-ignore-imports")
	} else {
		args = append(args, "--pass-arg=asyncify-imports@"+strings.Join(safePoints, ","))
	}
	return append(args, "-O4")
}

func cacheKey(mod []byte, version string, args []string) string {
	h := sha256.New()
	fmt.Fprintf(h, "ftvm-instrument %s\n%s\n", Version, version)
	for _, a := range args {
		fmt.Fprintf(h, "%q\n", a)
	}
	h.Write(mod)
	return hex.EncodeToString(h.Sum(nil))
}

var tool struct {
	mu      sync.Mutex
	path    string
	id      string
	version string
}

// toolVersion is `wasm-opt --version`, part of every cache key. Running it
// costs a process start (~10 ms here, ~15 ms of CPU) in every ftvm process
// that looks up the cache — a restore, a backup preparing for failover — so
// the answer is remembered per binary: in this process, and in cacheDir
// (unless "-") under the binary's identity (its resolved path, size,
// modification time, device and inode), which a package upgrade changes.
func toolVersion(ctx context.Context, cacheDir string) (string, error) {
	tool.mu.Lock()
	defer tool.mu.Unlock()
	path, err := exec.LookPath(WasmOpt)
	if err != nil {
		return "", &MissingToolError{Err: err}
	}
	id := binaryID(path)
	if tool.path == path && tool.id == id && tool.version != "" {
		return tool.version, nil
	}
	memo := ""
	if cacheDir != "-" && id != "" {
		memo = filepath.Join(cacheDir, "wasm-opt-version")
		if b, err := os.ReadFile(memo); err == nil {
			if got, ok := strings.CutPrefix(string(b), id+"\n"); ok && strings.Count(got, "\n") == 1 {
				tool.path, tool.id, tool.version = path, id, strings.TrimSuffix(got, "\n")
				return tool.version, nil
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", &MissingToolError{Err: fmt.Errorf("%s --version: %w", path, err)}
	}
	version := strings.TrimSpace(string(out))
	if version == "" || strings.Contains(version, "\n") {
		return "", &MissingToolError{Err: fmt.Errorf("%s --version printed %q, not a version", path, out)}
	}
	tool.path, tool.id, tool.version = path, id, version
	if memo != "" && os.MkdirAll(cacheDir, 0o755) == nil {
		// Best effort: without it the next process asks the binary again.
		_ = writeAtomic(memo, []byte(id+"\n"+version+"\n"))
	}
	return version, nil
}

// binaryID names the file behind path as it is now, or "" if it cannot be
// read (then nothing is remembered on disk).
func binaryID(path string) string {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return ""
	}
	real, err = filepath.Abs(real)
	if err != nil {
		return ""
	}
	var st unix.Stat_t
	if unix.Stat(real, &st) != nil {
		return ""
	}
	return fmt.Sprintf("%s size=%d mtime=%d.%09d dev=%d ino=%d", real, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Dev, st.Ino)
}

// runWasmOpt runs wasm-opt on mod, with its files in a private temporary
// directory (not the cache: a killed run leaves nothing there).
func runWasmOpt(ctx context.Context, mod []byte, args []string) ([]byte, error) {
	work, err := os.MkdirTemp("", "ftvm-wasm-opt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	in, out := filepath.Join(work, "in.wasm"), filepath.Join(work, "out.wasm")
	if err := os.WriteFile(in, mod, 0o644); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, WasmOpt, append(append([]string{in}, args...), "-o", out)...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		var ee *exec.Error
		switch {
		case errors.As(err, &ee):
			return nil, &MissingToolError{Err: err}
		case errors.Is(ctx.Err(), context.DeadlineExceeded) && time.Since(t0) >= Timeout:
			return nil, fmt.Errorf("wasm-opt did not finish within %v", Timeout)
		case ctx.Err() != nil:
			return nil, fmt.Errorf("wasm-opt: %w", ctx.Err())
		}
		return nil, fmt.Errorf("wasm-opt failed (%v): %s", err, lastLines(stderr.String(), 20))
	}
	return os.ReadFile(out)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append([]string{"..."}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// finish exports the globals of wasm-opt's output (so Asyncify's own state
// is exported too) and checks that Asyncify's functions are there.
func finish(out []byte, safePoints []string, key string, cached bool) (*Instrumented, error) {
	m, err := parse(out)
	if err != nil {
		return nil, fmt.Errorf("wasm-opt output: %w", err)
	}
	have := map[string]bool{}
	for _, e := range m.exports {
		if e.kind == kindFunc {
			have[e.name] = true
		}
	}
	for _, name := range AsyncifyExports {
		if !have[name] {
			return nil, fmt.Errorf("wasm-opt output lacks the %s export: Asyncify was not applied", name)
		}
	}
	mod, globals, err := m.exportGlobals(out)
	if err != nil {
		return nil, fmt.Errorf("wasm-opt output: %w", err)
	}
	return &Instrumented{Module: mod, Globals: globals, SafePoints: safePoints, Key: key, Cached: cached}, nil
}

func load(path string, safePoints []string, key string) (*Instrumented, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return finish(b, safePoints, key, true)
}

// writeAtomic writes b to path so that readers see all of it or nothing,
// even across a crash: temp file, fsync, rename, fsync of the directory.
func writeAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// lockFile takes an exclusive flock on path, waiting until ctx ends. flock
// locks belong to the open file, so goroutines of one process exclude each
// other as processes do.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
