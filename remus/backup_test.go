package remus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/remus/store"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/transport"

	"golang.org/x/sys/unix"
)

// fakePrimary speaks the protocol by hand to a real backup.
type fakePrimary struct {
	t *testing.T
	c *transport.Conn
}

func dialBackup(t *testing.T, addr string, module snapshot.Hash) *fakePrimary {
	t.Helper()
	return dialBackupHello(t, addr, &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: module, Name: "fake"})
}

// dialBackupHello is dialBackup with a Hello of the caller's.
func dialBackupHello(t *testing.T, addr string, hello *wire.Hello) *fakePrimary {
	t.Helper()
	c, err := transport.Dial(context.Background(), addr, nil, transport.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	f := &fakePrimary{t: t, c: c}
	f.send(hello)
	if m := f.next(); m == nil || m.Type() != wire.TypeWelcome {
		t.Fatalf("handshake answered %v", m)
	}
	return f
}

func (f *fakePrimary) send(m wire.Message) {
	f.t.Helper()
	if err := wire.SendFlush(f.c, m); err != nil {
		f.t.Fatalf("send %s: %v", m.Type(), err)
	}
}

// sendErr is send for a peer that may have hung up already.
func (f *fakePrimary) sendErr(m wire.Message) error { return wire.SendFlush(f.c, m) }

// next returns the next message that is not a heartbeat, nil once the
// backup closed the connection.
func (f *fakePrimary) next() wire.Message {
	f.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		m, err := wire.Recv(f.c)
		if err != nil {
			return nil
		}
		if m.Type() != wire.TypeHeartbeat {
			return m
		}
	}
}

// within returns the next message that is not a heartbeat to arrive within
// d: nil and closed false if none did, nil and closed true once the backup
// closed the connection.
func (f *fakePrimary) within(d time.Duration) (m wire.Message, closed bool) {
	f.c.SetReadDeadline(time.Now().Add(d))
	defer f.c.SetReadDeadline(time.Time{})
	for {
		m, err := wire.Recv(f.c)
		if err != nil {
			var ne net.Error
			return nil, !errors.As(err, &ne) || !ne.Timeout()
		}
		if m.Type() != wire.TypeHeartbeat {
			return m, false
		}
	}
}

// checkpoint sends checkpoint seq with the encoded snapshot raw; mangle
// may damage the end message.
func (f *fakePrimary) checkpoint(seq uint64, full bool, raw []byte, mangle func(*wire.CheckpointEnd)) {
	f.send(&wire.CheckpointBegin{Seq: seq, Full: full})
	f.send(&wire.CheckpointData{Seq: seq, Data: raw})
	end := &wire.CheckpointEnd{Seq: seq, SnapshotSize: uint64(len(raw)), SnapshotCRC: crc32.Checksum(raw, castagnoli)}
	if mangle != nil {
		mangle(end)
	}
	f.send(end)
}

// ack waits for the acknowledgement of checkpoint seq.
func (f *fakePrimary) ack(seq uint64) {
	f.t.Helper()
	for {
		switch m := f.next().(type) {
		case *wire.Ack:
			if m.Seq == seq {
				return
			}
		default:
			f.t.Fatalf("waiting for the ack of %d: got %v", seq, m)
		}
	}
}

// fakeModule is the least module a backup prepares for failover (a WASI
// command: a memory and a _start that returns), and its hash. A backup
// that cannot prepare a primary's module refuses it, so the tests' module
// must be one it can.
func fakeModule() ([]byte, snapshot.Hash) {
	m := slices.Clone(minimalCommand)
	return m, snapshot.ModuleHash(m)
}

// minimalCommand is (module (memory (export "memory") 1) (func (export
// "_start"))), encoded by hand.
var minimalCommand = []byte("\x00asm\x01\x00\x00\x00" +
	"\x01\x04\x01\x60\x00\x00" + // type section: () -> ()
	"\x03\x02\x01\x00" + // function section: one, of type 0
	"\x05\x03\x01\x00\x01" + // memory section: one, at least 1 page
	"\x07\x13\x02\x06_start\x00\x00\x06memory\x02\x00" + // exports
	"\x0a\x04\x01\x02\x00\x0b") // code section: an empty body

// onePage is a page of byte v.
func onePage(v byte) []byte { return bytes.Repeat([]byte{v}, snapshot.PageSize) }

// slotImage is the memory image of b's slot (the tests have one).
func slotImage(b *Backup) *snapshot.Image {
	b.mu.Lock()
	defer b.mu.Unlock()
	var img *snapshot.Image
	for _, s := range b.slots {
		img = s.img
	}
	return img
}

// serveBackup runs a backup on a loopback port with the given timeout
// until the test ends.
func serveBackup(t *testing.T, timeout time.Duration) *Backup {
	t.Helper()
	b, stop := startBackup(t, t.TempDir(), timeout)
	t.Cleanup(stop)
	return b
}

