package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// guestSim is a VM's state evolving the way a guest's does: pages written
// (some back to zero), memory grown, globals, stack and devices changed.
type guestSim struct {
	rng     *rand.Rand
	mem     []byte
	dirty   map[uint32]bool
	globals []Global
	stack   []byte
	devices []byte
	addr    uint64
}

func newGuestSim(seed uint64) *guestSim {
	g := &guestSim{rng: rand.New(rand.NewPCG(seed, seed+1)), mem: make([]byte, 2<<20), dirty: map[uint32]bool{}}
	for i := 0; i < 200; i++ { // initial data: a full snapshot's non-zero pages
		g.write()
	}
	g.state(0)
	return g
}

func (g *guestSim) write() {
	p := uint32(g.rng.IntN(len(g.mem) / PageSize))
	d := g.mem[int(p)*PageSize:][:PageSize]
	if g.rng.IntN(10) == 0 {
		clear(d) // freed: the incremental must carry the zero page
	} else {
		fillPage(g.rng, d)
	}
	g.dirty[p] = true
}

func (g *guestSim) state(step int) {
	g.globals = []Global{{0, I32, uint64(g.rng.Uint32())}, {1, I64, g.rng.Uint64()}, {2, F64, g.rng.Uint64()}}
	g.stack = fmt.Appendf(nil, "stack at step %d %x", step, g.rng.Uint64())
	g.addr = uint64(g.rng.IntN(len(g.mem) - len(g.stack)))
	g.devices = fmt.Appendf(nil, `{"step":%d}`, step)
}

func (g *guestSim) step(step int) {
	if g.rng.IntN(4) == 0 {
		g.mem = append(g.mem, make([]byte, WasmPageSize*(1+g.rng.IntN(4)))...)
	}
	for range g.rng.IntN(80) {
		g.write()
	}
	g.state(step)
}

// snapshot takes a snapshot the way a machine would: stage the dirty (or,
// for a full one, non-zero) pages, then encode from the copy.
func (g *guestSim) snapshot(kind Kind, seq uint64, parent Hash, st *Stager) *Snapshot {
	var idx []uint32
	if kind == Full {
		idx = NonZeroPages(g.mem)
	} else {
		for p := range g.dirty {
			idx = append(idx, p)
		}
	}
	clear(g.dirty)
	pages, err := st.Stage(g.mem, idx)
	if err != nil {
		panic(err)
	}
	return &Snapshot{Kind: kind, Module: testModule, Seq: seq, Parent: parent, MemorySize: uint64(len(g.mem)),
		Pages: pages, Globals: g.globals, StackAddr: g.addr, Stack: g.stack, Devices: g.devices,
		Meta: Meta{Created: time.Now(), Host: "test", Reason: fmt.Sprintf("step %d", seq)}}
}

func (g *guestSim) check(t *testing.T, img *Image) {
	t.Helper()
	if !bytes.Equal(img.Memory, g.mem) {
		t.Fatal("memory differs from the guest's")
	}
	if !slices.Equal(img.Globals, g.globals) || !bytes.Equal(img.Stack, g.stack) || img.StackAddr != g.addr ||
		!bytes.Equal(img.Devices, g.devices) {
		t.Fatal("state differs from the guest's")
	}
}

// writeChain simulates steps, writing a full snapshot at step 0 and an
// incremental at each later step; it returns the paths and the guest.
func writeChain(t *testing.T, dir string, seed uint64, module Hash, steps int) ([]string, *guestSim) {
	g := newGuestSim(seed)
	var st Stager
	var paths []string
	var parent Hash
	for i := 0; i <= steps; i++ {
		kind := Incremental
		if i == 0 {
			kind = Full
		} else {
			g.step(i)
		}
		s := g.snapshot(kind, uint64(i), parent, &st)
		s.Module = module
		p := filepath.Join(dir, fmt.Sprintf("%s-%02d.snap", module.Short(), i))
		if err := WriteFileOptions(p, s, Options{BatchPages: 16}); err != nil {
			t.Fatal(err)
		}
		parent = s.ID
		paths = append(paths, p)
	}
	return paths, g
}

