package remus

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/store"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/transport"
	"github.com/ftvm/ftvm/wasi"
)

// senderOverTCP starts p's sender for a session over a loopback
// connection and returns the session and the far end, which reads what
// the sender writes.
func senderOverTCP(t *testing.T, p *Primary) (*session, *transport.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	near, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	far, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s := &session{id: 1, conn: transport.NewConn(near, transport.Options{}), queue: make(chan any, 16),
		done: make(chan struct{}), lastID: snapshot.Hash{1}}
	go s.sender(p)
	fc := transport.NewConn(far, transport.Options{})
	t.Cleanup(func() { s.close(); fc.Close() })
	return s, fc
}

// primaryOverTCP is a primary whose sender writes to a loopback
// connection (senderOverTCP); the far end's reads give up after 30 s.
func primaryOverTCP(t *testing.T) (*Primary, *session, *transport.Conn) {
	t.Helper()
	p, err := NewPrimary(PrimaryConfig{Backup: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	s, far := senderOverTCP(t, p)
	far.SetReadDeadline(time.Now().Add(30 * time.Second))
	return p, s, far
}

// memoryCheckpoint is an incremental checkpoint of n random pages (S2
// cannot shrink them: each of its pieces on the wire is a chunk), with
// ops as its epoch's disk operations.
func memoryCheckpoint(seq uint64, n int, ops []wire.FsOp) *checkpoint {
	rng := rand.New(rand.NewPCG(seq, 3))
	mem := make([]byte, (n*snapshot.PageSize+65535)&^65535) // whole wasm pages
	for i := range mem {
		mem[i] = byte(rng.Uint32())
	}
	var st snapshot.Stager
	idx := make([]uint32, n)
	for i := range idx {
		idx[i] = uint32(i)
	}
	pages, err := st.Stage(mem, idx)
	if err != nil {
		panic(err)
	}
	snap := &snapshot.Snapshot{Kind: snapshot.Incremental, Seq: seq, MemorySize: uint64(len(mem)), Pages: pages,
		Devices: []byte("{}")}
	return &checkpoint{seq: seq, snap: snap, stager: &st, dirty: n, ops: ops}
}

// TestExitAbandonsMemoryOnlyCheckpoints: once the guest has ended
// (session.exiting, set by Finish), no failover will resume it, so the
// sender stops streaming a checkpoint of only memory at its next piece and
// skips the next such one. An incremental checkpoint with disk operations
// after those cannot be sent (the backup lacks its base: it refused such
// a checkpoint for a gap, and applied the Exit's operations without it's,
// so its copy of the files lost them): its operations go with the Exit's,
// in order, and the Exit names the last checkpoint sent whole. Only the
// ack of the Exit's own seq, not a checkpoint's, tells Finish the backup
// knows.
func TestExitAbandonsMemoryOnlyCheckpoints(t *testing.T) {
	p, s, far := primaryOverTCP(t)
	recv := func() wire.Message {
		t.Helper()
		m, err := wire.Recv(far)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	// 48 MiB of random pages: far more than the connection buffers, so
	// the sender is still streaming when the guest ends.
	const pages = 12288
	write := func(data string) []wire.FsOp {
		return []wire.FsOp{{Op: uint8(wasi.FsWrite), Path: "out.txt", Offset: -1, Data: []byte(data)}}
	}
	s.queue <- memoryCheckpoint(4, 8, write("four\n")) // sent whole before the guest ends
	s.queue <- memoryCheckpoint(5, pages, nil)
	for { // checkpoint 4 first
		if b, ok := recv().(*wire.CheckpointBegin); ok && b.Seq == 5 {
			break
		}
	}
	if _, ok := recv().(*wire.CheckpointData); !ok {
		t.Fatal("no data of checkpoint 5")
	}
	s.exiting.Store(true)
	s.queue <- memoryCheckpoint(6, 8, nil)              // of only memory: skipped
	s.queue <- memoryCheckpoint(7, 8, write("seven\n")) // with disk operations, after a gap
	s.queue <- &exitItem{exit: wire.Exit{Seq: 8, Code: 3}, ops: write("eight\n")}
	var data int
	var ends []uint64
	var begins []uint64
	var ops []string
	for done := false; !done; {
		switch m := recv().(type) {
		case *wire.CheckpointData:
			if m.Seq == 5 {
				data += len(m.Data)
			}
		case *wire.CheckpointBegin:
			begins = append(begins, m.Seq)
		case *wire.CheckpointEnd:
			ends = append(ends, m.Seq)
		case *wire.DiskOps:
			if m.Seq != 8 {
				t.Errorf("disk operations of epoch %d, want them all with the exit's (8)", m.Seq)
			}
			for _, op := range m.Ops {
				ops = append(ops, string(op.Data))
			}
		case *wire.Exit:
			if m.Seq != 8 || m.Code != 3 || m.After != 4 || m.DiskOps != 1 {
				t.Errorf("exit %+v, want seq 8, code 3, 1 message of disk ops following checkpoint 4", m)
			}
			done = true
		}
	}
	if len(begins) != 0 || len(ends) != 0 {
		t.Errorf("after the guest ended: begun %v, ended %v; want none", begins, ends)
	}
	if want := []string{"seven\n", "eight\n"}; !slices.Equal(ops, want) {
		t.Errorf("the exit's disk operations write %q, want %q", ops, want)
	}
	if whole := pages * snapshot.PageSize; data >= whole/2 {
		t.Errorf("%d bytes of checkpoint 5's %d sent after the guest ended: it was not abandoned", data, whole)
	}
	// The Exit's ack, not an earlier checkpoint's, releases the output.
	exited := make(chan struct{})
	s.exitSeq.Store(8)
	s.exitDone.Store(&exited)
	go s.receiver(p)
	wire.SendFlush(far, &wire.Ack{Seq: 7})
	select {
	case <-exited:
		t.Fatal("the ack of checkpoint 7 was taken for the exit's")
	case <-time.After(100 * time.Millisecond):
	}
	wire.SendFlush(far, &wire.Ack{Seq: 8})
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the exit's ack did not release the output")
	}
}

// TestBackupDropsAPartialCheckpointAtExit: an Exit that comes in the
// middle of a checkpoint (the primary abandoned it: the guest ended) is
// acknowledged, the part received is dropped, never committed, and the
// slot is closed for good.
func TestBackupDropsAPartialCheckpointAtExit(t *testing.T) {
	b := serveBackup(t, time.Hour)
	module, hash := fakeModule()
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 20,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, encodeSnap(t, full), nil)
	f.ack(1)
	var pages []snapshot.Page
	for i := range uint32(200) {
		pages = append(pages, snapshot.Page{Index: i, Data: onePage(byte(i))})
	}
	inc := encodeSnap(t, &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID,
		MemorySize: 1 << 20, Pages: pages, Devices: []byte("{}")})
	f.send(&wire.CheckpointBegin{Seq: 2})
	f.send(&wire.CheckpointData{Seq: 2, Data: inc[:len(inc)/2]})
	f.send(&wire.Exit{Seq: 3, Code: 0})
	f.ack(3)
	if c := committedOn(b); c != 1 {
		t.Errorf("committed %d after the exit, want 1: the partial checkpoint 2 was applied", c)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st := b.Status().Slots
		if len(st) == 1 && st[0].State == "exited" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slots after the exit: %+v, want one, exited", st)
		}
	}
}

