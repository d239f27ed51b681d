package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/internal/sysmon"
	"github.com/ftvm/ftvm/remus"
)

// kvInstrumented builds the KV guest and instruments it into the shared
// cache before any timed wait: a protected VM is always instrumented, and
// instrumenting a Go module takes a minute the first time.
func kvInstrumented(t *testing.T) string {
	t.Helper()
	wasm := guest.MustGo(t, "testdata/guests/kvserver")
	instrumented(t, wasm)
	return wasm
}

// remusPair is a protected KV primary and its backup, as two ftvm processes.
type remusPair struct {
	kvAddr, replAddr  string
	primary, backup   *proc
	pSock, bSock      string
	stateDir, dataDir string
	wasm              string
	dir               string
	primaryArgs       []string // the primary's command line, to start it again
	protectAddr       string   // what primaries dial for the backup: replAddr or a proxy's
}

// remusOpts are extra flags for either side.
type remusOpts struct {
	primary, backup []string
	// protect, if set, gives the address the primaries dial for the
	// backup's (a proxy's, say).
	protect func(replAddr string) string
}

// startRemus starts a backup and a protected primary running the KV guest
// (logging every write to /data/wal.log) on loopback, and waits until the
// primary reports it is protected.
func startRemus(t *testing.T, opts ...remusOpts) *remusPair {
	t.Helper()
	var o remusOpts
	if len(opts) > 0 {
		o = opts[0]
	}
	bin := ftvmBinary(t)
	dir := t.TempDir()
	r := &remusPair{replAddr: freeAddr(t), bSock: filepath.Join(dir, "b.sock"), stateDir: filepath.Join(dir, "state"),
		wasm: kvInstrumented(t), dir: dir}
	r.backup = startProc(t, bin, append([]string{"backup", "--listen", r.replAddr, "--state", r.stateDir,
		"--timeout", "300ms", "--api-sock", r.bSock, "--log-level", "info"}, o.backup...)...)
	waitSocket(t, r.backup, r.bSock)
	if r.protectAddr = r.replAddr; o.protect != nil {
		r.protectAddr = o.protect(r.replAddr)
	}
	r.primary, r.kvAddr, r.pSock, r.dataDir = r.startPrimary(t, "p", o.primary...)
	return r
}

// startPrimary starts one more protected KV primary against r's backup.
func (r *remusPair) startPrimary(t *testing.T, name string, extra ...string) (p *proc, kvAddr, sock, data string) {
	t.Helper()
	kvAddr, sock, data = freeAddr(t), filepath.Join(r.dir, name+".sock"), filepath.Join(r.dir, name+"-data")
	os.MkdirAll(data, 0o755)
	protect := r.protectAddr
	if protect == "" {
		protect = r.replAddr
	}
	args := append([]string{"run", "--protect", protect, "--timeout", "300ms", "--api-sock", sock,
		"--listen", "4=" + kvAddr, "--dir", data + ":/data", "--log-level", "info"}, extra...)
	r.primaryArgs = args
	p = startProc(t, ftvmBinary(t), append(args, r.wasm, "--fd", "4", "--wal", "/data/wal.log")...)
	waitKV(t, p, kvAddr)
	waitState(t, sock, "protected", 30*time.Second)
	return p, kvAddr, sock, data
}

