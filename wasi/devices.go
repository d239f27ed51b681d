// Package wasi is ftvm's device layer: a complete wasi_snapshot_preview1
// implemented on the host, one file per device area. Every host call is a
// safe point, every nondeterministic input flows through the InputTap, and
// every external effect through the OutputGate (hooks.go). Guest memory is
// touched only through Mem (mem.go).
package wasi

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/sys"
	"golang.org/x/sys/unix"
)

// Preopen is a host directory made visible to the guest under GuestPath.
type Preopen struct {
	HostPath  string
	GuestPath string
}

// Listener is a TCP listener preopened for the guest. Fd is the guest
// descriptor number it appears at (0 means the next free one after the
// preopened directories). Either Addr (host:port to bind) or File (an
// already listening socket, taken over) is set.
type Listener struct {
	Fd   uint32
	Addr string
	File *os.File
}

// Config configures a device layer.
type Config struct {
	Args     []string
	Env      []string // KEY=VALUE
	Preopens []Preopen
	Listen   []Listener
	// Stdin, Stdout and Stderr default to the process's own. A *os.File is
	// used directly (and waited on by poll_oneoff); other readers and writers
	// are always ready.
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Tap observes every nondeterministic input; nil for none.
	Tap InputTap
	// Gate decides when effects happen; nil performs them at once.
	Gate OutputGate
	// SafePoint, when set, is called at the entry of every host call, before
	// the call has any effect: the point where the machine may pause. It
	// returns true when it has begun unwinding the guest's stack: the call
	// then returns at once without effect, and runs for real when the guest
	// is rewound to it.
	SafePoint func(ctx context.Context, mod api.Module, c Call) bool
	// OnWake, when set, runs on the guest's goroutine each time a blocked
	// wait inside a host call wakes up (Interrupt, an event, a timeout),
	// before it waits again or returns: Go code, where the machine can
	// collect garbage without a stop waiting on guest code.
	OnWake func()
	// OnIdle, when set, is called when the guest is about to sleep in a
	// blocking call (poll_oneoff, or a blocking read, accept or write):
	// it has nothing to do until input arrives. A Remus primary takes
	// that moment to end an epoch whose output is waiting, since pausing
	// an idle guest costs it nothing. It reports whether it asked for a
	// pause (Devices.idle).
	OnIdle func() bool
	// Rand is the source of random_get; crypto/rand when nil.
	Rand io.Reader
	// Clock supplies host time; the real clocks when nil.
	Clock HostClock
}

// Counters are running totals, safe to read from any goroutine.
type Counters struct {
	Calls     [NumCalls]atomic.Uint64
	BytesIn   atomic.Uint64 // bytes the guest read from files, sockets and stdin
	BytesOut  atomic.Uint64 // bytes the guest wrote to files, sockets and stdio
	Accepted  atomic.Uint64 // connections accepted
	Effects   atomic.Uint64 // effects passed to the output gate
	PollWaits atomic.Uint64 // times poll_oneoff or a blocking call actually slept
}

