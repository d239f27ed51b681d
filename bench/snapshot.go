package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/machine/dirty"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

// runSnapshot measures what checkpointing costs: how long the guest is
// stopped per checkpoint against the number of dirty pages (next to the
// memcpy of the same pages, the floor), how long a restore takes, and what
// dirty-page tracking costs.
func runSnapshot(ctx context.Context, e *env) (string, error) {
	wasm, err := guest.C("dirtier", []string{"testdata/guests/dirtier/dirtier.c"})
	if err != nil {
		return "", err
	}
	mod, err := os.ReadFile(wasm)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	if err := benchPause(ctx, e, mod, &b); err != nil {
		return "", err
	}
	if err := benchRestore(ctx, e, mod, &b); err != nil {
		return "", err
	}
	benchTracking(e, &b)
	return b.String(), nil
}

// benchPause: the dirtier guest (256 MiB, N pages written per round, one
// round per 20 ms) is checkpointed every ~25 ms as a Remus epoch would be:
// pause, collect dirty pages, copy them to a staging buffer, capture
// globals, stack and devices, resume. The pause is the guest's stopped
// time, from the start of the unwind to the end of the rewind.
func benchPause(ctx context.Context, e *env, mod []byte, b *strings.Builder) error {
	counts := []int{0, 100, 1000, 10000}
	pauses := 40
	if e.quick {
		counts, pauses = []int{0, 1000}, 8
	}
	fmt.Fprintf(b, "### Checkpoint pause vs dirty pages\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot`. Guest: testdata/guests/dirtier (C, 256 MiB of memory, "+
		"writes N random pages, then sleeps 20 ms), instrumented. Every ~25 ms the harness pauses it and takes what a "+
		"checkpoint needs (collect dirty pages from the kernel tracker, copy them into a staging buffer, globals, "+
		"stack, device state), then resumes it; %d pauses per row. **Pause** = the guest's stopped time, unwind to "+
		"end of rewind. **Floor** = copying the same number of 4 KiB pages from a 256 MiB buffer (memcpy), measured "+
		"in the same run. Each pause also copies the 256 KiB scratch region back and forth (64 pages).\n\n", pauses)
	fmt.Fprintf(b, "| pages written per round | dirty pages per pause (median) | pause p50 | pause p99 | memcpy floor p50 | p99 ÷ (2×floor + 200 µs) |\n|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range counts {
		m, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier",
			Args: []string{"256", fmt.Sprint(n), "0", "20000"}, Stdout: io.Discard, Stderr: io.Discard,
			Stdin: strings.NewReader(""), CacheDir: filepath.Join(e.cache, "ftvm-compiled"), Instrument: true})
		if err != nil {
			return err
		}
		runCtx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); m.Run(runCtx) }()
		var stager snapshot.Stager
		var idx []uint32
		var dirtyCounts sample
		time.Sleep(300 * time.Millisecond) // let it allocate and touch its memory
		m.WithPaused(ctx, func(p *machine.Paused) error { idx, _ = p.DirtyPages(idx[:0]); return nil })
		before := m.PauseStats().Count
		for i := 0; i < pauses; i++ {
			time.Sleep(25 * time.Millisecond)
			err := m.WithPaused(ctx, func(p *machine.Paused) error {
				var err error
				if idx, err = p.DirtyPages(idx[:0]); err != nil {
					return err
				}
				if _, err := stager.Stage(p.Memory(), idx); err != nil {
					return err
				}
				_ = p.Globals()
				_, _ = p.Stack()
				_ = p.Devices()
				dirtyCounts = append(dirtyCounts, float64(len(idx)))
				return nil
			})
			if err != nil {
				cancel()
				wg.Wait()
				m.Close(ctx)
				return err
			}
		}
		time.Sleep(5 * time.Millisecond)
		ps := m.PauseStats()
		cancel()
		m.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
		wg.Wait()
		m.Close(ctx)
		var pause sample
		for _, d := range ps.Recent[len(ps.Recent)-int(ps.Count-before):] {
			pause = append(pause, float64(d.Nanoseconds()))
		}
		dn := int(dirtyCounts.median())
		floor := memcpyFloor(dn, 200)
		p99 := pause.quantile(0.99)
		fmt.Fprintf(b, "| %d | %d | %s | %s | %s | %.2f |\n", n, dn, fmtNsDur(pause.median()), fmtNsDur(p99),
			fmtNsDur(floor), p99/(2*floor+200e3))
		if n == 1000 {
			e.summarize("Checkpoint pause at ~%d dirty pages: p50 %s, p99 %s (memcpy floor %s; target p99 ≤ 2×floor + 200 µs = %s).",
				dn, fmtNsDur(pause.median()), fmtNsDur(p99), fmtNsDur(floor), fmtNsDur(2*floor+200e3))
		}
	}
	b.WriteString("\n")
	return nil
}