// waitLog waits until p's output has text in it.
func waitLog(t *testing.T, p *proc, text string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(p.out.String(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("%q not in the log within %v:\n%s", text, within, p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
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

// waitState is waitState for the pair's tests.
func (r *remusPair) waitState(t *testing.T, sock, state string, within time.Duration) map[string]any {
	t.Helper()
	return waitState(t, sock, state, within)
}

// waitState waits until the primary's status says state.
func waitState(t *testing.T, sock, state string, within time.Duration) map[string]any {
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
	r := startRemus(t, remusOpts{})
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
	// The writers rewrite the same pages: most go as deltas against the
	// backup's copies, so what fails over below was resolved from them.
	if d, _ := st["delta_pages"].(float64); d == 0 {
		t.Errorf("no page was sent as a delta: %v", st)
	}
	checkCheckpointLog(t, r.pSock)
	// The primary collects garbage only where a stop cannot wait on the
	// guest (machine.CollectAtSafePoints): under this load, many times.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	info, err := api.NewClient(r.pSock).Info(ctx)
	cancel()
	if err != nil || !info.GC.AtSafePoints || info.GC.OnGuest == 0 || info.GC.Forced != 0 {
		t.Errorf("the primary's garbage collection: %+v (err %v); want at safe points, on the guest's goroutine, never forced", info.GC, err)
	}
	// Its runtime monitor sleeps longer (internal/sysmon), where the
	// process may set another thread's timer slack (CAP_SYS_NICE): under
	// this load it is found within seconds.
	if sysmon.CanSetSlack() {
		rm := info.RuntimeMonitor
		for deadline := time.Now().Add(10 * time.Second); rm.SlackNS == 0 && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if i, err := api.NewClient(r.pSock).Info(ctx); err == nil {
				rm = i.RuntimeMonitor
			}
			cancel()
		}
		if rm.TID == 0 || rm.SlackNS == 0 {
			t.Errorf("the primary's runtime monitor: %+v; want its thread found and its slack set", rm)
		}
	}
	// The same through the CLI, as an operator reads it.
	for sock, want := range map[string][]string{
		r.pSock: {"role:        primary", "state:       protected", "backup:      " + r.replAddr + ", healthy true",
			"recent:      ", "checkpoints: pause p50 ", "; commit p50 "},
		r.bSock: {"role:    backup", ": following, term 1"},
	} {
		res := runCLI(t, 30*time.Second, "", "status", "--api-sock", sock)
		for _, w := range want {
			if res.code != 0 || !strings.Contains(res.stdout, w) {
				t.Errorf("ftvm status --api-sock %s: exit %d, no %q in:\n%s%s", sock, res.code, w, res.stdout, res.stderr)
			}
		}
	}
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
	// The disk: the guest's write-ahead log, replicated into the backup's
	// replica of /data, has every acknowledged write, and the resumed guest
	// appends to it.
	wal := replicaFile(t, r.stateDir, "wal.log")
	for key, val := range acked {
		if !strings.Contains(wal, "SET "+key+" "+val+"\n") {
			t.Errorf("the backup's replica of the guest's log lacks the acknowledged SET %s %s", key, val)
			break
		}
	}
	if wal = replicaFile(t, r.stateDir, "wal.log"); !strings.HasSuffix(wal, "SET after failover\n") {
		t.Errorf("the resumed guest's log does not end with its new write: ...%q", wal[max(0, len(wal)-80):])
	}
	bst := status(t, r.bSock)
	b, _ := json.Marshal(bst)
	if !strings.Contains(string(b), "failed-over") && !strings.Contains(string(b), "failover_ms") {
		t.Errorf("backup status after failover: %s", b)
	}
	t.Logf("backup status: %s", b)
}

// checkCheckpointLog checks that a protected primary under load accounts
// for every checkpoint it takes: GET /checkpoints lists each one since a
// given one (consecutive, each with its pause and pages, and once the
// backup acknowledged it, how long that took), and the histograms in
// GET /metrics count them all.
func checkCheckpointLog(t *testing.T, sock string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := api.NewClient(sock)
	var st struct {
		Checkpoints uint64 `json:"checkpoints"`
	}
	if err := c.Get(ctx, "/status", &st); err != nil {
		t.Fatal(err)
	}
	since := st.Checkpoints - min(st.Checkpoints, 20)
	time.Sleep(200 * time.Millisecond) // more checkpoints meanwhile
	var list remus.CheckpointsList
	if err := c.Get(ctx, fmt.Sprintf("/checkpoints?since=%d", since), &list); err != nil {
		t.Fatal(err)
	}
	before := st.Checkpoints // taken before the list was asked for
	if err := c.Get(ctx, "/status", &st); err != nil {
		t.Fatal(err)
	}
	recs := list.Checkpoints
	if list.Missed != 0 || len(recs) == 0 || recs[0].Seq != since+1 || recs[len(recs)-1].Seq < before ||
		recs[len(recs)-1].Seq > st.Checkpoints {
		t.Fatalf("GET /checkpoints?since=%d: %d records (first %+v), missed %d; the status said %d checkpoints before, %d after",
			since, len(recs), recs[:min(1, len(recs))], list.Missed, before, st.Checkpoints)
	}
	committed := 0
	for i, r := range recs {
		if r.Seq != since+1+uint64(i) || r.PauseUS <= 0 || r.DirtyPages < 0 || r.At.IsZero() || r.Session == 0 {
			t.Fatalf("checkpoint record %d after %d: %+v", i, since, r)
		}
		if r.CommitUS > 0 {
			committed++
			if r.CommitUS > 10e6 {
				t.Errorf("checkpoint %d took %v µs to be acknowledged", r.Seq, r.CommitUS)
			}
		}
	}
	// All but the last few (in flight when asked) were acknowledged.
	if committed < len(recs)-8 {
		t.Errorf("only %d of %d checkpoint records have their acknowledgement: %+v", committed, len(recs), recs[len(recs)-1])
	}
	if err := c.Get(ctx, "/checkpoints?since=x", &list); err == nil || !strings.Contains(err.Error(), "400") {
		t.Errorf("GET /checkpoints?since=x: %v, want 400 Bad Request", err)
	}
	body := getText(t, sock, "/metrics")
	counts := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if name, v, ok := strings.Cut(line, "_count "); ok {
			counts[name], _ = strconv.ParseFloat(v, 64)
		}
	}
	last := float64(recs[len(recs)-1].Seq)
	// A pause is observed once the guest runs on: the last may be just now.
	if c := counts["ftvm_remus_checkpoint_pause_seconds"]; c < last-1 {
		t.Errorf("ftvm_remus_checkpoint_pause_seconds_count %v, want at least %v (checkpoints taken)", c, last-1)
	}
	if c := counts["ftvm_remus_checkpoint_commit_seconds"]; c < last-8 {
		t.Errorf("ftvm_remus_checkpoint_commit_seconds_count %v, want about %v (checkpoints acknowledged)", c, last)
	}
}

// getText fetches path from an API socket as text.
func getText(t *testing.T, sock, path string) string {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
	resp, err := hc.Get("http://vm" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", path, resp.Status, err)
	}
	return string(b)
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

// replicaFile reads a file of the (only) protected VM's directory replica
// on the backup.
func replicaFile(t *testing.T, stateDir, name string) string {
	t.Helper()
	matches, _ := filepath.Glob(filepath.Join(stateDir, "slots", "*", "disk", "0", name))
	if len(matches) != 1 {
		t.Fatalf("replica files %s: %v", name, matches)
	}
	b, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestRemusOneBackupTwoPrimaries: one backup protects two VMs (one slot
// each); both fail over, each with its own data on its own address.
func TestRemusOneBackupTwoPrimaries(t *testing.T) {
	r := startRemus(t, remusOpts{})
	p2, kv2, _, _ := r.startPrimary(t, "second")
	for i, addr := range []string{r.kvAddr, kv2} {
		k, err := dialKV(addr)
		if err != nil {
			t.Fatal(err)
		}
		for j := 0; j < 20; j++ {
			if got, err := k.do(fmt.Sprintf("SET vm%d-%d x", i, j), 5*time.Second); err != nil || got != "OK" {
				t.Fatalf("SET: %q %v", got, err)
			}
		}
		k.c.Close()
	}
	st := status(t, r.bSock)
	if slots, _ := st["slots"].([]any); len(slots) != 2 {
		t.Fatalf("backup status: %v", st)
	}
	r.primary.cmd.Process.Kill()
	p2.cmd.Process.Kill()
	for i, addr := range []string{r.kvAddr, kv2} {
		waitServing(t, addr, 10*time.Second)
		k, err := dialKV(addr)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := k.do("COUNT", 5*time.Second); got != "COUNT 20" {
			t.Errorf("vm %d after failover: %q", i, got)
		}
		if got, _ := k.do(fmt.Sprintf("GET vm%d-19", i), 5*time.Second); got != "VALUE x" {
			t.Errorf("vm %d after failover: %q", i, got)
		}
		if got, _ := k.do(fmt.Sprintf("GET vm%d-19", 1-i), 5*time.Second); got != "NOTFOUND" {
			t.Errorf("vm %d has the other VM's data: %q", i, got)
		}
		k.c.Close()
	}
}

// TestRemusMutualTLS: with --tls-cert/--tls-key/--tls-ca on both sides the
// primary is protected over mutual TLS; a primary without a certificate,
// or with one from another CA, is never accepted.
func TestRemusMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := testCA(t, "ftvm test CA")
	otherCA, otherKey := testCA(t, "another CA")
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caFile := write("ca.pem", pemCert(ca))
	bc, bk := testLeaf(t, ca, caKey, "backup")
	pc, pk := testLeaf(t, ca, caKey, "primary")
	xc, xk := testLeaf(t, otherCA, otherKey, "intruder")
	tls := func(who string, c, k []byte) []string {
		return []string{"--tls-cert", write(who+".pem", c), "--tls-key", write(who+".key", k), "--tls-ca", caFile}
	}
	r := startRemus(t, remusOpts{backup: tls("backup", bc, bk), primary: append(tls("primary", pc, pk),
		"--tls-server-name", "127.0.0.1")})
	if st := status(t, r.pSock); st["state"] != "protected" {
		t.Fatalf("primary over mutual TLS: %v", st)
	}
	// Intruders: no certificate, and a certificate from another CA.
	for _, extra := range [][]string{nil, append(tls("intruder", xc, xk), "--tls-server-name", "127.0.0.1")} {
		sock := filepath.Join(dir, fmt.Sprintf("x%d.sock", len(extra)))
		p := startProc(t, ftvmBinary(t), append(append([]string{"run", "--protect", r.replAddr, "--timeout", "300ms",
			"--api-sock", sock, "--listen", "3=" + freeAddr(t)}, extra...), r.wasm)...)
		waitSocket(t, p, sock)
		time.Sleep(1500 * time.Millisecond)
		if st := status(t, sock); st["state"] == "protected" || st["state"] == "syncing" {
			t.Errorf("a primary with TLS flags %v got protected: %v", extra, st)
		}
		p.cmd.Process.Kill()
	}
	if st := status(t, r.bSock); len(st["slots"].([]any)) != 1 {
		t.Errorf("the backup accepted an intruder: %v", st)
	}
}

var _ = exec.Command

// TestRemusGuestExits: a protected guest that ends by itself prints all its
// output (released after the backup learned of the exit), exits with its
// code, and its backup closes the slot instead of resuming it later. The
// backup's replica of the guest's directory ends as the primary's: the
// file operations of the epoch the guest ended in, after its last
// checkpoint, travel with its Exit. With fixed epochs of a minute, every
// operation of the run is in that epoch (the only checkpoint is the first,
// of the empty directory); with the default policy, which checkpoints at
// the guest's output, most of them reach the backup with checkpoints and
// the rest with the Exit.
func TestRemusGuestExits(t *testing.T) {
	wasm := cGuest(t, "fileio", []string{"fileio.c"})
	instrumented(t, wasm)
	native := fileioNative(t)
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"one-epoch", []string{"--epoch-policy", "fixed", "--epoch", "1m"}},
		{"output-policy", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			repl, bSock, state := freeAddr(t), filepath.Join(dir, "b.sock"), filepath.Join(dir, "state")
			backup := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", state,
				"--timeout", "300ms", "--api-sock", bSock, "--log-level", "debug")
			waitSocket(t, backup, bSock)
			data := filepath.Join(dir, "data")
			os.MkdirAll(data, 0o755)
			run := append([]string{"run", "--protect", repl, "--timeout", "300ms", "--dir", data + ":/data", "--log-level", "debug"}, tc.flags...)
			res := runCLI(t, time.Minute, "", append(run, wasm, "/data")...)
			if res.code != 0 {
				t.Fatalf("exit %d\nstderr:\n%s", res.code, res.stderr)
			}
			checkFileioOutput(t, res.stdout, native)
			checkFileioTree(t, data)
			if strings.Contains(res.stderr, "asks for a full checkpoint") {
				t.Errorf("the backup refused a checkpoint of the run") // a gap: the replica misses an epoch
			}
			// The backup stores the exit off its ack's path: wait for it.
			waitLog(t, backup, "the guest's exit stored", 10*time.Second)
			replicas, _ := filepath.Glob(filepath.Join(state, "slots", "*", "disk", "0"))
			if len(replicas) != 1 {
				t.Fatalf("replicas of /data on the backup: %v", replicas)
			}
			checkFileioTree(t, replicas[0])
			exitedNotResumed(t, backup, bSock)
			if t.Failed() { // the backup's log is shown by startProc
				t.Logf("the primary's log:\n%s", res.stderr)
			}
		})
	}
}

