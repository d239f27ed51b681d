package snapshot

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestWriteFileRefusesWhatIsNotAFile: the rename that makes a snapshot
// durable replaces whatever is at its path, so a path naming a FIFO, a
// socket (a VM's own API socket, say), a device or a directory is refused,
// and the thing there is left as it was. (Before, `ftvm snapshot --out
// /dev/full` turned the device into a regular file.)
func TestWriteFileRefusesWhatIsNotAFile(t *testing.T) {
	dir := t.TempDir()
	s := smallSnapshot(t)
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	link := filepath.Join(dir, "link")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, says string }{
		{fifo, "a FIFO"}, {sock, "a socket"}, {link, "a FIFO"}, {sub, "a directory"}, {sub + "/", "a directory"},
	} {
		err := WriteFile(c.path, s)
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("WriteFile(%s): %v, want a refusal saying %q", c.path, err, c.says)
		}
	}
	for path, want := range map[string]os.FileMode{fifo: os.ModeNamedPipe, sock: os.ModeSocket, link: os.ModeSymlink, sub: os.ModeDir} {
		fi, err := os.Lstat(path)
		if err != nil || fi.Mode().Type() != want {
			t.Errorf("%s after the refused write: %v, %v", path, fi, err)
		}
	}
	// A regular file, and a symbolic link to one, are replaced.
	file := filepath.Join(dir, "old.snap")
	if err := os.WriteFile(file, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(file, s); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadFile(file, nil); err != nil || got.ID != s.ID {
		t.Fatalf("the snapshot written over a file: %v", err)
	}
	names, _ := os.ReadDir(dir)
	for _, n := range names {
		if strings.Contains(n.Name(), ".tmp") {
			t.Errorf("left %s", n.Name())
		}
	}
}

// TestWriteFileLeavesNothingWhenKilled: a process killed while it writes a
// snapshot leaves no file behind (the file has no name until it is whole),
// where a named temporary file of the memory's size stayed for good.
func TestWriteFileLeavesNothingWhenKilled(t *testing.T) {
	if dir := os.Getenv("FTVM_TEST_WRITE_CHILD"); dir != "" {
		f, tmp, err := createTemp(dir, "victim.snap")
		if err != nil {
			os.Exit(2)
		}
		f.Write(make([]byte, 8<<20))
		os.Stdout.WriteString(tmp + "|ready\n")
		time.Sleep(time.Hour) // killed here (select{} would end it: every goroutine asleep)
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestWriteFileLeavesNothingWhenKilled$")
	cmd.Env = append(os.Environ(), "FTVM_TEST_WRITE_CHILD="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasSuffix(line, "|ready\n") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the child: %q, %v", line, err)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if tmp := strings.TrimSuffix(line, "|ready\n"); tmp != "" {
		t.Skipf("this file system has no O_TMPFILE: the write was named %s", tmp)
	}
	names, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		t.Errorf("the killed writer left %s", n.Name())
	}
}

func smallSnapshot(t *testing.T) *Snapshot {
	t.Helper()
	page := make([]byte, PageSize)
	page[0] = 1
	return &Snapshot{Kind: Full, Module: ModuleHash([]byte("m")), MemorySize: 1 << 16,
		Pages: []Page{{Index: 0, Data: page}}, Devices: []byte("{}"), ModuleCode: []byte("m"), ModuleName: "m"}
}