// memcpyFloor is the median time to copy n random 4 KiB pages out of a 256 MiB
// buffer into a staging buffer.
func memcpyFloor(n, reps int) float64 {
	src := make([]byte, 256<<20)
	for i := 0; i < len(src); i += 4096 {
		src[i] = byte(i)
	}
	dst := make([]byte, max(n, 1)*4096)
	var s sample
	for r := 0; r < reps; r++ {
		idx := make([]int, n)
		for i := range idx {
			idx[i] = rand.IntN(len(src) / 4096)
		}
		t0 := time.Now()
		for i, x := range idx {
			copy(dst[i*4096:(i+1)*4096], src[x*4096:])
		}
		s = append(s, float64(time.Since(t0).Nanoseconds()))
	}
	return s.median()
}

// benchRestore: a full snapshot of the dirtier with every page of its memory
// written is restored into a new VM; the time runs until the guest's first
// host call after the restore.
func benchRestore(ctx context.Context, e *env, mod []byte, b *strings.Builder) error {
	sizes := []int{64, 1024}
	reps := 5
	if e.quick {
		sizes, reps = []int{64}, 2
	}
	fmt.Fprintf(b, "### Restore time\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot`. A full snapshot of testdata/guests/dirtier with every page of "+
		"its memory written (the worst case: nothing is zero) is written to disk, then restored %d times. **Read** = "+
		"decoding the file (checksums, S2 decompression) into a memory image; **VM** = `machine.New` with the compiled "+
		"code in the cache plus instantiation, copying the image into linear memory and rewinding, until the guest's "+
		"first host call; **cold compile** = the same `machine.New` with an empty compilation cache (reported "+
		"separately). Floor: memcpy of the whole memory.\n\n", reps)
	fmt.Fprintf(b, "**Adopted** = what a Remus backup does at failover: the memory image already in memory (in a "+
		"`machine.MemoryImage`), the module prepared (`machine.Prepare`) in advance, the VM taking the pages over "+
		"with mremap(2) instead of copying them; timed from `machine.New` to the guest's first host call.\n\n")
	fmt.Fprintf(b, "| memory | file | read p50 | VM p50 | read + VM p50 | adopted p50 | memcpy floor | cold compile |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, mib := range sizes {
		path := filepath.Join(e.work, fmt.Sprintf("restore-%d.snap", mib))
		m, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier",
			Args: []string{fmt.Sprint(mib - 1), "1", "0", "1000"}, Stdout: io.Discard, Stderr: io.Discard,
			Stdin: strings.NewReader(""), CacheDir: filepath.Join(e.cache, "ftvm-compiled"), Instrument: true})
		if err != nil {
			return err
		}
		done := make(chan struct{})
		go func() { m.Run(ctx); close(done) }()
		time.Sleep(time.Duration(mib) * time.Millisecond) // it touches every page first
		if _, err := m.Snapshot(ctx, path, machine.SnapshotOptions{Stop: true, Reason: "bench"}); err != nil {
			m.Close(ctx)
			return err
		}
		<-done
		m.Close(ctx)
		fi, _ := os.Stat(path)
		hash := snapshot.ModuleHash(mod)
		var read, vm, adopt sample
		var memBytes int
		for r := 0; r < reps; r++ {
			t0 := time.Now()
			img, err := snapshot.Restore(&hash, path)
			if err != nil {
				return err
			}
			tRead := time.Since(t0)
			memBytes = len(img.Memory)
			first := &firstInput{at: make(chan time.Time, 1)}
			t1 := time.Now()
			rm, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier", Restore: img, Stdout: io.Discard,
				Stderr: io.Discard, Stdin: strings.NewReader(""), CacheDir: filepath.Join(e.cache, "ftvm-compiled"), Tap: first})
			if err != nil {
				return err
			}
			rdone := make(chan struct{})
			go func() { rm.Run(ctx); close(rdone) }()
			tVM := (<-first.at).Sub(t1)
			rm.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
			<-rdone
			rm.Close(ctx)
			read = append(read, float64(tRead.Nanoseconds()))
			vm = append(vm, float64(tVM.Nanoseconds()))

			// The failover path: image in a MemoryImage, program prepared.
			mi, err := machine.NewMemoryImage(0)
			if err != nil {
				return err
			}
			aimg := &snapshot.Image{Resize: mi.Resize}
			if err := snapshot.RestoreInto(aimg, &hash, path); err != nil {
				mi.Close()
				return err
			}
			prog, err := machine.Prepare(ctx, machine.Config{Module: mod, Name: "dirtier", Instrument: true,
				CacheDir: filepath.Join(e.cache, "ftvm-compiled")})
			if err != nil {
				mi.Close()
				return err
			}
			afirst := &firstInput{at: make(chan time.Time, 1)}
			t2 := time.Now()
			am, err := machine.New(ctx, machine.Config{Program: prog, Restore: aimg, RestoreMemory: mi, Stdout: io.Discard,
				Stderr: io.Discard, Stdin: strings.NewReader(""), Tap: afirst})
			if err != nil {
				mi.Close()
				return err
			}
			adone := make(chan struct{})
			go func() { am.Run(ctx); close(adone) }()
			tAdopt := (<-afirst.at).Sub(t2)
			am.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
			<-adone
			am.Close(ctx)
			mi.Close()
			adopt = append(adopt, float64(tAdopt.Nanoseconds()))
		}
		// Cold compile: an empty cache.
		t0 := time.Now()
		cm, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier", Stdout: io.Discard, Stderr: io.Discard,
			CacheDir: filepath.Join(e.work, fmt.Sprintf("cold-%d", mib)), Instrument: true})
		if err != nil {
			return err
		}
		cold := time.Since(t0)
		cm.Close(ctx)
		floor := memcpyWhole(memBytes)
		fmt.Fprintf(b, "| %d MiB | %.1f MiB | %s | %s | %s | %s | %s | %s |\n", mib, float64(fi.Size())/(1<<20),
			fmtNsDur(read.median()), fmtNsDur(vm.median()), fmtNsDur(read.median()+vm.median()), fmtNsDur(adopt.median()),
			fmtNsDur(floor), fmtDur(cold))
		if mib == 64 {
			e.summarize("Restore of a 64 MiB VM (every page written): from a file, reading the snapshot %s + restoring "+
				"the VM %s; from a memory image kept in memory with the module prepared (a Remus backup's failover) %s "+
				"(target < 10 ms; memcpy floor %s).",
				fmtNsDur(read.median()), fmtNsDur(vm.median()), fmtNsDur(adopt.median()), fmtNsDur(floor))
		}
	}
	b.WriteString("\nFrom a file, reading is checksumming and decompressing every page, and `ftvm restore` now " +
		"decodes straight into a memory image the VM takes over (no second copy). Restoring from a file in " +
		"Firecracker-class time (< 10 ms for 64 MiB) would need an uncompressed, page-aligned memory file mapped " +
		"copy-on-write into the guest's reservation: not done yet. The adopted column is the Remus failover path.\n\n")
	return nil
}

