package machine

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/snapshot"
)

// TestIncrementalChain snapshots a running guest that keeps dirtying pages:
// one full snapshot, then incrementals of only the pages the kernel saw
// written (the guest dirties a page every 100 µs, so each incremental is
// small). After each, the chain restores to exactly the memory, globals
// and stack captured in the same pause, and to the same image as a full
// snapshot taken in that pause; incrementals are a small fraction of a full
// one. Finally a VM restored from the whole chain runs to the end and
// prints what an uninterrupted run prints.
func TestIncrementalChain(t *testing.T) {
	mod := dirtierModule(t)
	args := []string{"64", "1", "4000", "100"}
	ctx := context.Background()
	var ref bytes.Buffer
	if code, err := Run(ctx, Config{Module: mod, Name: "dirtier", Args: args, Stdout: &ref, Stderr: &ref,
		CacheDir: t.TempDir()}); err != nil || code != 0 {
		t.Fatalf("uninterrupted: %d %v %s", code, err, ref.String())
	}

	var out bytes.Buffer
	m, err := New(ctx, Config{Module: mod, Name: "dirtier", Args: args, Stdout: &out, Stderr: &out,
		CacheDir: t.TempDir(), Instrument: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(ctx)
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()

	// Start the chain once the guest has its 64 MiB: the incrementals are
	// then checked to be small next to the full snapshot.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		var size int
		if err := m.WithPaused(ctx, func(p *Paused) error { size = len(p.Memory()); return nil }); err != nil {
			t.Fatal(err)
		}
		if size >= 64<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's memory is still %d bytes", size)
		}
	}
	dir := t.TempDir()
	hash := snapshot.ModuleHash(mod)
	var chain []string
	var fullPages, incPages int
	for i := 0; i < 6; i++ {
		path := filepath.Join(dir, fmt.Sprintf("%d.snap", i))
		fullPath := filepath.Join(dir, fmt.Sprintf("full-%d.snap", i))
		err := m.WithPaused(ctx, func(p *Paused) error {
			s, err := m.capturePaused(p, SnapshotOptions{Incremental: i > 0})
			if err != nil {
				return err
			}
			if err := snapshot.WriteFile(path, s); err != nil {
				return err
			}
			m.snaps.lastID, m.snaps.seq = s.ID, s.Seq
			t.Logf("snapshot %d: %v, %d pages", i, s.Kind, len(s.Pages))
			if i == 0 {
				fullPages = len(s.Pages)
			} else if s.Kind != snapshot.Incremental || len(s.Pages) > fullPages/4 {
				t.Errorf("snapshot %d: %v with %d pages (full: %d)", i, s.Kind, len(s.Pages), fullPages)
			} else {
				// One may hold none: on a busy machine the guest may not
				// have run in the millisecond between two pauses.
				incPages += len(s.Pages)
			}
			// A full snapshot in the same pause, for comparison.
			f := &snapshot.Snapshot{Kind: snapshot.Full, Module: s.Module, MemorySize: s.MemorySize,
				Globals: s.Globals, StackAddr: s.StackAddr, Stack: s.Stack, Devices: s.Devices}
			for _, x := range snapshot.NonZeroPages(p.Memory()) {
				f.Pages = append(f.Pages, snapshot.Page{Index: x, Data: p.Memory()[int(x)*4096 : int(x+1)*4096]})
			}
			if err := snapshot.WriteFile(fullPath, f); err != nil {
				return err
			}
			// Restore the chain so far while the guest stays paused, so
			// that the next incremental holds only the next millisecond.
			img, err := snapshot.Restore(&hash, append(chain, path)...)
			if err != nil {
				return err
			}
			whole, err := snapshot.Restore(&hash, fullPath)
			if err != nil {
				return err
			}
			_, blob := p.Stack()
			if !bytes.Equal(img.Memory, p.Memory()) || !bytes.Equal(whole.Memory, p.Memory()) {
				t.Errorf("step %d: restored memory differs from the live memory", i)
			}
			if !slices.Equal(img.Globals, p.Globals()) || !bytes.Equal(img.Stack, blob) || !bytes.Equal(img.Devices, whole.Devices) {
				t.Errorf("step %d: restored globals, stack or devices differ", i)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, path)
		time.Sleep(time.Millisecond) // let the guest dirty some more pages
	}
	if incPages == 0 {
		t.Errorf("the 5 incrementals hold no page: the guest's writes were not seen")
	}
	// Stop the original; continue from the chain in a new VM.
	if err := m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != ErrStopped {
		t.Fatalf("original ended with %v", err)
	}
	img, err := snapshot.Restore(&hash, chain...)
	if err != nil {
		t.Fatal(err)
	}
	var rest bytes.Buffer
	code, err := Run(ctx, Config{Module: mod, Name: "dirtier", Restore: img, Stdout: &rest, Stderr: &rest,
		CacheDir: t.TempDir()})
	if err != nil || code != 0 {
		t.Fatalf("restored: %d %v %s", code, err, rest.String())
	}
	if got := out.String() + rest.String(); got != ref.String() {
		t.Errorf("output %q, uninterrupted %q", got, ref.String())
	}
	if !strings.HasSuffix(ref.String(), "\n") {
		t.Errorf("reference output %q", ref.String())
	}

	// Once more the way a Remus backup fails over: the chain applied into
	// a MemoryImage, the module prepared in advance, the pages taken
	// over by the VM instead of copied.
	mi, err := NewMemoryImage(0)
	if err != nil {
		t.Fatal(err)
	}
	defer mi.Close()
	kept := &snapshot.Image{Resize: mi.Resize}
	for _, p := range chain {
		s, err := snapshot.ReadFile(p, &hash)
		if err != nil {
			t.Fatal(err)
		}
		if err := snapshot.Apply(kept, s); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(kept.Memory, img.Memory) {
		t.Fatal("memory applied into the MemoryImage differs from the restored image")
	}
	prog, err := Prepare(ctx, Config{Module: mod, Name: "dirtier", Instrument: true, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	// A restore refused by a check leaves the image whole, for another
	// try (it was taken over before the checks: its memory then unmapped).
	globals := kept.Globals
	kept.Globals = globals[1:]
	if _, err := Run(ctx, Config{Program: prog, Restore: kept, RestoreMemory: mi, Stdout: io.Discard, Stderr: io.Discard}); err == nil ||
		!strings.Contains(err.Error(), "lacks mutable global") {
		t.Fatalf("a state without a global: %v", err)
	}
	kept.Globals = globals
	if !bytes.Equal(kept.Memory, img.Memory) {
		t.Fatal("a refused restore spent the memory image")
	}
	// (The refused VM owned the program: a new one.)
	if prog, err = Prepare(ctx, Config{Module: mod, Name: "dirtier", Instrument: true, CacheDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	var adopted bytes.Buffer
	code, err = Run(ctx, Config{Program: prog, Restore: kept, RestoreMemory: mi, Stdout: &adopted, Stderr: &adopted})
	if err != nil || code != 0 {
		t.Fatalf("restored from the memory image: %d %v %s", code, err, adopted.String())
	}
	if got := out.String() + adopted.String(); got != ref.String() {
		t.Errorf("output after taking the memory image over %q, uninterrupted %q", got, ref.String())
	}
	if mi.Bytes() != nil {
		t.Error("the memory image still has memory after the VM took it over")
	}
}

// TestScratchRegionSurvivesPauses: a guest that writes to the region the
// machine borrows for Asyncify's stack, between host calls, finds its bytes
// intact however often it is paused (the machine refreshes its copy of the
// region by the pages written since the last pause). Three ways of
// collecting: as a snapshot does (re-armed in the pause); as Remus's
// primary does (re-armed after the guest runs again, so the guest writes
// pages before they are protected: the copy must still learn of them);
// and as its primary does for a guest that writes many pages an epoch
// (most collected ahead of the pause and protected again while the guest
// runs: written all the same since the last pause).
func TestScratchRegionSurvivesPauses(t *testing.T) {
	wasm := guest.MustC(t, "scratchtop", []string{"testdata/guests/scratchtop/scratchtop.c"})
	mod, err := os.ReadFile(wasm)
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"collect", "deferred", "ahead"} {
		t.Run(mode, func(t *testing.T) {
			deferred := mode != "collect"
			ctx := context.Background()
			var out bytes.Buffer
			// The guest would run for a very long time: it is paused until
			// it has been paused often enough, then stopped. It exits by
			// itself (code 1) only if it finds a byte changed.
			m, err := New(ctx, Config{Module: mod, Name: "scratchtop", Args: []string{"2000000000"}, Stdout: &out, Stderr: &out,
				CacheDir: t.TempDir(), Instrument: true})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close(ctx)
			done := make(chan struct{})
			go func() { m.Run(ctx); close(done) }()
			pauses := 0
			var pages []uint32
			copies := map[uint32][]byte{}
			rng := rand.New(rand.NewPCG(7, uint64(len(wasm))))
			deadline := time.Now().Add(time.Minute)
			for pauses < 1000 && time.Now().Before(deadline) {
				select {
				case <-done:
					t.Fatalf("the guest ended after %d pauses: %s", pauses, out.String())
				default:
				}
				if mode == "ahead" {
					// As Remus's sender for a busy guest: after the guest ran
					// a little, take what it wrote, while it runs.
					time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
					if _, _, err := m.CollectAhead(nil, func([]byte, []uint32) error { return nil }); err != nil {
						t.Fatal(err)
					}
				}
				var gen uint64
				err := m.WithPaused(ctx, func(p *Paused) error {
					var err error
					if !deferred {
						// Collect as a checkpoint does, so the tracker re-arms.
						pages, err = p.DirtyPages(pages[:0])
						return err
					}
					if pages, gen, err = p.DirtyPagesDeferred(pages[:0]); err != nil {
						return err
					}
					clear(copies)
					mem := p.Memory()
					for _, i := range pages {
						copies[i] = bytes.Clone(mem[int(i)*dirty.PageSize : int(i+1)*dirty.PageSize])
					}
					return nil
				})
				if err != nil {
					continue
				}
				pauses++
				if deferred {
					// As Remus's sender: after the guest ran a little.
					time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
					if err := m.RearmDirty(gen, func(i uint32) []byte { return copies[i] }); err != nil {
						select {
						case <-done:
							t.Fatalf("the guest ended after %d pauses: %s", pauses, out.String())
						case <-time.After(time.Second):
							t.Fatal(err)
						}
					}
				}
			}
			if err := m.WithPaused(ctx, func(p *Paused) error { p.Stop(); return nil }); err != nil {
				t.Fatal(err)
			}
			<-done
			if strings.Contains(out.String(), "wrote") || pauses < 1000 {
				t.Fatalf("output %q after %d pauses", out.String(), pauses)
			}
			t.Logf("%d pauses, the scratch region's bytes intact", pauses)
		})
	}
}

// TestIncrementalSnapshotsOfRestoredStreamedVM: a VM restored from a full
// snapshot, whose pages a checkpoint stream collects too (a Remus primary
// restored from a snapshot), takes incremental snapshots through Snapshot
// (pages collected ahead, while it runs, then in the pause). Every page
// the stream collected before the first of them is in it: the chain from
// the restored snapshot, continued in a new VM, prints what an
// uninterrupted run prints (the guest's checksum of its whole memory).
func TestIncrementalSnapshotsOfRestoredStreamedVM(t *testing.T) {
	mod := dirtierModule(t)
	args := []string{"8", "300", "600", "1000"}
	ctx := context.Background()
	cache := t.TempDir()
	var ref bytes.Buffer
	if code, err := Run(ctx, Config{Module: mod, Name: "dirtier", Args: args, Stdout: &ref, Stderr: &ref,
		CacheDir: cache}); err != nil || code != 0 {
		t.Fatalf("uninterrupted: %d %v %s", code, err, ref.String())
	}
	hash := snapshot.ModuleHash(mod)
	dir := t.TempDir()
	run := func(cfg Config) (*Machine, chan error) {
		t.Helper()
		cfg.Module, cfg.Name, cfg.Stdout, cfg.Stderr, cfg.CacheDir, cfg.Instrument = mod, "dirtier", io.Discard, io.Discard, cache, true
		m, err := New(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close(ctx) })
		done := make(chan error, 1)
		go func() { _, err := m.Run(ctx); done <- err }()
		return m, done
	}
	m1, done1 := run(Config{Args: args})
	time.Sleep(100 * time.Millisecond)
	chain := []string{filepath.Join(dir, "0.snap")}
	if _, err := m1.Snapshot(ctx, chain[0], SnapshotOptions{Stop: true}); err != nil {
		t.Fatal(err)
	}
	if err := <-done1; err != ErrStopped {
		t.Fatalf("first VM ended with %v", err)
	}
	img, err := snapshot.Restore(&hash, chain...)
	if err != nil {
		t.Fatal(err)
	}
	m2, done2 := run(Config{Restore: img})
	stream := func() {
		t.Helper()
		var gen uint64
		var staged []snapshot.Page
		var st snapshot.Stager
		if err := m2.WithPaused(ctx, func(p *Paused) error {
			pages, g, err := p.DirtyPagesDeferred(nil)
			if err != nil {
				return err
			}
			gen = g
			staged, err = st.Stage(p.Memory(), pages)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if err := m2.RearmDirty(gen, func(i uint32) []byte { return snapshot.PageData(staged, i) }); err != nil {
			t.Fatal(err)
		}
	}
	ahead := 0
	for i := 1; i <= 3; i++ {
		for range 4 {
			time.Sleep(5 * time.Millisecond)
			stream()
		}
		time.Sleep(10 * time.Millisecond)
		path := filepath.Join(dir, fmt.Sprintf("%d.snap", i))
		// What Snapshot does, with the chain checked against the live
		// memory in the same pause.
		opt := SnapshotOptions{Incremental: true}
		m2.snaps.mu.Lock()
		m2.stageAhead(opt)
		before := m2.snaps.stager.Len()
		err := m2.WithPaused(ctx, func(p *Paused) error {
			s, err := m2.capturePaused(p, opt)
			if err != nil {
				return err
			}
			if s.Kind != snapshot.Incremental {
				return fmt.Errorf("snapshot %d is %v", i, s.Kind)
			}
			if err := snapshot.WriteFile(path, s); err != nil {
				return err
			}
			m2.snaps.lastID, m2.snaps.seq = s.ID, s.Seq
			img, err := snapshot.Restore(&hash, append(chain, path)...)
			if err != nil {
				return err
			}
			if !bytes.Equal(img.Memory, p.Memory()) {
				for o := 0; o < len(img.Memory); o += 4096 {
					if !bytes.Equal(img.Memory[o:o+4096], p.Memory()[o:o+4096]) {
						return fmt.Errorf("snapshot %d: the chain's page %d differs from the live memory", i, o/4096)
					}
				}
			}
			if i == 3 {
				p.Stop()
			}
			return nil
		})
		m2.snaps.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		ahead += before
		chain = append(chain, path)
	}
	if err := <-done2; err != ErrStopped {
		t.Fatalf("restored VM ended with %v", err)
	}
	if img, err = snapshot.Restore(&hash, chain...); err != nil {
		t.Fatal(err)
	}
	var rest bytes.Buffer
	if code, err := Run(ctx, Config{Module: mod, Name: "dirtier", Restore: img, Stdout: &rest, Stderr: &rest,
		CacheDir: cache}); err != nil || code != 0 {
		t.Fatalf("restored from the chain: %d %v %s", code, err, rest.String())
	}
	if rest.String() != ref.String() {
		t.Fatalf("the chain's VM printed %q, an uninterrupted run %q", rest.String(), ref.String())
	}
	if ahead == 0 {
		t.Fatal("no page of the incrementals was copied ahead of their pauses")
	}
}
