package wasi

import (
	"bytes"
	"encoding/json"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCaptureRestore captures a device table with open files (at offsets, in
// append mode, in a subdirectory), a listener and a live connection, moves
// the state through JSON as a snapshot would, and restores it in new devices
// on a copy of the directory: files continue at their offsets, the listener
// accepts again, the connection reads as reset, the clock does not go back.
func TestCaptureRestore(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "r.txt"), []byte("0123456789"), 0o644)

	g := newGuest(t, dir, nil)
	// Replace the devices with ones that also have a listener.
	g.d.Close()
	d, err := New(Config{Preopens: []Preopen{{HostPath: dir, GuestPath: "/"}},
		Listen: []Listener{{Addr: "127.0.0.1:0"}}, Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	g.d = d
	t.Cleanup(func() { d.Close() })
	const listenerFd = 4

	r, errno := g.open(preopenFd, 0, "sub/r.txt", 0, RightFdRead|RightFdSeek|RightFdTell, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	if s, _ := g.read(r, 4); s != "0123" {
		t.Fatalf("read %q", s)
	}
	w, errno := g.open(preopenFd, 0, "log.txt", OflagCreat, RightFdWrite, FdflagAppend)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	g.write(w, "first\n")

	// A live connection on the listener.
	addr := d.ListenerAddrs()[listenerFd]
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res := g.alloc(4)
	if errno := g.call(sockAccept, listenerFd, 0, uint64(res)); errno != ESUCCESS {
		t.Fatal(errno)
	}
	conn := g.u32(res)

	st := d.Capture()
	blob, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var st2 State
	if err := json.Unmarshal(blob, &st2); err != nil {
		t.Fatal(err)
	}
	// Restore on a copy of the directory, on a fresh port.
	copyDir := t.TempDir()
	os.Mkdir(filepath.Join(copyDir, "sub"), 0o755)
	for _, p := range []string{"sub/r.txt", "log.txt"} {
		b, _ := os.ReadFile(filepath.Join(dir, p))
		os.WriteFile(filepath.Join(copyDir, p), b, 0o644)
	}
	d2, err := Restore(Config{Preopens: []Preopen{{HostPath: copyDir, GuestPath: "/"}},
		Listen: []Listener{{Fd: listenerFd, Addr: "127.0.0.1:0"}},
		Stdin:  strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}, &st2)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if d2.clock.Monotonic() < st.Monotonic {
		t.Error("monotonic clock went backwards across restore")
	}
	g2 := &guest{t: t, d: d2, mem: make([]byte, 1<<20), top: 64}
	if s, errno := g2.read(r, 4); s != "4567" || errno != ESUCCESS {
		t.Errorf("restored read = %q %v, want 4567 at the saved offset", s, errno)
	}
	g2.write(w, "second\n")
	if b, _ := os.ReadFile(filepath.Join(copyDir, "log.txt")); string(b) != "first\nsecond\n" {
		t.Errorf("appended file = %q", b)
	}
	if _, errno := g2.read(conn, 4); errno != ECONNRESET {
		t.Errorf("read on a connection that did not survive = %v, want ECONNRESET", errno)
	}
	if errno := g2.call(fdClose, uint64(conn)); errno != ESUCCESS {
		t.Errorf("close of the reset connection: %v", errno)
	}
	// The listener is bound again and accepts.
	addr2 := d2.ListenerAddrs()[listenerFd]
	c2, err := net.Dial("tcp", addr2)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if errno := g2.call(sockAccept, listenerFd, 0, uint64(res)); errno != ESUCCESS {
		t.Errorf("accept on the restored listener: %v", errno)
	}

	// A file that vanished is a clear error, not a half-restored table.
	os.Remove(filepath.Join(copyDir, "sub", "r.txt"))
	if _, err := Restore(Config{Preopens: []Preopen{{HostPath: copyDir, GuestPath: "/"}},
		Listen: []Listener{{Fd: listenerFd, Addr: "127.0.0.1:0"}},
		Stdin:  strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}, &st2); err == nil ||
		!strings.Contains(err.Error(), "on the host "+filepath.Join(copyDir, "sub", "r.txt")) {
		t.Errorf("restore with a missing file: %v, want it named as the host names it", err)
	}
	// Preopens must match by guest path.
	if _, err := Restore(Config{Preopens: []Preopen{{HostPath: copyDir, GuestPath: "/data"}}}, &st2); err == nil {
		t.Error("restore with a different preopen succeeded")
	}
}

// TestSameButClock: a change to any field of the device state but the
// clock, at the top or in any descriptor, makes it another state. The
// fields are found by reflection, so a field added later is checked too
// (and SameButClock must then compare it).
func TestSameButClock(t *testing.T) {
	base := func() *State {
		return &State{Args: []string{"app", "-x"}, Env: []string{"A=1"},
			Preopens: []Preopen{{HostPath: "/srv", GuestPath: "/data"}}, Monotonic: 5,
			FDs:             []FDState{{Num: 3, Kind: 1, Path: "f", Pos: 10}, {Num: 4, Kind: 2, Addr: "127.0.0.1:1"}},
			Instrumentation: &Instrumentation{Module: "abc"}}
	}
	a := base()
	if b := base(); !a.SameButClock(b) {
		t.Fatal("equal states differ")
	}
	if b := base(); func() bool { b.Monotonic = 99; return !a.SameButClock(b) }() {
		t.Fatal("states that differ in the clock only differ")
	}
	// mutate changes one field of v (a struct), whatever its kind.
	mutate := func(f reflect.Value) {
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "'")
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			f.SetInt(f.Int() + 1)
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			f.SetUint(f.Uint() + 1)
		case reflect.Slice:
			f.Set(reflect.AppendSlice(f.Slice(0, f.Len()), f.Slice(0, 1)))
		case reflect.Pointer:
			n := reflect.New(f.Type().Elem())
			n.Elem().Set(f.Elem())
			n.Elem().Field(n.Elem().NumField() - 1).SetString("other")
			f.Set(n)
		default:
			t.Fatalf("field kind %s: teach this test (and SameButClock) about it", f.Kind())
		}
	}
	st := reflect.TypeFor[State]()
	for i := range st.NumField() {
		name := st.Field(i).Name
		if name == "Monotonic" {
			continue
		}
		b := base()
		mutate(reflect.ValueOf(b).Elem().Field(i))
		if a.SameButClock(b) {
			t.Errorf("a change of %s goes unseen", name)
		}
	}
	for _, sub := range []reflect.Type{reflect.TypeFor[FDState](), reflect.TypeFor[Preopen]()} {
		for i := range sub.NumField() {
			b := base()
			switch sub {
			case reflect.TypeFor[FDState]():
				mutate(reflect.ValueOf(&b.FDs[1]).Elem().Field(i))
			default:
				mutate(reflect.ValueOf(&b.Preopens[0]).Elem().Field(i))
			}
			if a.SameButClock(b) {
				t.Errorf("a change of %s.%s goes unseen", sub.Name(), sub.Field(i).Name)
			}
		}
	}
}

// TestRestoreRefusesImpossibleTables: a state from a corrupt or hostile
// snapshot or checkpoint that no guest could have left (a descriptor number
// past the table's bound or given twice, a root or stream that does not
// exist, an unknown kind) is a clear error before anything is opened, not a
// table grown to 2^32 entries (32 GiB), a leaked file or a panic.
func TestRestoreRefusesImpossibleTables(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Preopens: []Preopen{{HostPath: dir, GuestPath: "/"}},
		Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
	file := func(num uint32) FDState {
		return FDState{Num: num, Kind: KindFile, Filetype: FiletypeRegularFile, Root: 0, Path: "f", Readable: true}
	}
	pre := []Preopen{{HostPath: dir, GuestPath: "/"}}
	for _, c := range []struct {
		name string
		fds  []FDState
		want string
	}{
		{"past the bound", []FDState{file(4), file(math.MaxUint32)}, "out of range"},
		{"at the bound", []FDState{file(maxFds)}, "out of range"},
		{"twice", []FDState{file(4), file(5), file(4)}, "given twice"},
		{"root past the preopens", []FDState{file(4), {Num: 5, Kind: KindFile, Root: 1, Path: "f"}}, "preopen index 1"},
		{"no such stream", []FDState{{Num: 1, Kind: KindStdio, Stdio: 3}}, "standard stream 3"},
		{"unknown kind", []FDState{{Num: 6, Kind: 77}}, "unknown descriptor kind"},
		{"negative offset", []FDState{{Num: 4, Kind: KindFile, Filetype: FiletypeRegularFile, Path: "f", Writable: true, Pos: -1}},
			"negative offset"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := openFiles(t)
			d, err := Restore(cfg, &State{Preopens: pre, FDs: c.fds})
			if err == nil {
				d.Close()
				t.Fatal("restored")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q, want one saying %q", err, c.want)
			}
			if after := openFiles(t); after != before {
				t.Errorf("%d host descriptors open after the refused restore, %d before", after, before)
			}
		})
	}
	// The largest number the table holds is restored.
	d, err := Restore(cfg, &State{Preopens: pre, FDs: []FDState{file(maxFds - 1)}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, errno := d.fds.Get(maxFds - 1); errno != ESUCCESS {
		t.Errorf("fd %d after restore: %v", maxFds-1, errno)
	}
}

// openFiles counts this process's open descriptors.
func openFiles(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestRestoreRefusesAClockPastItsRange: a monotonic clock past the int64
// nanoseconds it is kept in read 0 after a restore (the guest's clock went
// back to its start).
func TestRestoreRefusesAClockPastItsRange(t *testing.T) {
	cfg := Config{Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
	if d, err := Restore(cfg, &State{Monotonic: math.MaxInt64 + 5}); err == nil {
		d.Close()
		t.Fatal("restored a clock past its range")
	}
}

// TestRestoreReopensFilesAsOpened: a file the guest opened through a
// symlink is re-opened through it (it was re-opened without following
// symlinks: ELOOP, a state a guest could leave that no restore took); its
// sync flags are the host descriptor's again; and a FIFO found where a
// regular file was is an error, not a restore that waits for ever for the
// FIFO's writer.
func TestRestoreReopensFilesAsOpened(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "target"), []byte("0123456789"), 0o644)
	os.Symlink("target", filepath.Join(dir, "link"))
	os.WriteFile(filepath.Join(dir, "log"), nil, 0o644)
	g := newGuest(t, dir, nil)
	r, errno := g.open(preopenFd, LookupSymlinkFollow, "link", 0, RightFdRead|RightFdSeek|RightFdTell, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	if s, _ := g.read(r, 4); s != "0123" {
		t.Fatalf("read %q", s)
	}
	w, errno := g.open(preopenFd, 0, "log", 0, RightFdWrite, FdflagDsync|FdflagAppend)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	st := g.d.Capture()
	cfg := Config{Preopens: []Preopen{{HostPath: dir, GuestPath: "/"}},
		Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
	d2, err := Restore(cfg, st)
	if err != nil {
		t.Fatalf("restore of a file opened through a symlink: %v", err)
	}
	g2 := &guest{t: t, d: d2, mem: make([]byte, 1<<20), top: 64}
	if s, _ := g2.read(r, 4); s != "4567" {
		t.Fatalf("after the restore the file opened through the link reads %q, want \"4567\"", s)
	}
	f, _ := d2.fds.Get(w)
	fl, err := unix.FcntlInt(uintptr(f.Host), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_DSYNC == 0 || fl&unix.O_APPEND == 0 || fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("the restored log's host flags %#x: want O_DSYNC and O_APPEND, blocking", fl)
	}
	d2.Close()

	// The link's target is a FIFO now, with no writer: refused at once.
	os.Remove(filepath.Join(dir, "target"))
	if err := unix.Mkfifo(filepath.Join(dir, "target"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		d3, err := Restore(cfg, st)
		if err == nil {
			d3.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "file type") {
			t.Fatalf("restore with a FIFO where the file was: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the restore waited for the FIFO's writer")
	}
}

// TestCaptureIntoReusesTheTable: capturing into a state captured before
// reuses its descriptor table — a Remus primary does it in every pause,
// where a fresh table cost page faults — and gives what a fresh capture
// gives, as the table grows past the memory it had and shrinks again.
func TestCaptureIntoReusesTheTable(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"} {
		os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644)
	}
	g := newGuest(t, dir, nil)
	open := func(name string) uint32 {
		fd, errno := g.open(preopenFd, 0, name, 0, RightFdRead|RightFdSeek|RightFdTell, 0)
		if errno != ESUCCESS {
			t.Fatal(errno)
		}
		return fd
	}
	open("a")
	same := func(got *State) {
		t.Helper()
		want := g.d.Capture()
		got.Monotonic, want.Monotonic = 0, 0
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("captured into a reused state:\n%+v\nwant\n%+v", got.FDs, want.FDs)
		}
	}
	st := g.d.Capture()
	if n := testing.AllocsPerRun(100, func() { st = g.d.CaptureInto(st) }); n != 0 {
		t.Fatalf("CaptureInto a state with room allocated %v times", n)
	}
	same(st)
	// More descriptors than it has room for, then fewer again.
	var fds []uint32
	for _, name := range []string{"b", "c", "d", "e", "f", "g", "h", "i", "j"} {
		fds = append(fds, open(name))
	}
	st = g.d.CaptureInto(st)
	same(st)
	for _, fd := range fds[2:] {
		if errno := g.call(fdClose, uint64(fd)); errno != ESUCCESS {
			t.Fatal(errno)
		}
	}
	st = g.d.CaptureInto(st)
	same(st)
	if n := testing.AllocsPerRun(100, func() { st = g.d.CaptureInto(st) }); n != 0 {
		t.Fatalf("CaptureInto a state with room allocated %v times", n)
	}
}