// firstInput is an input tap that reports the time of the first input.
type firstInput struct {
	once sync.Once
	at   chan time.Time
}

func (f *firstInput) Input(wasi.Input) {
	f.once.Do(func() { f.at <- time.Now() })
}

func memcpyWhole(n int) float64 {
	src := bytes.Repeat([]byte{1}, n)
	dst := make([]byte, n)
	var s sample
	for r := 0; r < 5; r++ {
		t0 := time.Now()
		copy(dst, src)
		s = append(s, float64(time.Since(t0).Nanoseconds()))
	}
	return s.median()
}

// benchTracking compares Collect on the kernel tracker and on the hash
// fallback for 64 MiB and 1 GiB regions.
func benchTracking(e *env, b *strings.Builder) {
	fmt.Fprintf(b, "### Dirty-page tracking: userfaultfd write-protect vs page hashing\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot` (finer figures: `go test -bench . ./machine/dirty/`). "+
		"A region of the given size, fully written, then N random pages written; **Collect** = the time to learn "+
		"which pages were written (and re-arm). Write cost = a store to an already-populated page after re-arming.\n\n")
	fmt.Fprintf(b, "| region | dirty pages | uffd-wp Collect | hash Collect | hash ÷ uffd |\n|---:|---:|---:|---:|---:|\n")
	sizes := []int{64, 1024}
	if e.quick {
		sizes = []int{64}
	}
	for _, mib := range sizes {
		for _, n := range []int{0, 1000, 10000} {
			var res [2]float64
			for k, force := range []bool{false, true} {
				res[k] = collectTime(mib, n, force)
			}
			fmt.Fprintf(b, "| %d MiB | %d | %s | %s | ×%.0f |\n", mib, n, fmtNsDur(res[0]), fmtNsDur(res[1]), res[1]/res[0])
		}
	}
	wr := writeCost()
	fmt.Fprintf(b, "\nFirst write to a page after re-arming, uffd-wp: %s per page (the fault the kernel resolves); the hash fallback costs nothing on writes.\n\n", fmtNsDur(wr))
}