// Devices is the device layer of one VM.
type Devices struct {
	args, env []string
	preopens  []Preopen
	fds       Table
	stdin     io.Reader
	// stdinOwn is stdin's host descriptor as the guest reads it when the
	// device layer opened it itself (privateStdin), -1 otherwise.
	stdinOwn int
	// stdinSock is stdin's host descriptor if it is a socket, read with
	// MSG_DONTWAIT (a socket cannot be reopened), -1 otherwise.
	stdinSock int
	stdout    io.Writer
	stderr    io.Writer
	tap       InputTap
	gate      OutputGate
	safePoint func(ctx context.Context, mod api.Module, c Call) bool
	onWake    func()
	onIdle    func() bool
	rand      io.Reader
	clock     *Clock
	counters  Counters

	// wake is an eventfd that interrupts any blocking wait of the guest, so
	// that a pause or shutdown never waits for guest I/O.
	wake int
	// idle, if not nil, is where poll_oneoff sleeps (idle.go).
	idle *idleWaiter
	// closed is set by Stop: blocking waits return EINTR from then on.
	closed atomic.Bool
	// waiting is set while poll_oneoff blocks: the guest is parked in Go
	// code, not running its own (Waiting).
	waiting atomic.Bool
	// pollWait is what a guest blocked in poll_oneoff waits for (PollWait).
	pollWait atomic.Pointer[PollWait]
	// pause is set by RequestPause: a call blocked in a wait that has had no
	// effect yet gives up and restarts from its safe point.
	pause atomic.Bool
	// pauseAsked and pauseWoken count RequestPause calls begun and done
	// (their wake-up written): drainPauseWake waits for the two to meet.
	pauseAsked, pauseWoken atomic.Uint64
	released               atomic.Bool
	// dirBytes is what all descriptors' cached listings hold (fd.go).
	dirBytes int
	// detached is held (read) by outputs a gate performs off the guest's
	// call while they check released and use a host descriptor, and
	// (write) by Close while it sets released: no such output uses a
	// number Close freed.
	detached sync.RWMutex

	iovs [][]byte // scratch for iovec resolution

	// pollScratch is poll.go's and sock.go's reusable state (owned there).
	pollScratch pollScratch
}

