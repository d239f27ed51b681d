package machine_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"sync"
	"testing"

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
