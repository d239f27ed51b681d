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
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/internal/sysmon"
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
	// The pauses below run in this process: its Go runtime monitor is
	// relaxed as ftvm's own is (cmd/ftvm, FTVM_SYSMON_SLACK), else its
	// wake-ups every 20 µs preempt pauses that ftvm's would not. The
	// groups before this one (CPU, calls, KV) compare in-process guests
	// with wazero's and so leave it alone; the Remus group after it runs
	// ftvm processes.
	sysmon.Relax(0)
	var b strings.Builder
	if err := benchPause(ctx, e, mod, &b); err != nil {
		return "", err
	}
	if err := benchIncremental(ctx, e, mod, &b); err != nil {
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
	mems := []int{64, 256} // MiB
	pauses := 200
	if e.quick {
		counts, mems, pauses = []int{0, 1000}, []int{256}, 8
	}
	fmt.Fprintf(b, "### Checkpoint pause vs dirty pages\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot`. Guest: testdata/guests/dirtier (C, 64 or 256 MiB of memory, "+
		"writes N random pages, then sleeps 20 ms), instrumented. Every ~25 ms the harness walks the memory's page tables "+
		"while the guest runs (`Machine.WarmDirty`, as Remus's primary and the snapshotter do before asking for a pause, "+
		"so that the walk in the pause finds them cached), then pauses it and takes what a "+
		"checkpoint needs (collect dirty pages from the kernel tracker, copy them into a staging buffer, globals, "+
		"stack, device state), then resumes it, and then, while it runs, re-arms tracking for the pages it copied "+
		"(`machine.Paused.DirtyPagesDeferred`, `Machine.RearmDirty`, as Remus's sender does) and tops up the staging "+
		"memory for the next pause (`snapshot.StagePool.Refill`, as the snapshotter and Remus do); %d pauses per row, "+
		"after a first one that stages every non-zero page, as the full snapshot or checkpoint that starts a chain does. **Pause** = the guest's stopped time, unwind to "+
		"end of rewind. **Floor** = copying the same number of 4 KiB pages from a 256 MiB buffer (memcpy), measured "+
		"in the same run. The harness's process relaxes the Go runtime's monitor as `ftvm` does (`FTVM_SYSMON_SLACK`). "+
		"Each pause also borrows the top 256 KiB of the guest's memory for the unwound stack: it "+
		"saves the pages of it written since the last pause (usually one or two) and puts back what the unwind "+
		"overwrote; the tracker keeps the pages the stack uses writable and compares them by content "+
		"(`dirty.Keeper`), so that writing them never faults. Much of a pause with few pages is the walk of the memory's page tables (`PAGEMAP_SCAN`), which "+
		"reads every entry of the memory however few pages were written, so the pause's floor grows with the memory's "+
		"size, which is why both sizes are here. The memory is in transparent huge pages (`MADV_HUGEPAGE`, "+
		"README, \"Dirty tracking\"): a write to a write-protected one splits it into 4 KiB entries, so tracking "+
		"stays per 4 KiB, and one nobody wrote since it was protected is a single entry to the walk instead of 512 "+
		"(the rows with few pages written keep most of theirs; with 100 or more random pages a round every one is "+
		"split after a few rounds).\n\n", pauses)
	fmt.Fprintf(b, "**Walk alone** = the same walk with nothing else: a region of the memory's size, every page in use, "+
		"tracked the same way; before each of %d collections one page is written, then 5 ms pass and the tables are "+
		"walked once (`Warm`), as in the rows' pauses; p50/p99 of the collection (`Collect`) alone, measured in this run: "+
		"the part of an empty pause no copying removes. In huge pages as the guest's memory is, and the same page written "+
		"each time, as the dirtier's own few pages are at N = 0 (**split** = the same in 4 KiB pages, every huge page "+
		"split: the walk when every part of the memory has been written since the start).\n\n", pauses)
	fmt.Fprintf(b, "**Through the kernel** = the share of the rows' copied pages that the stager read with process_vm_readv instead of memcpy "+
		"(`snapshot.KernelCopiedPages`): on this VM, reading pages the tracker write-protected inside transparent huge pages "+
		"turns 15-20 times slower in stretches, and the stager, timing its copy every 16 pages, takes the kernel's road while it lasts "+
		"(README, \"The pause\"'s copy; docs/MEASUREMENTS.md, \"Pauses at 10,000 pages written per round\").\n\n")
	fmt.Fprintf(b, "| memory | pages written per round | dirty pages per pause (median) | pause p50 | pause p99 | memcpy floor p50 | through the kernel | walk alone p50 / p99 | walk alone, split, p50 / p99 | p99 ÷ (2×floor + 200 µs) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, mib := range mems {
		walk50, walk99, err := walkAlone(mib, pauses, true)
		if err != nil {
			return err
		}
		split50, split99, err := walkAlone(mib, pauses, false)
		if err != nil {
			return err
		}
		for _, n := range counts {
			m, stop, err := startDirtier(ctx, e, mod, mib, n)
			if err != nil {
				return err
			}
			var pool snapshot.StagePool
			stager := snapshot.Stager{Pool: &pool}
			var idx []uint32
			var dirtyCounts sample
			m.WithPaused(ctx, func(p *machine.Paused) error {
				idx, _ = p.DirtyPages(idx[:0])
				_, err := stager.Stage(p.Memory(), snapshot.NonZeroPages(p.Memory()))
				return err
			})
			pool.Refill()
			before := m.PauseStats().Count
			kernelBefore := snapshot.KernelCopiedPages()
			for i := 0; i < pauses; i++ {
				time.Sleep(25 * time.Millisecond)
				var gen uint64
				var staged []snapshot.Page
				m.WarmDirty() // as Remus's primary and the snapshotter do, while the guest runs
				err := m.WithPaused(ctx, func(p *machine.Paused) error {
					var err error
					if idx, gen, err = p.DirtyPagesDeferred(idx[:0]); err != nil {
						return err
					}
					if staged, err = stager.Stage(p.Memory(), idx); err != nil {
						return err
					}
					_ = p.Globals()
					_, _ = p.Stack()
					_ = p.Devices()
					dirtyCounts = append(dirtyCounts, float64(len(idx)))
					pool.Expect(staged, uint64(len(p.Memory())))
					return nil
				})
				if err == nil {
					// As Remus's sender does, while the guest runs.
					err = m.RearmDirty(gen, func(i uint32) []byte { return snapshot.PageData(staged, i) })
					pool.Refill()
				}
				if err != nil {
					stop()
					return err
				}
			}
			time.Sleep(5 * time.Millisecond)
			ps := m.PauseStats()
			stop()
			var staged float64
			for _, d := range dirtyCounts {
				staged += d
			}
			kernelShare := float64(snapshot.KernelCopiedPages()-kernelBefore) / max(staged, 1)
			var pause sample
			for _, d := range ps.Recent[len(ps.Recent)-int(ps.Count-before):] {
				pause = append(pause, float64(d.Nanoseconds()))
			}
			dn := int(dirtyCounts.median())
			floor := memcpyFloor(dn, 200)
			p99 := pause.quantile(0.99)
			fmt.Fprintf(b, "| %d MiB | %d | %d | %s | %s | %s | %.1f%% | %s / %s | %s / %s | %.2f |\n", mib, n, dn, fmtNsDur(pause.median()), fmtNsDur(p99),
				fmtNsDur(floor), 100*kernelShare, fmtNsDur(walk50), fmtNsDur(walk99), fmtNsDur(split50), fmtNsDur(split99), p99/(2*floor+200e3))
			if n == 0 || n == 1000 {
				how := ""
				if n == 1000 {
					how = " with every page copied in the pause (at this size incremental snapshots and Remus checkpoints copy them ahead: the incremental snapshot line below)"
				}
				e.summarize("Checkpoint pause of a %d MiB guest at ~%d dirty pages%s: p50 %s, p99 %s (memcpy floor %s; target p99 ≤ 2×floor + 200 µs = %s; "+
					"the page-table walk of %d MiB alone: p50 %s, p99 %s; in 4 KiB pages, every huge page split, p50 %s, p99 %s).",
					mib, dn, how, fmtNsDur(pause.median()), fmtNsDur(p99), fmtNsDur(floor), fmtNsDur(2*floor+200e3), mib,
					fmtNsDur(walk50), fmtNsDur(walk99), fmtNsDur(split50), fmtNsDur(split99))
			}
		}
	}
	b.WriteString("\n")
	return nil
}