// New opens the preopened directories and listeners and sets up stdio.
func New(cfg Config) (*Devices, error) {
	d, err := newBase(cfg)
	if err != nil {
		return nil, err
	}
	for i, p := range cfg.Preopens {
		if err := d.openPreopen(i, p); err != nil {
			d.Close()
			return nil, err
		}
	}
	for _, l := range cfg.Listen {
		if err := d.openListener(l); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// newBase sets up everything but the preopened directories and listeners.
func newBase(cfg Config) (*Devices, error) {
	d := &Devices{
		args: cfg.Args, env: cfg.Env, preopens: append([]Preopen(nil), cfg.Preopens...),
		stdin: cfg.Stdin, stdout: cfg.Stdout, stderr: cfg.Stderr,
		tap: cfg.Tap, gate: cfg.Gate, safePoint: cfg.SafePoint, onWake: cfg.OnWake, onIdle: cfg.OnIdle, rand: cfg.Rand,
		wake: -1, stdinOwn: -1, stdinSock: -1,
	}
	if d.stdin == nil {
		d.stdin = os.Stdin
	}
	if d.stdout == nil {
		d.stdout = os.Stdout
	}
	if d.stderr == nil {
		d.stderr = os.Stderr
	}
	d.clock = newClock(cfg.Clock)
	for _, e := range d.env {
		if !validEnv(e) {
			return nil, fmt.Errorf("environment entry %q: want KEY=VALUE", e)
		}
	}
	var err error
	if d.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	d.idle = newIdleWaiter(d.wake)
	for i, std := range []any{d.stdin, d.stdout, d.stderr} {
		host := -1
		if f, ok := std.(*os.File); ok {
			host = int(f.Fd())
		}
		f := &FD{Kind: KindStdio, Stdio: i, Host: host, Root: -1, Filetype: stdioFiletype(host),
			Readable: i == 0, Writable: i != 0}
		if i == 0 && host >= 0 {
			if own := privateStdin(host); own >= 0 {
				f.Host, d.stdinOwn = own, own
			} else if f.Filetype == FiletypeSocketStream || f.Filetype == FiletypeSocketDgram {
				d.stdinSock = host
			}
		}
		f.RightsBase = RightsTTY
		if f.Filetype == FiletypeRegularFile {
			f.RightsBase = RightsRegularFile &^ (RightFdSeek | RightFdTell)
		}
		d.fds.Set(uint32(i), f)
	}
	return d, nil
}

func validEnv(e string) bool {
	for i := 0; i < len(e); i++ {
		if e[i] == '=' {
			return i > 0
		}
		if e[i] == 0 {
			return false
		}
	}
	return false
}

// privateStdin opens, for a stdin that is a pipe, a FIFO or a terminal, a
// non-blocking open file description of its own (through /proc/self/fd),
// or returns -1. The guest's reads then never block in the kernel, and no
// one else's view of stdin changes: the descriptor ftvm was given may be
// shared with other processes, and another reader can take the bytes
// between a readiness check and a read, which on the shared, blocking
// description then sleeps out of reach of pauses and stops. A socket
// cannot be reopened so (it is read with MSG_DONTWAIT instead), and a
// regular file never blocks.
func privateStdin(host int) int {
	var st unix.Stat_t
	if unix.Fstat(host, &st) != nil {
		return -1
	}
	if m := st.Mode & unix.S_IFMT; m != unix.S_IFIFO && m != unix.S_IFCHR {
		return -1
	}
	// Only a stdin open for reading: reopening a pipe's write end for
	// reading would let the guest read what is written to it.
	if fl, err := unix.FcntlInt(uintptr(host), unix.F_GETFL, 0); err != nil || fl&unix.O_ACCMODE == unix.O_WRONLY {
		return -1
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", host), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return -1
	}
	var st2 unix.Stat_t
	if unix.Fstat(fd, &st2) != nil || st2.Dev != st.Dev || st2.Ino != st.Ino {
		unix.Close(fd) // not the same file after all
		return -1
	}
	return fd
}

func stdioFiletype(host int) Filetype {
	if host < 0 {
		return FiletypeCharacterDevice
	}
	var st unix.Stat_t
	if unix.Fstat(host, &st) != nil {
		return FiletypeUnknown
	}
	return filetypeOfMode(st.Mode)
}

func filetypeOfMode(mode uint32) Filetype {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return FiletypeRegularFile
	case unix.S_IFDIR:
		return FiletypeDirectory
	case unix.S_IFLNK:
		return FiletypeSymbolicLink
	case unix.S_IFCHR:
		return FiletypeCharacterDevice
	case unix.S_IFBLK:
		return FiletypeBlockDevice
	case unix.S_IFSOCK:
		return FiletypeSocketStream
	}
	// Pipes have no WASI file type; Unknown is what wasmtime reports too.
	return FiletypeUnknown
}

func (d *Devices) openPreopen(idx int, p Preopen) error {
	abs, err := filepath.Abs(p.HostPath)
	if err != nil {
		return fmt.Errorf("preopen %s: %w", p.HostPath, err)
	}
	host, err := unix.Open(abs, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("preopen %s: %w", p.HostPath, err)
	}
	d.preopens[idx].HostPath = abs
	_, errno := d.fds.Add(&FD{Kind: KindDir, Filetype: FiletypeDirectory, Host: host, Preopen: p.GuestPath,
		Root: idx, Path: ".", Readable: true,
		RightsBase: RightsDirectory, RightsInheriting: RightsDirectoryInheriting})
	if errno != ESUCCESS {
		unix.Close(host)
		return fmt.Errorf("preopen %s: %w", p.HostPath, errno)
	}
	return nil
}

func (d *Devices) openListener(l Listener) error {
	host, addr, err := listenHost(l)
	if err != nil {
		return err
	}
	f := &FD{Kind: KindListener, Filetype: FiletypeSocketStream, Host: host, Root: -1, Addr: addr,
		Readable: true, RightsBase: RightsListener}
	if l.Fd == 0 {
		if _, errno := d.fds.Add(f); errno != ESUCCESS {
			unix.Close(host)
			return fmt.Errorf("listen %s: %w", addr, errno)
		}
		return nil
	}
	if l.Fd >= maxFds {
		unix.Close(host)
		return fmt.Errorf("listen %s: descriptor %d out of range", addr, l.Fd)
	}
	if old, errno := d.fds.Get(l.Fd); errno == ESUCCESS {
		unix.Close(host)
		return fmt.Errorf("listen %s: guest descriptor %d is already in use by %v", addr, l.Fd, old.Kind)
	}
	d.fds.Set(l.Fd, f)
	return nil
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return (&net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}).String()
	case *unix.SockaddrInet6:
		return (&net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}).String()
	}
	return ""
}

// ListenerAddrs reports the bound address of each listener by guest fd.
func (d *Devices) ListenerAddrs() map[uint32]string {
	out := map[uint32]string{}
	d.fds.Each(func(fd uint32, f *FD) {
		if f.Kind == KindListener {
			out[fd] = f.Addr
		}
	})
	return out
}

