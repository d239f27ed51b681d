package machine_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/snapshot"
)

// TestSnapshotStopRestore pauses a Go guest blocked reading stdin, writes a
// snapshot and stops it there; a new VM restored from the file continues
// the same computation: it reads the line from its own stdin, prints and
// exits with the original's exit code.
func TestSnapshotStopRestore(t *testing.T) {
	mod := hello(t)
	ctx := context.Background()
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinW.Close()
	var out1 bytes.Buffer
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", Args: []string{"stdin"},
		Env: []string{"FOO=before", "EXIT=3"}, Stdin: stdinR, Stdout: &out1, Stderr: &out1,
		CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	// Wait until the guest blocks on stdin.
	for deadline := time.Now().Add(20 * time.Second); m.Info().Counters.Calls["fd_write"] < 3; {
		if time.Now().After(deadline) {
			t.Fatal("guest did not reach stdin")
		}
		time.Sleep(10 * time.Millisecond)
	}
	path := filepath.Join(t.TempDir(), "hello.snap")
	s, err := m.Snapshot(ctx, path, machine.SnapshotOptions{Stop: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != machine.ErrStopped {
		t.Fatalf("run ended with %v, want ErrStopped", err)
	}
	if strings.Contains(out1.String(), "stdin:") {
		t.Fatalf("the guest ran past the snapshot: %q", out1.String())
	}
	t.Logf("snapshot: %d pages, %d bytes of stack, memory %d", len(s.Pages), len(s.Stack), s.MemorySize)

	hash := snapshot.ModuleHash(mod)
	img, err := snapshot.Restore(&hash, path)
	if err != nil {
		t.Fatal(err)
	}
	var out2 bytes.Buffer
	code, err := machine.Run(ctx, machine.Config{Module: mod, Name: "hello", Restore: img,
		Stdin: strings.NewReader("after restore\n"), Stdout: &out2, Stderr: &out2, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if code != 3 {
		t.Errorf("restored guest exited %d, want 3 (its environment came with the snapshot)", code)
	}
	if want := "stdin: \"after restore\\n\"\nexiting with 3\n"; out2.String() != want {
		t.Errorf("restored output %q, want %q", out2.String(), want)
	}
	// Another module (here: the same code plus a custom section) is refused.
	other := append(bytes.Clone(mod), 0x00, 0x02, 0x01, 'x')
	if _, err := machine.New(ctx, machine.Config{Module: other, Name: "other",
		Restore: img, Stdout: io.Discard, CacheDir: t.TempDir()}); err == nil ||
		!strings.Contains(err.Error(), "not the module the snapshot was taken of") {
		t.Errorf("restore with another module: %v", err)
	}
}

// TestSnapshotBeforeFirstSafePoint asks for a snapshot before the guest has
// even started: the request waits for the first safe point instead of
// failing, and the snapshot restores.
func TestSnapshotBeforeFirstSafePoint(t *testing.T) {
	mod := hello(t)
	ctx := context.Background()
	var out bytes.Buffer
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", Stdin: strings.NewReader(""),
		Stdout: &out, Stderr: &out, CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	path := filepath.Join(t.TempDir(), "early.snap")
	got := make(chan error, 1)
	go func() {
		_, err := m.Snapshot(ctx, path, machine.SnapshotOptions{Stop: true})
		got <- err
	}()
	time.Sleep(50 * time.Millisecond) // the request is waiting before Run starts
	if _, err := m.Run(ctx); err != machine.ErrStopped {
		t.Fatalf("run: %v, want ErrStopped", err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if out.Len() != 0 {
		t.Errorf("the guest printed %q before its first host call", out.String())
	}
	hash := snapshot.ModuleHash(mod)
	img, err := snapshot.Restore(&hash, path)
	if err != nil {
		t.Fatal(err)
	}
	var rest bytes.Buffer
	if code, err := machine.Run(ctx, machine.Config{Module: mod, Name: "hello", Restore: img,
		Stdin: strings.NewReader(""), Stdout: &rest, Stderr: &rest, CacheDir: t.TempDir()}); err != nil || code != 0 {
		t.Fatalf("restored: %d %v", code, err)
	}
	if !strings.Contains(rest.String(), "hello from a guest") {
		t.Errorf("restored output %q", rest.String())
	}
}

// A state captured from one instrumented module restores only into the same
// instrumented code: the snapshot records it, and a restore whose
// instrumentation differs (another wasm-opt, other options) is a clear
// error, not a guest rewound into code its stack does not describe.
func TestRestoreChecksInstrumentation(t *testing.T) {
	ctx := context.Background()
	mod, s := captureHello(t)
	if !bytes.Contains(s.Devices, []byte(`"instrumented_sha256":"`)) {
		t.Fatalf("the device state does not record the instrumented module: %s", s.Devices)
	}
	var buf bytes.Buffer
	if err := s.Encode(&buf); err != nil {
		t.Fatal(err)
	}
	restore := func(devices []byte) error {
		s2, err := snapshot.DecodeBytes(buf.Bytes(), nil)
		if err != nil {
			t.Fatal(err)
		}
		s2.Devices = devices
		var img snapshot.Image
		if err := snapshot.Apply(&img, s2); err != nil {
			t.Fatal(err)
		}
		rm, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", Restore: &img, Stdin: strings.NewReader("x\n"),
			Stdout: io.Discard, Stderr: io.Discard, CacheDir: t.TempDir()})
		if err == nil {
			rm.Close(ctx)
		}
		return err
	}
	if err := restore(s.Devices); err != nil {
		t.Fatalf("the same instrumentation: %v", err)
	}
	forged := bytes.Replace(s.Devices, []byte(`"instrumented_sha256":"`), []byte(`"instrumented_sha256":"0`), 1)
	err := restore(forged)
	var me *machine.ModuleError
	if !errors.As(err, &me) || !strings.Contains(err.Error(), "instrumented") {
		t.Fatalf("another instrumentation: %v", err)
	}
	// A state that does not say (made by another tool): refused too, as
	// its stack cannot be checked; it was restored unchecked.
	var devs map[string]any
	if err := json.Unmarshal(s.Devices, &devs); err != nil {
		t.Fatal(err)
	}
	delete(devs, "instrumentation")
	unsaid, _ := json.Marshal(devs)
	if bytes.Contains(unsaid, []byte("instrumented_sha256")) {
		t.Fatalf("the record is elsewhere in %s", unsaid)
	}
	if err := restore(unsaid); !errors.As(err, &me) || !strings.Contains(err.Error(), "does not record") {
		t.Fatalf("no instrumentation recorded: %v", err)
	}
}

// TestRestoreChecksGlobals: a state lacking one of the module's mutable
// globals, or giving one another type, is refused with a clear error. The
// first restored (the global kept its initial value) and the Go guest
// trapped at once; the second restored, and every later capture of the VM
// failed (a Remus primary restored so could never checkpoint).
func TestRestoreChecksGlobals(t *testing.T) {
	ctx := context.Background()
	mod, s := captureHello(t)
	var buf bytes.Buffer
	if err := s.Encode(&buf); err != nil {
		t.Fatal(err)
	}
	restore := func(edit func(g []snapshot.Global) []snapshot.Global) error {
		s2, err := snapshot.DecodeBytes(buf.Bytes(), nil)
		if err != nil {
			t.Fatal(err)
		}
		s2.Globals = edit(slices.Clone(s2.Globals))
		s2.ID = snapshot.Hash{1} // edited: Prepare wants an ID
		var img snapshot.Image
		if err := snapshot.Apply(&img, s2); err != nil {
			return err
		}
		rm, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", Restore: &img, Stdin: strings.NewReader("x\n"),
			Stdout: io.Discard, Stderr: io.Discard, CacheDir: t.TempDir()})
		if err == nil {
			_, err = rm.Run(ctx)
			rm.Close(ctx)
		}
		return err
	}
	if err := restore(func(g []snapshot.Global) []snapshot.Global { return g }); err != nil {
		t.Fatalf("the state as captured: %v", err)
	}
	if len(s.Globals) == 0 {
		t.Fatal("no globals captured")
	}
	if err := restore(func(g []snapshot.Global) []snapshot.Global { return g[1:] }); err == nil ||
		!strings.Contains(err.Error(), "lacks mutable global") {
		t.Fatalf("a state without global %d: %v", s.Globals[0].Index, err)
	}
	if err := restore(func(g []snapshot.Global) []snapshot.Global {
		g[0].Type = snapshot.ValType(0x7e) + snapshot.ValType(0x7f) - g[0].Type // i32 <-> i64
		return g
	}); err == nil || !strings.Contains(err.Error(), "of type") {
		t.Fatalf("a state with global %d of another type: %v", s.Globals[0].Index, err)
	}
}

// captureHello captures the hello guest waiting on its stdin (a pipe kept
// open until the test ends) and returns its module and the snapshot.
func captureHello(t *testing.T) ([]byte, *snapshot.Snapshot) {
	t.Helper()
	mod := hello(t)
	ctx := context.Background()
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdinW.Close() })
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", Args: []string{"stdin"},
		Stdin: stdinR, Stdout: io.Discard, Stderr: io.Discard, CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(ctx) })
	go m.Run(ctx)
	s, err := m.Capture(ctx, machine.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return mod, s
}
