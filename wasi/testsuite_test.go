package wasi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/wasi"
)

// The official WASI testsuite (github.com/WebAssembly/wasi-testsuite), run
// as its SPECIFICATION.md asks, each case on a private copy of its root
// directory.

// suites are the testsuite's directories of wasm32-wasip1 command modules.
var suites = []string{"rust", "assemblyscript"}

// testsuiteDir finds shared/wasi-testsuite beside the repository by walking
// up from the working directory.
func testsuiteDir() (string, bool) {
	dir, err := os.Getwd()
	if err != nil {
		return "", false
	}
	for {
		p := filepath.Join(dir, "shared", "wasi-testsuite")
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p, true
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", false
		}
		dir = parent
	}
}

// caseSpec is a test's JSON specification, legacy or operation-based.
type caseSpec struct {
	Args       []string          `json:"args"`
	Env        map[string]string `json:"env"`
	Root       *string           `json:"root"`
	ExitCode   uint32            `json:"exit_code"`
	Stdout     *string           `json:"stdout"`
	Stderr     *string           `json:"stderr"`
	Proposals  []string          `json:"proposals"`
	Operations []struct {
		Type     string            `json:"type"`
		Args     []string          `json:"args"`
		Env      map[string]string `json:"env"`
		Root     *string           `json:"root"`
		ExitCode uint32            `json:"exit_code"`
		ID       string            `json:"id"`
		Payload  *string           `json:"payload"`
	} `json:"operations"`
}

// normalize folds an operation-based specification into the legacy fields;
// it reports false for what a command-module runner cannot do (connections).
func (s *caseSpec) normalize() (bool, string) {
	if len(s.Operations) == 0 {
		return true, ""
	}
	for _, op := range s.Operations {
		switch op.Type {
		case "run":
			s.Args, s.Env, s.Root = op.Args, op.Env, op.Root
		case "wait":
			s.ExitCode = op.ExitCode
		case "read":
			payload := op.Payload
			if payload == nil {
				payload = new(string)
			}
			if op.ID == "stderr" {
				s.Stderr = payload
			} else {
				s.Stdout = payload
			}
		default:
			return false, "operation " + op.Type
		}
	}
	return true, ""
}

func TestWASITestsuite(t *testing.T) {
	root, ok := testsuiteDir()
	if !ok {
		t.Skip("wasi testsuite not found: expected shared/wasi-testsuite beside the repository (e.g. ../shared/wasi-testsuite)")
	}
	cache := t.TempDir()
	passed, total := 0, 0
	var failed []string
	for _, suite := range suites {
		cases, err := filepath.Glob(filepath.Join(root, suite, "*.wasm"))
		if err != nil {
			t.Fatal(err)
		}
		sort.Strings(cases)
		for _, wasm := range cases {
			name := suite + "/" + strings.TrimSuffix(filepath.Base(wasm), ".wasm")
			total++
			if t.Run(name, func(t *testing.T) { runCase(t, wasm, cache) }) {
				passed++
			} else {
				failed = append(failed, name)
			}
		}
	}
	t.Logf("wasi testsuite: %d/%d passed", passed, total)
	if len(failed) > 0 {
		t.Logf("failed: %s", strings.Join(failed, ", "))
	}
}

func runCase(t *testing.T, wasm, cache string) {
	module, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	var spec caseSpec
	if js, err := os.ReadFile(strings.TrimSuffix(wasm, ".wasm") + ".json"); err == nil {
		if err := json.Unmarshal(js, &spec); err != nil {
			t.Fatalf("parsing specification: %v", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if ok, why := spec.normalize(); !ok {
		t.Skipf("needs %s, which a command module runner does not do", why)
	}
	if len(spec.Proposals) > 0 {
		t.Skipf("needs proposals %v", spec.Proposals)
	}
	var env []string
	for k, v := range spec.Env {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	var dirs []wasi.Preopen
	if spec.Root != nil {
		scratch := t.TempDir()
		if err := copyTree(filepath.Join(filepath.Dir(wasm), *spec.Root), scratch); err != nil {
			t.Fatalf("copying root: %v", err)
		}
		dirs = []wasi.Preopen{{HostPath: scratch, GuestPath: "/"}}
	}
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code, err := machine.Run(ctx, machine.Config{
		Module: module, Name: filepath.Base(wasm), Args: spec.Args, Env: env, Dirs: dirs,
		Stdin: strings.NewReader(""), Stdout: &stdout, Stderr: &stderr, CacheDir: cache,
	})
	if err != nil {
		t.Fatalf("run: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	if code != spec.ExitCode {
		t.Errorf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", code, spec.ExitCode, stdout.String(), stderr.String())
	}
	if spec.Stdout != nil && stdout.String() != *spec.Stdout {
		t.Errorf("stdout %q, want %q", stdout.String(), *spec.Stdout)
	}
	if spec.Stderr != nil && stderr.String() != *spec.Stderr {
		t.Errorf("stderr %q, want %q", stderr.String(), *spec.Stderr)
	}
}

// copyTree copies the directory src into dst, writable (the testsuite's own
// tree may be read-only) and without the *.cleanup artifacts of earlier runs.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		if strings.HasSuffix(e.Name(), ".cleanup") {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		out := filepath.Join(dst, rel)
		switch {
		case e.IsDir():
			return os.MkdirAll(out, 0o755)
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, out)
		case e.Type().IsRegular():
			return copyFile(p, out)
		}
		return fmt.Errorf("%s: unsupported file type %v", p, e.Type())
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
