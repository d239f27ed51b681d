package store

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
)

var testModule = snapshot.ModuleHash([]byte("\x00asm remus store test"))

// vmSim is a guest's memory evolving between checkpoints, and the image a
// correct backup must hold after each.
type vmSim struct {
	rng    *rand.Rand
	mem    []byte
	dirty  map[uint32]bool
	img    *snapshot.Image
	lastID snapshot.Hash
}

func newVMSim(seed uint64, size int) *vmSim {
	v := &vmSim{rng: rand.New(rand.NewPCG(seed, 7)), mem: make([]byte, size), dirty: map[uint32]bool{}}
	for range 6 {
		v.touch()
	}
	return v
}

func (v *vmSim) touch() {
	p := uint32(v.rng.IntN(len(v.mem) / snapshot.PageSize))
	d := v.mem[int(p)*snapshot.PageSize:][:snapshot.PageSize]
	if v.rng.IntN(8) == 0 {
		clear(d)
	} else {
		for i := 0; i < len(d); i += 64 {
			d[i] = byte(v.rng.Uint32())
		}
	}
	v.dirty[p] = true
}

// next takes checkpoint seq, full or incremental, after some guest work,
// and returns its encoding.
func (v *vmSim) next(t testing.TB, kind snapshot.Kind, seq uint64) []byte {
	t.Helper()
	if v.rng.IntN(3) == 0 {
		v.mem = append(v.mem, make([]byte, snapshot.WasmPageSize)...)
	}
	for range 1 + v.rng.IntN(5) {
		v.touch()
	}
	s := &snapshot.Snapshot{Kind: kind, Module: testModule, Seq: seq, MemorySize: uint64(len(v.mem)),
		Globals:   []snapshot.Global{{Index: 0, Type: snapshot.I32, Value: seq}, {Index: 1, Type: snapshot.I64, Value: v.rng.Uint64()}},
		StackAddr: 64, Stack: fmt.Appendf(nil, "stack of %d", seq), Devices: fmt.Appendf(nil, `{"seq":%d}`, seq),
		Meta: snapshot.Meta{Created: time.Unix(1700000000+int64(seq), 0), Host: "primary", Reason: "test"}}
	var idx []uint32
	if kind == snapshot.Full {
		idx = snapshot.NonZeroPages(v.mem)
		v.img = &snapshot.Image{}
	} else {
		s.Parent = v.lastID
		for p := range v.dirty {
			idx = append(idx, p)
		}
	}
	clear(v.dirty)
	slices.Sort(idx)
	for _, p := range idx {
		s.Pages = append(s.Pages, snapshot.Page{Index: p, Data: bytes.Clone(v.mem[int(p)*snapshot.PageSize:][:snapshot.PageSize])})
	}
	var b bytes.Buffer
	if err := s.Encode(&b); err != nil {
		t.Fatal(err)
	}
	if err := snapshot.Apply(v.img, s); err != nil {
		t.Fatal(err)
	}
	v.lastID = s.ID
	return b.Bytes()
}

func cloneImage(img *snapshot.Image) *snapshot.Image {
	c := *img
	c.Memory = bytes.Clone(img.Memory)
	return &c
}

func sameImage(got, want *snapshot.Image) error {
	switch {
	case got.Seq != want.Seq || got.Module != want.Module:
		return fmt.Errorf("image at seq %d of %s, want %d of %s", got.Seq, got.Module.Short(), want.Seq, want.Module.Short())
	case !bytes.Equal(got.Memory, want.Memory):
		return fmt.Errorf("memory differs (%d vs %d bytes)", len(got.Memory), len(want.Memory))
	case !slices.Equal(got.Globals, want.Globals) || got.StackAddr != want.StackAddr || !bytes.Equal(got.Stack, want.Stack) ||
		!bytes.Equal(got.Devices, want.Devices):
		return fmt.Errorf("globals, stack or devices differ")
	}
	return nil
}