// TestBackupStoresTheLastEpochsDiskOps: the file operations of the epoch a
// guest ended in come with its Exit, after a checkpoint abandoned
// mid-stream, and reach the backup's replica of its directory after those
// of every committed checkpoint. An Exit that announces more of them than
// arrived drops the session unacknowledged. One whose operations follow a
// checkpoint the backup never committed is acknowledged (the run is over)
// but its operations are not applied: the replica stays as of the last
// commit, a state the guest's files had, and the backup says so.
func TestBackupStoresTheLastEpochsDiskOps(t *testing.T) {
	creat := uint32(wasi.OflagCreat | wasi.OflagTrunc)
	write := func(path string, off int64, data string) wire.FsOp {
		return wire.FsOp{Op: uint8(wasi.FsWrite), Path: path, Offset: off, Data: []byte(data)}
	}
	create := func(path string) wire.FsOp { return wire.FsOp{Op: uint8(wasi.FsCreate), Path: path, Flags: creat} }
	for _, tc := range []struct {
		name     string
		announce uint32 // DiskOps messages the Exit announces; 1 are sent
		after    uint64 // the checkpoint the Exit says they follow
	}{{"whole", 1, 2}, {"missing", 2, 2}, {"after a checkpoint not committed", 1, 3}} {
		t.Run(tc.name, func(t *testing.T) {
			// Copies into the image that take a while: the disk gets
			// a checkpoint once its copy is done, and the exit after.
			b := serveSlowBackup(t, time.Hour, 30*time.Millisecond)
			module, hash := fakeModule()
			// The device state names the Hello's one preopen, as a
			// primary's does (the backup checks it before its ack).
			devs := []byte(`{"preopens":[{"HostPath":"/srv/data","GuestPath":"/data"}],"monotonic_ns":5}`)
			full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 20,
				Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: devs, ModuleCode: module, ModuleName: "fake"}
			f := dialBackupHello(t, b.Addr().String(), &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1,
				Module: hash, Name: "fake", Preopens: []string{"/data"}})
			f.checkpoint(1, true, encodeSnap(t, full), nil)
			f.ack(1)
			// Checkpoint 2 writes log.txt.
			inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID,
				MemorySize: 1 << 20, Pages: []snapshot.Page{{Index: 1, Data: onePage(1)}}, Devices: devs}
			raw := encodeSnap(t, inc)
			f.send(&wire.CheckpointBegin{Seq: 2})
			f.send(&wire.CheckpointData{Seq: 2, Data: raw})
			f.send(&wire.DiskOps{Seq: 2, Ops: []wire.FsOp{create("log.txt"), write("log.txt", 0, "one\n")}})
			f.send(&wire.CheckpointEnd{Seq: 2, SnapshotSize: uint64(len(raw)), SnapshotCRC: crc32.Checksum(raw, castagnoli), DiskOps: 1})
			f.ack(2)
			// Checkpoint 3, of memory only, is cut off by the exit in
			// epoch 4, which appended to log.txt and wrote result.txt.
			raw3 := encodeSnap(t, &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 3, Parent: inc.ID,
				MemorySize: 1 << 20, Pages: []snapshot.Page{{Index: 2, Data: onePage(2)}}, Devices: []byte("{}")})
			f.send(&wire.CheckpointBegin{Seq: 3})
			f.send(&wire.CheckpointData{Seq: 3, Data: raw3[:len(raw3)/2]})
			f.send(&wire.DiskOps{Seq: 4, Ops: []wire.FsOp{write("log.txt", -1, "two\n"), create("result.txt"),
				write("result.txt", 0, "42\n")}})
			f.send(&wire.Exit{Seq: 4, Code: 3, DiskOps: tc.announce, After: tc.after})
			replica := filepath.Join(b.cfg.StateDir, "slots", "vm1", "disk", "0")
			if tc.announce != 1 {
				if m := f.next(); m != nil {
					t.Fatalf("an exit missing disk ops was answered with %v", m)
				}
				if _, err := os.Stat(filepath.Join(replica, "result.txt")); err == nil {
					t.Errorf("the replica has the ops of an exit that lacked some")
				}
				return
			}
			f.ack(4)
			if c := committedOn(b); c != 2 {
				t.Errorf("committed %d after the exit, want 2", c)
			}
			want := map[string]string{"log.txt": "one\ntwo\n", "result.txt": "42\n"}
			if tc.after != 2 {
				want = map[string]string{"log.txt": "one\n"} // checkpoint 2's
			}
			replicaFiles := func() map[string]string {
				got := map[string]string{}
				for _, name := range []string{"log.txt", "result.txt"} {
					if d, err := os.ReadFile(filepath.Join(replica, name)); err == nil {
						got[name] = string(d)
					}
				}
				return got
			}
			for deadline := time.Now().Add(5 * time.Second); !maps.Equal(replicaFiles(), want); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the backup's replica after the exit: %q, want %q", replicaFiles(), want)
				}
			}
			// The exit is durable: the slot, reopened, says so and keeps
			// checkpoint 2's memory.
			b.mu.Lock()
			sl := b.slots["vm1"]
			b.mu.Unlock()
			st := sl.store
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, ok := st.Exited(); ok {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the store does not say the VM exited")
				}
			}
			if got := replicaFiles(); !maps.Equal(got, want) {
				t.Errorf("the backup's replica once the exit is stored: %q, want %q", got, want)
			}
			if why := b.Status().Slots[0].Reason; (tc.after != 2) != strings.Contains(why, "files here are as of") {
				t.Errorf("the slot's reason: %q", why)
			}
			dir := t.TempDir()
			if err := os.CopyFS(dir, os.DirFS(filepath.Join(b.cfg.StateDir, "slots", "vm1"))); err != nil {
				t.Fatal(err)
			}
			os.Remove(filepath.Join(dir, "LOCK"))
			re, err := store.Open(dir, store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer re.Close()
			if code, ok := re.Exited(); !ok || code != 3 || re.Committed() != 2 {
				t.Errorf("reopened: exited %v code %d, committed %d; want exited, 3, 2", ok, code, re.Committed())
			}
		})
	}
}

