package store

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftvm/ftvm/snapshot"
)

// countFS counts the journal's fsyncs (file and directory) and notes when
// COMMIT's rename became durable (the commit point).
type countFS struct {
	FS
	syncs     *atomic.Int64
	committed *bool
	start     *time.Time
	toCommit  *time.Duration
}

func (c countFS) Rename(oldname, newname string) error {
	if filepath.Base(newname) == commitName {
		*c.committed = true
	}
	return c.FS.Rename(oldname, newname)
}

type countFile struct {
	File
	syncs *atomic.Int64
}

func (c countFS) Create(name string) (File, error) {
	f, err := c.FS.Create(name)
	if err != nil {
		return nil, err
	}
	return countFile{f, c.syncs}, nil
}

func (c countFS) SyncDir(name string) error {
	c.syncs.Add(1)
	err := c.FS.SyncDir(name)
	if *c.committed {
		*c.committed = false
		*c.toCommit += time.Since(*c.start)
	}
	return err
}

func (f countFile) Sync() error { f.syncs.Add(1); return f.File.Sync() }

// benchChain makes n incremental snapshots of pages dirty pages each
// (random data: incompressible, so the file is about pages × 4 KiB),
// following a full one.
func benchChain(b *testing.B, n, pages int) (full []byte, incs [][]byte) {
	rng := rand.New(rand.NewPCG(1, 2))
	mem := 64 * snapshot.WasmPageSize
	s := &snapshot.Snapshot{Kind: snapshot.Full, Module: testModule, Seq: 1, MemorySize: uint64(mem)}
	var buf bytes.Buffer
	if err := s.Encode(&buf); err != nil {
		b.Fatal(err)
	}
	full = bytes.Clone(buf.Bytes())
	parent := s.ID
	for i := range n {
		inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: testModule, Seq: uint64(2 + i), Parent: parent,
			MemorySize: uint64(mem), Devices: []byte(`{}`)}
		for _, p := range rng.Perm(mem / snapshot.PageSize)[:pages] {
			d := make([]byte, snapshot.PageSize)
			for j := range d {
				d[j] = byte(rng.Uint32())
			}
			inc.Pages = append(inc.Pages, snapshot.Page{Index: uint32(p), Data: d})
		}
		snapshot.SortPages(inc.Pages)
		buf.Reset()
		if err := inc.Encode(&buf); err != nil {
			b.Fatal(err)
		}
		incs = append(incs, bytes.Clone(buf.Bytes()))
		parent = inc.ID
	}
	return full, incs
}

// BenchmarkCommitIncremental: one checkpoint of a 100 KiB incremental
// snapshot and 10 fs ops, on the OS file system (real fsyncs), with
// compaction off. "segments" is the ops' segment count; fsyncs/op counts
// journal file and directory fsyncs and replica fsyncs.
func BenchmarkCommitIncremental(b *testing.B) {
	for _, bc := range []struct {
		name string
		ops  func(i int) []FsOp
	}{
		// appends to a log, 4 KiB writes into a database file, a new
		// file created and written: one segment
		{"writes", func(i int) []FsOp {
			f := fmt.Sprintf("f%d", i)
			page := strings.Repeat("d", 4096)
			return []FsOp{
				opA(0, "log", "line 1\n"), opA(0, "log", "line 2\n"), opA(0, "log", "line 3\n"), opA(0, "log", "line 4\n"),
				opW(0, "db", int64(i%64)*4096, page), opW(0, "db", int64(i%64+64)*4096, page),
				opW(0, "db", int64(i%64+128)*4096, page), opW(0, "db", 0, page[:512]),
				opCr(0, f, creat|trunc), opW(0, f, 0, "new file"),
			}
		}},
		// the same with an atomic replace (write temp, rename over):
		// three segments
		{"rename", func(i int) []FsOp {
			page := strings.Repeat("d", 4096)
			return []FsOp{
				opA(0, "log", "line 1\n"), opA(0, "log", "line 2\n"), opW(0, "db", int64(i%64)*4096, page),
				opW(0, "db", 0, page[:512]), opCr(0, "cfg.tmp", creat|trunc), opW(0, "cfg.tmp", 0, "config"),
				opSy(0, "cfg.tmp"), opRn(0, "cfg.tmp", 0, "cfg"), opA(0, "log", "line 3\n"), opA(0, "log", "line 4\n"),
			}
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			full, incs := benchChain(b, b.N, 25) // 25 pages: 100 KiB
			var syncs atomic.Int64
			var committed bool
			var start time.Time
			var toCommit time.Duration
			dir := b.TempDir()
			s, err := Open(dir, Options{FS: countFS{OS(), &syncs, &committed, &start, &toCommit}, Roots: 1, MaxRecords: -1, MaxRecordBytes: -1,
				diskHook: func(op string) error {
					if op == "fsync" || op == "syncfs" {
						syncs.Add(1)
					}
					return nil
				}})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			tree := []TreeEntry{fileE(0, "log", ""), fileE(0, "db", strings.Repeat("\x00", 1<<20)), fileE(0, "cfg", "old")}
			if err := s.CommitFull(1, full, tree, nil); err != nil {
				b.Fatal(err)
			}
			ops := make([][]FsOp, b.N)
			for i := range ops {
				ops[i] = bc.ops(i)
			}
			syncs.Store(0)
			toCommit = 0
			b.SetBytes(int64(len(incs[0])))
			b.ResetTimer()
			for i := range b.N {
				start = time.Now()
				if err := s.CommitIncremental(uint64(2+i), incs[i], ops[i]); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(syncs.Load())/float64(b.N), "fsyncs/op")
			b.ReportMetric(float64(len(incs[0]))/1024, "KiB-snap")
			b.ReportMetric(float64(toCommit.Microseconds())/1000/float64(b.N), "ms-to-commit-point")
		})
	}
}

// BenchmarkFsync is the unit of the above: 4 KiB written and fsynced in
// place, on the same file system.
func BenchmarkFsync(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "f"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for i := range b.N {
		if _, err := f.WriteAt(buf, int64(i%16)*4096); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}
