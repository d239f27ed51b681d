package store

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
)

// snapshotDir describes everything under dir, times aside.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		desc := fi.Mode().String()
		switch {
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			desc += " " + string(b)
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			desc += " -> " + l
		}
		out[p] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestEscape: nothing an op or a tree entry names, through any symlink a
// tree or the guest planted, reaches outside its root: not the host, not
// the slot's journal, not the other preopen's replica.
func TestEscape(t *testing.T) {
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	if err := os.MkdirAll(filepath.Join(outside, "emptydir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "slot")
	m := newMemFS(&crasher{}) // the journal's fsyncs are not what this is about
	s, err := Open(dir, Options{FS: m, Roots: 2, noDiskSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := newVMSim(1, snapshot.WasmPageSize)
	// disk/0 is base/slot/disk/0: "../../../outside" is base/outside.
	tree := []TreeEntry{
		fileE(0, "f", "f"), dirE(0, "d"),
		linkE(0, "up", "../../../outside"), linkE(0, "deep", "d/../../../../outside"),
		linkE(0, "r1", "../1"), linkE(0, "journal", "../.."), linkE(0, "proc", "../../../../../../proc/self/root"),
		linkE(0, "chain1", "chain2"), linkE(0, "chain2", "up"),
		fileE(1, "other", "root 1"),
	}
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), tree, nil); err != nil {
		t.Fatal(err)
	}
	watch := func() map[string]string {
		m := snapshotDir(t, outside)
		for k, v := range snapshotDir(t, s.DiskDir(1)) {
			m[k] = v
		}
		// No name an attack uses appears next to the journal or above.
		for _, d := range []string{base, dir} {
			for _, n := range []string{"new", "newdir", "moved", "stolen", "hl", "sl", "secret", "emptydir"} {
				if _, err := os.Lstat(filepath.Join(d, n)); err == nil {
					m[filepath.Join(d, n)] = "exists"
				}
			}
		}
		return m
	}
	before := watch()
	var attacks []FsOp
	for _, via := range []string{"up", "deep", "chain1", "journal/..", "proc/etc"} {
		attacks = append(attacks,
			opW(0, via+"/secret", 0, "pwned"), opA(0, via+"/secret", "pwned"), opTr(0, via+"/secret", 0),
			opAl(0, via+"/secret", 0, 1<<20), opTs(0, via+"/secret", 1, 1, 5), opCr(0, via+"/new", creat),
			opCr(0, via+"/secret", creat|trunc), opMk(0, via+"/newdir"), opRd(0, via+"/emptydir"),
			opUl(0, via+"/secret"), opRn(0, "f", 0, via+"/moved"), opRn(0, via+"/secret", 0, "stolen"),
			opLn(0, via+"/secret", 0, "hl"), opLn(0, "f", 0, via+"/hl"), opSl(0, via+"/sl", "x"),
		)
	}
	attacks = append(attacks, opW(0, "r1/other", 0, "pwned"), opUl(0, "r1/other"), opW(0, "journal/COMMIT", 0, "x"),
		opCr(0, "journal/APPLIED", trunc))
	seq := uint64(1)
	for _, op := range attacks {
		// As part of a full checkpoint: refused, nothing committed.
		err := s.CommitFull(seq+1, v.next(t, snapshot.Full, seq+1), tree, []FsOp{op})
		if err == nil || !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrDiverged) {
			t.Errorf("full with %s: %v, want a refusal", op.String(), err)
		}
		// As an incremental: the op is not applied, the slot diverges.
		v.img, v.lastID = nil, snapshot.Hash{}
		seq++
		if err := s.CommitFull(seq, v.next(t, snapshot.Full, seq), tree, nil); err != nil {
			t.Fatal(err)
		}
		seq++
		err = s.CommitIncremental(seq, v.next(t, snapshot.Incremental, seq), []FsOp{op})
		if !errors.Is(err, ErrDiverged) && !errors.Is(err, ErrInvalid) {
			t.Errorf("incremental with %s: %v, want ErrDiverged", op.String(), err)
		}
		if d := diffTrees(watch(), before); d != "" {
			t.Fatalf("%s changed something outside its root:\n%s", op.String(), d)
		}
	}

	// A symlink the guest plants in one epoch is no way out in the next.
	seq++
	if err := s.CommitFull(seq, v.next(t, snapshot.Full, seq), tree, nil); err != nil {
		t.Fatal(err)
	}
	seq++
	if err := s.CommitIncremental(seq, v.next(t, snapshot.Incremental, seq),
		[]FsOp{opSl(0, "planted", "../../../outside"), opMk(0, "x"), opSl(0, "x/p2", "../planted")}); err != nil {
		t.Fatal(err)
	}
	seq++
	err = s.CommitIncremental(seq, v.next(t, snapshot.Incremental, seq),
		[]FsOp{opW(0, "planted/secret", 0, "pwned"), opW(0, "x/p2/secret", 0, "pwned"), opCr(0, "x/p2/new", creat)})
	if !errors.Is(err, ErrDiverged) {
		t.Fatalf("writes through planted symlinks: %v", err)
	}

	// Tree entries are never created through a symlink.
	for _, bad := range [][]TreeEntry{
		{linkE(0, "l", "../../../outside"), fileE(0, "l/new", "x")},
		{linkE(0, "l", "d"), dirE(0, "d"), fileE(0, "l/new", "x")},
		{fileE(0, "../x", "x")},
		{fileE(0, "a/../../x", "x")},
		{fileE(0, "/abs", "x")},
		{linkE(0, "abs", "/etc")},
		{fileE(0, "missing/parent", "x")},
		{fileE(0, "a", "x"), fileE(0, "a", "y")},
		{{Root: 0, Path: "dev", Kind: 4}},
		{{Root: 0, Path: "f", Kind: KindFile, Mode: 0o10644}},
		{fileE(2, "f", "x")},
	} {
		seq++
		err := s.CommitFull(seq, v.next(t, snapshot.Full, seq), bad, nil)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("tree %v: %v, want ErrInvalid", bad, err)
		}
		seq--
	}
	if d := diffTrees(watch(), before); d != "" {
		t.Fatalf("something outside changed:\n%s", d)
	}
	if _, err := os.Stat(filepath.Join(dir, diskNewName)); err == nil {
		t.Error("a refused tree's staging directory is left behind")
	}
	// Set-id bits from the peer are dropped.
	seq++
	if err := s.CommitFull(seq, v.next(t, snapshot.Full, seq),
		[]TreeEntry{{Root: 0, Path: "suid", Kind: KindFile, Mode: 0o6755}, {Root: 0, Path: "sd", Kind: KindDir, Mode: 0o1000}}, nil); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(s.DiskDir(0), "suid")); err != nil || fi.Mode() != 0o755 {
		t.Errorf("suid file: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Join(s.DiskDir(0), "sd")); err != nil || fi.Mode() != fs.ModeDir|0o700 {
		t.Errorf("sticky directory: %v %v", fi.Mode(), err)
	}
	// The journal is intact.
	s.Close()
	if s, err = Open(dir, Options{FS: m}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Committed() != seq || s.Diverged() {
		t.Fatalf("reopened at %d (diverged %v), want %d (the last full cleared the divergence)", s.Committed(), s.Diverged(), seq)
	}
}