// TestRemusTrapIsRecordedAsAnAbort: a protected guest that traps ends
// ftvm with 134, and its backup records that code as the VM's exit (it
// recorded 0, a success, for a run that crashed).
func TestRemusTrapIsRecordedAsAnAbort(t *testing.T) {
	wasm := cGuest(t, "fail", []string{"fail.c"})
	instrumented(t, wasm)
	dir := t.TempDir()
	repl, bSock, state := freeAddr(t), filepath.Join(dir, "b.sock"), filepath.Join(dir, "state")
	backup := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", state, "--timeout", "300ms", "--api-sock", bSock,
		"--log-level", "info")
	waitSocket(t, backup, bSock)
	res := runCLI(t, time.Minute, "", "run", "--protect", repl, "--timeout", "300ms", wasm, "trap")
	if res.code != 134 || !strings.Contains(res.stdout, "about to trap") {
		t.Fatalf("exit %d, stdout %q\nstderr:\n%s", res.code, res.stdout, res.stderr)
	}
	waitLog(t, backup, "the guest's exit stored", 10*time.Second)
	if !strings.Contains(backup.out.String(), "exit_code=134") {
		t.Fatalf("the backup did not record the trap's 134:\n%s", backup.out.String())
	}
	exitedNotResumed(t, backup, bSock)
}

