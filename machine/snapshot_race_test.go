package machine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
)

// TestAutoSnapshotBesideAPISnapshots: snapshots asked for while the guest
// runs to SnapshotAtCall's host call (the API's, incremental, one after the
// other) share nothing with the one written there, which runs without the
// snapshots' lock on the guest goroutine: it once staged its pages in the
// stager an API snapshot was filling at the same time (go test -race
// showed it; make test runs this test so). The snapshot at the call is a
// full one of that call, and decodes.
func TestAutoSnapshotBesideAPISnapshots(t *testing.T) {
	mod := dirtierModule(t)
	dir := t.TempDir()
	at := filepath.Join(dir, "at.snap")
	const call = 300
	m, err := New(context.Background(), Config{Module: mod, Name: "dirtier", Args: []string{"8", "50", "0", "2000"},
		Stdout: io.Discard, Stderr: io.Discard, Stdin: strings.NewReader(""), CacheDir: t.TempDir(), Instrument: true,
		SnapshotAtCall: call, SnapshotPath: at})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	api := 0
	for ; ; api++ {
		if _, err := m.Snapshot(context.Background(), filepath.Join(dir, fmt.Sprintf("api-%d.snap", api%2)),
			SnapshotOptions{Incremental: true}); err != nil {
			break
		}
	}
	if err := <-done; !errors.Is(err, ErrStopped) {
		t.Fatalf("run: %v, want stopped at host call %d", err, call)
	}
	h := snapshot.ModuleHash(mod)
	s, err := snapshot.ReadFile(at, &h)
	if err != nil {
		t.Fatal(err)
	}
	if s.Kind != snapshot.Full || !strings.Contains(s.Meta.Reason, fmt.Sprintf("host call %d", call)) {
		t.Fatalf("the snapshot at the call: %v, %q", s.Kind, s.Meta.Reason)
	}
	t.Logf("%d API snapshots beside it; %s, %d pages", api, s.Meta.Reason, len(s.Pages))
}
