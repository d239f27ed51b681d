package api_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
)

// TestVMInfo serves the API of a real VM blocked reading stdin, and checks
// what GET /vm reports while it runs and after it exits.
func TestVMInfo(t *testing.T) {
	mod, err := os.ReadFile(guest.MustGo(t, "testdata/guests/hello"))
	if err != nil {
		t.Fatal(err)
	}
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	ctx := context.Background()
	m, err := machine.New(ctx, machine.Config{Module: mod, Name: "hello.wasm", Args: []string{"stdin"},
		Stdin: stdinR, Stdout: io.Discard, Stderr: io.Discard, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	sock := filepath.Join(t.TempDir(), "vm.sock")
	srv, err := api.Listen(sock, m)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
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