// TestRemusRunAgainAfterExit: a guest that exited under one --vm-id can
// be run again under it, protected, on the backup that saw it exit and on
// one restarted from that backup's state (which recorded the exit). Each
// run starts over from a full checkpoint; the one that ended is never
// resumed.
func TestRemusRunAgainAfterExit(t *testing.T) {
	wasm := cGuest(t, "fileio", []string{"fileio.c"})
	instrumented(t, wasm)
	dir := t.TempDir()
	repl, bSock, state := freeAddr(t), filepath.Join(dir, "b.sock"), filepath.Join(dir, "state")
	startBackup := func() *proc {
		os.Remove(bSock)
		b := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", state,
			"--timeout", "300ms", "--api-sock", bSock, "--log-level", "info")
		waitSocket(t, b, bSock)
		return b
	}
	backup := startBackup()
	runOnce := func(run int, backup *proc) {
		t.Helper()
		data := filepath.Join(dir, fmt.Sprintf("data%d", run))
		os.MkdirAll(data, 0o755)
		const stored = "the guest's exit stored"
		before := strings.Count(backup.out.String(), stored)
		res := runCLI(t, time.Minute, "", "run", "--protect", repl, "--timeout", "300ms", "--vm-id", "job1",
			"--dir", data+":/data", wasm, "/data")
		if res.code != 0 || strings.Contains(res.stderr, "NOT PROTECTED") {
			t.Fatalf("run %d: exit %d, protected: %v\n%s", run, res.code, !strings.Contains(res.stderr, "NOT PROTECTED"), res.stderr)
		}
		for deadline := time.Now().Add(10 * time.Second); strings.Count(backup.out.String(), stored) == before; {
			if time.Now().After(deadline) {
				t.Fatalf("run %d: its exit not stored within 10 s:\n%s", run, backup.out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		checkFileioTree(t, filepath.Join(state, "slots", "job1", "disk", "0"))
	}
	runOnce(1, backup)
	// Again, on the backup that saw the first run exit.
	runOnce(2, backup)
	if !strings.Contains(backup.out.String(), "a new run of the VM") {
		t.Errorf("the backup did not take the second run as a new one:\n%s", backup.out.String())
	}
	// And on a backup restarted from that state after kill -9.
	backup.cmd.Process.Kill()
	<-backup.done
	backup = startBackup()
	runOnce(3, backup)
	if strings.Contains(backup.out.String(), "FAILOVER") {
		t.Errorf("a backup resumed a run that had exited:\n%s", backup.out.String())
	}
}

// TestRemusSmallMemoryGuest: a C guest whose memory stays at its first
// 128 KiB is protected like any other. It used to be unable to pause (a
// pause borrowed 256 KiB of memory and waited for a bigger one), so it was
// never checkpointed: the primary stayed syncing and held every line until
// the guest exited — a server that small would never have answered.
func TestRemusSmallMemoryGuest(t *testing.T) {
	wasm := cGuest(t, "small", []string{"small.c"})
	instrumented(t, wasm)
	dir := t.TempDir()
	repl, bSock, pSock := freeAddr(t), filepath.Join(dir, "b.sock"), filepath.Join(dir, "p.sock")
	backup := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", filepath.Join(dir, "state"),
		"--timeout", "300ms", "--api-sock", bSock, "--log-level", "info")
	waitSocket(t, backup, bSock)
	const lines = 300 // 10 ms apart: 3 s
	primary := startProc(t, ftvmBinary(t), "run", "--protect", repl, "--timeout", "300ms", "--api-sock", pSock,
		"--log-level", "warn", wasm, fmt.Sprint(lines), "10")
	stdout := primary.out // and stderr, quiet at warn
	waitSocket(t, primary, pSock)
	st := waitState(t, pSock, "protected", 30*time.Second)
	if n := num(st, "checkpoints"); n < 1 {
		t.Fatalf("protected without a checkpoint: %v", st)
	}
	// Released while it runs, not at its exit.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stdout.String(), "line 1 ") {
		select {
		case <-primary.done:
			t.Fatalf("the guest exited before any line was released while it ran (%d bytes after exit)", len(stdout.String()))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line released 10s after protection began: %v", status(t, pSock))
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-primary.done:
	case <-time.After(time.Minute):
		t.Fatal("the guest did not finish")
	}
	if code := primary.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d", code)
	}
	var want strings.Builder
	h := uint32(2166136261)
	for i := range lines {
		h = (h ^ uint32(i)) * 16777619
		fmt.Fprintf(&want, "line %d %08x\n", i, h)
	}
	var got strings.Builder
	for l := range strings.Lines(stdout.String()) {
		if strings.HasPrefix(l, "line ") {
			got.WriteString(l)
		}
	}
	if got.String() != want.String() {
		t.Errorf("output differs from the program's:\n%s", diffLines(want.String(), got.String()))
	}
}

// protectedLikeUnprotected runs wasm with args unprotected, then protected
// (with --log-level debug and runFlags) by a fresh backup whose log is at
// backupLog; it fails the test unless both exit 0 with the same output, and
// returns the protected run, the backup and the backup's API socket.
func protectedLikeUnprotected(t *testing.T, wasm, backupLog string, runFlags []string, args ...string) (cliResult, *proc, string) {
	t.Helper()
	ref := runCLI(t, 2*time.Minute, "", append([]string{"run", wasm}, args...)...)
	if ref.code != 0 {
		t.Fatalf("unprotected: exit %d\n%s", ref.code, ref.stderr)
	}
	dir := t.TempDir()
	repl, bSock := freeAddr(t), filepath.Join(dir, "b.sock")
	backup := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", filepath.Join(dir, "state"),
		"--timeout", "500ms", "--api-sock", bSock, "--log-level", backupLog)
	waitSocket(t, backup, bSock)
	run := append([]string{"run", "--protect", repl, "--timeout", "500ms", "--log-level", "debug"}, runFlags...)
	res := runCLI(t, 2*time.Minute, "", append(append(run, wasm), args...)...)
	if res.code != 0 {
		t.Fatalf("protected: exit %d\n%s", res.code, res.stderr)
	}
	if res.stdout != ref.stdout {
		t.Errorf("protected output %q, unprotected %q", res.stdout, ref.stdout)
	}
	return res, backup, bSock
}

// TestRemusFirstCheckpointAtStart: a protected guest starts only once its
// first, full, checkpoint is asked for, so that checkpoint is taken at the
// guest's first host call and carries its memory before it ran, not what a
// computation making no host call put there meanwhile (it would also run
// unprotected until then). The dirtier's first host calls are libc's, for
// its arguments; then it allocates 16 MiB and writes every page of it
// before its next.
func TestRemusFirstCheckpointAtStart(t *testing.T) {
	wasm := guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	instrumented(t, wasm)
	// 16 MiB, one page a round, three rounds.
	res, _, _ := protectedLikeUnprotected(t, wasm, "warn", nil, "16", "1", "3")
	m := regexp.MustCompile(`msg="checkpoint sent".* seq=1 full=true pages=([0-9]+)`).FindStringSubmatch(res.stderr)
	if m == nil {
		t.Fatalf("no full checkpoint 1 in the primary's log:\n%s", res.stderr)
	}
	// Taken after the buffer was written, it would hold its 4,096 pages.
	if pages, _ := strconv.Atoi(m[1]); pages > 256 {
		t.Errorf("the first, full, checkpoint carried %d pages: taken after the guest had run, not at its first host call", pages)
	}
}

