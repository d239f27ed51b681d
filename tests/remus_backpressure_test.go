package tests

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRemusBackPressure: with the backup's acknowledgements frozen, a
// client asking for megabytes of replies gets none of them, and the
// primary holds no more than --hold-limit (plus the little the guest wrote
// before its next safe point) instead of buffering without bound: the
// guest is stalled. Once acks flow again every reply arrives, intact and in order.
func TestRemusBackPressure(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	const limit = 256 << 10
	var px *faultProxy
	r := launchRemus(t, "10s", func(repl string) string { px = newFaultProxy(t, repl); return px.addr() },
		"--hold-limit", "256KiB")
	t.Cleanup(px.close)
	waitState(t, r.pSock, "protected", time.Minute)

	k, err := dialKV(r.kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer k.c.Close()
	val := strings.Repeat("v", 8000)
	if got, err := k.do("SET big "+val, 10*time.Second); err != nil || got != "OK" {
		t.Fatalf("SET: %q %v", got, err)
	}

	const requests = 2000 // 16 MB of replies
	px.freeze()
	var got atomic.Int64
	readDone := readReplies(k, requests, "VALUE "+val+"\n", &got)
	go func() {
		w := bufio.NewWriter(k.c)
		for i := 0; i < requests; i++ {
			w.WriteString("GET big\n")
		}
		w.Flush() // blocks while the stalled guest reads nothing: fine
	}()

	// While frozen: nothing reaches the client, held output stays bounded,
	// the guest is stalled.
	maxHeld := 0.0
	var st map[string]any
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if st = status(t, r.pSock); st != nil {
			maxHeld = max(maxHeld, st["held_output_bytes"].(float64))
		}
	}
	checkHeldBack(t, got.Load(), st)
	// What the guest writes in the host calls before its next safe point
	// may come on top of the limit: a few replies, not megabytes.
	if maxHeld > 2*limit {
		t.Errorf("held output reached %.0f bytes with --hold-limit %d", maxHeld, limit)
	}
	t.Logf("while frozen: at most %.0f bytes held (limit %d), %v stalls", maxHeld, limit, st["stalls"])

	px.thaw()
	waitReplies(t, readDone, &got, requests)
}

// TestRemusDiskJournalBackPressure: with the backup's acknowledgements
// frozen, a client writing megabytes through the KV guest's write-ahead
// log gets no reply, and the primary's journal of the epoch's file writes
// stays within --hold-limit: the guest is stalled, its log stops growing
// at a few times the limit instead of taking all 16 MB into the
// primary's memory. Once acks flow again every write is acknowledged, and
// after a failover the backup has each of them.
func TestRemusDiskJournalBackPressure(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	const limit = 256 << 10
	var px *faultProxy
	r := startRemus(t, remusOpts{
		protect: func(repl string) string { px = newFaultProxy(t, repl); return px.addr() },
		// The primary must not give its frozen backup up.
		primary: []string{"--hold-limit", "256KiB", "--timeout", "20s"},
	})
	t.Cleanup(px.close)

	k, err := dialKV(r.kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer k.c.Close()
	val := strings.Repeat("w", 8000)
	const writes = 2000 // 16 MB through the log
	wal := filepath.Join(r.dataDir, "wal.log")
	walSize := func() int64 {
		fi, err := os.Stat(wal)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	before := walSize()

	px.freeze()
	var got atomic.Int64
	readDone := readReplies(k, writes, "OK\n", &got)
	go func() {
		w := bufio.NewWriter(k.c)
		for i := 0; i < writes; i++ {
			fmt.Fprintf(w, "SET k%d %s\n", i, val)
		}
		w.Flush() // blocks while the stalled guest reads nothing: fine
	}()

	maxJournal := 0.0
	var st map[string]any
	var midSize int64
	for start := time.Now(); time.Since(start) < 2*time.Second; time.Sleep(50 * time.Millisecond) {
		if st = status(t, r.pSock); st != nil {
			maxJournal = max(maxJournal, st["journal_bytes"].(float64))
		}
		if midSize == 0 && time.Since(start) > time.Second {
			midSize = walSize()
		}
	}
	endSize := walSize() - before
	checkHeldBack(t, got.Load(), st)
	// One SET may land on top of the limit before the next safe point.
	if maxJournal > 2*limit {
		t.Errorf("the epoch's journal reached %.0f bytes with --hold-limit %d", maxJournal, limit)
	}
	// Checkpoints taken and not acknowledged hold their epochs' journals
	// too: at most the engine's 4 in flight, each ended at the limit.
	if endSize > 8*limit {
		t.Errorf("the log grew by %d bytes while acks were frozen (--hold-limit %d): the guest was not held back", endSize, limit)
	}
	if grown := walSize() - midSize; grown > 0 {
		t.Errorf("the log still grew by %d bytes in the last second of the freeze", grown)
	}
	t.Logf("while frozen: journal at most %.0f bytes (limit %d), log grew %d of %d bytes, %v stalls",
		maxJournal, limit, endSize, writes*(len(val)+8), st["stalls"])

	px.thaw()
	waitReplies(t, readDone, &got, writes)
	if n := walSize() - before; n < int64(writes*len(val)) {
		t.Errorf("the log holds %d bytes after %d acknowledged writes of %d", n, writes, len(val))
	}

	// Every acknowledged write survives the primary.
	killProc(t, r.primary)
	waitServing(t, r.kvAddr, 30*time.Second)
	b, err := dialKV(r.kvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.c.Close()
	for i := 0; i < writes; i++ {
		reply, err := b.do(fmt.Sprintf("GET k%d", i), 10*time.Second)
		if err != nil || reply != "VALUE "+val {
			t.Fatalf("after failover, GET k%d: %.40q %v", i, reply, err)
		}
	}
}

// checkHeldBack fails unless, with the backup's acks frozen, no reply
// reached the client (got), and the primary, by its last status st, was
// still protected and had stalled its guest.
func checkHeldBack(t *testing.T, got int64, st map[string]any) {
	t.Helper()
	if got != 0 {
		t.Fatalf("%d replies reached the client while the backup's acks were frozen", got)
	}
	if st == nil || st["state"] != "protected" {
		t.Fatalf("primary while frozen: %v", st)
	}
	if st["stalls"].(float64) < 1 {
		t.Errorf("the guest was never stalled: %v", st)
	}
}

// readReplies reads n reply lines from k in the background, each of which
// must be want, counting them in got. The channel gets the first error, or
// nil after the last.
func readReplies(k *kvConn, n int, want string, got *atomic.Int64) <-chan error {
	done := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			k.c.SetReadDeadline(time.Now().Add(60 * time.Second))
			line, err := k.r.ReadString('\n')
			if err != nil {
				done <- err
				return
			}
			if line != want {
				done <- fmt.Errorf("reply %d: %.40q", i, line)
				return
			}
			got.Add(1)
		}
		done <- nil
	}()
	return done
}

// waitReplies waits for readReplies's n replies once acks flow again.
func waitReplies(t *testing.T, readDone <-chan error, got *atomic.Int64, n int) {
	t.Helper()
	select {
	case err := <-readDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(90 * time.Second):
		t.Fatalf("only %d of %d replies after the thaw", got.Load(), n)
	}
}