// TestBackupRefusesBadDiskChanges: the backup checks a checkpoint's or an
// exit's file operations as its store will when it commits them, before it
// acknowledges them (the commit to disk comes after the ack, and must not
// refuse them then): an op that escapes the directory, names a directory
// the VM does not have, or an exit with such an op is never acknowledged,
// and the replica gets nothing of it. A primary of that VM id with another
// number of directories is refused at its Hello, with the reason.
func TestBackupRefusesBadDiskChanges(t *testing.T) {
	b := serveBackup(t, time.Hour)
	module, hash := fakeModule()
	devs := []byte(`{"preopens":[{"HostPath":"/srv/data","GuestPath":"/data"}],"monotonic_ns":5}`)
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 20,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: devs, ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(t, full) // sets full.ID
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID,
		MemorySize: 1 << 20, Pages: []snapshot.Page{{Index: 1, Data: onePage(1)}}, Devices: devs}
	hello := &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "fake", Preopens: []string{"/data"}}
	replica := filepath.Join(b.cfg.StateDir, "slots", "vm1", "disk", "0")
	creat := uint32(wasi.OflagCreat | wasi.OflagTrunc)
	op := func(root uint32, path string) wire.FsOp {
		return wire.FsOp{Op: uint8(wasi.FsCreate), Root: root, Path: path, Flags: creat}
	}
	for _, c := range []struct {
		name string
		op   wire.FsOp
		exit bool
	}{
		{"escape", op(0, "../escaped.txt"), false},
		{"absolute", op(0, "/etc/escaped.txt"), false},
		{"unknown directory", op(1, "escaped.txt"), false},
		{"exit escaping", op(0, "../escaped.txt"), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := dialBackupHello(t, b.Addr().String(), hello)
			f.checkpoint(1, true, fullRaw, nil)
			f.ack(1)
			if c.exit {
				f.send(&wire.DiskOps{Seq: 2, Ops: []wire.FsOp{op(0, "fine.txt"), c.op}})
				f.send(&wire.Exit{Seq: 2, Code: 0, DiskOps: 1})
			} else {
				raw := encodeSnap(t, inc)
				f.send(&wire.CheckpointBegin{Seq: 2})
				f.send(&wire.CheckpointData{Seq: 2, Data: raw})
				f.send(&wire.DiskOps{Seq: 2, Ops: []wire.FsOp{op(0, "fine.txt"), c.op}})
				f.send(&wire.CheckpointEnd{Seq: 2, SnapshotSize: uint64(len(raw)), SnapshotCRC: crc32.Checksum(raw, castagnoli), DiskOps: 1})
			}
			if m := f.next(); m != nil {
				t.Fatalf("answered with %v", m)
			}
			// The status follows the ack: wait for checkpoint 1's.
			for deadline := time.Now().Add(5 * time.Second); committedOn(b) != 1 && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if st := b.Status().Slots; len(st) != 1 || st[0].Committed != 1 || st[0].State == "exited" {
				t.Fatalf("slot after the refused changes: %+v, want committed 1 and not exited", st)
			}
			time.Sleep(50 * time.Millisecond) // a persister that took them would have written by now
			for _, p := range []string{filepath.Join(replica, "fine.txt"), filepath.Join(replica, "..", "escaped.txt")} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s exists", p)
				}
			}
		})
	}
	// Another number of directories for the same VM id.
	two := *hello
	two.Preopens = []string{"/data", "/logs"}
	if why := refusedHello(t, b.Addr().String(), &two); !strings.Contains(why, "1 preopened directories, this primary has 2") {
		t.Fatalf("a Hello with two directories for a VM of one: refused with %q", why)
	}
}

