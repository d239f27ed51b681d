// Package guest builds the test and benchmark guests in testdata/guests: Go
// programs with GOOS=wasip1 and C programs with Debian's clang for
// wasm32-wasi. Builds are cached by a hash of their inputs, so a test suite
// pays each build once.
package guest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

// Root is the repository root (the directory holding go.mod).
func Root() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// CacheDir is where built guests are kept.
func CacheDir() string {
	if d := os.Getenv("FTVM_GUEST_CACHE"); d != "" {
		return d
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "ftvm", "guests")
}

var mu sync.Mutex

// Go builds the Go package in dir (relative to the repo root) for wasip1 and
// returns the path of the .wasm file.
func Go(dir string) (string, error) {
	root, err := Root()
	if err != nil {
		return "", err
	}
	src := filepath.Join(root, dir)
	key, err := hashTree(src, "go-"+goVersion())
	if err != nil {
		return "", err
	}
	return cached(filepath.Base(dir), key, func(out string) error {
		cmd := exec.Command("go", "build", "-o", out, ".")
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm", "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", dir, err, b)
		}
		return nil
	})
}

// Sysroot is a wasi-sdk style sysroot; when it does not exist, clang's own
// default is used, which finds Debian's wasi-libc in /usr/include/wasm32-wasi.
const Sysroot = "/usr/share/wasi-sysroot"

// C compiles C sources (relative to the repo root) into one wasm32-wasi
// command module with -O2 plus extra flags.
func C(name string, srcs []string, flags ...string) (string, error) {
	root, err := Root()
	if err != nil {
		return "", err
	}
	if _, err := exec.LookPath("clang"); err != nil {
		return "", errors.New("clang not found: install Debian packages clang lld wasi-libc libclang-rt-dev-wasm32 (make deps)")
	}
	h := sha256.New()
	fmt.Fprintln(h, "c", strings.Join(flags, " "))
	var abs []string
	for _, s := range srcs {
		p := filepath.Join(root, s)
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", s, len(b))
		h.Write(b)
		abs = append(abs, p)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	return cached(name, key, func(out string) error {
		args := []string{"--target=wasm32-wasi", "-O2", "-o", out}
		if _, err := os.Stat(Sysroot); err == nil {
			args = append(args, "--sysroot="+Sysroot)
		}
		args = append(args, flags...)
		args = append(args, abs...)
		cmd := exec.Command("clang", args...)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("clang %s: %w\n%s", name, err, b)
		}
		return nil
	})
}

// MustGo is Go for tests: it fails the test on error.
func MustGo(t testing.TB, dir string) string {
	t.Helper()
	p, err := Go(dir)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// MustC is C for tests.
func MustC(t testing.TB, name string, srcs []string, flags ...string) string {
	t.Helper()
	p, err := C(name, srcs, flags...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func cached(name, key string, build func(out string) error) (string, error) {
	mu.Lock()
	defer mu.Unlock()
	dir := CacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	out := filepath.Join(dir, name+"-"+key+".wasm")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	tmp := fmt.Sprintf("%s.tmp%d", out, os.Getpid())
	if err := build(tmp); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return out, nil
}

// hashTree hashes every file under dir, plus salt.
func hashTree(dir, salt string) (string, error) {
	h := sha256.New()
	fmt.Fprintln(h, salt)
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		rel, _ := filepath.Rel(dir, f)
		fmt.Fprintf(h, "%s %d\n", rel, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

var goVer struct {
	once sync.Once
	v    string
}

func goVersion() string {
	goVer.once.Do(func() {
		b, _ := exec.Command("go", "env", "GOVERSION").Output()
		goVer.v = strings.TrimSpace(string(b))
	})
	return goVer.v
}
