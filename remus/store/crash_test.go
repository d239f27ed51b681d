package store

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

type step struct {
	kind string // "full", "inc", "compact", "exit"
	seq  uint64
	snap []byte
	tree []TreeEntry
	ops  []FsOp
	// ontoTip: the incremental is encoded, when committed, onto the
	// slot's Tip (as a Remus backup's merges are) instead of naming the
	// primary's ID of its parent.
	ontoTip bool
}

func (s step) String() string { return fmt.Sprintf("%s %d", s.kind, s.seq) }

const scenarioRoots = 2

// scenario is a slot's life: a full checkpoint, incrementals with every
// kind of fs op (including the ones replay must be careful with), an
// automatic compaction (MaxRecords 3), an explicit one, a second full
// checkpoint and more incrementals on it, then the guest's exit with the
// ops of its last epoch. want[i] is the image after step i.
func scenario(t testing.TB) (steps []step, want []*snapshot.Image) {
	v := newVMSim(1, 2*snapshot.WasmPageSize)
	big := strings.Repeat("0123456789abcdef", 640)
	add := func(kind string, seq uint64, tree []TreeEntry, ops ...FsOp) {
		st := step{kind: kind, seq: seq, tree: tree, ops: ops}
		switch kind {
		case "full":
			st.snap = v.next(t, snapshot.Full, seq)
		case "inc":
			st.snap = v.next(t, snapshot.Incremental, seq)
		}
		steps = append(steps, st)
		want = append(want, cloneImage(v.img))
	}
	root1 := TreeEntry{Root: 1, Path: ".", Kind: KindDir, Mode: 0o750}
	add("full", 1, []TreeEntry{
		dirE(0, "d"), fileE(0, "d/f", "hello from f"), fileE(0, "a", "A0"), linkE(0, "l", "d/f"),
		dirE(0, "empty"), fileE(0, "big", big), fileE(1, "x", "xxxxxxxx"), root1,
	},
		opA(0, "a", "+a1"), opCr(0, "new", creat), opW(0, "new", 0, "fresh"), opMk(0, "e"))
	add("inc", 2, nil,
		opA(0, "a", "+a2"), opA(0, "a", "+a3"), opW(0, "d/f", 0, "HE"), opTr(1, "x", 3),
		opTs(0, "a", 1e9, 2e9, wasi.FstflagAtim|wasi.FstflagMtim), opCr(0, "b", creat|trunc),
		opA(0, "b", "b1"), opW(0, "b", 10, "b10"), opA(0, "b", "b2"), opSy(0, "a"))
	add("inc", 3, nil,
		opRn(0, "a", 0, "e/a2"), opCr(0, "a", creat), opW(0, "a", 0, "new a"), opLn(0, "e/a2", 1, "hl"),
		opA(0, "l", "+viaL"), opA(0, "d/f", "+viaF"), opW(0, "big", 5000, "mid"))
	add("inc", 4, nil,
		opUl(0, "new"), opMk(0, "g"), opRd(0, "g"), opSl(0, "s", "e"), opW(0, "s/a2", 0, "S"),
		opAl(1, "x", 0, 100), opA(0, "a", "+4"), opA(1, "hl", "+hl"))
	add("inc", 5, nil) // memory only; the fourth record: compaction follows
	add("inc", 6, nil,
		opRn(0, "e", 0, "e2"), opA(0, "e2/a2", "+e2"), opRn(1, "hl", 0, "hl2"), opUl(0, "d/f"),
		opCr(0, "l", creat), opA(0, "l", "again"), opA(0, "l", "+more"), opRd(0, "empty"))
	add("compact", 6, nil)
	add("inc", 7, nil,
		opW(0, "a", 0, "A7"), opTr(0, "big", 100),
		// a symlink made in the segment aliases a file an append then
		// targets: the symlink must end the segment
		opSl(0, "s2", "big"), opW(0, "s2", 200, "far"), opA(0, "big", "tail"),
		opMk(0, "h"), opCr(0, "h/i", creat), opA(0, "h/i", "x"),
		opA(0, "h/i", "y"))
	steps[len(steps)-1].ontoTip = true // after a compaction: the slot's own IDs
	add("full", 8, []TreeEntry{fileE(0, "only", "one"), dirE(0, "z"), root1},
		opA(0, "only", "+1"), opCr(0, "z/q", creat|excl))
	add("inc", 9, nil,
		opRn(0, "only", 0, "z/only"), opLn(0, "z/only", 0, "z/o2"), opA(0, "z/o2", "+hl"), opA(0, "z/only", "+x"))
	// The exit: no snapshot, Committed stays 9; the result file written
	// and renamed into place in the last epoch must reach the replica.
	add("exit", 9, nil,
		opCr(0, "result.tmp", creat|trunc), opW(0, "result.tmp", 0, "forty-two"), opA(0, "z/only", "+bye"),
		opRn(0, "result.tmp", 0, "result"), opUl(0, "z/o2"))
	return steps, want
}