// startBackup runs a backup on a loopback port with its state in
// stateDir, until stop.
func startBackup(t *testing.T, stateDir string, timeout time.Duration) (b *Backup, stop func()) {
	t.Helper()
	b, err := ListenBackup(BackupConfig{Listen: "127.0.0.1:0", StateDir: stateDir,
		Engine: engine.Config{Timeout: timeout}, CacheDir: "-", InstrumentCacheDir: filepath.Join(t.TempDir(), "i")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Serve(ctx); close(done) }()
	return b, func() { cancel(); <-done }
}

// serveSlowBackup is serveBackup with every copy of a checkpoint into the
// image slowed down by delay.
func serveSlowBackup(t *testing.T, timeout, delay time.Duration) *Backup {
	t.Helper()
	// Registered first, so run last: once the backup and its copies
	// have stopped.
	t.Cleanup(func() { testApplyDelay.Store(0) })
	b := serveBackup(t, timeout)
	testApplyDelay.Store(int64(delay))
	return b
}

func encodeSnap(t testing.TB, s *snapshot.Snapshot) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := s.Encode(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestBackupVerifiesStreams: the backup acknowledges a checkpoint only when
// all of it arrived and verified; a damaged or truncated one, or one that
// does not follow the chain, is never committed, and the session is
// dropped or a full checkpoint asked for.
func TestBackupVerifiesStreams(t *testing.T) {
	module, hash := fakeModule() // never run: failover is not under test
	b := serveBackup(t, time.Hour)
	addr := b.Addr().String()
	committed := func() uint64 { return committedOn(b) }

	page := bytes.Repeat([]byte{7}, snapshot.PageSize)
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: page}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(t, full)

	f := dialBackup(t, addr, hash)
	// A checksum that does not match: dropped, nothing acknowledged.
	f.checkpoint(1, true, fullRaw, func(e *wire.CheckpointEnd) { e.SnapshotCRC ^= 1 })
	if m := f.next(); m != nil {
		t.Fatalf("a checkpoint with a bad CRC was answered with %s", m.Type())
	}
	if committed() != 0 {
		t.Fatal("a damaged checkpoint was committed")
	}

	// Announced counts that did not arrive: dropped.
	f = dialBackup(t, addr, hash)
	f.checkpoint(1, true, fullRaw, func(e *wire.CheckpointEnd) { e.DiskFiles = 3 })
	if m := f.next(); m != nil || committed() != 0 {
		t.Fatalf("a checkpoint missing its disk files: answered %v, committed %d", m, committed())
	}

	// A snapshot damaged inside (its own checksums), with a matching
	// stream CRC: dropped.
	bad := bytes.Clone(fullRaw)
	bad[len(bad)/2] ^= 0x40
	f = dialBackup(t, addr, hash)
	f.checkpoint(1, true, bad, nil)
	if m := f.next(); m != nil || committed() != 0 {
		t.Fatalf("a corrupt snapshot: answered %v, committed %d", m, committed())
	}

	// Device states a failover could not restore: dropped before any
	// ack, since the failover would fail on them after it. A table of
	// 2^32 descriptors, and a preopen the Hello did not name.
	for _, devs := range []string{
		`{"fds":[{"num":4294967295,"kind":3,"root":0,"path":"x"}],"monotonic_ns":1}`,
		`{"preopens":[{"HostPath":"/","GuestPath":"/"}],"monotonic_ns":1}`,
	} {
		hostile := *full
		hostile.Devices = []byte(devs)
		f = dialBackup(t, addr, hash)
		f.checkpoint(1, true, encodeSnap(t, &hostile), nil)
		if m := f.next(); m != nil || committed() != 0 {
			t.Fatalf("device state %s: answered %v, committed %d", devs, m, committed())
		}
	}

	// A whole, valid full checkpoint is acknowledged.
	f = dialBackup(t, addr, hash)
	f.checkpoint(1, true, fullRaw, nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("a valid full checkpoint was answered with %v", m)
	}
	// The status is published right after the ack is sent: wait for it.
	for deadline := time.Now().Add(5 * time.Second); committed() != 1 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if committed() != 1 {
		t.Fatalf("committed %d after the ack", committed())
	}

	// An incremental whose device state turned impossible after valid
	// ones (no shortcut for a state not seen before): dropped, and the
	// primary's next session starts over.
	bad2 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 65536,
		Devices: []byte(`{"fds":[{"num":1,"kind":1,"stdio":7}],"monotonic_ns":2}`)}
	f.checkpoint(2, false, encodeSnap(t, bad2), nil)
	if m := f.next(); m != nil || committed() != 1 {
		t.Fatalf("an incremental with an impossible device state: answered %v, committed %d", m, committed())
	}
	f = dialBackup(t, addr, hash)
	f.checkpoint(1, true, fullRaw, nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("a valid full checkpoint after a dropped session was answered with %v", m)
	}

	// An incremental that skips a checkpoint: a full one is asked for.
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 3, Parent: full.ID, MemorySize: 65536,
		Devices: []byte("{}")}
	f.checkpoint(3, false, encodeSnap(t, inc), nil)
	if m, ok := f.next().(*wire.NeedFull); !ok {
		t.Fatalf("a gap in the chain was answered with %v", m)
	}
	if committed() != 1 {
		t.Fatalf("committed %d after a gap", committed())
	}

	// The primary vanishes mid-transfer: nothing of it is committed.
	inc2 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{9}, snapshot.PageSize)}}, Devices: []byte("{}")}
	raw2 := encodeSnap(t, inc2)
	f.send(&wire.CheckpointBegin{Seq: 2})
	f.send(&wire.CheckpointData{Seq: 2, Data: raw2[:len(raw2)/2]})
	f.c.Close()
	time.Sleep(200 * time.Millisecond)
	if committed() != 1 {
		t.Fatalf("committed %d after a primary vanished mid-checkpoint", committed())
	}
}