// TestRemusExitAbandonsMemory: a guest that fills 64 MiB with random
// words without a host call (longer than its 5 ms epoch), then prints a
// checksum and exits. The
// checkpoint taken at that print carries every page (tens of milliseconds
// to encode and send), and the exit does not wait for it: no failover
// will resume a guest that ended, so the Exit goes to the backup past it
// (the primary sends it between the sender's messages), and once the
// backup acknowledges the Exit the line is released and the checkpoint
// abandoned. The output is the unprotected run's, and the backup closes
// the slot, never committing the abandoned checkpoint (the one before the
// Exit's number) and never resuming the guest.
func TestRemusExitAbandonsMemory(t *testing.T) {
	wasm := cGuest(t, "bigexit", []string{"bigexit.c"})
	instrumented(t, wasm)
	res, backup, bSock := protectedLikeUnprotected(t, wasm, "info", []string{"--epoch", "5ms"}, "64")
	m := regexp.MustCompile(`msg="the guest's exit sent at once, not behind the sender's queue" .*seq=([0-9]+) after=([0-9]+)`).FindStringSubmatch(res.stderr)
	if m == nil {
		t.Fatalf("the exit waited for the checkpoints being streamed:\n%s", res.stderr)
	}
	exitSeq, _ := strconv.Atoi(m[1])
	after, _ := strconv.ParseFloat(m[2], 64)
	s := exitedNotResumed(t, backup, bSock)
	t.Logf("%s; backup: %v", m[0], s)
	if num(s, "committed") != after {
		t.Errorf("the backup committed %v, the Exit followed checkpoint %v", s["committed"], after)
	}
	if regexp.MustCompile(fmt.Sprintf(`msg="checkpoint sent" .* seq=%d `, exitSeq-1)).MatchString(res.stderr) {
		t.Errorf("checkpoint %d, taken at the print, was sent whole before the exit:\n%s", exitSeq-1, res.stderr)
	}
}

// TestRemusPrimaryUnderCPUContention: other processes that keep every core
// busy slow a protected primary down but must not silence it: the backup
// must not take it for dead. The guest fills 64 MiB without a host call,
// so the checkpoint at its print carries them all, and the primary encodes
// it on threads of low priority while a busy loop per core competes.
// Those threads took the policy SCHED_IDLE once: starved by the loops,
// each held one of the process's Ps (the guest's goroutine holds the
// other) and every goroutine stood still behind them, heartbeats
// included; the backup failed over a live primary in 4 runs of 4.
func TestRemusPrimaryUnderCPUContention(t *testing.T) {
	wasm := cGuest(t, "bigexit", []string{"bigexit.c"})
	instrumented(t, wasm)
	ref := runCLI(t, 2*time.Minute, "", "run", wasm, "64")
	if ref.code != 0 {
		t.Fatalf("unprotected: exit %d\n%s", ref.code, ref.stderr)
	}
	for range runtime.NumCPU() {
		busy := exec.Command("sh", "-c", "while :; do :; done")
		if err := busy.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { busy.Process.Kill(); busy.Wait() })
	}
	dir := t.TempDir()
	repl, bSock := freeAddr(t), filepath.Join(dir, "b.sock")
	backup := startProc(t, ftvmBinary(t), "backup", "--listen", repl, "--state", filepath.Join(dir, "state"),
		"--timeout", "500ms", "--api-sock", bSock, "--log-level", "info")
	waitSocket(t, backup, bSock)
	res := runCLI(t, 2*time.Minute, "", "run", "--protect", repl, "--timeout", "500ms", "--log-level", "info", wasm, "64")
	if res.code != 0 || res.stdout != ref.stdout {
		t.Fatalf("protected: exit %d, output %q (unprotected %q)\n%s", res.code, res.stdout, ref.stdout, res.stderr)
	}
	if strings.Contains(res.stderr, "NOT PROTECTED") || strings.Contains(res.stderr, "stale") {
		t.Errorf("the primary lost its backup under load:\n%s", res.stderr)
	}
	exitedNotResumed(t, backup, bSock)
}

// exitedNotResumed checks, well past the timeout (a backup that took the
// exit for silence would have resumed the guest by then), that the
// backup's one slot is exited and never failed over; it returns the
// slot's status.
func exitedNotResumed(t *testing.T, backup *proc, bSock string) map[string]any {
	t.Helper()
	time.Sleep(time.Second)
	st := status(t, bSock)
	slots, _ := st["slots"].([]any)
	if len(slots) != 1 {
		t.Fatalf("backup status: %v", st)
	}
	s := slots[0].(map[string]any)
	if s["state"] != "exited" {
		t.Errorf("the backup's slot after the guest exited: %v", s)
	}
	if strings.Contains(backup.out.String(), "FAILOVER") {
		t.Errorf("the backup resumed a guest that had exited:\n%s", backup.out.String())
	}
	return s
}

