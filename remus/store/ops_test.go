package store

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

// randomOps draws n ops over a small namespace (files, directories,
// symlinks into it, hard links, two roots) and keeps those a real
// directory accepts: what a primary's guest could have done.
func randomOps(rng *rand.Rand, o *oracle, n int) []FsOp {
	names := []string{"a", "b", "c", "d", "d/e", "d/f", "l", "d/l", "m", "d/e/g", "l/e", ".", "d/../b", "n"}
	// Targets stay inside wherever the link is moved to (escapes:
	// TestEscape); "e" is missing at the top and d/e inside d.
	targets := []string{"a", "b", "d", "d/e", "missing", "e", "l"}
	name := func() string { return names[rng.IntN(len(names))] }
	root := func() uint32 { return uint32(rng.IntN(scenarioRoots)) }
	data := func() string { return string(rune('A'+rng.IntN(26))) + fmt.Sprint(rng.IntN(1000)) }
	var ops []FsOp
	for len(ops) < n {
		var op FsOp
		switch rng.IntN(13) {
		case 0, 1:
			op = opW(root(), name(), int64(rng.IntN(40)), data())
		case 2, 3:
			op = opA(root(), name(), data())
		case 4:
			op = opTr(root(), name(), int64(rng.IntN(30)))
		case 5:
			op = opAl(root(), name(), int64(rng.IntN(20)), 1+int64(rng.IntN(40)))
		case 6:
			op = opCr(root(), name(), [...]uint16{creat, creat | trunc, trunc, creat | excl}[rng.IntN(4)])
		case 7:
			op = opMk(root(), name())
		case 8:
			op = opUl(root(), name())
		case 9:
			op = opRd(root(), name())
		case 10:
			op = opRn(root(), name(), root(), name())
		case 11:
			op = opSl(root(), name(), targets[rng.IntN(len(targets))])
		case 12:
			op = opLn(root(), name(), root(), name())
		}
		if _, err := normalize(op, scenarioRoots, DefaultMaxFileSize, time.Time{}); err != nil {
			continue // the device layer never sends it
		}
		if o.one(op) == nil {
			ops = append(ops, op)
		}
	}
	return ops
}

// TestRandomOpsMatchOracle commits random op sequences and checks, after
// each commit, the replica against the same ops done on a real directory;
// then replays random records from random partial states.
func TestRandomOpsMatchOracle(t *testing.T) {
	rounds, perRound := 40, 60
	if testing.Short() {
		rounds = 10
	}
	rng := rand.New(rand.NewPCG(11, 12))
	o := newOracle(t, scenarioRoots)
	v := newVMSim(3, snapshot.WasmPageSize)
	dir := t.TempDir()
	s, err := Open(dir, Options{FS: newMemFS(&crasher{}), Roots: scenarioRoots, noDiskSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tree := []TreeEntry{fileE(0, "a", "a0"), dirE(0, "d"), fileE(1, "b", "b0")}
	o.full(tree, nil)
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), tree, nil); err != nil {
		t.Fatal(err)
	}
	nops := 0
	for seq := uint64(2); seq < uint64(2+rounds); seq++ {
		ops := randomOps(rng, o, perRound)
		nops += len(ops)
		if err := s.CommitIncremental(seq, v.next(t, snapshot.Incremental, seq), ops); err != nil {
			t.Fatalf("commit %d: %v\nops: %v", seq, err, ops)
		}
		if d := diffTrees(captureTree(t, filepath.Join(dir, diskName), scenarioRoots), o.tree()); d != "" {
			t.Fatalf("commit %d: replica differs from the oracle:\n%s\nops: %v", seq, d, ops)
		}
	}
	t.Logf("%d random ops over %d commits match", nops, rounds)
}