func TestChainRestoresLikeAFullSnapshot(t *testing.T) {
	dir := t.TempDir()
	const steps = 25
	paths, g := writeChain(t, dir, 1, testModule, steps)

	img, err := Restore(&testModule, paths...)
	if err != nil {
		t.Fatal(err)
	}
	g.check(t, img)
	if img.Seq != steps {
		t.Fatalf("image at seq %d", img.Seq)
	}

	// a full snapshot taken at the end restores to the same bytes
	var st Stager
	full := g.snapshot(Full, steps, Hash{}, &st)
	fp := filepath.Join(dir, "full.snap")
	if err := WriteFile(fp, full); err != nil {
		t.Fatal(err)
	}
	sum, err := Inspect(fp)
	if err != nil || sum.ID != full.ID.String() || sum.Pages != len(full.Pages) || sum.Kind != "full" {
		t.Fatalf("inspect: %v %+v", err, sum)
	}
	img2, err := Restore(nil, fp)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.Memory, img2.Memory) || !slices.Equal(img.Globals, img2.Globals) ||
		!bytes.Equal(img.Stack, img2.Stack) || !bytes.Equal(img.Devices, img2.Devices) || img.StackAddr != img2.StackAddr {
		t.Fatal("chain and full snapshot restore differently")
	}

	// compaction: the restored image's own full snapshot restores the same
	cs := img.Snapshot(Meta{Reason: "compact"})
	cp := filepath.Join(dir, "compact.snap")
	if err := WriteFile(cp, cs); err != nil {
		t.Fatal(err)
	}
	img3, err := Restore(&testModule, cp)
	if err != nil {
		t.Fatal(err)
	}
	g.check(t, img3)

	// the chain goes on from the compacted snapshot
	g.step(steps + 1)
	next := g.snapshot(Incremental, steps+1, cs.ID, &st)
	np := filepath.Join(dir, "next.snap")
	if err := WriteFile(np, next); err != nil {
		t.Fatal(err)
	}
	img4, err := Restore(nil, cp, np)
	if err != nil {
		t.Fatal(err)
	}
	g.check(t, img4)
}

func TestBrokenChains(t *testing.T) {
	dir := t.TempDir()
	paths, _ := writeChain(t, dir, 2, testModule, 6)
	other := ModuleHash([]byte("another module"))
	otherPaths, _ := writeChain(t, dir, 2, other, 3)

	corrupt := filepath.Join(dir, "corrupt.snap")
	b, err := os.ReadFile(paths[3])
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.snap")
	if err := os.WriteFile(truncated, b[:len(b)-7], 0o600); err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x10
	if err := os.WriteFile(corrupt, b, 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name  string
		paths []string
		want  error
	}{
		{"missing middle", []string{paths[0], paths[1], paths[3], paths[4]}, ErrChain},
		{"wrong order", []string{paths[0], paths[2], paths[1]}, ErrChain},
		{"applied twice", []string{paths[0], paths[1], paths[1]}, ErrChain},
		{"starts with an incremental", paths[1:], ErrChain},
		// Two chains given as one: the second's full snapshot would
		// replace all the first one's state.
		{"a full snapshot mid-chain", []string{paths[0], paths[1], paths[0], paths[1]}, ErrChain},
		{"other module's incremental", []string{paths[0], otherPaths[1]}, ErrModuleMismatch},
		{"other module's chain, expected ours", otherPaths, ErrModuleMismatch},
		{"other module's full after ours", []string{paths[0], otherPaths[0]}, ErrModuleMismatch},
		{"corrupt middle", []string{paths[0], paths[1], paths[2], corrupt}, ErrCorrupt},
		{"truncated middle", []string{paths[0], paths[1], paths[2], truncated, paths[4]}, ErrTruncated},
		{"nothing", nil, ErrChain},
	}
	for _, c := range cases {
		var module *Hash
		if strings.HasPrefix(c.name, "other module's chain") {
			module = &testModule
		}
		img, err := Restore(module, c.paths...)
		if !errors.Is(err, c.want) || img != nil {
			t.Errorf("%s: %v (image %v)", c.name, err, img != nil)
			continue
		}
		t.Logf("%s: %v", c.name, err)
	}
	// the error names the file
	_, err = Restore(nil, paths[0], paths[2])
	if err == nil || !strings.Contains(err.Error(), paths[2]) {
		t.Fatalf("error does not name the file: %v", err)
	}
}

