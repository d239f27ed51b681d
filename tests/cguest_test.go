package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/wasi"
)

// fileioTree is what testdata/guests/c/fileio.c leaves in its directory:
// everything else it created it also removed.
var fileioTree = map[string]string{
	"final.txt": "file \"the end\\n\"",
	"log.txt":   "file \"one\\ntwo\\nthree 3\\n\"",
	"sub":       "dir \"\"",
	"sub/b.txt": "file \"c content\\n\"",
}

// fileioNative runs the fileio guest built for the host on a fresh
// directory: its output is what the same program must print under ftvm.
func fileioNative(t *testing.T) string {
	t.Helper()
	bin := nativeC(t, "fileio.c")
	dir := t.TempDir()
	out, err := exec.Command(bin, dir).Output()
	if err != nil {
		t.Fatalf("native fileio: %v\n%s", err, out)
	}
	checkFileioTree(t, dir)
	return string(out)
}

func checkFileioTree(t *testing.T, dir string) {
	t.Helper()
	got := snapshotTree(t, dir)
	for p, want := range fileioTree {
		if e, ok := got[p]; !ok {
			t.Errorf("%s: missing after the run", p)
		} else if e.String() != want {
			t.Errorf("%s: %v, want %s", p, e, want)
		}
	}
	for p, e := range got {
		if _, ok := fileioTree[p]; !ok {
			t.Errorf("%s: left behind (%v)", p, e)
		}
	}
}

// checkFileioOutput compares the guest's output with the native run's, and
// holds a few lines explicitly so the test means something without cc.
func checkFileioOutput(t *testing.T, got, native string) {
	t.Helper()
	for _, want := range []string{
		"read: 12 \"hello world\"", "read 5: 5 \"world\"", "seek before start: EINVAL",
		"pread whole: 23 \"HELLO world\n....Z...END\"", "tell after pread/pwrite: 2", "tell in append file: 8",
		"log line: three 3", "after extend: 8 \"HELLO...\"", "rmdir non-empty: ENOTEMPTY",
		"list .: a.txt log.txt sub/", "stat sub/b.txt: file size=10 nlink=1", "stat hard.txt: file size=10 nlink=2",
		"readlink sym: 9 \"sub/b.txt\"", "times: atime=1000000000 mtime=1234567890",
		"big: wrote 262144 read 262144 equal=1", "list .: final.txt log.txt sub/", "failures: 0",
	} {
		if !strings.Contains(got, want+"\n") {
			t.Errorf("output lacks %q", want)
		}
	}
	if native != "" && got != native {
		t.Errorf("output differs from the native build's:\n%s", diffLines(native, got))
	}
	if t.Failed() {
		t.Logf("full output:\n%s", got)
	}
}

// TestCFileIOLibrary runs a C program doing ordinary libc file I/O on a
// preopened directory through the machine library: it must print exactly
// what the same source prints natively, and leave the same files.
func TestCFileIOLibrary(t *testing.T) {
	wasm := readModule(t, cGuest(t, "fileio", []string{"fileio.c"}))
	native := fileioNative(t)
	for _, tc := range []struct{ name, guestDir string }{
		{"absolute", "/data"},
		{"dot", "."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			res := runLib(t, time.Minute, machine.Config{Module: wasm, Name: "fileio.wasm",
				Args: []string{tc.guestDir}, Dirs: []wasi.Preopen{{HostPath: dir, GuestPath: tc.guestDir}}})
			if res.err != nil || res.code != 0 {
				t.Errorf("exit %d, err %v\nstderr:\n%s", res.code, res.err, res.stderr)
			}
			checkFileioOutput(t, res.stdout, native)
			checkFileioTree(t, dir)
		})
	}
}

// TestCFileIOCLI is the same through the ftvm binary and --dir.
func TestCFileIOCLI(t *testing.T) {
	wasm := cGuest(t, "fileio", []string{"fileio.c"})
	native := fileioNative(t)
	dir := t.TempDir()
	res := runCLI(t, time.Minute, "", "run", "--dir", dir+":/data", wasm, "/data")
	if res.code != 0 {
		t.Errorf("exit %d\nstderr:\n%s", res.code, res.stderr)
	}
	checkNoHostPanic(t, res.stderr, false)
	checkFileioOutput(t, res.stdout, native)
	checkFileioTree(t, dir)
}

// TestCPUGuestsAgree runs the benchmark workloads (C and Go) under ftvm and
// natively at a small scale: all four must print the same checksums, which
// shows the benchmark guests are deterministic and ftvm computes what
// native code computes.
func TestCPUGuestsAgree(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs four CPU workloads")
	}
	outputs := map[string]string{}

	cwasm := readModule(t, cGuest(t, "cpu", []string{"cpu.c"}))
	res := runLib(t, 2*time.Minute, machine.Config{Module: cwasm, Name: "cpu.wasm", Args: []string{"1"}})
	if res.err != nil || res.code != 0 {
		t.Fatalf("C cpu under ftvm: exit %d, err %v\n%s", res.code, res.err, res.stderr)
	}
	outputs["C under ftvm"] = res.stdout

	gowasm := readModule(t, guest.MustGo(t, "testdata/guests/gocpu"))
	res = runLib(t, 2*time.Minute, machine.Config{Module: gowasm, Name: "gocpu.wasm", Args: []string{"1"}})
	if res.err != nil || res.code != 0 {
		t.Fatalf("Go cpu under ftvm: exit %d, err %v\n%s", res.code, res.err, res.stderr)
	}
	outputs["Go under ftvm"] = res.stdout

	if out, err := exec.Command(nativeC(t, "cpu.c"), "1").Output(); err != nil {
		t.Fatalf("native C cpu: %v", err)
	} else {
		outputs["C native"] = string(out)
	}

	root, err := guest.Root()
	if err != nil {
		t.Fatal(err)
	}
	gobin := filepath.Join(t.TempDir(), "gocpu")
	build := exec.Command("go", "build", "-o", gobin, ".")
	build.Dir = filepath.Join(root, "testdata/guests/gocpu")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("native go build: %v\n%s", err, b)
	}
	if out, err := exec.Command(gobin, "1").Output(); err != nil {
		t.Fatalf("native Go cpu: %v", err)
	} else {
		outputs["Go native"] = string(out)
	}

	want := outputs["C native"]
	if !strings.Contains(want, "checksum: ") || len(lines(want)) != 5 {
		t.Fatalf("native C output malformed:\n%s", want)
	}
	for name, got := range outputs {
		if got != want {
			t.Errorf("%s differs from C native:\n%s", name, diffLines(want, got))
		}
	}
}