// Counters exposes the running totals.
func (d *Devices) Counters() *Counters { return &d.counters }

// OpenFds is the number of open guest descriptors. Not safe to call while
// the guest runs; for tests and snapshots.
func (d *Devices) OpenFds() int { return d.fds.Len() }

// PreopenHostPaths returns the host directories the guest was given
// (absolute), in preopen order. They are set when the devices are made or
// restored and do not change after.
func (d *Devices) PreopenHostPaths() []string {
	out := make([]string, len(d.preopens))
	for i, p := range d.preopens {
		out[i] = p.HostPath
	}
	return out
}

// Interrupt wakes any blocking wait inside a host call. Safe from any goroutine.
func (d *Devices) Interrupt() {
	var one [8]byte
	one[0] = 1
	unix.Write(d.wake, one[:])
}

// RequestPause makes a guest blocked inside a host call reach its safe point
// promptly: the wait is abandoned (it has had no effect) and the call starts
// again at its safe point, where the machine can pause it. Safe from any
// goroutine.
func (d *Devices) RequestPause() {
	d.pauseAsked.Add(1)
	d.pause.Store(true)
	if testAfterPauseFlag != nil {
		testAfterPauseFlag()
	}
	d.Interrupt()
	d.pauseWoken.Add(1)
}

// testAfterPauseFlag, if set, runs in RequestPause between the flag and the
// Interrupt: tests widen that window, which a busy machine may too.
var testAfterPauseFlag func()

// Waiting reports whether the guest is blocked in poll_oneoff now, so
// neither running its own code nor about to (until an event or its timeout).
func (d *Devices) Waiting() bool { return d.waiting.Load() }

// ClearPause ends a RequestPause.
func (d *Devices) ClearPause() { d.pause.Store(false) }

// PauseRequested says whether the pause flag is up (RequestPause, not yet
// ClearPause).
func (d *Devices) PauseRequested() bool { return d.pause.Load() }

// Stop makes every blocking wait return at once and forever after (EINTR),
// so that a VM being shut down never waits on guest I/O.
func (d *Devices) Stop() {
	d.closed.Store(true)
	d.Interrupt()
}

// Stopping reports whether Stop (or Close) was called: a guest that ended
// with sys.ExitCodeContextCanceled since was ended by it.
func (d *Devices) Stopping() bool { return d.closed.Load() }

// Close releases every host resource. Safe to call once the guest has stopped.
func (d *Devices) Close() error {
	d.closed.Store(true)
	d.detached.Lock()
	already := d.released.Swap(true)
	d.detached.Unlock()
	if already {
		return nil
	}
	d.fds.Each(func(fd uint32, f *FD) { d.closeHost(f) })
	d.fds = Table{}
	if d.idle != nil {
		d.idle.close()
	}
	if d.wake >= 0 {
		unix.Close(d.wake)
	}
	if d.stdinOwn >= 0 {
		if d.idle != nil {
			d.idle.forget(d.stdinOwn)
		}
		unix.Close(d.stdinOwn)
		d.stdinOwn = -1
	}
	return nil
}

// Register instantiates the host modules in r and attaches d to them.
func (d *Devices) Register(ctx context.Context, r wazero.Runtime) error {
	h, err := RegisterHost(ctx, r)
	if err != nil {
		return err
	}
	h.Attach(d)
	return nil
}

// Host is the device layer's host modules (wasi_snapshot_preview1 and the
// instrumentation's loop poll) instantiated in a runtime, before the
// devices they serve exist: a VM's preparation registers them, and the VM
// attaches its devices when it is set up. Compiling them cost every VM
// 0.3–0.7 ms here (46 host functions), in a restore's or a Remus
// failover's critical path; a backup prepares its Program in advance.
type Host struct{ dev atomic.Pointer[Devices] }

// Attach makes d the devices every call reaches, before the guest runs.
func (h *Host) Attach(d *Devices) { h.dev.Store(d) }