// sendFirstCheckpoint connects a fake primary of a one-page VM to b and
// sends its full checkpoint 1.
func sendFirstCheckpoint(t *testing.T, b *Backup) *fakePrimary {
	t.Helper()
	module, hash := fakeModule()
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{7}, snapshot.PageSize)}}, Devices: []byte("{}"),
		ModuleCode: module, ModuleName: "fake"}
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, encodeSnap(t, full), nil)
	return f
}

// TestBackupSlowDecodeIsNotSilence: while the backup decodes a checkpoint
// for longer than its timeout (a burst of dirty pages on a loaded machine),
// it reads nothing from the primary; that must not count as the primary's
// silence. (Without the keep-alive the slot failed a live primary over:
// seen with 2500 dirty pages per 25 ms epoch, once in six runs.)
func TestBackupSlowDecodeIsNotSilence(t *testing.T) {
	const timeout = 200 * time.Millisecond
	b := serveBackup(t, timeout)
	testDecodeDelay.Store(int64(4 * timeout))
	defer testDecodeDelay.Store(0)
	f := sendFirstCheckpoint(t, b)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("a checkpoint decoded for %v (timeout %v) was answered with %v, want its ack", time.Duration(testDecodeDelay.Load()), timeout, m)
	}
	expectFollowing(t, b, "a slow decode")
}

// TestBackupHeartbeatsWhileApplying: copying a large checkpoint into the
// image takes long (on a VM, 64 MiB of pages new to the image take a few
// hundred milliseconds). The ack does not wait for the copy: it leaves
// once the checkpoint is known to apply (snapshot.Prepare), so the
// primary's output is not held for it, and the copy runs while the loop
// goes on. Nor does the next incremental checkpoint's ack wait for it:
// its copy queues behind. Whatever waits for the copies (a full
// checkpoint, too many queued, a failover), the loop, the only sender of
// heartbeats, must keep the primary hearing from it, or the primary takes
// the backup for dead after the timeout and resynchronises, without end
// if every checkpoint is as slow to apply.
func TestBackupHeartbeatsWhileApplying(t *testing.T) {
	// 300 ms, heartbeats every 60: a stall of the whole process for 100
	// ms, which a loaded two-core CI machine gives now and then (it failed
	// a clean-clone run at 150 ms, silent 102 ms), is the machine's; a
	// loop that waits for a copy is silent for the copy, 1.8 s.
	const timeout = 300 * time.Millisecond
	b := serveBackup(t, timeout)
	testApplyDelay.Store(int64(6 * timeout))
	defer testApplyDelay.Store(0)
	module, hash := fakeModule()
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{7}, snapshot.PageSize)}}, Devices: []byte("{}"),
		ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(t, full)
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{9}, snapshot.PageSize)}}, Devices: []byte("{}")}
	incRaw := encodeSnap(t, inc)
	inc3 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 3, Parent: inc.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{11}, snapshot.PageSize)}}, Devices: []byte("{}")}
	inc3Raw := encodeSnap(t, inc3)
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, fullRaw, nil)
	// The primary heartbeats, more often than a live one does: while the
	// loop waits for the copy, more messages come than its event queue
	// holds, and the reader must go on reading them (the connection's
	// writes are whole messages, whoever makes them).
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
				if wire.SendFlush(f.c, &wire.Heartbeat{Seq: 1}) != nil {
					return
				}
			}
		}
	}()
	applied := func() int { return int(b.Status().Slots[0].Checkpoints) }
	// Every message until both checkpoints are applied: no gap may come
	// near the timeout.
	last, longest, beats, acked := time.Now(), time.Duration(0), 0, uint64(0)
	for acked < 3 || applied() < 3 {
		f.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := wire.Recv(f.c)
		if err != nil {
			t.Fatalf("waiting for the acks and the copies: %v (acked %d, applied %d, after %d heartbeats)", err, acked, applied(), beats)
		}
		longest, last = max(longest, time.Since(last)), time.Now()
		switch a := m.(type) {
		case *wire.Heartbeat:
			beats++
		case *wire.Ack:
			switch {
			case a.Seq == acked:
				beats++ // a repeated ack is the backup's heartbeat once it has committed
			case a.Seq != acked+1:
				t.Fatalf("ack of %d after %d", a.Seq, acked)
			case applied() >= int(a.Seq):
				t.Errorf("the ack of %d came after its copy (%v): it should not wait for it", a.Seq, time.Duration(testApplyDelay.Load()))
			case a.Seq == 2 && applied() >= 1:
				t.Errorf("the ack of 2 waited for the copy of 1 (%v)", time.Duration(testApplyDelay.Load()))
			default:
				acked = a.Seq
				if acked == 1 {
					// The next checkpoint arrives while the first is
					// still being copied, and the one after it late in
					// that copy, when the reader has long been feeding
					// the loop's queue heartbeats (it must leave room).
					f.checkpoint(2, false, incRaw, nil)
					time.AfterFunc(time.Duration(testApplyDelay.Load())*7/8, func() {
						f.sendErr(&wire.CheckpointBegin{Seq: 3})
						f.sendErr(&wire.CheckpointData{Seq: 3, Data: inc3Raw})
						f.sendErr(&wire.CheckpointEnd{Seq: 3, SnapshotSize: uint64(len(inc3Raw)), SnapshotCRC: crc32.Checksum(inc3Raw, castagnoli)})
					})
				}
			}
		default:
			t.Fatalf("the checkpoints were answered with %v, want their acks", m)
		}
	}
	if longest >= timeout/2 {
		t.Errorf("the backup was silent for %v while copying for %v three times (timeout %v, %d heartbeats)", longest, time.Duration(testApplyDelay.Load()), timeout, beats)
	}
	if beats < 10 {
		t.Errorf("%d heartbeats during three copies of %v (timeout %v)", beats, time.Duration(testApplyDelay.Load()), timeout)
	}
	// Nor did the backup take its primary's heartbeats, queued meanwhile,
	// for silence.
	time.Sleep(timeout)
	expectFollowing(t, b, "a slow apply")
}