func collectTime(mib, n int, forceHash bool) float64 {
	size := mib << 20
	region, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return 0
	}
	defer unix.Munmap(region)
	for i := 0; i < size; i += 4096 {
		region[i] = 1
	}
	t, err := dirty.New(region, dirty.Options{Used: uint64(size), ForceHash: forceHash})
	if err != nil {
		return 0
	}
	defer t.Close()
	var idx []uint32
	idx, _ = t.Collect(idx[:0], uint64(size))
	var s sample
	for r := 0; r < 5; r++ {
		for i := 0; i < n; i++ {
			region[rand.IntN(size/4096)*4096+8]++
		}
		t0 := time.Now()
		idx, _ = t.Collect(idx[:0], uint64(size))
		s = append(s, float64(time.Since(t0).Nanoseconds()))
	}
	return s.median()
}

func writeCost() float64 {
	const pages = 4096
	region, err := unix.Mmap(-1, 0, pages*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0
	}
	defer unix.Munmap(region)
	for i := 0; i < len(region); i += 4096 {
		region[i] = 1
	}
	t, err := dirty.New(region, dirty.Options{Used: uint64(len(region))})
	if err != nil || t.Kind() != dirty.KindUffd {
		return 0
	}
	defer t.Close()
	t.Collect(nil, uint64(len(region)))
	t0 := time.Now()
	for i := 0; i < len(region); i += 4096 {
		region[i+1]++
	}
	return float64(time.Since(t0).Nanoseconds()) / pages
}

// fmtNsDur formats a duration given in nanoseconds.
func fmtNsDur(ns float64) string { return fmtSeconds(ns / 1e9) }
