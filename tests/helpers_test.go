package tests

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
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
)

var ftvmBin struct {
	once sync.Once
	path string
	err  error
}

// ftvmBinary builds ./cmd/ftvm once per test binary and returns its path.
// The binary lives in the guest cache under a name derived from the
// repository path, so repeated runs reuse one file instead of leaving a
// copy in /tmp each time; each run still rebuilds it (the Go build cache
// makes that cheap) so it always matches the source under test.
func ftvmBinary(t testing.TB) string {
	t.Helper()
	ftvmBin.once.Do(func() {
		root, err := guest.Root()
		if err != nil {
			ftvmBin.err = err
			return
		}
		sum := sha256.Sum256([]byte(root))
		dir := filepath.Join(guest.CacheDir(), "bin")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			ftvmBin.err = err
			return
		}
		out := filepath.Join(dir, "ftvm-"+hex.EncodeToString(sum[:6]))
		tmp := fmt.Sprintf("%s.tmp%d", out, os.Getpid())
		cmd := exec.Command("go", "build", "-o", tmp, "./cmd/ftvm")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			os.Remove(tmp)
			ftvmBin.err = fmt.Errorf("go build ./cmd/ftvm: %v\n%s", err, b)
			return
		}
		// Rename is atomic: a concurrent test run keeps executing its copy.
		if err := os.Rename(tmp, out); err != nil {
			ftvmBin.err = err
			return
		}
		ftvmBin.path = out
	})
	if ftvmBin.err != nil {
		t.Fatal(ftvmBin.err)
	}
	return ftvmBin.path
}

// cliResult is what one ftvm process did.
type cliResult struct {
	stdout, stderr string
	code           int
}

// runCLI runs the ftvm binary with args and stdin, bounded by timeout so a
// hung guest fails the test instead of the whole suite.
func runCLI(t testing.TB, timeout time.Duration, stdin string, args ...string) cliResult {
	t.Helper()
	bin := ftvmBinary(t) // built before the clock starts: the build is not the guest's time
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("ftvm %q did not finish within %v\nstdout:\n%s\nstderr:\n%s", args, timeout, out.String(), errb.String())
	}
	res := cliResult{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		res.code = ee.ExitCode()
	default:
		// Killed by a signal: ftvm itself crashed (SIGSEGV, SIGABRT, ...).
		t.Fatalf("ftvm %q: %v\nstdout:\n%s\nstderr:\n%s", args, err, out.String(), errb.String())
	}
	return res
}

// libResult is what one machine.Run did.
type libResult struct {
	stdout, stderr string
	code           uint32
	err            error
}

// runLib runs a module through the machine library with buffered stdio.
func runLib(t testing.TB, timeout time.Duration, cfg machine.Config) libResult {
	t.Helper()
	var out, errb bytes.Buffer
	cfg.Stdout, cfg.Stderr = &out, &errb
	if cfg.Stdin == nil {
		cfg.Stdin = strings.NewReader("")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	code, err := machine.Run(ctx, cfg)
	if ctx.Err() != nil {
		t.Fatalf("guest %s did not finish within %v\nstdout:\n%s\nstderr:\n%s", cfg.Name, timeout, out.String(), errb.String())
	}
	return libResult{stdout: out.String(), stderr: errb.String(), code: code, err: err}
}

// readModule reads a built guest.
func readModule(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cGuest builds C sources from testdata/guests/c into a wasm32-wasi command.
func cGuest(t testing.TB, name string, srcs []string, flags ...string) string {
	t.Helper()
	full := make([]string, len(srcs))
	for i, src := range srcs {
		full[i] = filepath.Join("testdata/guests/c", src)
	}
	return guest.MustC(t, name, full, flags...)
}

// nativeC builds C sources from testdata/guests/c for the host with plain
// `cc -O2`, or skips the test when there is no C compiler.
func nativeC(t testing.TB, srcs ...string) string {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no native C compiler (cc)")
	}
	root, err := guest.Root()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "native")
	args := []string{"-O2", "-o", out}
	for _, s := range srcs {
		args = append(args, filepath.Join(root, "testdata/guests/c", s))
	}
	if b, err := exec.Command(cc, args...).CombinedOutput(); err != nil {
		t.Fatalf("cc %v: %v\n%s", srcs, err, b)
	}
	return out
}

// hostPanicMarkers are what a Go panic or crash of ftvm itself (not of a
// guest) would print: a goroutine dump naming ftvm's or wazero's code.
var hostPanicMarkers = []string{"github.com/ftvm/ftvm/", "tetratelabs/wazero", "runtime/debug", "SIGSEGV",
	"fatal error: unexpected signal", "internal error"}

// checkNoHostPanic fails if stderr shows that ftvm itself panicked. With
// guestIsGo false, a goroutine dump of any kind is ftvm's, since only Go
// guests print one.
func checkNoHostPanic(t testing.TB, stderr string, guestIsGo bool) {
	t.Helper()
	markers := hostPanicMarkers
	if !guestIsGo {
		markers = append(markers, "goroutine ", "panic:")
	}
	for _, m := range markers {
		if strings.Contains(stderr, m) {
			t.Errorf("stderr shows a crash of ftvm itself (%q):\n%s", m, stderr)
			return
		}
	}
}

// treeEntry describes one path of a host directory tree.
type treeEntry struct {
	kind    string // "file", "dir", "symlink"
	content string // file content or symlink target
	mtime   time.Time
}

func (e treeEntry) String() string {
	return fmt.Sprintf("%s %q", e.kind, e.content)
}

// snapshotTree records every path under root with its content, without
// following symlinks. Comparing two snapshots shows anything created,
// removed or modified.
func snapshotTree(t testing.TB, root string) map[string]treeEntry {
	t.Helper()
	out := map[string]treeEntry{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		e := treeEntry{mtime: fi.ModTime()}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			e.kind = "symlink"
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			e.content = target
		case fi.IsDir():
			e.kind = "dir"
		case fi.Mode().IsRegular():
			e.kind = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.content = string(b)
		default:
			e.kind = fi.Mode().Type().String()
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// diffTrees lists the differences between two snapshots, content and
// modification time included.
func diffTrees(before, after map[string]treeEntry) []string {
	var diffs []string
	for p, b := range before {
		a, ok := after[p]
		switch {
		case !ok:
			diffs = append(diffs, "removed "+p)
		case a.kind != b.kind || a.content != b.content:
			diffs = append(diffs, fmt.Sprintf("changed %s: %v -> %v", p, b, a))
		case b.kind == "file" && !a.mtime.Equal(b.mtime):
			diffs = append(diffs, fmt.Sprintf("mtime of %s changed: %v -> %v", p, b.mtime, a.mtime))
		}
	}
	for p, a := range after {
		if _, ok := before[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("created %s: %v", p, a))
		}
	}
	sort.Strings(diffs)
	return diffs
}

// writeFile writes a file, creating parent directories.
func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// lines splits output into lines without the trailing empty one.
func lines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// diffLines reports the first lines where want and got differ, for
// readable failures on long outputs.
func diffLines(want, got string) string {
	w, g := lines(want), lines(got)
	var b strings.Builder
	n := max(len(w), len(g))
	shown := 0
	for i := 0; i < n && shown < 10; i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "line %d:\n  want %q\n  got  %q\n", i+1, wl, gl)
			shown++
		}
	}
	return b.String()
}