// committedOn returns the last checkpoint committed on b's slot (b has
// one, or none yet: 0).
func committedOn(b *Backup) uint64 {
	for _, s := range b.Status().Slots {
		return s.Committed
	}
	return 0
}

// expectFollowing fails the test unless every slot of b still follows its
// primary after what happened.
func expectFollowing(t *testing.T, b *Backup, after string) {
	t.Helper()
	for _, s := range b.Status().Slots {
		if s.State != "following" {
			t.Fatalf("slot %s after %s: %s (%s), want following", s.VM, after, s.State, s.Reason)
		}
	}
}

// TestBackupPreparesAtLowPriority: the backup compiles the module of its
// first full checkpoint, so that failover need not, on a thread of lower
// priority (nice prepareNice) than its own work: it runs while the
// primary's guest does, and took that guest's core on a shared machine.
// A failover waiting for it gives the thread its priority back.
func TestBackupPreparesAtLowPriority(t *testing.T) {
	const timeout = 200 * time.Millisecond
	started, release := make(chan int, 1), make(chan struct{})
	hook := func() {
		started <- unix.Gettid()
		<-release
	}
	testPreparing.Store(&hook)
	defer testPreparing.Store(nil)
	b := serveBackup(t, timeout)
	defer close(release)
	f := sendFirstCheckpoint(t, b)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("the full checkpoint was answered with %v, want its ack", m)
	}
	var tid int
	select {
	case tid = <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the backup did not start preparing the module of its full checkpoint")
	}
	if n, policy := threadPriority(t, tid); n != prepareNice || policy != unix.SCHED_NORMAL {
		t.Errorf("the thread preparing the program runs at nice %d, policy %d; want %d, SCHED_NORMAL (niceThread)", n, policy, prepareNice)
	}
	// The primary falls silent: after the timeout the slot fails over,
	// and waits for the program.
	f.c.Close()
	waitNiceRaised(t, tid, timeout, "the thread preparing its program")
}

// TestBackupPersistsAtLowPriority: the slot's persister (merging,
// compressing and fsyncing checkpoints for the disk, which nothing but a
// failover waits for) runs on a thread at nice persistNice, and a failover,
// which drains it, gives the thread its priority back first.
func TestBackupPersistsAtLowPriority(t *testing.T) {
	const timeout = 200 * time.Millisecond
	b := serveBackup(t, timeout)
	f := sendFirstCheckpoint(t, b)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("the full checkpoint was answered with %v, want its ack", m)
	}
	b.mu.Lock()
	var s *slot
	for _, x := range b.slots {
		s = x
	}
	b.mu.Unlock()
	if s == nil {
		t.Fatal("no slot after the first checkpoint")
	}
	var tid int
	for deadline := time.Now().Add(10 * time.Second); tid == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the persister did not lower its thread's priority")
		}
		s.mu.Lock()
		tid = s.persistTid
		s.mu.Unlock()
	}
	if n, policy := threadPriority(t, tid); n != persistNice || policy != unix.SCHED_NORMAL {
		t.Errorf("the persister's thread runs at nice %d, policy %d; want %d, SCHED_NORMAL (niceThread)", n, policy, persistNice)
	}
	// The primary falls silent: after the timeout the slot fails over.
	f.c.Close()
	waitNiceRaised(t, tid, timeout, "the persister's thread")
}

// waitNiceRaised waits (up to 20 timeouts) for the failover that follows
// a primary's silence to give thread tid (what) its priority back.
func waitNiceRaised(t *testing.T, tid int, timeout time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * timeout)
	for {
		n, policy := threadPriority(t, tid)
		if n == 0 && policy == unix.SCHED_NORMAL {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the failover left %s at nice %d, policy %d", what, n, policy)
		}
		time.Sleep(timeout / 20)
	}
}