// refusedHello sends hello to the backup at addr and returns the reason
// of its Reject (the test fails on any other answer).
func refusedHello(t *testing.T, addr string, hello *wire.Hello) string {
	t.Helper()
	c, err := transport.Dial(context.Background(), addr, nil, transport.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f := &fakePrimary{t: t, c: c}
	f.send(hello)
	msg := f.next()
	r, ok := msg.(*wire.Reject)
	if !ok {
		t.Fatalf("the Hello was answered with %v, want a Reject", msg)
	}
	return r.Reason
}

// TestBackupRestartedRefusesOtherDirectories: a backup restarted on the
// state of a VM with one directory refuses a primary of that VM id with
// none (the store would have taken the slot's one, and the session none),
// as a running one does; a primary with the one directory is welcome.
func TestBackupRestartedRefusesOtherDirectories(t *testing.T) {
	state := t.TempDir()
	start := func() (*Backup, func()) { return startBackup(t, state, time.Hour) }
	module, hash := fakeModule()
	devs := []byte(`{"preopens":[{"HostPath":"/srv/data","GuestPath":"/data"}],"monotonic_ns":5}`)
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 20,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: devs, ModuleCode: module, ModuleName: "fake"}
	hello := &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "fake", Preopens: []string{"/data"}}
	b, stop := start()
	f := dialBackupHello(t, b.Addr().String(), hello)
	f.checkpoint(1, true, encodeSnap(t, full), nil)
	f.ack(1)
	f.c.Close()
	stop() // waits for the disk

	b, stop = start()
	defer stop()
	none := *hello
	none.Preopens = nil
	if why := refusedHello(t, b.Addr().String(), &none); !strings.Contains(why, "1 preopened directories, this primary has 0") {
		t.Fatalf("a Hello without the VM's directory: refused with %q", why)
	}
	dialBackupHello(t, b.Addr().String(), hello) // welcome
}