// benchIncremental: incremental snapshots of the dirtier (64 MiB, N pages
// written per round, a round per 20 ms), one every ~25 ms, alternating
// between what `ftvm snapshot --incremental` does (Machine.Snapshot: the
// pages collected and copied ahead of the pause, the rest in it) and every
// page collected and copied in the pause (what it did before: the page
// tables warmed, then DirtyPages and a copy in the pause). Both collect
// through the snapshots' view, so each takes the pages written since the
// other.
func benchIncremental(ctx context.Context, e *env, mod []byte, b *strings.Builder) error {
	counts, each := []int{1000, 10000}, 30
	if e.quick {
		counts, each = []int{1000}, 4
	}
	fmt.Fprintf(b, "### Incremental snapshot pause: pages copied ahead of it, or all in it\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot`. Guest: testdata/guests/dirtier (C, 64 MiB, writes N random pages, "+
		"then sleeps 20 ms), instrumented. After a full snapshot, %d incremental snapshots each way, alternating, one every ~25 ms "+
		"of the same VM: **ahead** = `Machine.Snapshot` with `Incremental` (what `ftvm snapshot --incremental` does: the pages "+
		"written since the last snapshot are collected, write-protected and copied while the guest runs, and the pause collects "+
		"and copies only those written after; the file is then written, temp → fsync → rename, as the guest runs); **in the pause** "+
		"= the page tables walked while the guest runs (`WarmDirty`), then, paused, `Paused.DirtyPages` and a copy of every page "+
		"it reports, with globals, stack and devices (the snapshotter before 2026-12-06 13:05). Pause = the guest's stopped time "+
		"(`PauseStats`); pages = the snapshot's (ahead: the pages copied ahead and in the pause together).\n\n", each)
	fmt.Fprintf(b, "| pages written per round | pages per snapshot, ahead / in the pause | pause p50, ahead | pause p99, ahead | pause p50, in the pause | pause p99, in the pause | p50 ratio |\n|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range counts {
		m, stop, err := startDirtier(ctx, e, mod, 64, n)
		if err != nil {
			return err
		}
		dir := filepath.Join(e.work, fmt.Sprintf("incremental-%d", n))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			stop()
			return err
		}
		if _, err := m.Snapshot(ctx, filepath.Join(dir, "full.snap"), machine.SnapshotOptions{}); err != nil {
			stop()
			return err
		}
		var stager snapshot.Stager
		var pool snapshot.StagePool
		stager.Pool = &pool
		var aheadPause, inPause, aheadPages, inPages sample
		last := func() float64 {
			ps := m.PauseStats()
			return float64(ps.Recent[len(ps.Recent)-1].Nanoseconds())
		}
		for i := range 2 * each {
			time.Sleep(25 * time.Millisecond)
			if i%2 == 0 {
				s, err := m.Snapshot(ctx, filepath.Join(dir, fmt.Sprintf("%d.snap", i)), machine.SnapshotOptions{Incremental: true})
				if err != nil {
					stop()
					return err
				}
				aheadPause = append(aheadPause, last())
				aheadPages = append(aheadPages, float64(len(s.Pages)))
				continue
			}
			m.WarmDirty()
			var pages int
			err := m.WithPaused(ctx, func(p *machine.Paused) error {
				idx, err := p.DirtyPages(nil)
				if err != nil {
					return err
				}
				if _, err := stager.Stage(p.Memory(), idx); err != nil {
					return err
				}
				_, _, _ = p.Globals(), p.Devices(), p.ModuleHash()
				_, _ = p.Stack()
				pages = len(idx)
				return nil
			})
			if err != nil {
				stop()
				return err
			}
			inPause = append(inPause, last())
			inPages = append(inPages, float64(pages))
			pool.Refill()
		}
		stop()
		fmt.Fprintf(b, "| %d | %s / %s | %s | %s | %s | %s | %.2f |\n", n, fmtNum(aheadPages.median()), fmtNum(inPages.median()),
			fmtNsDur(aheadPause.median()), fmtNsDur(aheadPause.quantile(0.99)), fmtNsDur(inPause.median()),
			fmtNsDur(inPause.quantile(0.99)), aheadPause.median()/inPause.median())
		if n == 1000 {
			floor := memcpyFloor(int(aheadPages.median()), 200)
			target := 2*floor + 200e3
			met := "met"
			if aheadPause.quantile(0.99) > target {
				met = "not met"
			}
			e.summarize("Incremental snapshot pause of a 64 MiB guest at ~%s pages (`ftvm snapshot --incremental`, pages copied ahead of the pause, "+
				"as every incremental snapshot is taken, and a Remus checkpoint after one of 256 pages or more): p50 %s, p99 %s (memcpy floor of those pages %s; "+
				"target p99 ≤ 2×floor + 200 µs = %s: %s), against %s and %s with every page copied in the pause (%d of each, alternating).",
				fmtNum(aheadPages.median()), fmtNsDur(aheadPause.median()), fmtNsDur(aheadPause.quantile(0.99)), fmtNsDur(floor),
				fmtNsDur(target), met, fmtNsDur(inPause.median()), fmtNsDur(inPause.quantile(0.99)), each)
		}
	}
	b.WriteString("\n")
	return nil
}