// threadPriority reads the niceness and the scheduling policy of this
// process's thread tid.
func threadPriority(t *testing.T, tid int) (nice, policy int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command's closing parenthesis: state is the
	// first (the file's third), nice the 17th (19th), policy the 39th
	// (41st).
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	nice, err1 := strconv.Atoi(f[16])
	policy, err2 := strconv.Atoi(f[38])
	if err1 != nil || err2 != nil {
		t.Fatalf("stat of thread %d: %q", tid, b)
	}
	return nice, policy
}

// TestBackupFullCheckpointWaitsForCopies: the copies of committed
// incremental checkpoints may still be queued when a full one arrives (a
// resync); it replaces the memory they write, so its commit, and its ack,
// wait for them, and the image ends up as the full checkpoint says.
func TestBackupFullCheckpointWaitsForCopies(t *testing.T) {
	b := serveSlowBackup(t, 2*time.Second, 300*time.Millisecond)
	module, hash := fakeModule()
	page := onePage
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: page(7)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(t, full)
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: page(9)}, {Index: 1, Data: page(5)}}, Devices: []byte("{}")}
	full3 := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 3, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: page(11)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	f := dialBackup(t, b.Addr().String(), hash)
	applied := func() int { return int(b.Status().Slots[0].Checkpoints) }
	f.checkpoint(1, true, fullRaw, nil)
	f.ack(1)
	f.checkpoint(2, false, encodeSnap(t, inc), nil)
	f.ack(2)
	if n := applied(); n >= 2 {
		t.Fatalf("the ack of 2 came after %d copies of %v: it should not wait for them", n, time.Duration(testApplyDelay.Load()))
	}
	f.checkpoint(3, true, encodeSnap(t, full3), nil)
	f.ack(3)
	if n := applied(); n < 2 {
		t.Errorf("the full checkpoint 3 was acknowledged with %d of the 2 copies before it done", n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for applied() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d of 3 checkpoints applied", applied())
		}
		time.Sleep(10 * time.Millisecond)
	}
	img := slotImage(b)
	if img.Seq != 3 || !bytes.Equal(img.Memory[:snapshot.PageSize], page(11)) || !bytes.Equal(img.Memory[snapshot.PageSize:2*snapshot.PageSize], page(0)) {
		t.Errorf("after full checkpoint 3 the image is at seq %d with pages 0 and 1 starting %d and %d, want 3 with 11 and 0",
			img.Seq, img.Memory[0], img.Memory[snapshot.PageSize])
	}
}