// RegisterHost instantiates the host modules in r, with no devices yet
// (Attach). One VM's, since module names are per runtime.
func RegisterHost(ctx context.Context, r wazero.Runtime) (*Host, error) {
	h := &Host{}
	b := r.NewHostModuleBuilder(ModuleName)
	for c := Call(0); c < NumCalls; c++ {
		sig := signatures[c]
		var fn api.GoModuleFunc
		var results []api.ValueType
		if c == CallProcExit {
			fn = h.via((*Devices).procExit)
		} else {
			fn = h.bind(c, handlers[c])
			results = []api.ValueType{i32}
		}
		b.NewFunctionBuilder().WithGoModuleFunction(fn, sig.params, results).WithName(sig.name).Export(sig.name)
	}
	if _, err := b.Instantiate(ctx); err != nil {
		return nil, err
	}
	pb := r.NewHostModuleBuilder(PollModule)
	pb.NewFunctionBuilder().WithGoModuleFunction(h.via((*Devices).poll), nil, nil).WithName(PollName).Export(PollName)
	pb.NewFunctionBuilder().WithGoModuleFunction(h.via((*Devices).yield), nil, nil).WithName(YieldName).Export(YieldName)
	if _, err := pb.Instantiate(ctx); err != nil {
		return nil, err
	}
	return h, nil
}

// via is the host function that calls method fn of the attached devices.
func (h *Host) via(fn func(*Devices, context.Context, api.Module, []uint64)) api.GoModuleFunc {
	return func(ctx context.Context, mod api.Module, stack []uint64) { fn(h.dev.Load(), ctx, mod, stack) }
}

// yield is the leaf loops' visit to the host (YieldName): entering Go code
// lets the runtime stop the goroutine for a garbage collection; and a
// stopping VM ends the guest here.
func (d *Devices) yield(ctx context.Context, mod api.Module, stack []uint64) {
	d.endIfStopping(ctx, mod)
}

// endIfStopping ends the guest, as proc_exit would, if the VM is being
// stopped. (The machine does not make wazero check for a cancelled
// context inside guest code: that check costs a CPU-bound guest several
// times its run time. Host calls, loop polls and yields check instead.)
func (d *Devices) endIfStopping(ctx context.Context, mod api.Module) {
	if d.closed.Load() {
		_ = mod.CloseWithExitCode(ctx, sys.ExitCodeContextCanceled)
		panic(sys.NewExitError(sys.ExitCodeContextCanceled))
	}
}

// poll is the loop poll (PollName): a safe point, and the place where a
// guest that makes no host calls notices that the VM is stopping.
func (d *Devices) poll(ctx context.Context, mod api.Module, stack []uint64) {
	d.endIfStopping(ctx, mod)
	if d.safePoint != nil {
		d.safePoint(ctx, mod, CallPoll)
	}
}

// bind turns a handler into a host function: it gives the machine its safe
// point, resolves guest memory, runs the call, counts it and stores the errno.
// A call whose wait was abandoned for a pause (errRestart) goes back to its
// safe point.
func (host *Host) bind(c Call, h handler) api.GoModuleFunc {
	return func(ctx context.Context, mod api.Module, stack []uint64) {
		d := host.dev.Load()
		d.endIfStopping(ctx, mod)
		for {
			if d.safePoint != nil && d.safePoint(ctx, mod, c) {
				return // unwinding: the call happens when the guest is rewound
			}
			errno := h(d, guestMem(mod), stack)
			if errno != errRestart {
				d.counters.Calls[c].Add(1)
				stack[0] = uint64(errno)
				return
			}
		}
	}
}

func guestMem(mod api.Module) Mem {
	mem := mod.Memory()
	if mem == nil {
		return Mem{}
	}
	b, _ := mem.Read(0, mem.Size())
	return Mem{b: b}
}

// procExit ends the guest with an exit code; it does not return.
func (d *Devices) procExit(ctx context.Context, mod api.Module, stack []uint64) {
	// proc_exit is not a safe point: it never returns, so there is nothing
	// to resume, and the instrumentation does not let the guest unwind there.
	d.counters.Calls[CallProcExit].Add(1)
	code := uint32(stack[0])
	_ = mod.CloseWithExitCode(ctx, code)
	panic(sys.NewExitError(code))
}