// TestRemusCollectAheadFailover: a guest that writes hundreds of pages an
// epoch has most of each checkpoint copied before its pause, while it runs
// (the pause copies only what it wrote after). The backup, whose every
// checkpoint was built that way, takes over after kill -9 of the primary
// and finishes with the checksum of the guest's whole memory that an
// uninterrupted run prints: no page was lost or stale.
func TestRemusCollectAheadFailover(t *testing.T) {
	wasm := guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	instrumented(t, wasm)
	// 32 MiB; 400 pages a round, then 2 ms asleep: about 3,000 pages an
	// epoch, for 5 s.
	args := []string{"32", "400", "2000", "2000"}
	ref := runCLI(t, 2*time.Minute, "", append([]string{"run", wasm}, args...)...)
	if ref.code != 0 || ref.stdout == "" {
		t.Fatalf("unprotected: exit %d\n%s", ref.code, ref.stderr)
	}
	_, bOut, primary, pOut, pSock := startStdoutPair(t, nil, append([]string{wasm}, args...)...)
	var st, last map[string]any
	for deadline := time.Now().Add(time.Minute); ; {
		if st = status(t, pSock); len(st) > 0 {
			last = st
		}
		if num(st, "ahead_pages") >= 10000 && num(st, "acked") >= 20 {
			break
		}
		if pOut.String() != "" && num(last, "ahead_pages") < 10000 && num(last, "acked") >= 20 {
			// Pauses came late (over aheadMaxWait after they were asked
			// for: the guest's core was busy), so the primary rightly
			// did not collect ahead: there is nothing here to test.
			t.Skipf("the guest ended with %v pages collected ahead in %v checkpoints: a machine this busy delays pauses past aheadMaxWait",
				last["ahead_pages"], last["acked"])
		}
		if time.Now().After(deadline) || pOut.String() != "" {
			t.Fatalf("no checkpoints collected ahead: %v", last)
		}
		time.Sleep(20 * time.Millisecond)
	}
	primary.cmd.Process.Kill()
	<-primary.done
	deadline := time.Now().Add(2 * time.Minute)
	for bOut.String() == "" {
		if time.Now().After(deadline) {
			t.Fatal("the backup did not finish the guest")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // the whole line
	if pOut.String() != "" {
		t.Fatalf("the primary printed %q before it was killed: it finished too soon for the test", pOut.String())
	}
	if got := bOut.String(); got != ref.stdout {
		t.Fatalf("after failover the guest printed %q, an uninterrupted run %q", got, ref.stdout)
	}
	t.Logf("killed after %v checkpoints, %v pages of them copied ahead of their pauses", num(st, "checkpoints"), num(st, "ahead_pages"))
}

// TestRemusLoopPollsFailoverMidComputation: a CPU-bound guest run with
// --loop-polls is checkpointed inside its computation (epochs end at loop
// polls, not at its rare host calls); kill -9 of the primary mid-phase
// leaves the backup to finish the computation from its last checkpoint,
// and what the client saw — the primary's released output followed by the
// backup's — is exactly an uninterrupted run's output, nothing lost,
// nothing twice.
func TestRemusLoopPollsFailoverMidComputation(t *testing.T) {
	wasm := cGuest(t, "cpu", []string{"cpu.c"})
	const scale = "40"
	ref := runCLI(t, 2*time.Minute, "", "run", wasm, scale)
	if ref.code != 0 || !strings.Contains(ref.stdout, "checksum") {
		t.Fatalf("reference run: %d %s", ref.code, ref.stderr)
	}
	// Instrument with polls once, before the clock matters.
	if res := runCLI(t, 2*time.Minute, "", "run", "--loop-polls", wasm, "1"); res.code != 0 {
		t.Fatalf("warm-up: %d %s", res.code, res.stderr)
	}
	backup, bOut, primary, pOut, pSock := startStdoutPair(t, []string{"--loop-polls"}, wasm, scale)
	// Several checkpoints while the guest computes: it makes five host
	// calls in all (one line per phase), so only loop polls can end these
	// epochs.
	var cps float64
	for deadline := time.Now().Add(time.Minute); ; {
		st := status(t, pSock)
		cps, _ = st["checkpoints"].(float64)
		if cps >= 6 && st["state"] == "protected" {
			break
		}
		if time.Now().After(deadline) || strings.Contains(pOut.String(), "nbody") {
			t.Fatalf("no checkpoints inside the computation: %v, output so far %q", st, pOut.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	primary.cmd.Process.Kill() // kill -9, mid-phase
	<-primary.done
	seen := pOut.String()
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(bOut.String(), "checksum") {
		if time.Now().After(deadline) {
			t.Fatalf("the backup did not finish the computation; its output: %q", bOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(backup.out.String(), "FAILOVER") {
		t.Fatal("no failover logged")
	}
	if got := seen + bOut.String(); got != ref.stdout {
		t.Fatalf("the client saw (primary %q, then backup %q):\n%s", seen, bOut.String(), diffLines(ref.stdout, got))
	}
	t.Logf("%v checkpoints before the kill; the primary had released %d bytes", cps, len(seen))
}

// TestRemusRestartedPrimaryDoesNotStartOver: a primary killed and started
// again at once under the same --vm-id (a supervisor's restart) must not
// have its fresh VM replace what the backup holds of the run before: that
// lost every write the clients were told was saved. The new run is fenced
// (exit 69, saying why), and the backup resumes the earlier run's state.
func TestRemusRestartedPrimaryDoesNotStartOver(t *testing.T) {
	r := startRemus(t, remusOpts{primary: []string{"--vm-id", "kv"}})
	const n = 50
	for i := 0; i < n; i++ {
		if got := request(t, r.kvAddr, fmt.Sprintf("SET key%d value%d", i, i)); got != "OK" {
			t.Fatalf("SET: %q", got)
		}
	}
	r.primary.cmd.Process.Kill()
	<-r.primary.done
	again := startProc(t, ftvmBinary(t), append(r.primaryArgs, r.wasm, "--fd", "4", "--wal", "/data/wal.log")...)
	select {
	case <-again.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the new run of the VM was not stopped")
	}
	if code := again.cmd.ProcessState.ExitCode(); code != 69 || !strings.Contains(again.out.String(), "earlier run") {
		t.Fatalf("the new run exited %d, want 69 (fenced) saying why:\n%s", code, again.out.String())
	}
	waitLog(t, r.backup, "FAILOVER: resuming", 20*time.Second)
	waitKV(t, r.backup, r.kvAddr)
	for i := 0; i < n; i++ {
		if got, want := request(t, r.kvAddr, fmt.Sprintf("GET key%d", i)), fmt.Sprintf("VALUE value%d", i); got != want {
			t.Fatalf("after the failover GET key%d = %q, want %q", i, got, want)
		}
	}
}

// TestRemusFailoverAfterItsAddressFrees: a backup failing over a primary
// that still holds the guest's address (stopped, not dead) waits for it and
// says so in its status; once the address is free it resumes the VM, and
// its status says that, not the wait (it kept "failover waiting: ...
// address already in use" for good).
func TestRemusFailoverAfterItsAddressFrees(t *testing.T) {
	r := startRemus(t)
	if got := request(t, r.kvAddr, "SET before stop"); got != "OK" {
		t.Fatalf("SET: %q", got)
	}
	reason := func() string {
		var st struct {
			Slots []struct {
				Reason string `json:"reason"`
			} `json:"slots"`
		}
		if err := json.Unmarshal([]byte(getText(t, r.bSock, "/status")), &st); err != nil || len(st.Slots) != 1 {
			t.Fatalf("backup status: %v", err)
		}
		return st.Slots[0].Reason
	}
	r.primary.cmd.Process.Signal(syscall.SIGSTOP)
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(reason(), "failover waiting"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			r.primary.cmd.Process.Kill()
			t.Fatalf("the backup did not say it waits for the guest's address: %q", reason())
		}
	}
	r.primary.cmd.Process.Kill()
	waitLog(t, r.backup, "FAILOVER: resuming", 20*time.Second)
	waitKV(t, r.backup, r.kvAddr)
	if got := request(t, r.kvAddr, "GET before"); got != "VALUE stop" {
		t.Errorf("after the failover: GET before = %q", got)
	}
	if got := reason(); strings.Contains(got, "waiting") || !strings.Contains(got, "failed over") {
		t.Errorf("the backup's status after the failover: reason %q", got)
	}
}

// TestRemusStoppedPrimaryIsFenced: a primary that stands still for longer
// than the timeout (kill -STOP, as a starved or swapped-out host would)
// is failed over by its backup. When it runs again it must not release
// the output it held, nor go on: the backup runs the VM now. It waits to
// hear from the backup instead of giving it up, learns from the redial
// that it is stale, and stops its guest (exit 69). The guest's lines, the
// primary's then the backup's, are one history: each line once, none
// missing. Before, the primary woke, took the backup for dead, released
// the lines it held — the backup printed them again — and printed on.
func TestRemusStoppedPrimaryIsFenced(t *testing.T) {
	const lines = 400 // 10 ms apart: 4 s
	backup, bOut, primary, pOut, _ := startLinesPair(t, lines)
	primary.cmd.Process.Signal(syscall.SIGSTOP)
	// The backup fails over after 300 ms of silence (later on a busy
	// machine); the primary stays stopped until it has.
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(backup.out.String(), "FAILOVER"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			primary.cmd.Process.Signal(syscall.SIGCONT)
			t.Fatalf("the backup did not fail over a primary stopped for 20 s")
		}
	}
	time.Sleep(200 * time.Millisecond)
	primary.cmd.Process.Signal(syscall.SIGCONT)
	select {
	case <-primary.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the fenced primary did not stop")
	}
	if code := primary.cmd.ProcessState.ExitCode(); code != 69 || !strings.Contains(primary.out.String(), "FENCED") {
		t.Errorf("the primary exited %d, want 69 (fenced)", code)
	}
	if !strings.Contains(primary.out.String(), "this primary stood still") {
		t.Errorf("the primary did not say it stood still")
	}
	select {
	case <-backup.done:
		t.Fatal("the backup ended")
	default:
	}
	// The failed-over guest finishes its lines on the backup.
	last := fmt.Sprintf("line %d ", lines-1)
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(bOut.String(), last); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the backup's guest did not finish: %q", bOut.String())
		}
	}
	checkLineHistory(t, lines, pOut.String(), bOut.String())
	t.Logf("the primary printed %d lines, the backup the other %d", strings.Count(pOut.String(), "\n"), strings.Count(bOut.String(), "\n"))
}

// TestRemusStoppedBackupDoesNotFailOver: a backup that stands still for
// longer than the timeout (kill -STOP) heard nothing only because it did
// not listen: when it runs again it must not resume its last checkpoint
// beside the live primary (which meanwhile gave it up and printed on). It
// takes the primary back instead: the primary redials, resyncs and is
// protected again, and the guest's lines are the primary's alone, each
// once. Before, the backup woke and failed over at once, printing from an
// older checkpoint lines the primary had printed.
func TestRemusStoppedBackupDoesNotFailOver(t *testing.T) {
	const lines = 400 // 10 ms apart: 4 s
	backup, bOut, primary, pOut, pSock := startLinesPair(t, lines)
	backup.cmd.Process.Signal(syscall.SIGSTOP)
	waitState(t, pSock, "unprotected", 20*time.Second) // after 300 ms of silence
	time.Sleep(500 * time.Millisecond)                 // the backup stands still for longer than its timeout
	backup.cmd.Process.Signal(syscall.SIGCONT)
	waitState(t, pSock, "protected", 10*time.Second)
	select {
	case <-primary.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the primary did not finish")
	}
	if code := primary.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("the primary exited %d", code)
	}
	if strings.Contains(backup.out.String(), "FAILOVER") || bOut.String() != "" {
		t.Errorf("the backup failed over after standing still; it printed %q", bOut.String())
	}
	if !strings.Contains(backup.out.String(), "this backup stood still") {
		t.Errorf("the backup did not say it stood still")
	}
	checkLineHistory(t, lines, pOut.String())
}

// startLinesPair starts small.c printing lines lines, protected
// (startStdoutPair), and returns once it is protected and has printed 20.
func startLinesPair(t *testing.T, lines int) (backup *proc, bOut *syncBuffer, primary *proc, pOut *syncBuffer, pSock string) {
	t.Helper()
	wasm := cGuest(t, "small", []string{"small.c"})
	instrumented(t, wasm)
	backup, bOut, primary, pOut, pSock = startStdoutPair(t, nil, wasm, fmt.Sprint(lines), "10")
	waitState(t, pSock, "protected", 30*time.Second)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(pOut.String(), "line 20 "); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no line 20 from the primary: %q", pOut.String())
		}
	}
	return backup, bOut, primary, pOut, pSock
}

// checkLineHistory checks that outs, one after the other, hold small.c's
// lines 0 to lines-1, each once, in order.
func checkLineHistory(t *testing.T, lines int, outs ...string) {
	t.Helper()
	var got []int
	for _, out := range outs {
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			var n int
			var h string
			if _, err := fmt.Sscanf(l, "line %d %s", &n, &h); err != nil {
				t.Fatalf("unexpected output line %q", l)
			}
			got = append(got, n)
		}
	}
	for i, n := range got {
		if n != i {
			t.Fatalf("lines %v…: line %d where %d was due (the first output has %d lines)", got[max(0, i-3):min(len(got), i+3)],
				n, i, strings.Count(outs[0], "\n"))
		}
	}
	if len(got) != lines {
		t.Errorf("%d lines in all, want %d", len(got), lines)
	}
}

