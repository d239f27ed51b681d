package instrument_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/machine/instrument"
)

// readGuest reads a built guest.
func readGuest(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func goGuest(t testing.TB, dir string) []byte {
	t.Helper()
	root, err := guest.Root()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, dir)); err != nil {
		t.Skipf("guest %s not present: %v", dir, err)
	}
	return readGuest(t, guest.MustGo(t, dir))
}

// cGuest builds a C guest with internal/guest.
func cGuest(t testing.TB, name string, src string) []byte {
	t.Helper()
	if _, err := exec.LookPath("clang"); err != nil {
		t.Skip("clang not installed")
	}
	root, err := guest.Root()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, src)); err != nil {
		t.Skipf("guest %s not present: %v", src, err)
	}
	return readGuest(t, guest.MustC(t, name, []string{src}))
}

// instrumentCached instruments with the shared cache, so repeated test runs
// pay wasm-opt's minute per Go module once.
func instrumentCached(t testing.TB, mod []byte) *instrument.Instrumented {
	t.Helper()
	if _, err := exec.LookPath(instrument.WasmOpt); err != nil {
		t.Skip("wasm-opt not installed (Debian package binaryen)")
	}
	in, err := instrument.Instrument(context.Background(), mod, "")
	if err != nil {
		t.Fatal(err)
	}
	return in
}

type runResult struct {
	code           uint32
	stdout, stderr string
}

func run(t testing.TB, mod []byte, cacheDir string, args ...string) runResult {
	t.Helper()
	var out, errb bytes.Buffer
	code, err := machine.Run(context.Background(), machine.Config{Module: mod, Name: "guest", Args: args,
		Stdout: &out, Stderr: &errb, CacheDir: cacheDir})
	if err != nil {
		t.Fatalf("run: %v\nstdout: %s\nstderr: %s", err, out.String(), errb.String())
	}
	return runResult{code, out.String(), errb.String()}
}
