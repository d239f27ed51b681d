package wasi

import (
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// State is the device layer's state as plain data: what a snapshot carries so
// that a VM can continue in another process, on another host.
type State struct {
	Args     []string  `json:"args"`
	Env      []string  `json:"env"`
	Preopens []Preopen `json:"preopens"`
	// Monotonic is the guest's monotonic clock at capture; a restored clock
	// continues from it, so it never goes backwards.
	Monotonic uint64    `json:"monotonic_ns"`
	FDs       []FDState `json:"fds"`
	// Instrumentation is how the running module was instrumented: set by
	// the machine, not the device layer (a restore must run the very same
	// instrumented code, or the captured stack means nothing).
	Instrumentation *Instrumentation `json:"instrumentation,omitempty"`
}

// Instrumentation identifies the instrumented module a state was captured
// from.
type Instrumentation struct {
	LoopPolls bool   `json:"loop_polls,omitempty"`
	Module    string `json:"instrumented_sha256"`
}

// InstrumentationOf reads the Instrumentation of a captured state's JSON
// (nil if it has none, or does not parse).
func InstrumentationOf(stateJSON []byte) *Instrumentation {
	var st struct {
		Instrumentation *Instrumentation `json:"instrumentation"`
	}
	if json.Unmarshal(stateJSON, &st) != nil {
		return nil
	}
	return st.Instrumentation
}

// ListenersOf reads the listening sockets of a captured state's JSON:
// each one's guest descriptor and the address it was bound to.
func ListenersOf(stateJSON []byte) (map[uint32]string, error) {
	var st State
	if err := json.Unmarshal(stateJSON, &st); err != nil {
		return nil, fmt.Errorf("device state: %w", err)
	}
	out := map[uint32]string{}
	for _, f := range st.FDs {
		if f.Kind == KindListener {
			out[f.Num] = f.Addr
		}
	}
	return out, nil
}

// FDState is one open descriptor.
type FDState struct {
	Num              uint32   `json:"num"`
	Kind             Kind     `json:"kind"`
	Filetype         Filetype `json:"filetype"`
	Flags            uint16   `json:"flags,omitempty"`
	RightsBase       uint64   `json:"rights_base"`
	RightsInheriting uint64   `json:"rights_inheriting,omitempty"`
	Preopen          string   `json:"preopen,omitempty"`
	Root             int      `json:"root"`
	Path             string   `json:"path,omitempty"`
	Readable         bool     `json:"readable,omitempty"`
	Writable         bool     `json:"writable,omitempty"`
	Pos              int64    `json:"pos,omitempty"`
	Addr             string   `json:"addr,omitempty"`
	Stdio            int      `json:"stdio,omitempty"`
	Shut             uint8    `json:"shut,omitempty"`
	Follow           bool     `json:"follow,omitempty"`
}

// SameButClock reports whether st and o are the same device state but for
// the clock (Monotonic): a Remus primary re-encodes only the clock of a
// state that did not change since its last checkpoint.
func (st *State) SameButClock(o *State) bool {
	return sameSlice(st.Args, o.Args) && sameSlice(st.Env, o.Env) && sameSlice(st.Preopens, o.Preopens) &&
		sameSlice(st.FDs, o.FDs) && (st.Instrumentation == o.Instrumentation ||
		st.Instrumentation != nil && o.Instrumentation != nil && *st.Instrumentation == *o.Instrumentation)
}

// sameSlice is slices.Equal telling nil from empty, which JSON does.
func sameSlice[E comparable](a, b []E) bool { return (a == nil) == (b == nil) && slices.Equal(a, b) }

// Capture returns the device state. The guest must be stopped (not inside a
// host call) while it runs.
func (d *Devices) Capture() *State { return d.CaptureInto(nil) }

// CaptureInto is Capture into st, whose descriptor table's memory it
// reuses (nil: a new State). A Remus primary captures the device state in
// every pause, and a table allocated there took fresh heap pages, each a
// page fault (10-45 µs on a VM with shadow paging): a KV server's 40
// descriptors cost 25-29 µs of a capture of about 140, against 2 µs
// reused (docs/MEASUREMENTS.md, "What a round of replies waits for").
func (d *Devices) CaptureInto(st *State) *State {
	var fds []FDState
	if st == nil {
		st = new(State)
	} else {
		fds = st.FDs[:0]
	}
	*st = State{Args: d.args, Env: d.env, Preopens: d.preopens, Monotonic: d.clock.Monotonic()}
	n := d.fds.Len()
	if n == 0 {
		return st // FDs nil, as JSON and SameButClock tell nil from empty
	}
	if cap(fds) < n {
		// Room for a few more, so that a connection or two more do
		// not grow it in a pause again.
		fds = make([]FDState, 0, n+n/4+4)
	}
	d.fds.Each(func(fd uint32, f *FD) {
		fs := FDState{Num: fd, Kind: f.Kind, Filetype: f.Filetype, Flags: f.Flags, RightsBase: f.RightsBase,
			RightsInheriting: f.RightsInheriting, Preopen: f.Preopen, Root: f.Root, Path: f.Path,
			Readable: f.Readable, Writable: f.Writable, Pos: f.Pos, Addr: f.Addr, Stdio: f.Stdio, Follow: f.Follow}
		if f.conn != nil {
			fs.Shut = f.conn.shut
		}
		fds = append(fds, fs)
	})
	st.FDs = fds
	return st
}

// Restore re-creates devices from a captured state. cfg supplies what belongs
// to the new host: stdio, hooks, and optionally the host directories behind
// the preopens (matched by guest path; by default the snapshot's own host
// paths) and listener addresses by guest descriptor (by default the
// snapshot's own addresses). Files are re-opened by path with their offsets
// and flags; a missing file is an error, never a half-restored table.
// Connections cannot move between processes yet: the guest keeps their
// descriptors, and sees a reset on its next use.
func Restore(cfg Config, st *State) (*Devices, error) {
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	preopens, err := matchPreopens(cfg.Preopens, st.Preopens)
	if err != nil {
		return nil, err
	}
	cfg.Args, cfg.Env, cfg.Preopens = st.Args, st.Env, preopens
	d, err := newBase(cfg)
	if err != nil {
		return nil, err
	}
	d.clock.SetMonotonic(st.Monotonic)
	roots := make([]int, len(preopens))
	for i, p := range preopens {
		abs, err := filepath.Abs(p.HostPath)
		if err != nil {
			d.Close()
			return nil, err
		}
		d.preopens[i].HostPath = abs
		if roots[i], err = unix.Open(abs, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			for _, r := range roots[:i] {
				unix.Close(r)
			}
			d.Close()
			return nil, fmt.Errorf("restore: preopen %s: %w", abs, err)
		}
	}
	defer func() {
		for _, r := range roots {
			unix.Close(r)
		}
	}()
	listen := map[uint32]Listener{}
	for _, l := range cfg.Listen {
		listen[l.Fd] = l
	}
	var stdio [3]*FD
	for i := range stdio {
		stdio[i], _ = d.fds.Get(uint32(i))
	}
	d.fds = Table{}
	for _, fs := range st.FDs {
		f, err := d.restoreFD(fs, roots, listen, stdio)
		if err != nil {
			what := describeFD(fs)
			if (fs.Kind == KindFile || fs.Kind == KindDir) && fs.Root >= 0 && fs.Root < len(d.preopens) {
				// The host's name for it, which the operator can look at.
				what += ", on the host " + filepath.Join(d.preopens[fs.Root].HostPath, fs.Path)
			}
			d.Close()
			return nil, fmt.Errorf("restore: guest fd %d (%s): %w", fs.Num, what, err)
		}
		d.fds.Set(fs.Num, f)
	}
	return d, nil
}

// Validate refuses a state no guest could have left: a state comes from a
// snapshot file or a primary's checkpoint, and is checked before anything
// is opened (Restore), or before a backup acknowledges the checkpoint that
// carries it, so that its failover cannot fail on it. A descriptor number
// past the table's bound would have the table grow to it (2^32 entries:
// 32 GiB); one given twice would leak the first one's host file; a file's
// root must be one of the state's preopens, a standard stream one of the
// three. (Paths are confined where they are opened: beneath their root.)
func (st *State) Validate() error {
	if st.Monotonic > math.MaxInt64 {
		return fmt.Errorf("monotonic clock %d ns is past the clock's range", st.Monotonic)
	}
	if len(st.FDs) > maxFds {
		return fmt.Errorf("%d descriptors, more than the table's %d", len(st.FDs), maxFds)
	}
	seen := make(map[uint32]bool, len(st.FDs))
	for _, fs := range st.FDs {
		if fs.Num >= maxFds {
			return fmt.Errorf("guest fd %d out of range (the table holds %d)", fs.Num, maxFds)
		}
		if seen[fs.Num] {
			return fmt.Errorf("guest fd %d given twice", fs.Num)
		}
		seen[fs.Num] = true
		switch fs.Kind {
		case KindStdio:
			if fs.Stdio < 0 || fs.Stdio > 2 {
				return fmt.Errorf("guest fd %d: standard stream %d", fs.Num, fs.Stdio)
			}
		case KindDir, KindFile:
			if fs.Root < 0 || fs.Root >= len(st.Preopens) {
				return fmt.Errorf("guest fd %d: preopen index %d out of range (%d preopens)", fs.Num, fs.Root, len(st.Preopens))
			}
			if fs.Pos < 0 {
				return fmt.Errorf("guest fd %d: negative offset %d", fs.Num, fs.Pos)
			}
		case KindListener, KindConn:
		default:
			return fmt.Errorf("guest fd %d: unknown descriptor kind %d", fs.Num, fs.Kind)
		}
	}
	return nil
}

func describeFD(fs FDState) string {
	switch fs.Kind {
	case KindFile, KindDir:
		return "path " + fs.Path
	case KindListener, KindConn:
		return "socket " + fs.Addr
	}
	return "stdio"
}

func matchPreopens(given, saved []Preopen) ([]Preopen, error) {
	if len(given) == 0 {
		return saved, nil
	}
	if len(given) != len(saved) {
		return nil, fmt.Errorf("restore: the snapshot has %d preopened directories, %d were given", len(saved), len(given))
	}
	out := make([]Preopen, len(saved))
	for i, s := range saved {
		found := false
		for _, g := range given {
			if g.GuestPath == s.GuestPath {
				out[i], found = Preopen{HostPath: g.HostPath, GuestPath: s.GuestPath}, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("restore: no directory given for the snapshot's preopen %q", s.GuestPath)
		}
	}
	return out, nil
}

func (d *Devices) restoreFD(fs FDState, roots []int, listen map[uint32]Listener, stdio [3]*FD) (*FD, error) {
	f := &FD{Kind: fs.Kind, Filetype: fs.Filetype, Host: -1, Flags: fs.Flags, RightsBase: fs.RightsBase,
		RightsInheriting: fs.RightsInheriting, Preopen: fs.Preopen, Root: fs.Root, Path: fs.Path,
		Readable: fs.Readable, Writable: fs.Writable, Pos: fs.Pos, Addr: fs.Addr, Stdio: fs.Stdio, Follow: fs.Follow}
	// Restore validated fs (State.Validate): its stream and root exist.
	switch fs.Kind {
	case KindStdio:
		f.Host = stdio[fs.Stdio].Host
		return f, nil
	case KindDir, KindFile:
		// Always non-blocking to open: a FIFO found where a regular file
		// was must not wait for a writer (checked and made blocking again
		// below).
		flags := unix.O_CLOEXEC | unix.O_NONBLOCK
		if !fs.Follow {
			flags |= unix.O_NOFOLLOW
		}
		switch {
		case fs.Kind == KindDir:
			flags |= unix.O_RDONLY | unix.O_DIRECTORY
		case fs.Readable && fs.Writable:
			flags |= unix.O_RDWR
		case fs.Writable:
			flags |= unix.O_WRONLY
		default:
			flags |= unix.O_RDONLY
		}
		if fs.Flags&FdflagAppend != 0 {
			flags |= unix.O_APPEND
		}
		if fs.Flags&FdflagDsync != 0 {
			flags |= unix.O_DSYNC
		}
		if fs.Flags&(FdflagSync|FdflagRsync) != 0 {
			flags |= unix.O_SYNC
		}
		path := fs.Path
		if path == "" {
			path = "."
		}
		host, errno := openBeneath(roots[fs.Root], path, flags, 0)
		if errno != ESUCCESS {
			return nil, errno
		}
		var st unix.Stat_t
		if err := unix.Fstat(host, &st); err != nil {
			unix.Close(host)
			return nil, err
		}
		if got := filetypeOfMode(st.Mode); got != fs.Filetype {
			unix.Close(host)
			return nil, fmt.Errorf("its file type is %d now, it was %d", got, fs.Filetype)
		}
		f.dev, f.ino = uint64(st.Dev), st.Ino
		if fs.Filetype == FiletypeRegularFile || fs.Kind == KindDir {
			// Blocking as path_open leaves a file; a FIFO or device stays
			// non-blocking (its waits are the device layer's).
			if _, err := unix.FcntlInt(uintptr(host), unix.F_SETFL, flags&unix.O_APPEND); err != nil {
				unix.Close(host)
				return nil, err
			}
		}
		f.Host = host
		return f, nil
	case KindListener:
		l, ok := listen[fs.Num]
		if !ok {
			l = Listener{Addr: fs.Addr}
		}
		host, addr, err := listenHost(l)
		if err != nil {
			return nil, err
		}
		f.Host, f.Addr = host, addr
		return f, nil
	case KindConn:
		// A connection is reset: a socket whose peer is gone gives the
		// guest's poll a hangup, and reads and writes fail ECONNRESET.
		pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return nil, err
		}
		unix.Close(pair[1])
		f.Host = pair[0]
		f.conn = &connState{shut: fs.Shut, reset: true}
		return f, nil
	}
	return nil, fmt.Errorf("unknown descriptor kind %d", fs.Kind)
}

// listenHost opens a non-blocking listening socket for l and returns its
// host descriptor and bound address.
func listenHost(l Listener) (int, string, error) {
	var file *os.File
	if l.File != nil {
		file = l.File
	} else {
		ln, err := net.Listen("tcp", l.Addr)
		if err != nil {
			return -1, "", fmt.Errorf("listen %s: %w", l.Addr, err)
		}
		file, err = ln.(*net.TCPListener).File()
		ln.Close()
		if err != nil {
			return -1, "", fmt.Errorf("listen %s: %w", l.Addr, err)
		}
	}
	host, err := unix.FcntlInt(file.Fd(), unix.F_DUPFD_CLOEXEC, 3)
	file.Close()
	if err != nil {
		return -1, "", fmt.Errorf("listen %s: %w", l.Addr, err)
	}
	if err := unix.SetNonblock(host, true); err != nil {
		unix.Close(host)
		return -1, "", fmt.Errorf("listen %s: %w", l.Addr, err)
	}
	addr := l.Addr
	if sa, err := unix.Getsockname(host); err == nil {
		addr = sockaddrString(sa)
	}
	return host, addr, nil
}
