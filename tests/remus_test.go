package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
)

// remusPair is a protected KV primary and its backup, as two ftvm processes.
type remusPair struct {
	kvAddr, replAddr  string
	primary, backup   *proc
	pSock, bSock      string
	stateDir, dataDir string
	wasm              string
	primaryArgs       []string
}

// startRemus starts a backup and a protected primary running the KV guest
// on loopback, and waits until the primary reports it is protected.
func startRemus(t *testing.T, extra ...string) *remusPair {
	t.Helper()
	bin := ftvmBinary(t)
	dir := t.TempDir()
	r := &remusPair{kvAddr: freeAddr(t), replAddr: freeAddr(t), pSock: filepath.Join(dir, "p.sock"),
		bSock: filepath.Join(dir, "b.sock"), stateDir: filepath.Join(dir, "state"), dataDir: filepath.Join(dir, "data"),
		wasm: guest.MustGo(t, "testdata/guests/kvserver")}
	os.MkdirAll(r.dataDir, 0o755)
	r.backup = startProc(t, bin, "backup", "--listen", r.replAddr, "--state", r.stateDir, "--timeout", "300ms",
		"--api-sock", r.bSock, "--log-level", "info")
	waitSocket(t, r.backup, r.bSock)
	r.primaryArgs = append([]string{"run", "--protect", r.replAddr, "--timeout", "300ms", "--api-sock", r.pSock,
		"--listen", "4=" + r.kvAddr, "--dir", r.dataDir + ":/data", "--log-level", "info"}, extra...)
	r.primary = startProc(t, bin, append(r.primaryArgs, r.wasm, "--fd", "4")...)
	waitKV(t, r.primary, r.kvAddr)
	r.waitState(t, r.pSock, "protected", 30*time.Second)
	return r
}

func waitSocket(t *testing.T, p *proc, path string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("ftvm exited early: %v\n%s", p.cmd.ProcessState, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no API socket at %s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func status(t *testing.T, sock string) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st map[string]any
	if err := api.NewClient(sock).Get(ctx, "/status", &st); err != nil {
		return nil
	}
	return st
}

// waitState waits until the primary's status says state.
func (r *remusPair) waitState(t *testing.T, sock, state string, within time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(within)
	var st map[string]any
	for time.Now().Before(deadline) {
		if st = status(t, sock); st != nil && st["state"] == state {
			return st
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("state never became %q: %v", state, st)
	return nil
}

// kvConn is one client connection speaking the KV line protocol.
type kvConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialKV(addr string) (*kvConn, error) {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return nil, err
	}
	return &kvConn{c: c, r: bufio.NewReader(c)}, nil
}

func (k *kvConn) do(req string, timeout time.Duration) (string, error) {
	k.c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(k.c, "%s\n", req); err != nil {
		return "", err
	}
	line, err := k.r.ReadString('\n')
	return strings.TrimSpace(line), err
}

// waitServing waits until addr answers COUNT (after a failover).
func waitServing(t *testing.T, addr string, within time.Duration) time.Duration {
	t.Helper()
	t0 := time.Now()
	for time.Since(t0) < within {
		if k, err := dialKV(addr); err == nil {
			got, err := k.do("COUNT", time.Second)
			k.c.Close()
			if err == nil && strings.HasPrefix(got, "COUNT ") {
				return time.Since(t0)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("nothing serves %s %v after the failover", addr, within)
	return 0
}

// TestRemusFailover: writes acknowledged to clients of a protected primary
// all survive a kill -9 of the primary; the backup resumes the guest on
// the same address, with its files, and serves new writes.
func TestRemusFailover(t *testing.T) {
	r := startRemus(t)
	const writers = 4
	var mu sync.Mutex
	acked := map[string]string{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := dialKV(r.kvAddr)
			if err != nil {
				return
			}
			defer k.c.Close()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				key, val := fmt.Sprintf("w%d-k%d", w, i%50), fmt.Sprintf("w%d-v%d", w, i)
				got, err := k.do("SET "+key+" "+val, 5*time.Second)
				if err != nil {
					return // the primary died: this write's outcome is unknown
				}
				if got != "OK" {
					t.Errorf("SET %s: %q", key, got)
					return
				}
				mu.Lock()
				acked[key] = val
				mu.Unlock()
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	st := status(t, r.pSock)
	if st == nil || st["state"] != "protected" || st["checkpoints"].(float64) < 5 {
		t.Fatalf("primary status while writing: %v", st)
	}
	t.Logf("primary before the kill: %v", st)
	r.primary.cmd.Process.Kill() // kill -9
	<-r.primary.done
	killed := time.Now()
	close(stop)
	wg.Wait()
	mu.Lock()
	n := len(acked)
	mu.Unlock()
	if n < 50 {
		t.Fatalf("only %d keys acknowledged before the kill", n)
	}
	took := waitServing(t, r.kvAddr, 10*time.Second)
	t.Logf("%d keys acknowledged; the backup served again %v after the kill", n, time.Since(killed).Round(time.Millisecond))
	_ = took
	k, err := dialKV(r.kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer k.c.Close()
	for key, val := range acked {
		got, err := k.do("GET "+key, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		// A later write to the key may have reached the backup without
		// its reply reaching the client: only an older value is a loss.
		if got != "VALUE "+val && !laterValue(got, val) {
			t.Errorf("GET %s after failover = %q, acknowledged %q", key, got, val)
		}
	}
	if got, _ := k.do("SET after failover", 5*time.Second); got != "OK" {
		t.Errorf("SET after failover: %q", got)
	}
	bst := status(t, r.bSock)
	b, _ := json.Marshal(bst)
	if !strings.Contains(string(b), "failed-over") && !strings.Contains(string(b), "failover_ms") {
		t.Errorf("backup status after failover: %s", b)
	}
	t.Logf("backup status: %s", b)
}

// laterValue reports whether got is VALUE wN-vM with M greater than in
// acked (same writer wN).
func laterValue(got, acked string) bool {
	var gw, gi, aw, ai int
	if _, err := fmt.Sscanf(got, "VALUE w%d-v%d", &gw, &gi); err != nil {
		return false
	}
	if _, err := fmt.Sscanf(acked, "w%d-v%d", &aw, &ai); err != nil {
		return false
	}
	return gw == aw && gi > ai
}

var _ = exec.Command
