package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine/instrument"
	"github.com/ftvm/ftvm/snapshot"
)

// instrumented makes sure the instrumented form of a module is in the
// shared cache before a CLI process needs it (instrumenting a Go module
// takes a minute), and returns the module bytes.
func instrumented(t *testing.T, wasm string) []byte {
	t.Helper()
	mod := readModule(t, wasm)
	if _, err := instrument.Instrument(context.Background(), mod, ""); err != nil {
		t.Fatal(err)
	}
	return mod
}

// TestSnapshotEquivalence stops Go and C guests at many different host
// calls (with files open and half written), writes a snapshot, restores it
// in a new ftvm process, and checks that the two processes' combined output
// and the files left behind equal those of an uninterrupted run.
func TestSnapshotEquivalence(t *testing.T) {
	cases := []struct {
		name      string
		wasm      string
		args      []string
		maxMemory uint64 // the snapshots' memory must be at most this (0: any)
		// goSched: the guest's host calls vary a little from run to run
		// (Go's scheduler reads clocks); a C guest's never do, so each
		// snapshot it is asked for must be written.
		goSched bool
	}{
		{"go", guest.MustGo(t, "testdata/guests/gowork"), []string{"40"}, 0, true},
		{"c", cGuest(t, "fileio", []string{"fileio.c"}), nil, 0, false},
		// Memory smaller than the usual scratch region: the pause
		// borrows all of it.
		{"c-small-memory", cGuest(t, "small", []string{"small.c"}), []string{"30", "1"}, 128 << 10, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			instrumented(t, c.wasm)
			// The uninterrupted run, asked for a snapshot at a call it never
			// reaches: ftvm then reports how many safe points it passed.
			refDir := t.TempDir()
			ref := runCLI(t, 2*time.Minute, "", append([]string{"run", "--dir", refDir + ":/data",
				"--snapshot-at-call", "1000000", "--snapshot-out", filepath.Join(refDir, "never"), c.wasm}, c.args...)...)
			m := regexp.MustCompile(`host_calls=(\d+)`).FindStringSubmatch(ref.stderr)
			if ref.code != 0 || m == nil {
				t.Fatalf("uninterrupted run: exit %d\n%s", ref.code, ref.stderr)
			}
			want := ref.stdout
			calls, _ := strconv.ParseUint(m[1], 10, 64)
			wantTree := contentOnly(snapshotTree(t, refDir))
			if calls < 10 {
				t.Fatalf("only %d host calls", calls)
			}
			// Safe points early, in the middle and at the very end, and
			// some before the end (fileio.c holds files it unlinked and
			// renamed over open there).
			points := []uint64{1, 2, 3, 5, calls / 4, calls / 3, calls / 2, 2 * calls / 3,
				calls - 30, calls - 25, calls - 20, calls - 15, calls - 1, calls}
			for _, k := range points {
				dir := t.TempDir()
				snap := filepath.Join(t.TempDir(), "s.snap")
				args := append([]string{"run", "--dir", dir + ":/data", "--snapshot-at-call", fmt.Sprint(k),
					"--snapshot-out", snap, c.wasm}, c.args...)
				first := runCLI(t, 2*time.Minute, "", args...)
				if first.code != 0 {
					t.Fatalf("call %d: first half exited %d\n%s", k, first.code, first.stderr)
				}
				if _, err := os.Stat(snap); err != nil && !c.goSched {
					t.Fatalf("call %d of %d: no snapshot written\n%s", k, calls, first.stderr)
				} else if err != nil && strings.Contains(first.stderr, "no snapshot written") {
					// A Go guest's call count varies a little from run to
					// run (its scheduler reads clocks): this run ended
					// before call k. It must still equal the reference.
					if first.stdout != want {
						t.Errorf("call %d (not reached): output differs:\n%s", k, diffLines(want, first.stdout))
					}
					continue
				}
				if c.maxMemory != 0 {
					s, err := snapshot.ReadFile(snap, nil)
					if err != nil {
						t.Fatal(err)
					}
					if s.MemorySize > c.maxMemory {
						t.Fatalf("call %d: the guest has %d bytes of memory, not the small memory this case is for", k, s.MemorySize)
					}
				}
				second := runCLI(t, 2*time.Minute, "", "restore", "--module", c.wasm, snap)
				if second.code != 0 {
					t.Fatalf("call %d: restored half exited %d\n%s", k, second.code, second.stderr)
				}
				if got := first.stdout + second.stdout; got != want {
					t.Errorf("call %d of %d: output differs from an uninterrupted run:\n%s", k, calls, diffLines(want, got))
				}
				if d := diffTrees(wantTree, contentOnly(snapshotTree(t, dir))); len(d) > 0 {
					t.Errorf("call %d of %d: files differ: %v", k, calls, d)
				}
			}
		})
	}
}