// TestRandomOpsReplayAfterReplicaLoss is TestSegmentReplayAfterReplicaLoss
// on random records.
func TestRandomOpsReplayAfterReplicaLoss(t *testing.T) {
	records := 30
	if testing.Short() {
		records = 8
	}
	rng := rand.New(rand.NewPCG(21, 22))
	cases := 0
	for r := range records {
		o := newOracle(t, scenarioRoots)
		tree := []TreeEntry{fileE(0, "a", "a0"), dirE(0, "d"), fileE(1, "b", "b0"), linkE(0, "l", "d")}
		o.full(tree, nil)
		ops := randomOps(rng, o, 25)
		want := o.tree()
		v := newVMSim(uint64(r), snapshot.WasmPageSize)
		full, inc := v.next(t, snapshot.Full, 1), v.next(t, snapshot.Incremental, 2)

		// How many segments: the markers of a clean run.
		c := &crasher{}
		m := newMemFS(c)
		s, err := Open(t.TempDir(), crashOpts(m, c))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.CommitFull(1, full, tree, nil); err != nil {
			t.Fatal(err)
		}
		n := c.n
		if err := s.CommitIncremental(2, inc, ops); err != nil {
			t.Fatal(err)
		}
		s.Close()
		segs := 0
		for _, op := range c.trace[n:] {
			if op == "create .APPLIED.tmp" {
				segs++
			}
		}
		for target := range segs {
			l := &lossy{rng: rng, target: target}
			c := &crasher{fn: l.step}
			m := newMemFS(c)
			dir := t.TempDir()
			s, err := Open(dir, crashOpts(m, c))
			if err != nil {
				t.Fatal(err)
			}
			if err := s.CommitFull(1, full, tree, nil); err != nil {
				t.Fatal(err)
			}
			l.armed = true
			if err := s.CommitIncremental(2, inc, ops); !isCrash(err) {
				t.Fatalf("record %d segment %d: %v", r, target, err)
			}
			s.Close()
			m.crash(crashDrop, rng)
			m.c = &crasher{}
			if s, err = Open(dir, crashOpts(m, m.c)); err != nil {
				t.Fatal(err)
			}
			if d := diffTrees(captureTree(t, filepath.Join(dir, diskName), scenarioRoots), want); d != "" || s.Diverged() {
				t.Fatalf("record %d segment %d/%d (%d dropped, %d cut), diverged %v:\n%s\nops: %v", r, target, segs,
					l.dropped, l.halved, s.Diverged(), d, ops)
			}
			s.Close()
			cases++
		}
	}
	t.Logf("%d random records, %d partial states replayed", records, cases)
}