// A refused Apply leaves the image exactly as it was.
func TestApplyIsAllOrNothing(t *testing.T) {
	dir := t.TempDir()
	paths, _ := writeChain(t, dir, 3, testModule, 4)
	img, err := Restore(nil, paths[:2]...)
	if err != nil {
		t.Fatal(err)
	}
	clone := func(i *Image) Image {
		c := *i
		c.Memory = slices.Clone(i.Memory)
		c.Globals = slices.Clone(i.Globals)
		c.Stack = slices.Clone(i.Stack)
		c.Devices = slices.Clone(i.Devices)
		return c
	}
	before := clone(img)
	s3, err := ReadFile(paths[3], nil)
	if err != nil {
		t.Fatal(err)
	}
	bad := []*Snapshot{s3, // skips seq 2
		{Kind: Incremental, Module: testModule, Seq: 2, Parent: img.ID, MemorySize: 64 << 10, ID: Hash{9}}, // shrinks
		{Kind: Incremental, Module: ModuleHash(nil), Seq: 2, Parent: img.ID, MemorySize: 64 << 20, ID: Hash{9}},
		{Kind: Incremental, Module: testModule, Seq: 2, Parent: img.ID, MemorySize: 64 << 20}, // never encoded
		{Kind: Incremental, Module: testModule, Seq: 2, Parent: img.ID, MemorySize: 64 << 20, ID: Hash{9},
			Pages: []Page{{Index: 1, Data: make([]byte, PageSize)}, {Index: 1, Data: make([]byte, PageSize)}}},
	}
	for i, s := range bad {
		err := Apply(img, s)
		if err == nil {
			t.Fatalf("bad snapshot %d applied", i)
		}
		t.Logf("%d: %v", i, err)
		after := clone(img)
		if !bytes.Equal(before.Memory, after.Memory) || before.ID != after.ID || before.Seq != after.Seq ||
			!slices.Equal(before.Globals, after.Globals) || !bytes.Equal(before.Devices, after.Devices) {
			t.Fatalf("refused snapshot %d changed the image", i)
		}
	}
}

func TestWriteFileIsAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "vm.snap")
	rng := rand.New(rand.NewPCG(17, 18))
	a := testSnapshot(rng, Full, 1<<20, 30)
	if err := WriteFile(p, a); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	// a failed write leaves the old file and no temporary behind
	bad := testSnapshot(rng, Full, 1<<20, 30)
	bad.Pages[0], bad.Pages[1] = bad.Pages[1], bad.Pages[0]
	if err := WriteFile(p, bad); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), p) {
		t.Fatalf("invalid snapshot written: %v", err)
	}
	got, err := ReadFile(p, &testModule)
	if err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, got, a)
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries", len(entries))
	}
	// overwrite
	b := testSnapshot(rng, Full, 2<<20, 40)
	if err := WriteFile(p, b); err != nil {
		t.Fatal(err)
	}
	if got, err = ReadFile(p, nil); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, got, b)
	// trailing bytes in a file
	f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte("x"))
	f.Close()
	if _, err := ReadFile(p, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte: %v", err)
	}
	if _, err := ReadFile(filepath.Join(dir, "missing"), nil); !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := WriteFile(filepath.Join(dir, "no", "such", "dir"), a); err == nil {
		t.Fatal("wrote into a missing directory")
	}
}

// TestPrepareAhead: an image with Resize (a Remus backup's) may have the
// incremental snapshots of its chain prepared before the earlier ones'
// pages are copied in, so that each is checked and acknowledged at once;
// with the copies run in order afterwards, the image is the guest's. Its
// memory grows across them, and pages the copies write past a growth read
// as zeros until then.
func TestPrepareAhead(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		dir := t.TempDir()
		paths, g := writeChain(t, dir, seed, testModule, 8)
		reservation := make([]byte, 64<<20)
		size := 0
		img := &Image{Resize: func(n int, fresh bool) []byte {
			if n > len(reservation) {
				return nil
			}
			if fresh {
				clear(reservation[:size])
			}
			size = n
			return reservation[:n:n]
		}}
		var pending []func()
		for i, p := range paths {
			s, err := ReadFile(p, nil)
			if err != nil {
				t.Fatal(err)
			}
			finish, err := Prepare(img, s)
			if err != nil {
				t.Fatalf("seed %d: preparing snapshot %d with %d copies pending: %v", seed, i, len(pending), err)
			}
			if img.Seq != s.Seq || img.ID != s.ID {
				t.Fatalf("seed %d: after preparing %d the image is at seq %d", seed, i, img.Seq)
			}
			pending = append(pending, finish)
			if i == 0 {
				// The full snapshot's copy first: the next ones may
				// not be prepared before it (it discards the memory).
				pending[0]()
				pending = pending[:0]
			}
		}
		for _, f := range pending {
			f()
		}
		g.check(t, img)
	}
}