func runStep(s *Slot, st step) error {
	switch st.kind {
	case "full":
		return s.CommitFull(st.seq, st.snap, st.tree, st.ops)
	case "inc":
		snap := st.snap
		if st.ontoTip {
			sn, err := snapshot.DecodeBytes(snap, nil)
			if err != nil {
				return err
			}
			sn.Parent = s.Tip()
			var b bytes.Buffer
			if err := sn.Encode(&b); err != nil {
				return err
			}
			snap = b.Bytes()
		}
		return s.CommitIncremental(st.seq, snap, st.ops)
	case "exit":
		return s.CommitExit(exitCode, st.ops)
	}
	img, err := s.Image()
	if err != nil {
		return err
	}
	return s.Compact(img)
}

// exitCode is the scenario's exit's.
const exitCode = 3

type expected struct {
	seq    uint64
	exited bool
	img    *snapshot.Image
	tree   map[string]string
	// COMMIT's rename in this step and the directory fsync after it
	// (operation numbers); 0 if the step writes no COMMIT.
	commitRename, commitSync int
}

func crashOpts(m *memFS, c *crasher) Options {
	return Options{FS: m, Roots: scenarioRoots, MaxRecords: 3,
		diskHook: func(op string) error { return c.step("disk " + op) }, noDiskSync: true}
}

// reference runs the scenario without a crash and records, after each
// step, the state and where its commit point was; it checks the replica
// against the oracle on the way.
func reference(t *testing.T, steps []step, want []*snapshot.Image) ([]expected, int) {
	c := &crasher{}
	m := newMemFS(c)
	dir := t.TempDir()
	s, err := Open(dir, crashOpts(m, c))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	o := newOracle(t, scenarioRoots)
	var exp []expected
	for i, st := range steps {
		start := c.n
		if err := runStep(s, st); err != nil {
			t.Fatalf("step %d (%s): %v", i, st, err)
		}
		switch st.kind {
		case "full":
			o.full(st.tree, st.ops)
		case "inc", "exit":
			o.apply(st.ops)
		}
		e := expected{seq: s.Committed(), exited: st.kind == "exit", img: want[i],
			tree: captureTree(t, filepath.Join(dir, diskName), scenarioRoots)}
		for k := start; k < c.n; k++ {
			if c.trace[k] == "rename .COMMIT.tmp COMMIT" {
				e.commitRename, e.commitSync = k+1, k+2
				if c.trace[k+1] != "syncdir" {
					t.Fatalf("COMMIT's rename is followed by %q", c.trace[k+1])
				}
				break
			}
		}
		if e.seq != st.seq {
			t.Fatalf("step %d (%s): committed %d", i, st, e.seq)
		}
		if code, ok := s.Exited(); ok != e.exited || ok && code != exitCode {
			t.Fatalf("step %d (%s): exited %v (code %d)", i, st, ok, code)
		}
		img, err := s.Image()
		if err != nil {
			t.Fatal(err)
		}
		if err := sameImage(img, want[i]); err != nil {
			t.Fatalf("step %d (%s): %v", i, st, err)
		}
		if d := diffTrees(e.tree, o.tree()); d != "" {
			t.Fatalf("step %d (%s): the replica differs from the oracle:\n%s", i, st, d)
		}
		if s.Diverged() {
			t.Fatalf("step %d (%s): diverged", i, st)
		}
		exp = append(exp, e)
	}
	return exp, c.n
}

func TestReference(t *testing.T) {
	steps, want := scenario(t)
	exp, n := reference(t, steps, want)
	t.Logf("%d steps, %d file operations", len(exp), n)
}

// checkState compares the slot's state with the expectation.
func checkState(t *testing.T, s *Slot, dir string, e *expected) error {
	if got := s.Committed(); got != e.seq {
		return fmt.Errorf("committed %d, want %d", got, e.seq)
	}
	if code, ok := s.Exited(); ok != e.exited || ok && code != exitCode {
		return fmt.Errorf("exited %v (code %d), want %v", ok, code, e.exited)
	}
	if e.seq == 0 {
		if _, err := os.Stat(filepath.Join(dir, diskName)); err == nil {
			return errors.New("a disk tree without a commit")
		}
		return nil
	}
	img, err := s.Image()
	if err != nil {
		return err
	}
	if err := sameImage(img, e.img); err != nil {
		return err
	}
	if d := diffTrees(captureTree(t, filepath.Join(dir, diskName), scenarioRoots), e.tree); d != "" {
		return fmt.Errorf("replica differs:\n%s", d)
	}
	if s.Diverged() {
		return errors.New("diverged")
	}
	return nil
}

