package store

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
)

// copyDir copies a slot directory (files, directories, symlinks).
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			return os.MkdirAll(to, fi.Mode().Perm()|0o700)
		case fi.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(l, to)
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(to, b, fi.Mode().Perm())
		}
	})
	if err != nil {
		t.Fatal(err)
	}
}

// buildSlot commits the scenario's first four steps (a full and three
// incrementals) with the OS file system.
func buildSlot(t *testing.T, dir string, opts Options) ([]step, []*snapshot.Image) {
	steps, want := scenario(t)
	opts.Roots = scenarioRoots
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, st := range steps[:4] {
		if err := runStep(s, st); err != nil {
			t.Fatal(err)
		}
	}
	return steps, want
}

// TestCorruptFiles damages each file the committed state needs in each
// way (a flipped byte, cut in half, emptied, removed): Open refuses with
// an error that names the file, and applies nothing.
func TestCorruptFiles(t *testing.T) {
	orig := t.TempDir()
	buildSlot(t, orig, Options{MaxRecords: -1})
	names, err := os.ReadDir(orig)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, n := range names {
		if !n.IsDir() && n.Name() != lockName {
			files = append(files, n.Name())
		}
	}
	files = append(files, filepath.Join(diskName, treeName))
	if len(files) != 10 { // COMMIT, APPLIED, base, 3 × (snap, ops), TREE
		t.Fatalf("files %v", files)
	}
	damages := map[string]func([]byte) []byte{
		"flipped byte":   func(b []byte) []byte { b[len(b)/2] ^= 0x40; return b },
		"last byte":      func(b []byte) []byte { b[len(b)-1] ^= 1; return b },
		"cut in half":    func(b []byte) []byte { return b[:len(b)/2] },
		"one byte short": func(b []byte) []byte { return b[:len(b)-1] },
		"one byte more":  func(b []byte) []byte { return append(b, 0) },
		"emptied":        func(b []byte) []byte { return nil },
		"removed":        nil,
	}
	checked := 0
	for _, f := range files {
		for what, damage := range damages {
			dir := t.TempDir()
			copyDir(t, orig, dir)
			before := captureTree(t, filepath.Join(dir, diskName), scenarioRoots)
			p := filepath.Join(dir, f)
			if damage == nil {
				os.Remove(p)
			} else {
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, damage(b), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s, err := Open(dir, Options{})
			if err == nil {
				s.Close()
				t.Errorf("%s %s: opened", f, what)
				continue
			}
			if !strings.Contains(err.Error(), filepath.Base(f)) && !(f == filepath.Join(diskName, treeName) && strings.Contains(err.Error(), treeName)) {
				t.Errorf("%s %s: the error does not name the file: %v", f, what, err)
			}
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, snapshot.ErrCorrupt) && !errors.Is(err, snapshot.ErrTruncated) &&
				!errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s %s: %v is not a corruption error", f, what, err)
			}
			if d := diffTrees(captureTree(t, filepath.Join(dir, diskName), scenarioRoots), before); d != "" {
				t.Errorf("%s %s: the replica changed:\n%s", f, what, d)
			}
			checked++
		}
	}
	t.Logf("%d damaged files refused", checked)
}