// Op constructors.
func opW(r uint32, p string, off int64, d string) FsOp {
	return FsOp{Op: uint8(wasi.FsWrite), Root: r, Path: p, Offset: off, Data: []byte(d)}
}
func opA(r uint32, p, d string) FsOp { return opW(r, p, -1, d) }
func opTr(r uint32, p string, n int64) FsOp {
	return FsOp{Op: uint8(wasi.FsTruncate), Root: r, Path: p, Size: n}
}
func opAl(r uint32, p string, off, n int64) FsOp {
	return FsOp{Op: uint8(wasi.FsAllocate), Root: r, Path: p, Offset: off, Size: n}
}
func opTs(r uint32, p string, atim, mtim int64, flags uint16) FsOp {
	return FsOp{Op: uint8(wasi.FsSetTimes), Root: r, Path: p, Offset: atim, Size: mtim, Flags: uint32(flags)}
}
func opCr(r uint32, p string, oflags uint16) FsOp {
	return FsOp{Op: uint8(wasi.FsCreate), Root: r, Path: p, Flags: uint32(oflags)}
}
func opMk(r uint32, p string) FsOp { return FsOp{Op: uint8(wasi.FsMkdir), Root: r, Path: p} }
func opRd(r uint32, p string) FsOp { return FsOp{Op: uint8(wasi.FsRmdir), Root: r, Path: p} }
func opUl(r uint32, p string) FsOp { return FsOp{Op: uint8(wasi.FsUnlink), Root: r, Path: p} }
func opRn(r uint32, p string, r2 uint32, p2 string) FsOp {
	return FsOp{Op: uint8(wasi.FsRename), Root: r, Path: p, Root2: r2, Path2: p2}
}
func opSl(r uint32, p, target string) FsOp {
	return FsOp{Op: uint8(wasi.FsSymlink), Root: r, Path: p, Path2: target}
}
func opLn(r uint32, p string, r2 uint32, p2 string) FsOp {
	return FsOp{Op: uint8(wasi.FsLink), Root: r, Path: p, Root2: r2, Path2: p2}
}
func opSy(r uint32, p string) FsOp { return FsOp{Op: uint8(wasi.FsSync), Root: r, Path: p} }

const creat, trunc, excl = wasi.OflagCreat, wasi.OflagTrunc, wasi.OflagExcl

func fileE(r uint32, p, data string) TreeEntry {
	return TreeEntry{Root: r, Path: p, Kind: KindFile, Mode: 0o644, Data: []byte(data)}
}
func dirE(r uint32, p string) TreeEntry {
	return TreeEntry{Root: r, Path: p, Kind: KindDir, Mode: 0o755}
}
func linkE(r uint32, p, target string) TreeEntry {
	return TreeEntry{Root: r, Path: p, Kind: KindSymlink, Mode: 0o777, Target: target}
}

