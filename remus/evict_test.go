package remus

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
)

// TestBackupLetsIdleSlotsGo: a backup serving many short runs, each with a
// VM id of its own, let none of their slots go: each kept its memory image,
// store and goroutines for as long as the backup ran, and after
// --max-slots of them every new primary was refused. Now a slot idle for
// slotLinger is let go: one that never committed anything (its primary
// gone before its first checkpoint, or its machine failed to build after
// the Hello) with its directory, one whose VM exited keeping its
// directory (its exit is stored; a primary of the VM reopens it). The
// limit still holds for slots in use.
func TestBackupLetsIdleSlotsGo(t *testing.T) {
	const linger = 200 * time.Millisecond
	testSlotLinger.Store(int64(linger))
	t.Cleanup(func() { testSlotLinger.Store(0) }) // after the backup stops (cleanups run last first)
	b := serveBackup(t, time.Hour)
	b.cfg.MaxSlots = 2
	addr := b.Addr().String()
	module, hash := fakeModule()
	hello := func(vm string) *wire.Hello {
		return &wire.Hello{Version: wire.Version, VM: vm, Term: 1, Module: hash, Name: "fake"}
	}
	slotDir := func(vm string) string { return filepath.Join(b.cfg.StateDir, "slots", vm) }
	gone := func(vm string) {
		t.Helper()
		for deadline := time.Now().Add(20 * linger); ; time.Sleep(10 * time.Millisecond) {
			b.mu.Lock()
			_, held := b.slots[vm]
			b.mu.Unlock()
			if !held {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the idle slot of %s was kept", vm)
			}
		}
	}

	// A primary gone before its first checkpoint.
	f := dialBackupHello(t, addr, hello("never"))
	f.c.Close()
	// A run that exited.
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 16,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	e := dialBackupHello(t, addr, hello("exited"))
	e.checkpoint(1, true, encodeSnap(t, full), nil)
	e.ack(1)
	e.send(&wire.Exit{Seq: 2, Code: 0})
	e.ack(2)
	e.c.Close()

	gone("never")
	gone("exited")
	if _, err := os.Stat(slotDir("never")); !os.IsNotExist(err) {
		t.Errorf("the directory of a slot that never committed anything is kept (%v)", err)
	}
	if _, err := os.Stat(slotDir("exited")); err != nil {
		t.Errorf("the directory of an exited VM's slot: %v", err)
	}

	// The exited VM's primary is welcomed again, from its directory.
	again := dialBackupHello(t, addr, hello("exited"))
	again.c.Close()
	gone("exited")
	if _, err := os.Stat(slotDir("exited")); err != nil {
		t.Errorf("the directory of an exited VM's slot, let go twice: %v", err)
	}

	// Room again for two slots in use; not for a third.
	dialBackupHello(t, addr, hello("next1"))
	dialBackupHello(t, addr, hello("next2"))
	why := refusedHello(t, addr, hello("next3"))
	if !strings.Contains(why, "--max-slots 2") {
		t.Fatalf("a third VM in use was refused for %q", why)
	}
	time.Sleep(3 * linger)
	if n := len(b.Status().Slots); n != 2 {
		t.Fatalf("%d slots with two primaries connected, want 2: a slot in use was let go", n)
	}
}

// TestIdleSlotOutlivesARefusedHandshake: a handshake given an idle slot
// keeps it (it may attach), and one refused afterwards (its module
// unpreparable, say) leaves the slot to go after all, though the loop
// hears nothing of the refusal.
func TestIdleSlotOutlivesARefusedHandshake(t *testing.T) {
	const linger = 100 * time.Millisecond
	testSlotLinger.Store(int64(linger))
	t.Cleanup(func() { testSlotLinger.Store(0) })
	b := serveBackup(t, time.Hour)
	_, hash := fakeModule()
	f := dialBackupHello(t, b.Addr().String(), &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "fake"})
	b.mu.Lock()
	s := b.slots["vm1"]
	b.mu.Unlock()
	// A second handshake is under way while the first primary leaves.
	b.mu.Lock()
	s.attaching++
	b.mu.Unlock()
	f.c.Close()
	time.Sleep(5 * linger)
	b.mu.Lock()
	_, held := b.slots["vm1"]
	s.attaching-- // refused: handshake's way out, no event for the loop
	b.mu.Unlock()
	if !held {
		t.Fatal("a slot a handshake was given was let go")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b.mu.Lock()
		_, held = b.slots["vm1"]
		b.mu.Unlock()
		if !held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the idle slot was kept after the refused handshake")
		}
	}
}