// TestUnappliedRecordCorrupt: a committed record whose ops were not yet
// applied, with its ops file damaged: recovery applies nothing of it.
func TestUnappliedRecordCorrupt(t *testing.T) {
	dir := t.TempDir()
	steps, _ := scenario(t)
	crashing := false
	s, err := Open(dir, Options{Roots: scenarioRoots, diskHook: func(op string) error {
		if crashing {
			return errCrash
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := runStep(s, steps[0]); err != nil {
		t.Fatal(err)
	}
	before := captureTree(t, filepath.Join(dir, diskName), scenarioRoots)
	crashing = true
	if err := runStep(s, steps[1]); !isCrash(err) {
		t.Fatal(err)
	}
	s.Close()
	if s.Committed() != 2 {
		t.Fatalf("committed %d", s.Committed())
	}
	p := filepath.Join(dir, opsName(2, 1))
	b, _ := os.ReadFile(p)
	b[len(b)-10] ^= 0xff // in the last op's data
	os.WriteFile(p, b, 0o600)
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), opsName(2, 1)) {
		t.Fatalf("open: %v", err)
	}
	if d := diffTrees(captureTree(t, filepath.Join(dir, diskName), scenarioRoots), before); d != "" {
		t.Fatalf("the replica changed:\n%s", d)
	}
}

// TestGarbageRemoved: what no COMMIT names is removed by Open, damaged or
// not.
func TestGarbageRemoved(t *testing.T) {
	dir := t.TempDir()
	buildSlot(t, dir, Options{MaxRecords: -1})
	garbage := []string{".COMMIT.tmp", ".APPLIED.tmp", "." + recName(5, 1) + ".tmp", recName(5, 1), opsName(5, 1),
		recName(3, 7), baseName(1, 0), baseName(2, 1)}
	for _, g := range garbage {
		os.WriteFile(filepath.Join(dir, g), []byte("junk"), 0o600)
	}
	os.MkdirAll(filepath.Join(dir, diskNewName, "0"), 0o700)
	os.MkdirAll(filepath.Join(dir, diskOldName, "0"), 0o700)
	os.WriteFile(filepath.Join(dir, "unrelated"), []byte("mine"), 0o600)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, g := range append(garbage, diskNewName, diskOldName) {
		if _, err := os.Lstat(filepath.Join(dir, g)); err == nil {
			t.Errorf("%s is still there", g)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "unrelated")); err != nil {
		t.Error("a file that is not the slot's was removed")
	}
	if s.Committed() != 4 {
		t.Fatalf("committed %d", s.Committed())
	}
}

// TestPathsAndCompaction: the chain files restore with snapshot.Restore
// alone, before and after compactions (explicit, with the slot's or the
// primary's image, and automatic), and across reopening.
func TestPathsAndCompaction(t *testing.T) {
	dir := t.TempDir()
	steps, want := scenario(t)
	s, err := Open(dir, Options{Roots: scenarioRoots, MaxRecords: -1, MaxRecordBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	check := func(label string, i, records int) {
		t.Helper()
		base, recs := s.Paths()
		if len(recs) != records {
			t.Fatalf("%s: %d records, want %d", label, len(recs), records)
		}
		img, err := snapshot.Restore(nil, append([]string{base}, recs...)...)
		if err != nil {
			t.Fatalf("%s: restore: %v", label, err)
		}
		if err := sameImage(img, want[i]); err != nil {
			t.Fatalf("%s: restored: %v", label, err)
		}
		if img, err = s.Image(); err != nil {
			t.Fatal(err)
		}
		if err := sameImage(img, want[i]); err != nil {
			t.Fatalf("%s: Image: %v", label, err)
		}
		names, _ := os.ReadDir(dir)
		n := 0
		for _, e := range names {
			if _, _, _, ok := parseName(e.Name()); ok {
				n++
			}
		}
		if n != 1+2*records {
			t.Fatalf("%s: %d chain files, want %d", label, n, 1+2*records)
		}
	}
	for i := 0; i < 4; i++ {
		if err := runStep(s, steps[i]); err != nil {
			t.Fatal(err)
		}
		check(steps[i].String(), i, i)
	}
	img, _ := s.Image()
	img.Seq++
	if err := s.Compact(img); !errors.Is(err, ErrInvalid) {
		t.Fatalf("compaction with an image of another seq: %v", err)
	}
	img.Seq--
	img.ID[0] ^= 1
	if err := s.Compact(img); !errors.Is(err, ErrInvalid) {
		t.Fatalf("compaction with an image of another checkpoint: %v", err)
	}
	img.ID[0] ^= 1
	if err := s.Compact(img); err != nil {
		t.Fatal(err)
	}
	check("compacted", 3, 0)
	for i := 4; i < 6; i++ { // re-encoded onto the compacted base
		if err := runStep(s, steps[i]); err != nil {
			t.Fatal(err)
		}
		check(steps[i].String(), i, i-3)
	}
	// The backup's own image of the primary's stream works too.
	if err := s.Compact(cloneImage(want[5])); err != nil {
		t.Fatal(err)
	}
	check("compacted with the primary's image", 5, 0)
	s.Close()
	if s, err = Open(dir, Options{MaxRecords: 2}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	check("reopened", 5, 0)
	for i := 7; i < 8; i++ {
		if err := runStep(s, steps[i]); err != nil {
			t.Fatal(err)
		}
	}
	check("after a compaction and an incremental", 7, 1)
	// Automatic compaction: MaxRecords 2.
	v := newVMSim(77, snapshot.WasmPageSize)
	if err := s.CommitFull(20, v.next(t, snapshot.Full, 20), nil, nil); err != nil {
		t.Fatal(err)
	}
	for seq := uint64(21); seq < 30; seq++ {
		// Every other one as a Remus backup commits: decoded already
		// (also after compactions, when the record is re-encoded).
		raw := v.next(t, snapshot.Incremental, seq)
		if seq%2 == 0 {
			sn, err := snapshot.DecodeBytes(raw, &testModule)
			if err != nil {
				t.Fatal(err)
			}
			id := sn.ID
			if err := s.CommitIncrementalDecoded(seq, raw, sn, nil); err != nil {
				t.Fatal(err)
			}
			if sn.ID != id {
				t.Fatalf("seq %d: CommitIncrementalDecoded changed the caller's snapshot", seq)
			}
		} else if err := s.CommitIncremental(seq, raw, nil); err != nil {
			t.Fatal(err)
		}
		_, recs := s.Paths()
		if len(recs) > 2 {
			t.Fatalf("seq %d: %d records", seq, len(recs))
		}
		base, recs := s.Paths()
		img, err := snapshot.Restore(&testModule, append([]string{base}, recs...)...)
		if err != nil {
			t.Fatal(err)
		}
		if err := sameImage(img, v.img); err != nil {
			t.Fatalf("seq %d: %v", seq, err)
		}
	}
}

// TestDivergence: an op the replica cannot apply commits the checkpoint
// (memory), applies the rest, and makes the slot refuse incrementals, also
// after reopening, until a full checkpoint.
func TestDivergence(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Roots: 1})
	if err != nil {
		t.Fatal(err)
	}
	v := newVMSim(1, snapshot.WasmPageSize)
	tree := []TreeEntry{fileE(0, "a", "a"), dirE(0, "d"), fileE(0, "d/x", "x")}
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), tree, nil); err != nil {
		t.Fatal(err)
	}
	err = s.CommitIncremental(2, v.next(t, snapshot.Incremental, 2),
		[]FsOp{opW(0, "a", 0, "A"), opW(0, "missing", 0, "x"), opRd(0, "d"), opA(0, "a", "+")})
	var oe *OpError
	if !errors.Is(err, ErrDiverged) || !errors.As(err, &oe) || oe.Index != 1 {
		t.Fatalf("%v", err)
	}
	if s.Committed() != 2 || !s.Diverged() {
		t.Fatalf("committed %d, diverged %v", s.Committed(), s.Diverged())
	}
	if b, _ := os.ReadFile(filepath.Join(s.DiskDir(0), "a")); string(b) != "A+" {
		t.Fatalf("the other ops: %q", b)
	}
	inc3 := v.next(t, snapshot.Incremental, 3)
	if err := s.CommitIncremental(3, inc3, nil); !errors.Is(err, ErrDiverged) {
		t.Fatalf("incremental on a diverged slot: %v", err)
	}
	s.Close()
	if s, err = Open(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Diverged() {
		t.Fatal("reopened: not diverged")
	}
	if err := s.CommitIncremental(3, inc3, nil); !errors.Is(err, ErrDiverged) {
		t.Fatalf("reopened, incremental: %v", err)
	}
	if err := s.CommitFull(3, v.next(t, snapshot.Full, 3), tree, nil); err != nil {
		t.Fatal(err)
	}
	if s.Diverged() {
		t.Fatal("diverged after a full checkpoint")
	}
	if err := s.CommitIncremental(4, v.next(t, snapshot.Incremental, 4), []FsOp{opA(0, "a", "!")}); err != nil {
		t.Fatal(err)
	}
}

func TestLifecycle(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Roots: 2})
	if err != nil {
		t.Fatal(err)
	}
	if s.Committed() != 0 {
		t.Fatal("a new slot has a checkpoint")
	}
	if b, r := s.Paths(); b != "" || r != nil {
		t.Fatal("paths of an empty slot")
	}
	if _, err := s.Image(); err == nil {
		t.Fatal("image of an empty slot")
	}
	if s.DiskDir(1) == "" || s.DiskDir(2) != "" || s.DiskDir(-1) != "" {
		t.Fatal("DiskDir")
	}
	v := newVMSim(1, snapshot.WasmPageSize)
	if err := s.CommitIncremental(1, v.next(t, snapshot.Full, 1), nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("incremental on an empty slot: %v", err)
	}
	if err := s.CommitFull(2, v.next(t, snapshot.Full, 1), nil, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("full with a snapshot of another seq: %v", err)
	}
	if err := s.CommitFull(1, v.next(t, snapshot.Incremental, 2), nil, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("full with an incremental: %v", err)
	}
	if _, err := Open(dir, Options{}); err == nil {
		t.Fatal("opened twice")
	}
	v = newVMSim(1, snapshot.WasmPageSize)
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitIncremental(2, v.next(t, snapshot.Incremental, 2), nil); err == nil {
		t.Fatal("commit on a closed slot")
	}
	if _, err := Open(dir, Options{Roots: 3}); err == nil {
		t.Fatal("opened with another number of roots")
	}
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Committed() != 1 || s.DiskDir(1) == "" {
		t.Fatalf("reopened: %d", s.Committed())
	}
	fi, err := os.Stat(s.DiskDir(1))
	if err != nil || !fi.IsDir() {
		t.Fatal("an empty preopen has no replica directory")
	}
}