// startStdoutPair starts a backup and a primary protected by it (timeout
// 300 ms, 25 ms epochs, then extra), each with its stdout kept apart
// (startStdout), once both API sockets answer; guest is the module and its
// arguments.
func startStdoutPair(t *testing.T, extra []string, guest ...string) (backup *proc, bOut *syncBuffer, primary *proc, pOut *syncBuffer, pSock string) {
	t.Helper()
	dir := t.TempDir()
	repl, bSock := freeAddr(t), filepath.Join(dir, "b.sock")
	pSock = filepath.Join(dir, "p.sock")
	backup, bOut = startStdout(t, "backup", "backup", "--listen", repl, "--state", filepath.Join(dir, "state"),
		"--timeout", "300ms", "--api-sock", bSock, "--log-level", "info")
	waitSocket(t, backup, bSock)
	args := append([]string{"run", "--protect", repl, "--timeout", "300ms", "--epoch", "25ms"}, extra...)
	args = append(append(args, "--api-sock", pSock, "--log-level", "info"), guest...)
	primary, pOut = startStdout(t, "primary", args...)
	waitSocket(t, primary, pSock)
	return backup, bOut, primary, pOut, pSock
}

// startStdout starts ftvm with its stdout kept apart from its stderr (the
// proc's out).
func startStdout(t *testing.T, what string, args ...string) (*proc, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(ftvmBinary(t), args...)
	p := &proc{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	stdout := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, p.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s stderr:\n%s", what, p.out.String())
		}
	})
	return p, stdout
}