// TestBackupRefusesAModuleItCannotPrepare: once preparing the module for
// failover failed (here: a module without _start), the backup drops the
// session, keeps nothing to fail over to, and refuses the primary's Hellos
// with the reason, for prepareRetryAfter; then it takes the primary again,
// to try once more.
func TestBackupRefusesAModuleItCannotPrepare(t *testing.T) {
	old := prepareRetryAfter.Swap(int64(2 * time.Second))
	t.Cleanup(func() { prepareRetryAfter.Store(old) })
	b := serveBackup(t, time.Hour)
	module := []byte("\x00asm\x01\x00\x00\x00") // no _start: not a WASI command
	hash := snapshot.ModuleHash(module)
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 16,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "nostart"}
	fullRaw := encodeSnap(t, full)
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 1 << 16,
		Devices: []byte("{}")}
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, fullRaw, nil)
	f.ack(1) // acknowledged before the module is prepared
	var slot SlotStatus
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if st := b.Status().Slots; len(st) == 1 && st[0].ProgramError != "" {
			slot = st[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the module was never found unpreparable: %+v", b.Status().Slots)
		}
	}
	failedAt := time.Now()
	if slot.ProgramReady || !strings.Contains(slot.ProgramError, "_start") {
		t.Fatalf("slot status after the failure: %+v", slot)
	}
	// The session is dropped; a checkpoint sent meanwhile is not
	// acknowledged.
	raw := encodeSnap(t, inc)
	f.sendErr(&wire.CheckpointBegin{Seq: 2})
	f.sendErr(&wire.CheckpointData{Seq: 2, Data: raw})
	f.sendErr(&wire.CheckpointEnd{Seq: 2, SnapshotSize: uint64(len(raw)), SnapshotCRC: crc32.Checksum(raw, castagnoli)})
	if m := f.next(); m != nil {
		t.Fatalf("the session went on after the failure: %v", m)
	}
	// Nothing kept to fail over to (engine.Unresumable).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if st := b.Status().Slots; len(st) == 1 && st[0].State == "idle" && st[0].Committed == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot after the failure: %+v, want idle with nothing committed", b.Status().Slots)
		}
	}
	hello := &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "nostart"}
	if why := refusedHello(t, b.Addr().String(), hello); !strings.Contains(why, "preparing its module for failover failed") ||
		!strings.Contains(why, "_start") {
		t.Fatalf("refused with %q", why)
	}
	// After the window, taken again.
	time.Sleep(time.Until(failedAt.Add(retryAfter() + 100*time.Millisecond)))
	dialBackupHello(t, b.Addr().String(), hello)
}

