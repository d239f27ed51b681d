package api_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
)

// serveHello makes a VM of the hello guest with cfg (module, name, output
// and cache filled in) and serves its API; both are closed at the test's
// end.
func serveHello(t *testing.T, cfg machine.Config) (*machine.Machine, string) {
	t.Helper()
	mod, err := os.ReadFile(guest.MustGo(t, "testdata/guests/hello"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Module, cfg.Name, cfg.Stdout, cfg.Stderr, cfg.CacheDir = mod, "hello.wasm", io.Discard, io.Discard, t.TempDir()
	ctx := context.Background()
	m, err := machine.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(ctx) })
	sock := filepath.Join(t.TempDir(), "vm.sock")
	srv, err := api.Listen(sock, m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return m, sock
}

// TestVMInfo serves the API of a real VM blocked reading stdin, and checks
// what GET /vm reports while it runs and after it exits.
func TestVMInfo(t *testing.T) {
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	ctx := context.Background()
	m, sock := serveHello(t, machine.Config{Args: []string{"stdin"}, Stdin: stdinR})
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()

	c := api.NewClient(sock)
	var info machine.Info
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err = c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.Counters.Calls["fd_read"] > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if info.State != machine.StateRunning || info.Module != "hello.wasm" || len(info.ModuleSHA256) != 64 ||
		info.MemoryBytes == 0 || info.Counters.HostCalls == 0 || info.UptimeSeconds <= 0 {
		t.Errorf("while blocked on stdin: %+v", info)
	}
	stdinW.Write([]byte("go on\n"))
	stdinW.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	info, err = c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != machine.StateExited || info.ExitCode == nil || *info.ExitCode != 0 {
		t.Errorf("after exit: %+v", info)
	}
	// A second server on the same live socket is refused.
	if _, err := api.Listen(sock, m); err == nil {
		t.Error("second API server on a live socket was allowed")
	}
}

// TestSocketIsPrivateFromTheStart: under a lax umask the API socket is
// the user's alone (it is now made so before it gets its name: bound there,
// then chmodded, it was open to other users in between, a window no test
// can watch), nothing of its making is left beside it, it serves, and
// Close removes it.
func TestSocketIsPrivateFromTheStart(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "vm.sock")
	old := syscall.Umask(0)
	srv, err := api.Listen(sock, nil)
	syscall.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the socket is %v, want a socket of mode 0600", fi.Mode())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("%d entries beside the socket's directory, want the socket alone", len(ents))
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the socket does not serve: %v", err)
	}
	c.Close()
	srv.Close()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("the socket after Close: %v", err)
	}
}

// TestCloseLeavesAnotherServersSocket: a server whose socket path was
// taken over (its file removed, another VM bound there) leaves the new
// socket alone when it closes: it removed whatever had its path, so the
// other VM could no longer be reached.
func TestCloseLeavesAnotherServersSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "vm.sock")
	a, err := api.Listen(sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(sock)
	b, err := api.Listen(sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a.Close()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the second server's socket after the first closed: %v", err)
	}
	c.Close()
}

// TestSnapshotPathMustBeAbsolute: a relative snapshot_path is refused with
// a clear error before anything is written (the VM's process would resolve
// it against its own working directory, which the client does not know).
func TestSnapshotPathMustBeAbsolute(t *testing.T) {
	_, sock := serveHello(t, machine.Config{})
	dir := t.TempDir()
	t.Chdir(dir)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	req, _ := http.NewRequest(http.MethodPut, "http://vm/snapshot/create", strings.NewReader(`{"snapshot_path": "kv.snap"}`))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "must be absolute") {
		t.Fatalf("relative snapshot_path: %d %s", resp.StatusCode, body)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("files written in the working directory: %v", ents)
	}
}

// TestIncrementalIsNotMappable: a request for an incremental, mappable
// snapshot is refused, with why, and nothing is written: the VM wrote an
// incremental one and dropped mappable without a word.
func TestIncrementalIsNotMappable(t *testing.T) {
	_, sock := serveHello(t, machine.Config{})
	out := filepath.Join(t.TempDir(), "kv.snap")
	_, err := api.NewClient(sock).Snapshot(context.Background(), api.SnapshotRequest{Path: out, Incremental: true, Mappable: true})
	if err == nil || !strings.Contains(err.Error(), "mappable applies to a full snapshot") {
		t.Fatalf("incremental and mappable: %v", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("the refused snapshot was written: %v", err)
	}
}