// TestKVSnapshotRestore fills the KV server guest over TCP, snapshots it
// with --stop through its API socket, restores it in a new process on
// another port, and reads every key back; then it serves new writes, is
// snapshotted again (incremental: dirty tracking works on restored
// memory, also when that memory is a mapping of the snapshot file) and the
// chain restores in a third process. With --mappable the full snapshot's
// memory is mapped by the restore instead of read.
func TestKVSnapshotRestore(t *testing.T) {
	wasm := guest.MustGo(t, "testdata/guests/kvserver")
	instrumented(t, wasm)
	for _, mappable := range []bool{false, true} {
		t.Run(fmt.Sprintf("mappable=%v", mappable), func(t *testing.T) { kvSnapshotRestore(t, wasm, mappable) })
	}
}

// TestSnapshotOutAndRestoreListenAreChecked: `ftvm snapshot --out` refuses
// a path that is not a file of its own to replace: the VM's API socket, a
// directory, a file in a directory the guest was given (its WAL, here,
// which the rename replaced while the guest kept writing to the unlinked
// one). Each refusal says why, leaves the thing there as it was and the
// VM running; a snapshot elsewhere is then taken as usual. Its restore
// refuses a --listen it would ignore (a descriptor that is no listener of
// the snapshot's, none, one given twice), then restores with the right one.
func TestSnapshotOutAndRestoreListenAreChecked(t *testing.T) {
	wasm := guest.MustGo(t, "testdata/guests/kvserver")
	instrumented(t, wasm)
	dir, data := t.TempDir(), t.TempDir()
	addr := freeAddr(t)
	sock := filepath.Join(dir, "vm.sock")
	p := startProc(t, ftvmBinary(t), "run", "--listen", "4="+addr, "--api-sock", sock, "--dir", data+":/data",
		wasm, "-fd", "4", "-wal", "/data/wal.log")
	waitKV(t, p, addr)
	for i := 0; i < 20; i++ {
		if got := request(t, addr, fmt.Sprintf("SET key%d value%d", i, i)); got != "OK" {
			t.Fatalf("SET: %q", got)
		}
	}
	wal := filepath.Join(data, "wal.log")
	before, err := os.ReadFile(wal)
	if err != nil || len(before) == 0 {
		t.Fatalf("the guest's WAL: %d bytes, %v", len(before), err)
	}
	if err := os.Mkdir(filepath.Join(data, "snaps"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ out, says string }{
		{wal, "a directory the guest was given"},
		{filepath.Join(data, "snaps", "kv.snap"), "a directory the guest was given"},
		{sock, "a socket"},
		{dir, "is a directory"},
	} {
		res := runCLI(t, time.Minute, "", "snapshot", "--api-sock", sock, "--out", c.out, "--stop")
		if res.code == 0 || !strings.Contains(res.stderr, c.says) {
			t.Errorf("snapshot --out %s: exit %d, %q; want a refusal saying %q", c.out, res.code, res.stderr, c.says)
		}
	}
	if after, err := os.ReadFile(wal); err != nil || !bytes.Equal(after, before) {
		t.Fatalf("the guest's WAL after the refused snapshots: %d bytes (%v), was %d", len(after), err, len(before))
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("the VM's API socket after the refused snapshot: %v, %v", fi, err)
	}
	if got := request(t, addr, "SET after refusals"); got != "OK" {
		t.Fatalf("the VM after the refused snapshots: %q", got)
	}
	snap := filepath.Join(dir, "kv.snap")
	if res := runCLI(t, time.Minute, "", "snapshot", "--api-sock", sock, "--out", snap, "--stop"); res.code != 0 {
		t.Fatalf("snapshot elsewhere: %d %s", res.code, res.stderr)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the VM did not stop after snapshot --stop")
	}

	// A restore's --listen that would not be used is refused: the guest
	// would bind its recorded address instead.
	addr2 := freeAddr(t)
	for _, c := range []struct {
		listen []string
		says   string
	}{
		{[]string{"7=" + addr2}, "not a listener in the snapshot (its listeners: 4=" + addr},
		{[]string{"3=" + addr2}, "not a listener"}, // fd 3 is the preopened directory
		{[]string{addr2}, "give the guest descriptor"},
		{[]string{"4=" + addr2, "4=" + freeAddr(t)}, "re-mapped twice"},
	} {
		args := []string{"restore", "--dir", data + ":/data"}
		for _, l := range c.listen {
			args = append(args, "--listen", l)
		}
		res := runCLI(t, time.Minute, "", append(args, snap)...)
		if res.code != 125 || !strings.Contains(res.stderr, c.says) {
			t.Errorf("restore --listen %v: exit %d, %q; want 125 saying %q", c.listen, res.code, res.stderr, c.says)
		}
	}
	p2 := startProc(t, ftvmBinary(t), "restore", "--dir", data+":/data", "--listen", "4="+addr2, snap)
	waitKV(t, p2, addr2)
	if got := request(t, addr2, "GET key7"); got != "VALUE value7" {
		t.Fatalf("the restored VM: GET key7 = %q", got)
	}
}

func kvSnapshotRestore(t *testing.T, wasm string, mappable bool) {
	dir := t.TempDir()
	addr := freeAddr(t)
	sock := filepath.Join(dir, "vm.sock")
	p := startProc(t, ftvmBinary(t), "run", "--listen", "3="+addr, "--api-sock", sock, wasm)
	waitKV(t, p, addr)
	const n = 300
	for i := 0; i < n; i++ {
		if got := request(t, addr, fmt.Sprintf("SET key%d value%d", i, i*i)); got != "OK" {
			t.Fatalf("SET: %q", got)
		}
	}
	// A client connected while the snapshot is taken sees a reset after.
	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()

	snap := filepath.Join(dir, "kv.snap")
	args := []string{"snapshot", "--api-sock", sock, "--out", snap, "--stop"}
	if mappable {
		args = append(args, "--mappable")
	}
	res := runCLI(t, time.Minute, "", args...)
	if res.code != 0 {
		t.Fatalf("ftvm snapshot: %d %s", res.code, res.stderr)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the VM did not stop after snapshot --stop")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("stopped VM exited %d", code)
	}
	insp := runCLI(t, time.Minute, "", "inspect", snap)
	if insp.code != 0 || !strings.Contains(insp.stdout, "full") ||
		strings.Contains(insp.stdout, "mappable memory section") != mappable {
		t.Errorf("inspect: %d %s %s", insp.code, insp.stdout, insp.stderr)
	}

	addr2 := freeAddr(t)
	sock2 := filepath.Join(dir, "vm2.sock")
	p2 := startProc(t, ftvmBinary(t), "restore", "--module", wasm, "--listen", "3="+addr2, "--api-sock", sock2, snap)
	waitKV(t, p2, addr2)
	for i := 0; i < n; i++ {
		if got, want := request(t, addr2, fmt.Sprintf("GET key%d", i)), fmt.Sprintf("VALUE value%d", i*i); got != want {
			t.Fatalf("after restore GET key%d = %q, want %q", i, got, want)
		}
	}
	for i := 0; i < 50; i++ {
		if got := request(t, addr2, fmt.Sprintf("SET after%d restore%d", i, i)); got != "OK" {
			t.Fatalf("SET after restore: %q", got)
		}
	}
	if got := request(t, addr2, "COUNT"); got != fmt.Sprintf("COUNT %d", n+50) {
		t.Errorf("COUNT after restore: %q", got)
	}

	// An incremental snapshot of the restored VM carries what changed
	// since the restore; the chain restores in a third process.
	inc := filepath.Join(dir, "kv.inc")
	if res := runCLI(t, time.Minute, "", "snapshot", "--api-sock", sock2, "--out", inc, "--incremental", "--stop"); res.code != 0 {
		t.Fatalf("ftvm snapshot --incremental: %d %s", res.code, res.stderr)
	}
	select {
	case <-p2.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the restored VM did not stop")
	}
	if insp := runCLI(t, time.Minute, "", "inspect", inc); insp.code != 0 || !strings.Contains(insp.stdout, "incremental") {
		t.Fatalf("inspect incremental: %d %s %s", insp.code, insp.stdout, insp.stderr)
	}
	addr3 := freeAddr(t)
	p3 := startProc(t, ftvmBinary(t), "restore", "--module", wasm, "--listen", "3="+addr3, snap, inc)
	waitKV(t, p3, addr3)
	for i := 0; i < n; i++ {
		if got, want := request(t, addr3, fmt.Sprintf("GET key%d", i)), fmt.Sprintf("VALUE value%d", i*i); got != want {
			t.Fatalf("after the chain's restore GET key%d = %q, want %q", i, got, want)
		}
	}
	for i := 0; i < 50; i++ {
		if got, want := request(t, addr3, fmt.Sprintf("GET after%d", i)), fmt.Sprintf("VALUE restore%d", i); got != want {
			t.Fatalf("after the chain's restore GET after%d = %q, want %q", i, got, want)
		}
	}
}

// proc is a background ftvm process.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

func startProc(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	return startCmd(t, exec.Command(bin, args...), fmt.Sprintf("ftvm %v", args))
}

// startCmd starts cmd with its output collected, kills it when the test
// ends, and shows its output (as what) if the test failed.
func startCmd(t *testing.T, cmd *exec.Cmd, what string) *proc {
	t.Helper()
	p := &proc{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", what, p.out.String())
		}
	})
	return p
}