// TestBackupResolvesDeltas: pages a primary sends as deltas against what it
// sent before are resolved against the backup's copy of them, in the image
// or in a checkpoint whose copy into the image is still under way (here
// slowed down: the acknowledgement does not wait for it), so the image
// ends as the primary's memory; the disk gets them resolved; and a delta
// against a copy the backup does not hold is never acknowledged.
func TestBackupResolvesDeltas(t *testing.T) {
	b := serveSlowBackup(t, 2*time.Second, 150*time.Millisecond)
	module, hash := fakeModule()
	page := onePage
	edit := func(p []byte, at int, v byte) []byte { p = bytes.Clone(p); p[at] = v; return p }
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: page(7)}, {Index: 1, Data: page(3)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(t, full)
	p0v2, p0v3 := edit(page(7), 10, 1), edit(edit(page(7), 10, 1), 4000, 2)
	inc2 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: p0v2, Base: page(7)}, {Index: 2, Data: page(5)}}, Devices: []byte("{}")}
	raw2 := encodeSnap(t, inc2)
	inc3 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 3, Parent: inc2.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 0, Data: p0v3, Base: p0v2}, {Index: 2, Data: edit(page(5), 0, 9), Base: page(5)}}, Devices: []byte("{}")}
	raw3 := encodeSnap(t, inc3)
	for _, sec := range inc3.Sections {
		if sec.Type == snapshot.SecPages && sec.Codec != snapshot.CodecDeltaSparse {
			t.Fatalf("checkpoint 3's pages are stored %s, not as deltas", sec.Codec)
		}
	}
	// A delta against a copy of page 1 that the backup never had.
	inc4 := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 4, Parent: inc3.ID, MemorySize: 65536,
		Pages: []snapshot.Page{{Index: 1, Data: page(4), Base: page(8)}}, Devices: []byte("{}")}
	raw4 := encodeSnap(t, inc4)

	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, fullRaw, nil)
	f.ack(1)
	f.checkpoint(2, false, raw2, nil)
	f.ack(2)
	f.checkpoint(3, false, raw3, nil)
	f.ack(3)
	st := func() SlotStatus { return b.Status().Slots[0] }
	if n := st().Checkpoints; n >= 3 {
		t.Errorf("the ack of 3 waited for the copies of the checkpoints before it (%d done)", n)
	}
	for deadline := time.Now().Add(10 * time.Second); st().Checkpoints < 3 || st().Persisted < 3; {
		if time.Now().After(deadline) {
			t.Fatalf("checkpoints applied %d, persisted %d, want 3", st().Checkpoints, st().Persisted)
		}
		time.Sleep(10 * time.Millisecond)
	}
	img := slotImage(b)
	for i, want := range [][]byte{p0v3, page(3), edit(page(5), 0, 9)} {
		if got := img.Memory[i*snapshot.PageSize : (i+1)*snapshot.PageSize]; !bytes.Equal(got, want) {
			t.Errorf("page %d of the image is not the primary's", i)
		}
	}
	f.checkpoint(4, false, raw4, nil)
	if m := f.next(); m != nil {
		if a, ok := m.(*wire.Ack); ok && a.Seq == 4 {
			t.Fatal("a delta against a copy the backup does not hold was acknowledged")
		}
	}
	if got := img.Memory[snapshot.PageSize : 2*snapshot.PageSize]; !bytes.Equal(got, page(3)) {
		t.Error("the unresolvable checkpoint changed the image")
	}
	// The slot says what it holds: 3, no session, waiting for a primary.
	for deadline := time.Now().Add(5 * time.Second); st().Committed != 3 || st().State != "waiting"; {
		if time.Now().After(deadline) {
			t.Fatalf("after the failed commit of 4 the slot reports committed %d, state %q; want 3, waiting", st().Committed, st().State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// flakyFS is the OS's file system, made to fail on demand (a full disk).
type flakyFS struct {
	store.FS
	fail atomic.Bool
}

func (f *flakyFS) Create(name string) (store.File, error) {
	if f.fail.Load() {
		return nil, unix.ENOSPC
	}
	return f.FS.Create(name)
}

// TestBackupDiskFailureWaitsForAFullCheckpoint: once storing a checkpoint
// fails, the slot's disk keeps the older checkpoint whole: the later
// incremental ones, which build on the one it lacks, are not merged onto
// it (that made a state that never existed, and a restore of the slot's
// chain restored it), and the backup asks its primary for a full
// checkpoint, which stores the whole state again.
func TestBackupDiskFailureWaitsForAFullCheckpoint(t *testing.T) {
	disk := &flakyFS{FS: store.OS()}
	var fs store.FS = disk
	testStoreFS.Store(&fs)
	defer testStoreFS.Store(nil)
	module, hash := fakeModule()
	b := serveBackup(t, time.Hour)
	slotOf := func() *slot {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.slots["vm1"]
	}
	waitFor := func(what string, ok func(s *slot) bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			if s := slotOf(); s != nil {
				s.mu.Lock()
				done := ok(s)
				s.mu.Unlock()
				if done {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("never %s", what)
			}
		}
	}
	pageOf := func(b byte) []snapshot.Page {
		return []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{b}, snapshot.PageSize)}}
	}
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 65536, Pages: pageOf(1),
		Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, encodeSnap(t, full), nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("full checkpoint 1: %v", m)
	}
	waitFor("stored checkpoint 1", func(s *slot) bool { return s.persSeq == 1 })

	// The disk fails for checkpoint 2: acknowledged (it is in memory),
	// not stored.
	disk.fail.Store(true)
	parent := full.ID
	inc := func(seq uint64, b byte) []byte {
		s := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: seq, Parent: parent, MemorySize: 65536,
			Pages: pageOf(b), Devices: []byte("{}")}
		raw := encodeSnap(t, s)
		parent = s.ID
		return raw
	}
	f.checkpoint(2, false, inc(2, 2), nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 2 {
		t.Fatalf("checkpoint 2: %v", m)
	}
	waitFor("saw the disk fail", func(s *slot) bool { return s.diskBehind })
	disk.fail.Store(false)

	// The disk works again. Incrementals are refused until a full one
	// (the first may still be taken in memory, before the loop heard of
	// the failure; the disk must not take it, and its acknowledgement is
	// withheld: the slot would refuse to fail over to it).
	refused := false
	for seq := uint64(3); seq <= 4 && !refused; seq++ {
		f.checkpoint(seq, false, inc(seq, byte(seq)), nil)
		switch m, _ := f.within(time.Second); m := m.(type) {
		case *wire.NeedFull:
			refused = true
		case nil:
		default:
			t.Fatalf("checkpoint %d, sent once the slot knew its disk behind: %v", seq, m)
		}
	}
	if !refused {
		t.Fatal("incrementals after a failed store were taken without a full checkpoint")
	}
	time.Sleep(200 * time.Millisecond) // the persister's turn (spaced 100 ms)
	s := slotOf()
	s.mu.Lock()
	st := s.store
	s.mu.Unlock()
	if got := st.Committed(); got != 1 {
		t.Fatalf("the disk holds record %d: incrementals were stored over the failed one", got)
	}
	img, err := st.Image()
	if err != nil {
		t.Fatal(err)
	}
	if got := img.Memory[0]; got != 1 {
		t.Fatalf("the disk's memory holds page 0 of checkpoint %d's bytes, want checkpoint 1's", got)
	}

	// The full checkpoint the primary then sends is stored.
	full5 := *full
	full5.Seq, full5.Pages = 5, pageOf(5)
	f.checkpoint(5, true, encodeSnap(t, &full5), nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 5 {
		t.Fatalf("full checkpoint 5: %v", m)
	}
	waitFor("stored the full checkpoint", func(s *slot) bool { return s.persSeq == 5 && !s.diskBehind })
}

// TestBackupStateDirIsItsOwn: a second backup on a state directory that a
// running one uses is refused at once, with the reason, rather than
// starting and refusing primaries of the VMs the first holds; once the
// first stops, the directory is free.
func TestBackupStateDirIsItsOwn(t *testing.T) {
	state := t.TempDir()
	_, stop := startBackup(t, state, time.Hour)
	_, err := ListenBackup(BackupConfig{Listen: "127.0.0.1:0", StateDir: state, Engine: engine.Config{Timeout: time.Hour}})
	if err == nil || !strings.Contains(err.Error(), "in use by another backup") {
		t.Fatalf("a second backup on the same state directory: %v", err)
	}
	stop()
	_, stop = startBackup(t, state, time.Hour)
	stop()
}

// TestBackupFullDiskStopsProtection: a backup whose disk cannot store the
// VM's checkpoints must not acknowledge them: its failover would be
// refused (the replica of the guest's files lags the image), so a primary
// that released output on those acks would lose it with its host. Once
// storing fails, no ack leaves the slot; when the full checkpoint the
// slot then asks for cannot be stored either, the slot lets the session
// go (its primary runs unprotected and says so, rather than holding its
// output for ever) and refuses primaries for a while; after that, a full
// checkpoint is acknowledged once it is stored. (The disk, before: every
// ack went, the slot refused to fail over, and the leftover temporary
// file of the failed write kept the disk full.)
func TestBackupFullDiskStopsProtection(t *testing.T) {
	disk := &flakyFS{FS: store.OS()}
	var fs store.FS = disk
	testStoreFS.Store(&fs)
	defer testStoreFS.Store(nil)
	defer diskRetryAfter.Store(diskRetryAfter.Load())
	diskRetryAfter.Store(int64(time.Hour)) // the wait ends when the test says (below)
	module, hash := fakeModule()
	b := serveBackup(t, time.Hour)
	status := func() SlotStatus {
		for _, s := range b.Status().Slots {
			if s.VM == "vm1" {
				return s
			}
		}
		return SlotStatus{}
	}
	waitFor := func(what string, ok func(SlotStatus) bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(status()); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("never %s: %+v", what, status())
			}
		}
	}
	pageOf := func(b byte) []snapshot.Page {
		return []snapshot.Page{{Index: 0, Data: bytes.Repeat([]byte{b}, snapshot.PageSize)}}
	}
	var lastFull snapshot.Hash
	fullAt := func(seq uint64) []byte {
		s := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: seq, MemorySize: 65536,
			Pages: pageOf(byte(seq)), Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
		raw := encodeSnap(t, s)
		lastFull = s.ID
		return raw
	}
	f := dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(1, true, fullAt(1), nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("full checkpoint 1: %v", m)
	}
	waitFor("stored checkpoint 1", func(s SlotStatus) bool { return s.Persisted == 1 })

	// The disk fills up. Checkpoint 2 is acknowledged from memory before
	// the disk is tried (the window a failure of the disk cannot close);
	// from the failure on, nothing is.
	disk.fail.Store(true)
	raw2 := encodeSnap(t, &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: lastFull,
		MemorySize: 65536, Pages: pageOf(2), Devices: []byte("{}")})
	f.checkpoint(2, false, raw2, nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 2 {
		t.Fatalf("checkpoint 2: %v", m)
	}
	waitFor("saw the disk fail", func(s SlotStatus) bool {
		return s.DiskBehind && strings.Contains(s.DiskError, "no space left")
	})
	rec := httptest.NewRecorder()
	b.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if m := rec.Body.String(); !strings.Contains(m, `ftvm_remus_backup_disk_behind{vm="vm1"} 1`) {
		t.Errorf("/metrics lacks ftvm_remus_backup_disk_behind 1:\n%s", m)
	}

	// It asks for a full checkpoint, which cannot be stored either: no
	// ack, and the session goes.
	f.checkpoint(3, true, fullAt(3), nil)
	for {
		m, closed := f.within(5 * time.Second)
		if closed {
			break
		}
		if a, ok := m.(*wire.Ack); ok {
			t.Fatalf("the slot acknowledged checkpoint %d with its disk full", a.Seq)
		}
		if m == nil {
			t.Fatal("the slot kept the session of a primary it cannot protect")
		}
	}

	// A primary is refused while the slot waits to try again.
	c, err := transport.Dial(context.Background(), b.Addr().String(), nil, transport.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := wire.SendFlush(c, &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "fake"}); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := wire.Recv(c); err != nil {
		t.Fatal(err)
	} else if r, ok := m.(*wire.Reject); !ok || !strings.Contains(r.Reason, "disk") {
		t.Fatalf("a primary of a slot whose disk is full was answered %v", m)
	}
	names, err := os.ReadDir(filepath.Join(b.cfg.StateDir, "slots", "vm1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasSuffix(n.Name(), ".tmp") {
			t.Errorf("a failed write left %s", n.Name())
		}
	}

	// The disk has room again: once the wait is over, a new session's
	// full checkpoint is acknowledged, after it is stored.
	disk.fail.Store(false)
	b.mu.Lock()
	s := b.slots["vm1"]
	b.mu.Unlock()
	s.mu.Lock()
	if s.diskWait != diskRetryMax {
		t.Errorf("the slot waits %s after its failed full checkpoint, want %s (the first wait, bounded)", s.diskWait, diskRetryMax)
	}
	s.diskFailed = time.Now().Add(-s.diskWait) // as if the wait were over
	s.mu.Unlock()
	f = dialBackup(t, b.Addr().String(), hash)
	f.checkpoint(5, true, fullAt(5), nil)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 5 {
		t.Fatalf("full checkpoint 5, the disk working again: %v", m)
	}
	if s := status(); s.Persisted != 5 || s.DiskBehind || s.DiskError != "" {
		t.Fatalf("acknowledged before stored, or the slot still says its disk is behind: %+v", s)
	}
}

