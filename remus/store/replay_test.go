package store

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// lossy models a power loss of the replica in the middle of one segment
// of a record's apply: after the record's COMMIT, in segment target (0 is
// the first), each replica effect is kept, dropped or (a write) cut in
// half at random, and the crash comes at the segment's barrier (its first
// fsync, or the marker that follows). Dropping an effect while later ones
// happen gives the states a file system can leave behind: any subset of a
// segment's unsynced effects.
type lossy struct {
	rng             *rand.Rand
	target          int
	armed, active   bool
	seg             int
	dropped, halved int
}

func (l *lossy) step(op string) error {
	if !l.active {
		if l.armed && op == "rename .COMMIT.tmp COMMIT" {
			l.active = true
		}
		return nil
	}
	if strings.HasPrefix(op, "create .APPLIED.tmp") {
		if l.seg == l.target {
			return errCrash
		}
		l.seg++
		return nil
	}
	if l.seg != l.target || !strings.HasPrefix(op, "disk ") {
		return nil
	}
	switch op = strings.TrimPrefix(op, "disk "); op {
	case "fsync", "syncfs":
		return errCrash
	case "pwrite":
		switch l.rng.IntN(4) {
		case 0:
			l.dropped++
			return errSkip
		case 1:
			l.halved++
			return errHalf
		}
	case "ftruncate", "fallocate", "utimens", "create", "mkdir", "rmdir", "unlink", "rename", "symlink", "link":
		if l.rng.IntN(3) == 0 {
			l.dropped++
			return errSkip
		}
	}
	return nil
}

// TestSegmentReplayAfterReplicaLoss checks the replay argument of doc.go:
// for every incremental of the scenario and every segment of its ops,
// whatever subset of the segment's effects reached the replica before the
// crash, recovery replays from the segment's marker to exactly the
// committed state.
func TestSegmentReplayAfterReplicaLoss(t *testing.T) {
	steps, want := scenario(t)
	exp, _ := reference(t, steps, want)
	trials := 12
	if testing.Short() {
		trials = 3
	}
	rng := rand.New(rand.NewPCG(5, 6))
	cases, dropped, halved := 0, 0, 0
	for i, st := range steps {
		if st.kind != "inc" || len(st.ops) == 0 {
			continue
		}
		// The number of segments: the markers the clean run wrote.
		segs := 0
		for _, op := range trace(t, steps, i) {
			if strings.HasPrefix(op, "create .APPLIED.tmp") {
				segs++
			}
		}
		for target := range segs {
			for trial := range trials {
				label := fmt.Sprintf("step %d (%s) segment %d/%d trial %d", i, st, target, segs, trial)
				l := &lossy{rng: rng, target: target}
				c := &crasher{fn: l.step}
				m := newMemFS(c)
				dir := t.TempDir()
				s, err := Open(dir, crashOpts(m, c))
				if err != nil {
					t.Fatal(err)
				}
				for j := range i {
					if err := runStep(s, steps[j]); err != nil {
						t.Fatalf("%s: step %d: %v", label, j, err)
					}
				}
				l.armed = true
				if err := runStep(s, st); !isCrash(err) {
					t.Fatalf("%s: %v, want the injected crash", label, err)
				}
				s.Close()
				m.crash(crashDrop, rng)
				c2 := &crasher{}
				m.c = c2
				if s, err = Open(dir, crashOpts(m, c2)); err != nil {
					t.Fatalf("%s: recovery: %v", label, err)
				}
				if err := checkState(t, s, dir, &exp[i]); err != nil {
					t.Fatalf("%s (%d effects dropped, %d cut): %v", label, l.dropped, l.halved, err)
				}
				s.Close()
				cases++
				dropped += l.dropped
				halved += l.halved
			}
		}
	}
	t.Logf("%d partial states replayed (%d effects dropped, %d writes cut in all)", cases, dropped, halved)
}

// trace is the operations of step i of a clean run.
func trace(t *testing.T, steps []step, i int) []string {
	c := &crasher{}
	m := newMemFS(c)
	s, err := Open(t.TempDir(), crashOpts(m, c))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for j := range i {
		if err := runStep(s, steps[j]); err != nil {
			t.Fatal(err)
		}
	}
	n := c.n
	if err := runStep(s, steps[i]); err != nil {
		t.Fatal(err)
	}
	return c.trace[n:]
}