// waitKV waits until the KV server at addr answers.
func waitKV(t *testing.T, p *proc, addr string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		select {
		case <-p.done:
			t.Fatalf("ftvm exited early: %v\n%s", p.cmd.ProcessState, p.out.String())
		default:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "COUNT\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil && strings.HasPrefix(line, "COUNT ") {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kvserver not reachable at %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// contentOnly drops modification times: a restored run writes its files
// later than the uninterrupted one did.
func contentOnly(tree map[string]treeEntry) map[string]treeEntry {
	for p, e := range tree {
		e.mtime = time.Time{}
		tree[p] = e
	}
	return tree
}

// TestLoopPollsSnapshotMidComputation: with --loop-polls a CPU-bound guest
// is snapshotted inside its computation, at a loop poll rather than at its
// next host call, and the restored guest finishes it exactly as an
// uninterrupted run does; without, the same request waits for a host call.
func TestLoopPollsSnapshotMidComputation(t *testing.T) {
	wasm := cGuest(t, "cpu", []string{"cpu.c"})
	instrumented(t, wasm)
	const scale = "40" // each phase computes for a while without a host call
	ref := runCLI(t, 2*time.Minute, "", "run", wasm, scale)
	if ref.code != 0 || !strings.Contains(ref.stdout, "checksum") {
		t.Fatalf("reference run: %d %s", ref.code, ref.stderr)
	}
	for _, polls := range []bool{true, false} {
		t.Run(fmt.Sprintf("loop-polls=%v", polls), func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "vm.sock")
			args := []string{"run", "--api-sock", sock}
			if polls {
				args = append(args, "--loop-polls")
			}
			p := startProc(t, ftvmBinary(t), append(args, wasm, scale)...)
			waitSocket(t, p, sock)
			// Past its host calls: its first printf asks whether stdout is
			// a terminal (fd_fdstat_get) after the first phase; from then
			// on it only computes, its output buffered, until it exits.
			// (Asked during a phase boundary, the pause could land on that
			// host call instead of a loop poll.)
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				info, err := api.NewClient(sock).Info(ctx)
				cancel()
				if err == nil && info.Counters.Calls["fd_fdstat_get"] > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the guest never reached its first printf: %v %+v", err, info)
				}
			}
			time.Sleep(50 * time.Millisecond)
			snap := filepath.Join(dir, "cpu.snap")
			res := runCLI(t, 2*time.Minute, "", "snapshot", "--api-sock", sock, "--out", snap, "--stop")
			if res.code != 0 {
				t.Fatalf("snapshot: %d %s", res.code, res.stderr)
			}
			<-p.done
			first := p.out.String()
			insp := runCLI(t, time.Minute, "", "inspect", snap)
			atPoll := strings.Contains(insp.stdout, "at ftvm.safepoint")
			if atPoll != polls {
				t.Fatalf("snapshot taken at a loop poll: %v, want %v:\n%s", atPoll, polls, insp.stdout)
			}
			second := runCLI(t, 2*time.Minute, "", "restore", snap)
			if second.code != 0 {
				t.Fatalf("restore: %d %s", second.code, second.stderr)
			}
			if got := first + second.stdout; got != ref.stdout {
				t.Fatalf("output differs from an uninterrupted run:\n%s", diffLines(ref.stdout, got))
			}
		})
	}
}