// TestBackupBoundsDiskOpsInMemory: the disk operations a checkpoint
// carries are held until it commits, and count against maxDiskBytes at
// what they cost in memory: an op with no path and no data, nine bytes on
// the wire, counted as nothing, so a peer could grow the backup without
// bound (ten times what it sent). Past the bound the backup drops the
// session.
func TestBackupBoundsDiskOpsInMemory(t *testing.T) {
	saved := maxDiskBytes
	maxDiskBytes = 1 << 20
	defer func() { maxDiskBytes = saved }()
	b := serveBackup(t, time.Hour)
	f := sendFirstCheckpoint(t, b)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("checkpoint 1: %v", m)
	}
	f.send(&wire.CheckpointBegin{Seq: 2})
	ops := make([]wire.FsOp, 1000) // empty: 9 bytes each on the wire
	const msgs = 400               // 400,000 ops: 3.6 MB sent, 40 MB held
	sent := 0
	for ; sent < msgs; sent++ {
		f.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := f.sendErr(&wire.DiskOps{Seq: 2, Ops: ops}); err != nil {
			break
		}
	}
	if sent == msgs {
		t.Fatalf("the backup took %d empty disk ops (%d bytes in memory) for one checkpoint, limit %d",
			msgs*len(ops), uint64(msgs*len(ops))*ops[0].HeldBytes(), maxDiskBytes)
	}
	if m := f.next(); m != nil {
		t.Fatalf("after %d messages of empty disk ops the backup answered %s", sent, m.Type())
	}
}