// startDirtier runs the dirtier guest, instrumented (mib MiB, n pages
// written a round, a round per 20 ms), and returns once it has had time
// to allocate and touch its memory; stop ends it and closes it.
func startDirtier(ctx context.Context, e *env, mod []byte, mib, n int) (m *machine.Machine, stop func(), err error) {
	m, err = machine.New(ctx, machine.Config{Module: mod, Name: "dirtier",
		Args: []string{fmt.Sprint(mib), fmt.Sprint(n), "0", "20000"}, Stdout: io.Discard, Stderr: io.Discard,
		Stdin: strings.NewReader(""), CacheDir: filepath.Join(e.cache, "ftvm-compiled"), Instrument: true})
	if err != nil {
		return nil, nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { m.Run(runCtx) })
	stop = func() {
		cancel()
		m.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
		wg.Wait()
		m.Close(ctx)
	}
	time.Sleep(300 * time.Millisecond)
	return m, stop, nil
}

// walkAlone is the kernel tracker's collection of a fully used region of
// mib MiB with one page written, after a 5 ms wait and a Warm walk, as the
// pauses above see it: its p50 and p99 over reps collections. With huge,
// the region is in transparent huge pages, as a guest's memory is, and the
// same page is written each time (as the dirtier's own pages are); without,
// it is in 4 KiB pages and a random page is written: the walk of a memory
// whose every huge page has been split.
func walkAlone(mib, reps int, huge bool) (p50, p99 float64, err error) {
	size := mib << 20
	const hugeSize = 2 << 20
	raw, err := unix.Mmap(-1, 0, size+hugeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Munmap(raw)
	off := (hugeSize - int(uintptr(unsafe.Pointer(&raw[0]))%hugeSize)) % hugeSize
	region := raw[off : off+size : off+size]
	advice := unix.MADV_NOHUGEPAGE
	if huge && !dirty.HugePagesCoarsen() {
		advice = unix.MADV_HUGEPAGE
	}
	if err := unix.Madvise(region, advice); err != nil {
		return 0, 0, err
	}
	for i := 0; i < size; i += dirty.PageSize {
		region[i] = 1
	}
	tr, err := dirty.New(region, dirty.Options{Used: uint64(size), HotPages: true})
	if err != nil {
		return 0, 0, err
	}
	defer tr.Close()
	if tr.Kind() != dirty.KindUffd {
		return 0, 0, fmt.Errorf("walk alone: the kernel tracker is unavailable (%s)", tr.Reason())
	}
	var s sample
	var dst []uint32
	page := size / dirty.PageSize / 2
	for range reps {
		if !huge {
			page = rand.IntN(size / dirty.PageSize)
		}
		region[page*dirty.PageSize]++
		time.Sleep(dirty.WarmAfter)
		tr.(dirty.Warmer).Warm(uint64(size))
		t0 := time.Now()
		if dst, err = tr.Collect(dst[:0], uint64(size)); err != nil {
			return 0, 0, err
		}
		s = append(s, float64(time.Since(t0).Nanoseconds()))
	}
	return s.median(), s.quantile(0.99), nil
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
// written is restored into a new VM, from a compressed file, from a
// mappable one (page cache warm and dropped), and from a memory image kept
// in memory (a Remus failover); the time runs until the guest's first host
// call after the restore. The module is compiled in advance (Prepare)
// everywhere, so the rows differ only in how memory arrives.
func benchRestore(ctx context.Context, e *env, mod []byte, b *strings.Builder) error {
	sizes := []int{64, 1024}
	reps := 5
	if e.quick {
		sizes, reps = []int{64}, 2
	}
	compiled := filepath.Join(e.cache, "ftvm-compiled")
	fmt.Fprintf(b, "### Restore time\n\n")
	fmt.Fprintf(b, "Command: `go run ./bench -only snapshot`. A full snapshot of testdata/guests/dirtier with every page of "+
		"its memory written (the worst case: nothing is zero) is written to disk, then restored %d times each way, in "+
		"this process, the module compiled in advance (`machine.Prepare`, as the issue's \"module already compiled\"). "+
		"**Decode** = from the file into a `machine.MemoryImage` (what `ftvm restore` does): for the compressed "+
		"snapshot, checksumming and decompressing every page into it; for the mappable one (`ftvm snapshot "+
		"--mappable`), mapping the file's page-aligned memory copy-on-write (`MAP_PRIVATE`) and checksumming every "+
		"non-zero page, read with pread(2) on all cores (the guest later faults in only what it touches). **VM** = `machine.New` to the guest's first host call: "+
		"instantiation, taking the image's pages over with mremap(2), rewinding. **Page cache dropped** = the same "+
		"after `posix_fadvise(DONTNEED)` on the file, so its pages come from the disk. **Adopted** = a Remus "+
		"backup's failover: the image already in memory. Floor: memcpy of the whole memory. Loading the compiled "+
		"code from the on-disk cache, which a fresh `ftvm restore` process adds, and compiling with an empty cache "+
		"are reported separately.\n\n", reps)
	fmt.Fprintf(b, "| memory | snapshot | on disk | decode p50 | VM p50 | total p50 | total p50, page cache dropped |\n|---:|---|---:|---:|---:|---:|---:|\n")
	type extra struct {
		mib               int
		floor, load, cold float64
	}
	var extras []extra
	for _, mib := range sizes {
		path := filepath.Join(e.work, fmt.Sprintf("restore-%d.snap", mib))
		mpath := filepath.Join(e.work, fmt.Sprintf("restore-%d.mapped.snap", mib))
		m, err := machine.New(ctx, machine.Config{Module: mod, Name: "dirtier",
			Args: []string{fmt.Sprint(mib - 1), "1", "0", "1000"}, Stdout: io.Discard, Stderr: io.Discard,
			Stdin: strings.NewReader(""), CacheDir: compiled, Instrument: true})
		if err != nil {
			return err
		}
		done := make(chan struct{})
		go func() { m.Run(ctx); close(done) }()
		time.Sleep(time.Duration(mib) * time.Millisecond) // it touches every page first
		s, err := m.Capture(ctx, machine.SnapshotOptions{Reason: "bench"})
		if err == nil {
			err = snapshot.WriteFile(path, s)
		}
		if err == nil {
			err = snapshot.WriteFileOptions(mpath, s, snapshot.Options{Mappable: true})
		}
		m.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
		<-done
		m.Close(ctx)
		if err != nil {
			return err
		}
		hash := snapshot.ModuleHash(mod)
		var load sample
		// restore decodes file into a MemoryImage (mapped or read) and
		// runs a VM from it to its first host call.
		restore := func(file string, mapped, drop bool) (dec, vm float64, memBytes int, err error) {
			if drop {
				if f, err := os.Open(file); err == nil {
					unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
					f.Close()
				}
			}
			// A Program serves one VM: prepared afresh, untimed here.
			tp := time.Now()
			prog, err := machine.Prepare(ctx, machine.Config{Module: mod, Name: "dirtier", Instrument: true, CacheDir: compiled})
			if err != nil {
				return 0, 0, 0, err
			}
			load = append(load, float64(time.Since(tp).Nanoseconds()))
			mi, err := machine.NewMemoryImage(0)
			if err != nil {
				return 0, 0, 0, err
			}
			defer mi.Close()
			t0 := time.Now()
			img := &snapshot.Image{Resize: mi.Resize}
			if mapped {
				img.Map = mi.MapFile
			}
			if err := snapshot.RestoreInto(img, &hash, file); err != nil {
				return 0, 0, 0, err
			}
			dec = float64(time.Since(t0).Nanoseconds())
			first := &firstInput{at: make(chan time.Time, 1)}
			t1 := time.Now()
			rm, err := machine.New(ctx, machine.Config{Program: prog, Restore: img, RestoreMemory: mi, Stdout: io.Discard,
				Stderr: io.Discard, Stdin: strings.NewReader(""), Tap: first})
			if err != nil {
				return 0, 0, 0, err
			}
			rdone := make(chan struct{})
			go func() { rm.Run(ctx); close(rdone) }()
			vm = float64((<-first.at).Sub(t1).Nanoseconds())
			rm.WithPaused(ctx, func(p *machine.Paused) error { p.Stop(); return nil })
			<-rdone
			rm.Close(ctx)
			return dec, vm, len(img.Memory), nil
		}
		type way struct {
			name, file string
			mapped     bool
		}
		ways := []way{{"compressed (S2)", path, false}, {"mappable", mpath, true}}
		var memBytes int
		var adoptTotal sample
		for _, w := range ways {
			var dec, vm, total, cold sample
			for r := 0; r < reps; r++ {
				d, v, n, err := restore(w.file, w.mapped, false)
				if err != nil {
					return fmt.Errorf("restore %s: %w", w.name, err)
				}
				memBytes = n
				dec, vm, total = append(dec, d), append(vm, v), append(total, d+v)
				d, v, _, err = restore(w.file, w.mapped, true)
				if err != nil {
					return fmt.Errorf("restore %s: %w", w.name, err)
				}
				cold = append(cold, d+v)
				if w.mapped {
					// Adopted: decoding is not timed (a backup does it
					// epoch by epoch, before any failure).
					_, v, _, err := restore(w.file, false, false)
					if err != nil {
						return err
					}
					adoptTotal = append(adoptTotal, v)
				}
			}
			var st syscall.Stat_t
			syscall.Stat(w.file, &st)
			fmt.Fprintf(b, "| %d MiB | %s | %.1f MiB | %s | %s | %s | %s |\n", mib, w.name, float64(st.Blocks*512)/(1<<20),
				fmtNsDur(dec.median()), fmtNsDur(vm.median()), fmtNsDur(total.median()), fmtNsDur(cold.median()))
			if mib == 64 {
				if w.mapped {
					e.summarize("Restore of a 64 MiB VM (every page written) from a mappable snapshot (`ftvm snapshot --mappable`, "+
						"memory mapped copy-on-write, every page's checksum verified): %s (decode %s + VM %s), %s with the "+
						"page cache dropped (target < 10 ms with the module compiled; memcpy floor %s).",
						fmtNsDur(total.median()), fmtNsDur(dec.median()), fmtNsDur(vm.median()), fmtNsDur(cold.median()),
						fmtNsDur(memcpyWhole(memBytes)))
				} else {
					e.summarize("Restore of a 64 MiB VM (every page written) from a compressed snapshot (the default): %s "+
						"(decode %s + VM %s).", fmtNsDur(total.median()), fmtNsDur(dec.median()), fmtNsDur(vm.median()))
				}
			}
		}
		fmt.Fprintf(b, "| %d MiB | adopted (failover) | — | — | %s | %s | — |\n", mib, fmtNsDur(adoptTotal.median()),
			fmtNsDur(adoptTotal.median()))
		if mib == 64 {
			e.summarize("Restore of a 64 MiB VM from a memory image kept in memory (a Remus backup's failover): %s.",
				fmtNsDur(adoptTotal.median()))
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
		extras = append(extras, extra{mib, memcpyWhole(memBytes), load.median(), float64(cold.Nanoseconds())})
		os.Remove(mpath)
	}
	b.WriteString("\n| memory | memcpy floor (whole memory) | compiled code from the on-disk cache (`machine.Prepare`) | cold compile (empty cache) |\n|---:|---:|---:|---:|\n")
	for _, x := range extras {
		fmt.Fprintf(b, "| %d MiB | %s | %s | %s |\n", x.mib, fmtNsDur(x.floor), fmtNsDur(x.load), fmtNsDur(x.cold))
	}
	if err := benchPrepareGo(ctx, e, compiled, b); err != nil {
		return err
	}
	b.WriteString("\nA mappable snapshot costs disk (the non-zero pages, uncompressed; zero pages are holes) and " +
		"restores in the time of one checksum pass over the non-zero pages, which the guest then finds already " +
		"mapped; pages it writes are copied on first write (the file never changes). A compressed snapshot is " +
		"smaller and restores at the speed of decompression. The mapped file must not be truncated while the " +
		"VM runs.\n\n")
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

// benchPrepareGo: what loading compiled code from the cache costs for a Go
// module, whose code is ten times the C dirtier's: a restore, a failover
// with nothing prepared and every ftvm run pay it (a Remus backup pays it in
// advance, while the primary runs).
func benchPrepareGo(ctx context.Context, e *env, compiled string, b *strings.Builder) error {
	wasmPath, err := guest.Go("testdata/guests/kvserver")
	if err != nil {
		return err
	}
	mod, err := os.ReadFile(wasmPath)
	if err != nil {
		return err
	}
	reps := 5
	if e.quick {
		reps = 2
	}
	var load sample
	for i := 0; i <= reps; i++ { // the first fills the caches
		t0 := time.Now()
		prog, err := machine.Prepare(ctx, machine.Config{Module: mod, Name: "kvserver", Instrument: true, CacheDir: compiled})
		if err != nil {
			return err
		}
		if i > 0 {
			load = append(load, float64(time.Since(t0).Nanoseconds()))
		}
		prog.Close(ctx)
	}
	var codeBytes int64
	if entries, err := os.ReadDir(compiled); err == nil {
		for _, d := range entries {
			sub, _ := os.ReadDir(filepath.Join(compiled, d.Name()))
			for _, f := range sub {
				if info, err := f.Info(); err == nil {
					codeBytes = max(codeBytes, info.Size())
				}
			}
		}
	}
	fmt.Fprintf(b, "\nA Go module is another matter: testdata/guests/kvserver (%.1f MiB of wasm; the largest compiled file "+
		"in the cache, its own, %.1f MiB) takes %s p50 over %d `machine.Prepare` calls with both caches warm. wazero "+
		"decodes and validates every function of the module before it looks in its cache, then reads the compiled "+
		"file and checksums all of it; a fresh `ftvm restore` of a Go guest adds that to the figures above, which a "+
		"Remus backup pays in advance.\n", float64(len(mod))/(1<<20), float64(codeBytes)/(1<<20), fmtNsDur(load.median()), reps)
	return nil
}