// TestRemusBackupCannotPrepare: a backup host without binaryen cannot
// prepare the guest's module for failover (it instruments it itself, and
// its cache is empty). Such a backup could never resume the VM, so the
// primary must not count it as protection: the backup drops the session
// once preparing failed and refuses the primary's Hellos with the reason,
// and the primary says so (log, status) and serves on unprotected.
func TestRemusBackupCannotPrepare(t *testing.T) {
	bin := ftvmBinary(t)
	dir := t.TempDir()
	replAddr, bSock, pSock := freeAddr(t), filepath.Join(dir, "b.sock"), filepath.Join(dir, "p.sock")
	noTools := filepath.Join(dir, "empty-path")
	os.MkdirAll(noTools, 0o755)
	cmd := exec.Command(bin, "backup", "--listen", replAddr, "--state", filepath.Join(dir, "state"),
		"--timeout", "300ms", "--api-sock", bSock, "--log-level", "info")
	cmd.Env = append(os.Environ(), "PATH="+noTools, "FTVM_INSTRUMENT_CACHE="+filepath.Join(dir, "icache"))
	backup := startCmd(t, cmd, "backup without binaryen")
	waitSocket(t, backup, bSock)

	kvAddr, data := freeAddr(t), filepath.Join(dir, "data")
	os.MkdirAll(data, 0o755)
	primary := startProc(t, bin, "run", "--protect", replAddr, "--timeout", "300ms", "--api-sock", pSock,
		"--listen", "4="+kvAddr, "--dir", data+":/data", "--log-level", "info", kvInstrumented(t), "--fd", "4")
	waitKV(t, primary, kvAddr)

	var st map[string]any
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st = status(t, pSock)
		if r, _ := st["backup_refused"].(string); strings.Contains(r, "preparing its module for failover failed") &&
			strings.Contains(r, "binaryen") && st["state"] == "unprotected" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the primary's status never said the backup refused it for its module: %v", st)
		}
	}
	waitLog(t, primary, "the backup refused this primary", 5*time.Second)
	// It serves, its output no longer held for a backup.
	k, err := dialKV(kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer k.c.Close()
	if got, err := k.do("SET a 1", 5*time.Second); err != nil || got != "OK" {
		t.Fatalf("SET on the unprotected primary: %q, %v", got, err)
	}
	// The backup says why too, and never reports the program ready; it
	// keeps nothing to resume, so the primary's refused redials, past the
	// 300 ms timeout, fail nothing over (that would only fail: there is
	// no program to run).
	time.Sleep(time.Second)
	var bst map[string]any
	if err := api.NewClient(bSock).Get(context.Background(), "/status", &bst); err != nil {
		t.Fatal(err)
	}
	slots, _ := bst["slots"].([]any)
	if len(slots) != 1 {
		t.Fatalf("backup status: %v", bst)
	}
	slot := slots[0].(map[string]any)
	if r, _ := slot["program_error"].(string); slot["program_ready"] != false || !strings.Contains(r, "binaryen") ||
		slot["state"] != "idle" || slot["committed"] != float64(0) {
		t.Fatalf("backup slot status: %v", slot)
	}
	if got, err := k.do("GET a", 5*time.Second); err != nil || got != "VALUE 1" {
		t.Fatalf("GET on the primary a second later: %q, %v", got, err)
	}
}

// TestRemusFailoverThatCannotResume: a failover whose VM cannot start here
// (its --rebind address belongs to no interface of this host) says so in
// the backup's status, `ftvm status` and a metric, and the restore command
// it gives resumes the slot's last committed checkpoint by hand, with
// every acknowledged write.
func TestRemusFailoverThatCannotResume(t *testing.T) {
	r := startRemus(t, remusOpts{backup: []string{"--rebind", "4=192.0.2.1:9"}}) // TEST-NET-1
	k, err := dialKV(r.kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	const keys = 40
	for i := range keys {
		if got, err := k.do(fmt.Sprintf("SET k%d v%d", i, i), 5*time.Second); err != nil || got != "OK" {
			t.Fatalf("SET k%d: %q, %v", i, got, err)
		}
	}
	k.c.Close()
	r.primary.cmd.Process.Kill() // kill -9
	<-r.primary.done

	var slot map[string]any
	for deadline := time.Now().Add(20 * time.Second); ; {
		if slots, _ := status(t, r.bSock)["slots"].([]any); len(slots) == 1 {
			slot, _ = slots[0].(map[string]any)
			if e, _ := slot["failover_error"].(string); e != "" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no failover_error in the backup's status 20s after the kill: %v", slot)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("backup slot after the failed failover: %v", slot)
	if e := slot["failover_error"].(string); !strings.Contains(e, "192.0.2.1") {
		t.Errorf("failover_error %q does not name the address that could not be bound", e)
	}
	if fo, _ := slot["failover_ms"].(float64); fo != 0 {
		t.Errorf("failover_ms %v for a failover that did not resume the VM", fo)
	}
	cmd, _ := slot["restore_command"].(string)
	if !strings.HasPrefix(cmd, "ftvm restore ") {
		t.Fatalf("restore_command %q", cmd)
	}
	res := runCLI(t, 30*time.Second, "", "status", "--api-sock", r.bSock)
	for _, w := range []string{"FAILOVER FAILED", "192.0.2.1", cmd} {
		if !strings.Contains(res.stdout, w) {
			t.Errorf("ftvm status of the backup lacks %q:\n%s%s", w, res.stdout, res.stderr)
		}
	}
	if m := getText(t, r.bSock, "/metrics"); !strings.Contains(m, fmt.Sprintf("ftvm_remus_backup_failover_failed{vm=%q} 1", slot["vm"])) {
		t.Errorf("/metrics lacks ftvm_remus_backup_failover_failed 1:\n%s", m)
	}

	// By hand, as the status says, with the listener somewhere of ours.
	addr := freeAddr(t)
	args := append([]string{"restore", "--listen", "4=" + addr}, strings.Fields(cmd)[2:]...)
	p := startProc(t, ftvmBinary(t), args...)
	waitKV(t, p, addr)
	if k, err = dialKV(addr); err != nil {
		t.Fatal(err)
	}
	defer k.c.Close()
	for i := range keys {
		if got, err := k.do(fmt.Sprintf("GET k%d", i), 5*time.Second); err != nil || got != fmt.Sprintf("VALUE v%d", i) {
			t.Errorf("GET k%d after the restore by hand: %q, %v", i, got, err)
		}
	}
}
