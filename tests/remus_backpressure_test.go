package tests

import (
	"bufio"
	"fmt"
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
	var px *freezeProxy
	r := launchRemus(t, "10s", func(repl string) string { px = newFreezeProxy(t, repl); return px.addr() },
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
	readDone := make(chan error, 1)
	go func() {
		r := bufio.NewReaderSize(k.c, 64<<10)
		for i := 0; i < requests; i++ {
			k.c.SetReadDeadline(time.Now().Add(60 * time.Second))
			line, err := r.ReadString('\n')
			if err != nil {
				readDone <- err
				return
			}
			if line != "VALUE "+val+"\n" {
				readDone <- fmt.Errorf("reply %d: %.40q...", i, line)
				return
			}
			got.Add(1)
		}
		readDone <- nil
	}()
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
	if n := got.Load(); n != 0 {
		t.Fatalf("%d replies reached the client while the backup's acks were frozen", n)
	}
	if st == nil || st["state"] != "protected" {
		t.Fatalf("primary while frozen: %v", st)
	}
	if st["stalls"].(float64) < 1 {
		t.Errorf("the guest was never stalled: %v", st)
	}
	// What the guest writes in the host calls before its next safe point
	// may come on top of the limit: a few replies, not megabytes.
	if maxHeld > 2*limit {
		t.Errorf("held output reached %.0f bytes with --hold-limit %d", maxHeld, limit)
	}
	t.Logf("while frozen: at most %.0f bytes held (limit %d), %v stalls", maxHeld, limit, st["stalls"])

	px.thaw()
	select {
	case err := <-readDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(90 * time.Second):
		t.Fatalf("only %d of %d replies after the thaw", got.Load(), requests)
	}
}