// TestFinishSendsTheExitPastTheEncoding: once the guest has ended, the
// Exit goes to the backup at once, between the sender's messages, when all
// that is queued or being streamed is memory (abandoned anyway): it does
// not wait for the checkpoint being encoded to reach its next piece (a
// computing guest's last checkpoint: 11–23 ms of compressing for cpu.c 8).
// Nothing of that checkpoint follows the Exit, which names the last
// checkpoint sent whole. A checkpoint with disk operations, queued or being
// streamed, keeps the Exit behind it.
func TestFinishSendsTheExitPastTheEncoding(t *testing.T) {
	write := func(data string) []wire.FsOp {
		return []wire.FsOp{{Op: uint8(wasi.FsWrite), Path: "out.txt", Offset: -1, Data: []byte(data)}}
	}
	for _, tc := range []struct {
		name string
		ops  []wire.FsOp // of the checkpoint held in its encoding
	}{{"memory only", nil}, {"disk operations", write("five\n")}} {
		t.Run(tc.name, func(t *testing.T) {
			hold, encoding := make(chan struct{}), make(chan struct{})
			var started sync.Once
			hook := func() {
				started.Do(func() { close(encoding) })
				<-hold
			}
			testEncodeWorker.Store(&hook)
			defer testEncodeWorker.Store(nil)
			_, s, far := primaryOverTCP(t)
			var msgs []string
			recv := func() wire.Message {
				t.Helper()
				m, err := wire.Recv(far)
				if err != nil {
					t.Fatalf("after %v: %v", msgs, err)
				}
				switch m := m.(type) {
				case *wire.CheckpointData:
					msgs = append(msgs, fmt.Sprintf("data%d", m.Seq))
				case *wire.CheckpointBegin:
					msgs = append(msgs, fmt.Sprintf("begin%d", m.Seq))
				case *wire.CheckpointEnd:
					msgs = append(msgs, fmt.Sprintf("end%d", m.Seq))
				default:
					msgs = append(msgs, fmt.Sprintf("%T", m))
				}
				return m
			}
			s.enqueue(memoryCheckpoint(4, 8, write("four\n"))) // sent whole
			for {
				if _, ok := recv().(*wire.CheckpointEnd); ok {
					break
				}
			}
			// Streamed niced, in two batches or more (a single batch is
			// compressed without workers): held.
			s.enqueue(memoryCheckpoint(5, 2*niceFrom, tc.ops))
			<-encoding
			s.exiting.Store(true)
			it := &exitItem{exit: wire.Exit{Seq: 6, Code: 3}, ops: write("six\n")}
			if sent := s.sendExit(it); sent != (tc.ops == nil) {
				t.Fatalf("sendExit sent the Exit: %v, with a checkpoint of %d disk operations being encoded", sent, len(tc.ops))
			} else if !sent {
				s.queue <- it
			}
			var exit *wire.Exit
			if tc.ops == nil {
				// Out while the encoding is held.
				for exit == nil {
					if m, ok := recv().(*wire.Exit); ok {
						exit = m
					}
				}
				close(hold)
			} else {
				close(hold)
				for exit == nil {
					if m, ok := recv().(*wire.Exit); ok {
						exit = m
					}
				}
			}
			wantAfter := map[bool]uint64{true: 4, false: 5}[tc.ops == nil]
			if exit.Seq != 6 || exit.Code != 3 || exit.After != wantAfter || exit.DiskOps != 1 {
				t.Errorf("exit %+v, want seq 6, code 3, after %d, 1 message of disk ops; messages %v", exit, wantAfter, msgs)
			}
			// Nothing of checkpoint 5 after the Exit (the sender abandons
			// it), nor a second Exit.
			far.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			exitAt := len(msgs)
			for {
				if _, err := wire.Recv(far); err != nil {
					break
				}
				msgs = append(msgs, "more")
			}
			if len(msgs) != exitAt {
				t.Errorf("messages after the Exit: %v", msgs[exitAt-1:])
			}
			if tc.ops != nil && !slices.Contains(msgs, "end5") {
				t.Errorf("checkpoint 5, with disk operations, not sent whole before the Exit: %v", msgs)
			}
			t.Logf("messages: %v", msgs)
		})
	}
}