// TestSetTimes checks that times set by FsSetTimes (absolute and "now")
// reach the replica.
func TestSetTimes(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Roots: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := newVMSim(1, snapshot.WasmPageSize)
	tree := []TreeEntry{fileE(0, "f", "x"), fileE(0, "g", "y"), dirE(0, "d"), linkE(0, "l", "g")}
	before := time.Now()
	err = s.CommitFull(1, v.next(t, snapshot.Full, 1), tree, []FsOp{
		opTs(0, "f", 1_000_000_123, 2_000_000_456, wasi.FstflagAtim|wasi.FstflagMtim),
		opTs(0, "d", 0, 3_000_000_000, wasi.FstflagMtim),
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.CommitIncremental(2, v.next(t, snapshot.Incremental, 2), []FsOp{
		opTs(0, "l", 5_000_000_000, 0, wasi.FstflagAtim|wasi.FstflagMtimNow), // through the symlink, to g
		opSl(0, "dangling", "nowhere"),
		opTs(0, "dangling", 0, 7_000_000_000, wasi.FstflagMtim), // the link itself
	})
	if err != nil {
		t.Fatal(err)
	}
	stat := func(p string) unix.Stat_t {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(s.DiskDir(0), p), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	if st := stat("f"); st.Atim.Nano() != 1_000_000_123 || st.Mtim.Nano() != 2_000_000_456 {
		t.Errorf("f: atime %d mtime %d", st.Atim.Nano(), st.Mtim.Nano())
	}
	if st := stat("d"); st.Mtim.Nano() != 3_000_000_000 {
		t.Errorf("d: mtime %d", st.Mtim.Nano())
	}
	if st := stat("dangling"); st.Mtim.Nano() != 7_000_000_000 {
		t.Errorf("dangling: mtime %d", st.Mtim.Nano())
	}
	if st := stat("g"); st.Atim.Nano() != 5_000_000_000 || st.Mtim.Nano() < before.UnixNano() {
		t.Errorf("g: atime %d mtime %d (now: after %d)", st.Atim.Nano(), st.Mtim.Nano(), before.UnixNano())
	}
}

// TestOpValidation: what the device layer never sends is refused before
// anything is written.
func TestOpValidation(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Roots: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := newVMSim(1, snapshot.WasmPageSize)
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), []TreeEntry{fileE(0, "a", "a")}, nil); err != nil {
		t.Fatal(err)
	}
	inc := v.next(t, snapshot.Incremental, 2)
	bad := []FsOp{
		opW(0, "/etc/passwd", 0, "x"),
		opW(0, "../x", 0, "x"),
		opW(0, "a/../../x", 0, "x"),
		opW(0, "a\x00b", 0, "x"),
		opW(0, "\xff", 0, "x"),
		opW(0, "", 0, "x"),
		opW(2, "a", 0, "x"),
		opW(0, "a", -2, "x"),
		opW(0, "a", DefaultMaxFileSize, "x"),
		{Op: uint8(wasi.FsWrite), Path: "a", Data: []byte("x"), Size: 5},
		opTr(0, "a", -1),
		opTr(0, "a", DefaultMaxFileSize+1),
		opAl(0, "a", -1, 1),
		opAl(0, "a", 0, 0),
		opAl(0, "a", 1<<62, 1<<62),
		opTs(0, "a", 0, 0, 0x10),
		opTs(0, "a", 0, 0, wasi.FstflagAtim|wasi.FstflagAtimNow),
		opTs(0, "a", -5, 0, wasi.FstflagAtim),
		opCr(0, "a", 0x20),
		opMk(0, "."),
		opMk(0, "a/.."),
		opUl(0, "x/."),
		opRn(0, "a", 3, "b"),
		opRn(0, "a", 0, "../b"),
		opSl(0, "s", "/etc"),
		opSl(0, "s", ""),
		opLn(0, "a", 0, "/b"),
		{Op: 0, Path: "a"},
		{Op: 13, Path: "a"},
		{Op: uint8(wasi.FsUnlink), Path: "a", Data: []byte("x")},
		{Op: uint8(wasi.FsUnlink), Path: "a", Flags: 1},
		{Op: uint8(wasi.FsMkdir), Path: "a", Root2: 1},
		{Op: uint8(wasi.FsTruncate), Path: "a", Size: 1, Offset: 3},
	}
	names, _ := os.ReadDir(dir)
	for _, op := range bad {
		err := s.CommitIncremental(2, inc, []FsOp{opW(0, "a", 0, "ok"), op})
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", op.String(), err)
		}
		// Validate, which a backup runs before its ack, refuses it too.
		if err := Validate(nil, []FsOp{opW(0, "a", 0, "ok"), op}, Options{Roots: 2}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Validate %s: %v, want ErrInvalid", op.String(), err)
		}
	}
	if err := Validate([]TreeEntry{fileE(0, "a", "a"), fileE(1, "b", "b")},
		[]FsOp{opW(0, "a", 0, "ok"), opCr(1, "c", creat), opRn(0, "a", 1, "d")}, Options{Roots: 2}); err != nil {
		t.Errorf("Validate of good changes: %v", err)
	}
	if err := Validate([]TreeEntry{fileE(2, "a", "a")}, nil, Options{Roots: 2}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Validate of a tree entry under root 2 of 2: %v", err)
	}
	if s.Committed() != 1 {
		t.Fatalf("committed %d", s.Committed())
	}
	after, _ := os.ReadDir(dir)
	if len(after) != len(names) {
		t.Fatalf("files appeared: %v -> %v", names, after)
	}
	if b, _ := os.ReadFile(filepath.Join(s.DiskDir(0), "a")); string(b) != "a" {
		t.Fatalf("the replica changed: %q", b)
	}
	// The chain is checked too.
	if err := s.CommitIncremental(3, inc, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("seq 3 after 1: %v", err)
	}
	other := newVMSim(9, snapshot.WasmPageSize)
	other.next(t, snapshot.Full, 1)
	if err := s.CommitIncremental(2, other.next(t, snapshot.Incremental, 2), nil); !errors.Is(err, snapshot.ErrChain) {
		t.Errorf("an incremental of another chain: %v", err)
	}
	if err := s.CommitIncremental(2, inc, nil); err != nil {
		t.Fatal(err)
	}
}