// TestCrashEverywhere crashes at every file operation of the scenario
// (journal and replica), under three crash models, recovers (sometimes
// crashing during recovery too), checks that the state is exactly the
// last durable commit or the one before, as the commit point says, and
// then finishes the scenario from there and checks the end state.
func TestCrashEverywhere(t *testing.T) {
	steps, want := scenario(t)
	exp, total := reference(t, steps, want)
	modes := []crashMode{crashDrop, crashKeep, crashRandom}
	stride := 1
	if testing.Short() {
		stride = 7
	}
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			crashEverywhere(t, mode, steps, exp, total, stride)
		})
	}
}

func crashEverywhere(t *testing.T, mode crashMode, steps []step, exp []expected, total, stride int) {
	empty := expected{}
	rng := rand.New(rand.NewPCG(42, uint64(mode)))
	points, nested := 0, 0
	{
		for k := 1; k <= total; k += stride {
			label := fmt.Sprintf("%s crash at %d", mode, k)
			c := &crasher{at: k, half: k%2 == 0}
			m := newMemFS(c)
			dir := t.TempDir()
			crashed := -1
			s, err := Open(dir, crashOpts(m, c))
			if err != nil {
				t.Fatalf("%s: open: %v", label, err)
			}
			for i, st := range steps {
				if err := runStep(s, st); err != nil {
					if !isCrash(err) {
						t.Fatalf("%s: step %d (%s): %v", label, i, st, err)
					}
					crashed = i
					break
				}
			}
			if crashed < 0 {
				t.Fatalf("%s: no crash", label)
			}
			s.Close()
			m.crash(mode, rng)
			points++

			// Recovery, itself crashed now and then.
			c2 := &crasher{}
			if rng.IntN(3) == 0 {
				c2.at = 1 + rng.IntN(12)
			}
			m.c = c2
			s, err = Open(dir, crashOpts(m, c2))
			if err == nil && c2.crashed {
				// The crash hit best-effort work (cleanup), which
				// carried on: the process would have died there.
				s.Close()
				err = errCrash
			}
			if err != nil {
				if !isCrash(err) {
					t.Fatalf("%s: recovery: %v", label, err)
				}
				nested++
				m.crash(mode, rng)
				c2 = &crasher{}
				m.c = c2
				if s, err = Open(dir, crashOpts(m, c2)); err != nil {
					t.Fatalf("%s: second recovery: %v", label, err)
				}
			}

			c2.at = 0 // recovered: no more crashes

			prev, next := &empty, &exp[crashed]
			if crashed > 0 {
				prev = &exp[crashed-1]
			}
			got := s.Committed()
			_, exited := s.Exited()
			var e *expected
			switch {
			case got == next.seq && exited == next.exited && (next.commitRename == 0 || k > next.commitRename):
				e = next
			case got == prev.seq && exited == prev.exited && (next.commitSync == 0 || k <= next.commitSync):
				e = prev
			default:
				t.Fatalf("%s during step %d (%s): recovered %d; the step goes from %d to %d (COMMIT renamed at %d, durable at %d)",
					label, crashed, steps[crashed], got, prev.seq, next.seq, next.commitRename, next.commitSync)
			}
			if mode == crashDrop && next.commitSync != 0 && k <= next.commitSync && e != prev &&
				(prev.seq != next.seq || prev.exited != next.exited) {
				t.Fatalf("%s: recovered a commit whose COMMIT was not durable", label)
			}
			if mode == crashKeep && next.commitRename != 0 && k > next.commitRename && e != next {
				t.Fatalf("%s: lost a commit whose COMMIT was renamed (process crash)", label)
			}
			if err := checkState(t, s, dir, e); err != nil {
				t.Fatalf("%s during step %d (%s), recovered %d: %v", label, crashed, steps[crashed], got, err)
			}

			// The primary resends what was not committed; the slot
			// goes on to the end.
			from := crashed
			if e == next {
				from = crashed + 1
			}
			for i := from; i < len(steps); i++ {
				if err := runStep(s, steps[i]); err != nil {
					t.Fatalf("%s: after recovery, step %d (%s): %v", label, i, steps[i], err)
				}
			}
			if err := checkState(t, s, dir, &exp[len(exp)-1]); err != nil {
				t.Fatalf("%s: end state after recovery: %v", label, err)
			}
			s.Close()
		}
	}
	t.Logf("%s: %d file operations in the scenario, %d crash points, %d with a crash during recovery",
		mode, total, points, nested)
}