// TestFullSnapshotOfMappedRestore: a VM restored from a mappable snapshot
// maps its memory from the file, so a page its guest has not touched since
// holds the file's data, not zeros. A full snapshot of it must carry those
// pages (the dirty tracker leaves nothing that may be the file's out as
// empty memory: dirty.Options.FileBacked). The dirtier writes every page of
// its 32 MiB, then random ones in rounds, and prints a checksum of all of
// it: run to its end through snapshot --mappable, restore, a full snapshot
// at once, and a restore of that, it prints what an uninterrupted run does.
func TestFullSnapshotOfMappedRestore(t *testing.T) {
	wasm := guest.MustC(t, "dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	instrumented(t, wasm)
	args := []string{wasm, "32", "200", "40", "20000"}
	whole := runCLI(t, time.Minute, "", append([]string{"run"}, args...)...)
	if whole.code != 0 || whole.stdout == "" {
		t.Fatalf("uninterrupted run: %d %q %s", whole.code, whole.stdout, whole.stderr)
	}
	dir := t.TempDir()
	// snapshotAndStop waits for p's API socket, lets the guest run a few
	// rounds, and snapshots it with --stop.
	snapshotAndStop := func(p *proc, sock, out string, extra ...string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if _, err := os.Stat(sock); err == nil {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
		res := runCLI(t, time.Minute, "", append([]string{"snapshot", "--api-sock", sock, "--out", out, "--stop"}, extra...)...)
		if res.code != 0 {
			t.Fatalf("ftvm snapshot %v: %d %s", extra, res.code, res.stderr)
		}
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Fatal("the VM did not stop after snapshot --stop")
		}
	}
	sock := filepath.Join(dir, "a.sock")
	mapped := filepath.Join(dir, "a.snap")
	snapshotAndStop(startProc(t, ftvmBinary(t), append([]string{"run", "--api-sock", sock}, args...)...), sock, mapped, "--mappable")
	sock2 := filepath.Join(dir, "b.sock")
	full := filepath.Join(dir, "b.snap")
	snapshotAndStop(startProc(t, ftvmBinary(t), "restore", "--api-sock", sock2, mapped), sock2, full)
	end := runCLI(t, time.Minute, "", "restore", full)
	if end.code != 0 || end.stdout != whole.stdout {
		t.Fatalf("restored from a full snapshot of a mapped restore: %d %q, want %q (%s)", end.code, end.stdout, whole.stdout, end.stderr)
	}
}