// TestWriteErrors: an I/O error before the commit point leaves the slot as
// it was (retry works); one at COMMIT or while applying breaks it until
// it is reopened, which recovers.
func TestWriteErrors(t *testing.T) {
	steps, _ := scenario(t)
	errIO := errors.New("injected I/O error")
	var failOn string
	c := &crasher{fn: func(op string) error {
		if failOn != "" && strings.HasPrefix(op, failOn) {
			failOn = ""
			return errIO
		}
		return nil
	}}
	m := newMemFS(c)
	dir := t.TempDir()
	s, err := Open(dir, crashOpts(m, c))
	if err != nil {
		t.Fatal(err)
	}
	if err := runStep(s, steps[0]); err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"fsync .rec-", "write .rec-", "rename .rec-", "create .rec-"} {
		failOn = op
		if err := runStep(s, steps[1]); !errors.Is(err, errIO) || errors.Is(err, ErrBroken) {
			t.Fatalf("failing %q: %v", op, err)
		}
		if s.Committed() != 1 {
			t.Fatal("committed")
		}
		// A failed write leaves no temporary file: on a full disk it
		// held the space the next try needs, for as long as the slot
		// stayed open.
		names, err := m.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if strings.HasSuffix(n, tmpSuffix) {
				t.Fatalf("failing %q left %s", op, n)
			}
		}
	}
	if err := runStep(s, steps[1]); err != nil {
		t.Fatalf("retry: %v", err)
	}
	for _, op := range []string{"fsync .COMMIT", "disk pwrite"} {
		failOn = op
		next := steps[2]
		if op == "disk pwrite" {
			next = steps[3]
		}
		if err := runStep(s, next); !errors.Is(err, ErrBroken) {
			t.Fatalf("failing %q: %v", op, err)
		}
		if err := runStep(s, next); !errors.Is(err, ErrBroken) {
			t.Fatalf("after failing %q: %v", op, err)
		}
		s.Close()
		if s, err = Open(dir, crashOpts(m, c)); err != nil {
			t.Fatal(err)
		}
		if s.Committed() != next.seq-1 && s.Committed() != next.seq {
			t.Fatalf("reopened at %d", s.Committed())
		}
		if s.Committed() != next.seq {
			if err := runStep(s, next); err != nil {
				t.Fatal(err)
			}
		}
	}
	s.Close()
}