// TestFinishSendsTheExitItself: Finish itself sends the Exit on a session
// with nothing queued that must precede it, and releases the held output
// once the backup acknowledges it.
func TestFinishSendsTheExitItself(t *testing.T) {
	r := newFinishRig(t, time.Minute)
	s, far := senderOverTCP(t, r.p)
	r.p.mu.Lock()
	r.p.sess = s
	r.p.mu.Unlock()
	r.start()
	far.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		m, err := wire.Recv(far)
		if err != nil {
			t.Fatalf("no Exit: %v", err)
		}
		if _, ok := m.(*wire.Exit); ok {
			break
		}
	}
	if !s.exitSent.Load() {
		t.Fatal("the Exit went through the sender's queue")
	}
	r.quiet(t, "before the backup acknowledged the exit")
	r.ackReleases(t, s)
}

// TestSentCheckpointGivesItsDeviceStateBack: once the sender has encoded a
// checkpoint's device state, the state goes back for a later pause to
// capture into (getDevState), so that pauses reuse its descriptor table
// instead of allocating one, and what went out is the state as captured.
func TestSentCheckpointGivesItsDeviceStateBack(t *testing.T) {
	p, s, far := primaryOverTCP(t)
	dev := &wasi.State{Monotonic: 42, FDs: []wasi.FDState{{Num: 3, Path: "a.txt", Pos: 7}, {Num: 4, Addr: "127.0.0.1:80"}}}
	cp := memoryCheckpoint(1, 2, nil)
	cp.snap.Devices, cp.devices = nil, dev
	s.queue <- cp
	var raw []byte
	for {
		m, err := wire.Recv(far)
		if err != nil {
			t.Fatal(err)
		}
		if d, ok := m.(*wire.CheckpointData); ok {
			raw = append(raw, d.Data...)
		}
		if _, ok := m.(*wire.CheckpointEnd); ok {
			break
		}
	}
	snap, err := snapshot.DecodeBytes(raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got wasi.State
	if err := json.Unmarshal(snap.Devices, &got); err != nil {
		t.Fatal(err)
	}
	if got.Monotonic != 42 || len(got.FDs) != 2 || got.FDs[0].Pos != 7 || got.FDs[1].Addr != "127.0.0.1:80" {
		t.Fatalf("the checkpoint carried device state %+v", got)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if st := p.getDevState(); st == dev {
			break
		} else if st != nil {
			t.Fatalf("getDevState gave %p, not the sent checkpoint's state %p", st, dev)
		}
		if time.Now().After(deadline) {
			t.Fatal("the sent checkpoint's device state did not come back for reuse")
		}
	}
}