// TestBackupBoundsItsSlots: every VM id a Hello names makes a slot (a
// memory image's address space, a state directory, goroutines); past
// --max-slots a primary of yet another VM is refused, saying why, and one
// of a VM already protected is still welcome.
func TestBackupBoundsItsSlots(t *testing.T) {
	_, hash := fakeModule()
	b := serveBackup(t, time.Hour)
	b.cfg.MaxSlots = 2
	addr := b.Addr().String()
	for _, vm := range []string{"vm1", "vm2"} {
		dialBackupHello(t, addr, &wire.Hello{Version: wire.Version, VM: vm, Term: 1, Module: hash, Name: "fake"})
	}
	why := refusedHello(t, addr, &wire.Hello{Version: wire.Version, VM: "vm3", Term: 1, Module: hash, Name: "fake"})
	if !strings.Contains(why, "--max-slots 2") {
		t.Fatalf("a third VM was refused for %q", why)
	}
	if n := len(b.Status().Slots); n != 2 {
		t.Fatalf("%d slots", n)
	}
}

// TestBackupStopsAfterItsPreparation: a backup told to stop while it
// prepares a module for failover returns from Serve only once that
// preparation is over, so that nothing writes to its cache directories
// afterwards (a test's temporary directory failed to be removed, and a
// library user's could be deleted under it), and without calling the
// module unpreparable.
func TestBackupStopsAfterItsPreparation(t *testing.T) {
	started, release := make(chan struct{}, 1), make(chan struct{})
	hook := func() {
		started <- struct{}{}
		<-release
	}
	testPreparing.Store(&hook)
	defer testPreparing.Store(nil)
	cache := filepath.Join(t.TempDir(), "i")
	b, err := ListenBackup(BackupConfig{Listen: "127.0.0.1:0", StateDir: t.TempDir(),
		Engine: engine.Config{Timeout: time.Hour}, CacheDir: "-", InstrumentCacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { b.Serve(ctx); close(served) }()
	f := sendFirstCheckpoint(t, b)
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("the full checkpoint was answered with %v, want its ack", m)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the backup did not start preparing the module of its full checkpoint")
	}
	f.c.Close()
	cancel()
	select {
	case <-served:
		t.Fatal("Serve returned while the module was still being prepared")
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return once the preparation could end")
	}
	before := listTree(t, cache)
	time.Sleep(200 * time.Millisecond)
	if after := listTree(t, cache); !slices.Equal(before, after) {
		t.Fatalf("the cache directory changed after Serve returned: %v, then %v", before, after)
	}
	if st := b.Status().Slots; len(st) != 1 || st[0].ProgramError != "" {
		t.Fatalf("slot after the stop: %+v, want no preparation error", st)
	}
}

// listTree lists the paths under dir (none if it does not exist).
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err == nil {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