// TestCommitDecodedChecksModule: a decoded checkpoint of another module is
// refused as an encoded one is, and commits nothing.
func TestCommitDecodedChecksModule(t *testing.T) {
	s, err := Open(t.TempDir(), Options{Roots: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := newVMSim(3, snapshot.WasmPageSize)
	if err := s.CommitFull(1, v.next(t, snapshot.Full, 1), nil, nil); err != nil {
		t.Fatal(err)
	}
	raw := v.next(t, snapshot.Incremental, 2)
	sn, err := snapshot.DecodeBytes(raw, &testModule)
	if err != nil {
		t.Fatal(err)
	}
	other := *sn
	other.Module[0] ^= 1
	if err := s.CommitIncrementalDecoded(2, raw, &other, nil); !errors.Is(err, ErrInvalid) || !errors.Is(err, snapshot.ErrModuleMismatch) {
		t.Fatalf("another module's checkpoint: %v, want ErrInvalid and ErrModuleMismatch", err)
	}
	if s.Committed() != 1 {
		t.Fatalf("committed %d after a refused checkpoint, want 1", s.Committed())
	}
	if err := s.CommitIncrementalDecoded(2, raw, sn, nil); err != nil || s.Committed() != 2 {
		t.Fatalf("the right checkpoint: %v, committed %d", err, s.Committed())
	}
}

// TestCommitFullDecoded: a full checkpoint committed with its decoded
// snapshot is refused when that does not fit (no snapshot, another seq, an
// incremental), and otherwise is what a reopened slot restores.
func TestCommitFullDecoded(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Roots: 1})
	if err != nil {
		t.Fatal(err)
	}
	v := newVMSim(5, snapshot.WasmPageSize)
	raw := v.next(t, snapshot.Full, 1)
	sn, err := snapshot.DecodeBytes(raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	inc := *sn
	inc.Kind = snapshot.Incremental
	for name, bad := range map[string]*snapshot.Snapshot{"none": nil, "incremental": &inc} {
		if err := s.CommitFullDecoded(1, raw, bad, nil, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if err := s.CommitFullDecoded(2, raw, sn, nil, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("seq 2 for a snapshot of seq 1: %v, want ErrInvalid", err)
	}
	if s.Committed() != 0 {
		t.Fatalf("committed %d after refusals", s.Committed())
	}
	if err := s.CommitFullDecoded(1, raw, sn, nil, nil); err != nil || s.Committed() != 1 {
		t.Fatalf("the right checkpoint: %v, committed %d", err, s.Committed())
	}
	s.Close()
	s, err = Open(dir, Options{Roots: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	img, err := s.Image()
	if err != nil || img.ID != sn.ID {
		t.Fatalf("reopened: %v, want the image of %v", err, sn.ID.Short())
	}
}