// captureTree describes every object under the roots of a disk directory:
// kind, permissions, content, symlink target and hard-link groups. Times
// are left out (the replica sets its own).
func captureTree(t testing.TB, diskDir string, roots int) map[string]string {
	t.Helper()
	out := map[string]string{}
	group := map[uint64][]string{}
	for r := range roots {
		base := filepath.Join(diskDir, strconv.Itoa(r))
		err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(base, p)
			key := strconv.Itoa(r) + ":" + rel
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil {
				return err
			}
			perm := st.Mode & 0o777
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				out[key] = fmt.Sprintf("dir %o", perm)
			case unix.S_IFREG:
				b, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				c := string(b)
				if len(b) > 64 {
					c = fmt.Sprintf("%x", sha256.Sum256(b))
				}
				out[key] = fmt.Sprintf("file %o %d %q", perm, len(b), c)
				if st.Nlink > 1 {
					group[st.Ino] = append(group[st.Ino], key)
				}
			case unix.S_IFLNK:
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				out[key] = "symlink -> " + target
			default:
				out[key] = fmt.Sprintf("other %o", st.Mode)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, keys := range group {
		slices.Sort(keys)
		for _, k := range keys {
			out[k] += " links " + strings.Join(keys, ",")
		}
	}
	return out
}

func diffTrees(got, want map[string]string) string {
	var b strings.Builder
	var keys []string
	for k := range got {
		keys = append(keys, k)
	}
	for k := range want {
		if _, ok := got[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		if got[k] != want[k] {
			fmt.Fprintf(&b, "  %s: got %q, want %q\n", k, got[k], want[k])
		}
	}
	return b.String()
}

// oracle applies ops the plain way, on a real directory per root: what a
// primary's own directories go through.
type oracle struct {
	t    testing.TB
	dir  string
	root int
}

func newOracle(t testing.TB, roots int) *oracle {
	o := &oracle{t: t, dir: t.TempDir(), root: roots}
	return o
}

// path keeps p as the kernel will walk it ("d/../b" needs d).
func (o *oracle) path(r uint32, p string) string { return o.dir + "/" + strconv.Itoa(int(r)) + "/" + p }

func (o *oracle) full(tree []TreeEntry, ops []FsOp) {
	os.RemoveAll(o.dir)
	for r := range o.root {
		if err := os.MkdirAll(filepath.Join(o.dir, strconv.Itoa(r)), 0o700); err != nil {
			o.t.Fatal(err)
		}
	}
	es := slices.Clone(tree)
	slices.SortFunc(es, func(a, b TreeEntry) int { return strings.Compare(o.path(a.Root, a.Path), o.path(b.Root, b.Path)) })
	var dirs []TreeEntry
	for _, e := range es {
		p := o.path(e.Root, e.Path)
		var err error
		switch e.Kind {
		case KindFile:
			if err = os.WriteFile(p, e.Data, 0o600); err == nil {
				err = os.Chmod(p, os.FileMode(e.Mode&0o777))
			}
		case KindDir:
			if e.Path != "." {
				err = os.Mkdir(p, 0o700)
			}
			dirs = append(dirs, e)
		case KindSymlink:
			err = os.Symlink(e.Target, p)
		}
		if err != nil {
			o.t.Fatal(err)
		}
	}
	for _, e := range dirs {
		if err := os.Chmod(o.path(e.Root, e.Path), os.FileMode(e.Mode&0o777|0o700)); err != nil {
			o.t.Fatal(err)
		}
	}
	o.apply(ops)
}

func (o *oracle) apply(ops []FsOp) {
	for i, op := range ops {
		if err := o.one(op); err != nil {
			o.t.Fatalf("oracle: op %d (%s): %v", i, op.String(), err)
		}
	}
}

func (o *oracle) one(op FsOp) error {
	p := o.path(op.Root, op.Path)
	switch wasi.FsOp(op.Op) {
	case wasi.FsWrite:
		if op.Offset < 0 {
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.Write(op.Data)
			return err
		}
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteAt(op.Data, op.Offset)
		return err
	case wasi.FsTruncate:
		return os.Truncate(p, op.Size)
	case wasi.FsAllocate:
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		return unix.Fallocate(int(f.Fd()), 0, op.Offset, op.Size)
	case wasi.FsSetTimes:
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if op.Flags&uint32(wasi.FstflagAtim) != 0 {
			ts[0] = unix.NsecToTimespec(op.Offset)
		}
		if op.Flags&uint32(wasi.FstflagMtim) != 0 {
			ts[1] = unix.NsecToTimespec(op.Size)
		}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, 0)
	case wasi.FsCreate:
		flags := os.O_RDONLY
		if op.Flags&uint32(trunc) != 0 {
			flags = os.O_WRONLY | os.O_TRUNC
		}
		if op.Flags&uint32(creat) != 0 {
			flags |= os.O_CREATE
		}
		if op.Flags&uint32(excl) != 0 {
			flags |= os.O_EXCL
		}
		f, err := os.OpenFile(p, flags, 0o666)
		if err == nil {
			f.Close()
		}
		return err
	case wasi.FsMkdir:
		return os.Mkdir(p, 0o777)
	case wasi.FsRmdir:
		return unix.Rmdir(p)
	case wasi.FsUnlink:
		return unix.Unlink(p)
	case wasi.FsRename:
		return os.Rename(p, o.path(op.Root2, op.Path2))
	case wasi.FsSymlink:
		return os.Symlink(op.Path2, p)
	case wasi.FsLink:
		return os.Link(p, o.path(op.Root2, op.Path2))
	case wasi.FsSync:
		return nil
	}
	return fmt.Errorf("unknown op %d", op.Op)
}

func (o *oracle) tree() map[string]string { return captureTree(o.t, o.dir, o.root) }
