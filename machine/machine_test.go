package machine_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/wasi"
)

func hello(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(guest.MustGo(t, "testdata/guests/hello"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRunArgsEnvStdioExitCode(t *testing.T) {
	mod := hello(t)
	var out, errb bytes.Buffer
	code, err := machine.Run(context.Background(), machine.Config{Module: mod, Name: "hello",
		Args: []string{"stdin", "x y"}, Env: []string{"FOO=bar=baz", "EXIT=7"},
		Stdin: strings.NewReader("typed line\nmore\n"), Stdout: &out, Stderr: &errb, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}
	for _, want := range []string{`args=["stdin" "x y"]`, `env FOO="bar=baz"`, "slept>=10ms: true", `stdin: "typed line\n"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("stdout lacks %q:\n%s", want, out.String())
		}
	}
	if errb.String() != "exiting with 7\n" {
		t.Errorf("stderr = %q", errb.String())
	}
}

// recorder is an input tap and output gate that logs what passes, and can
// hold outputs until released (as output commit does).
type recorder struct {
	mu      sync.Mutex
	inputs  map[wasi.InputKind]int
	written bytes.Buffer // bytes of every write effect, in order
	hold    bool
	held    []func()
}

func (r *recorder) Input(in wasi.Input) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inputs[in.Kind]++
}

func (r *recorder) Output(e wasi.Effect, perform wasi.Perform) (uint32, wasi.Errno) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.Kind == wasi.EffectWrite {
		r.written.Write(e.Data)
	}
	if !r.hold {
		return perform(e.Data)
	}
	data := append([]byte(nil), e.Data...)
	r.held = append(r.held, func() { perform(data) })
	return uint32(len(data)), wasi.ESUCCESS
}

func TestInputTapAndOutputGate(t *testing.T) {
	mod := hello(t)
	for _, hold := range []bool{false, true} {
		rec := &recorder{inputs: map[wasi.InputKind]int{}, hold: hold}
		var out bytes.Buffer
		code, err := machine.Run(context.Background(), machine.Config{Module: mod, Name: "hello",
			Stdout: &out, Stderr: &out, Tap: rec, Gate: rec, CacheDir: t.TempDir()})
		if err != nil || code != 0 {
			t.Fatalf("hold=%v: code %d err %v", hold, code, err)
		}
		if rec.inputs[wasi.InputClock] == 0 || rec.inputs[wasi.InputRandom] == 0 {
			t.Errorf("hold=%v: tap saw %v, want clock and random inputs", hold, rec.inputs)
		}
		if hold {
			// Nothing may leave while held; everything leaves, in order, on release.
			if out.Len() != 0 {
				t.Fatalf("held output leaked: %q", out.String())
			}
			for _, f := range rec.held {
				f()
			}
		}
		if out.String() != rec.written.String() || !strings.Contains(out.String(), "hello from a guest") {
			t.Errorf("hold=%v: stdout %q, gate saw %q", hold, out.String(), rec.written.String())
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"64MiB": 64 << 20, "64M": 64 << 20, "1g": 1 << 30, "65536": 65536, "128KiB": 128 << 10} {
		got, err := machine.ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "MiB", "-1", "1.5G", "12XB"} {
		if _, err := machine.ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) succeeded", bad)
		}
	}
}

// TestRunOnceAndNotAfterClose: a Machine runs its guest once; Run after
// Close, or a second time, says so instead of failing somewhere inside; a
// Close while the guest runs (blocked reading stdin) stops it, and Run
// returns ErrStopped.
func TestRunOnceAndNotAfterClose(t *testing.T) {
	mod := hello(t)
	ctx := context.Background()
	cache := t.TempDir()
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello", CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Run(ctx); !errors.Is(err, machine.ErrClosed) {
		t.Fatalf("Run after Close: %v, want ErrClosed", err)
	}

	m, err = machine.New(ctx, machine.Config{Module: mod, Name: "hello", CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	if code, err := m.Run(ctx); err != nil || code != 0 {
		t.Fatalf("first Run: %d, %v", code, err)
	}
	if _, err := m.Run(ctx); !errors.Is(err, machine.ErrRan) {
		t.Fatalf("second Run: %v, want ErrRan", err)
	}

	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	defer stdinW.Close()
	m, err = machine.New(ctx, machine.Config{Module: mod, Name: "hello", Args: []string{"stdin"}, Stdin: stdinR, CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	deadline := time.Now().Add(10 * time.Second)
	for m.Info().Counters.Calls["fd_read"] == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, machine.ErrStopped) {
			t.Fatalf("Run closed while blocked on stdin: %v, want ErrStopped", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close returned but Run did not")
	}
}
