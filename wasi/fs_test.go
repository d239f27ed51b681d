package wasi

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Device-level tests of the filesystem calls: a hostile guest must not reach
// outside its preopened directory, and every mutation and host-dependent read
// must reach the hooks.

const secretText = "TOP-SECRET-CONTENT"

// recorder is an InputTap and an OutputGate that keeps what it sees.
type recorder struct {
	inputs  []Input
	effects []Effect
}

func (r *recorder) Input(in Input) {
	in.Data = bytes.Clone(in.Data)
	r.inputs = append(r.inputs, in)
}

func (r *recorder) Output(e Effect, perform Perform) (uint32, Errno) {
	e.Data = bytes.Clone(e.Data)
	r.effects = append(r.effects, e)
	return perform(e.Data)
}

// guest drives the handlers directly over a fake linear memory.
type guest struct {
	t   *testing.T
	d   *Devices
	mem []byte
	top uint32
}

const preopenFd = 3

func newGuest(t *testing.T, sandbox string, hooks *recorder) *guest {
	t.Helper()
	cfg := Config{Preopens: []Preopen{{HostPath: sandbox, GuestPath: "/"}},
		Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
	if hooks != nil {
		cfg.Tap, cfg.Gate = hooks, hooks
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return &guest{t: t, d: d, mem: make([]byte, 1<<20), top: 64}
}

func (g *guest) m() Mem { return NewMem(g.mem) }

func (g *guest) alloc(n int) uint32 {
	p := g.top
	g.top += uint32(n+7) &^ 7
	if int(g.top) > len(g.mem) {
		g.top = 64 // scratch memory wraps; each call's arguments are short-lived
		return g.alloc(n)
	}
	return p
}

func (g *guest) str(s string) (uint64, uint64) {
	p := g.alloc(len(s))
	copy(g.mem[p:], s)
	return uint64(p), uint64(len(s))
}

func (g *guest) call(h handler, p ...uint64) Errno { return h(g.d, g.m(), p) }

func (g *guest) u32(p uint32) uint32 { return binary.LittleEndian.Uint32(g.mem[p:]) }
func (g *guest) u64(p uint32) uint64 { return binary.LittleEndian.Uint64(g.mem[p:]) }

// dirRights are what a guest asks for to open a directory.
const dirRights = RightsDirectory | RightFdRead

func (g *guest) open(dir uint32, lookup uint32, path string, oflags uint16, rights uint64, fdflags uint16) (uint32, Errno) {
	pp, pl := g.str(path)
	res := g.alloc(4)
	errno := g.call(pathOpen, uint64(dir), uint64(lookup), pp, pl, uint64(oflags), rights, RightsAll, uint64(fdflags), uint64(res))
	return g.u32(res), errno
}

func (g *guest) path(h handler, dir uint32, path string) Errno {
	pp, pl := g.str(path)
	return g.call(h, uint64(dir), pp, pl)
}

func (g *guest) symlink(target string, dir uint32, path string) Errno {
	tp, tl := g.str(target)
	pp, pl := g.str(path)
	return g.call(pathSymlink, tp, tl, uint64(dir), pp, pl)
}

func (g *guest) link(oldDir uint32, lookup uint32, oldPath string, newDir uint32, newPath string) Errno {
	op, ol := g.str(oldPath)
	np, nl := g.str(newPath)
	return g.call(pathLink, uint64(oldDir), uint64(lookup), op, ol, uint64(newDir), np, nl)
}

func (g *guest) rename(oldDir uint32, oldPath string, newDir uint32, newPath string) Errno {
	op, ol := g.str(oldPath)
	np, nl := g.str(newPath)
	return g.call(pathRename, uint64(oldDir), op, ol, uint64(newDir), np, nl)
}

func (g *guest) stat(dir uint32, lookup uint32, path string) (size uint64, typ Filetype, errno Errno) {
	pp, pl := g.str(path)
	buf := g.alloc(sizeFilestat)
	errno = g.call(pathFilestatGet, uint64(dir), uint64(lookup), pp, pl, uint64(buf))
	return g.u64(buf + 32), Filetype(g.mem[buf+16]), errno
}

func (g *guest) readlink(dir uint32, path string) (string, Errno) {
	pp, pl := g.str(path)
	buf, res := g.alloc(256), g.alloc(4)
	errno := g.call(pathReadlink, uint64(dir), pp, pl, uint64(buf), 256, uint64(res))
	return string(g.mem[buf : buf+g.u32(res)]), errno
}

func (g *guest) iovec(b []byte) uint32 {
	data := g.alloc(len(b))
	copy(g.mem[data:], b)
	iov := g.alloc(8)
	binary.LittleEndian.PutUint32(g.mem[iov:], data)
	binary.LittleEndian.PutUint32(g.mem[iov+4:], uint32(len(b)))
	return iov
}

func (g *guest) write(fd uint32, s string) (uint32, Errno) {
	iov, res := g.iovec([]byte(s)), g.alloc(4)
	errno := g.call(fdWrite, uint64(fd), uint64(iov), 1, uint64(res))
	return g.u32(res), errno
}

func (g *guest) read(fd uint32, n int) (string, Errno) {
	iov, res := g.iovec(make([]byte, n)), g.alloc(4)
	errno := g.call(fdRead, uint64(fd), uint64(iov), 1, uint64(res))
	data := g.u32(iov)
	return string(g.mem[data : data+g.u32(res)]), errno
}

// hostileTree makes outer/{secret2, mid/{secret, sandbox/...}} and returns
// the sandbox to preopen and the directory whose contents must never change
// except beneath the sandbox.
func hostileTree(t *testing.T) (outer, sandbox string) {
	outer = t.TempDir()
	mid := filepath.Join(outer, "mid")
	sandbox = filepath.Join(mid, "sandbox")
	for _, dir := range []string{mid, sandbox, filepath.Join(sandbox, "sub")} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(outer, "secret2"), filepath.Join(mid, "secret")} {
		if err := os.WriteFile(f, []byte(secretText), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(sandbox, "file"), []byte("inside"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Symlinks planted by someone else, pointing out in every way.
	links := map[string]string{
		"abs_link":    filepath.Join(mid, "secret"),
		"rel_link":    "../secret",
		"absdir_link": mid,
		"reldir_link": "..",
		"deep_link":   "sub/../../secret",
		"proc_link":   "/proc/self/root" + filepath.Join(mid, "secret"),
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(sandbox, name)); err != nil {
			t.Fatal(err)
		}
	}
	return outer, sandbox
}

// treeState describes everything under outer except the sandbox.
func treeState(t *testing.T, outer, sandbox string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(outer, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == sandbox {
			return filepath.SkipDir
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		content := ""
		if info.Mode().IsRegular() {
			c, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			content = string(c)
		}
		mtime := info.ModTime().UnixNano()
		if info.IsDir() {
			mtime = 0 // a directory's mtime moves when the sandbox inside it changes
		}
		b.WriteString(strings.Join([]string{p, info.Mode().String(), content, time.Unix(0, mtime).String()}, "|") + "\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestHostilePaths(t *testing.T) {
	outer, sandbox := hostileTree(t)
	before := treeState(t, outer, sandbox)
	hooks := &recorder{}
	g := newGuest(t, sandbox, hooks)
	const follow = LookupSymlinkFollow

	escapes := []string{
		"../secret", "../../secret2", "..", "../", "sub/../../secret", "sub/../..", "./../secret",
		"abs_link", "rel_link", "absdir_link/secret", "reldir_link/secret", "deep_link", "proc_link",
		"absdir_link/", "reldir_link/..", "sub/../reldir_link/secret",
	}
	absolute := []string{"/etc/passwd", filepath.Join(filepath.Dir(sandbox), "secret"), "/", "//file"}

	t.Run("open", func(t *testing.T) {
		for _, p := range append(escapes, absolute...) {
			for _, oflags := range []uint16{0, OflagCreat, OflagDirectory, OflagCreat | OflagTrunc} {
				if fd, errno := g.open(preopenFd, follow, p, oflags, RightsAll, 0); errno == ESUCCESS {
					got, _ := g.read(fd, 64)
					t.Errorf("path_open(%q, oflags %d) succeeded (fd %d, read %q)", p, oflags, fd, got)
				}
			}
		}
		for _, p := range absolute {
			if _, errno := g.open(preopenFd, follow, p, 0, RightsAll, 0); errno != ENOTCAPABLE {
				t.Errorf("path_open(%q) = %v, want ENOTCAPABLE", p, errno)
			}
		}
		for _, p := range []string{"../secret", "sub/../../secret", "rel_link", "abs_link", "absdir_link/secret"} {
			if _, errno := g.open(preopenFd, follow, p, 0, RightFdRead, 0); errno != ENOTCAPABLE {
				t.Errorf("path_open(%q) = %v, want ENOTCAPABLE", p, errno)
			}
		}
	})

	t.Run("guest symlinks", func(t *testing.T) {
		for _, target := range []string{"/etc/passwd", filepath.Join(filepath.Dir(sandbox), "secret"), "/"} {
			if errno := g.symlink(target, preopenFd, "evil_abs"); errno != ENOTCAPABLE {
				t.Errorf("path_symlink(%q) = %v, want ENOTCAPABLE", target, errno)
			}
		}
		// Relative targets pointing out may be created (they are only text),
		// but never followed out.
		for i, target := range []string{"../secret", "../created_by_guest", "sub/../../secret", "..", "../../secret2"} {
			name := "evil" + string(rune('a'+i))
			if errno := g.symlink(target, preopenFd, name); errno != ESUCCESS {
				t.Fatalf("path_symlink(%q): %v", target, errno)
			}
			if fd, errno := g.open(preopenFd, follow, name, OflagCreat, RightsAll, 0); errno == ESUCCESS {
				t.Errorf("path_open(%q -> %q, CREAT) succeeded: fd %d", name, target, fd)
			}
			if _, errno := g.write(preopenFd, "x"); errno == ESUCCESS {
				t.Errorf("wrote to a directory")
			}
			if _, _, errno := g.stat(preopenFd, follow, name); errno != ENOTCAPABLE {
				t.Errorf("path_filestat_get(follow %q -> %q) = %v, want ENOTCAPABLE", name, target, errno)
			}
			if _, typ, errno := g.stat(preopenFd, 0, name); errno != ESUCCESS || typ != FiletypeSymbolicLink {
				t.Errorf("path_filestat_get(nofollow %q) = %v, %v", name, typ, errno)
			}
			if errno := g.path(pathCreateDirectory, preopenFd, name+"/x"); errno == ESUCCESS {
				t.Errorf("mkdir through %q succeeded", name)
			}
			if got, errno := g.readlink(preopenFd, name); errno != ESUCCESS || got != target {
				t.Errorf("path_readlink(%q) = %q, %v", name, got, errno)
			}
		}
	})

	t.Run("loops and chains", func(t *testing.T) {
		if errno := g.symlink("loop", preopenFd, "loop"); errno != ESUCCESS {
			t.Fatal(errno)
		}
		if _, errno := g.open(preopenFd, follow, "loop", 0, RightsAll, 0); errno != ELOOP {
			t.Errorf("open of a self loop = %v, want ELOOP", errno)
		}
		if errno := g.symlink("pong", preopenFd, "ping"); errno != ESUCCESS {
			t.Fatal(errno)
		}
		if errno := g.symlink("ping", preopenFd, "pong"); errno != ESUCCESS {
			t.Fatal(errno)
		}
		if _, errno := g.open(preopenFd, follow, "ping/x", 0, RightsAll, 0); errno != ELOOP {
			t.Errorf("open through a loop = %v, want ELOOP", errno)
		}
		// A long chain that ends outside, and one too long to follow.
		const n = 60
		for i := 0; i < n; i++ {
			target := "c" + itoa(i+1)
			if i == n-1 {
				target = "../secret"
			}
			if errno := g.symlink(target, preopenFd, "c"+itoa(i)); errno != ESUCCESS {
				t.Fatal(errno)
			}
		}
		if _, errno := g.open(preopenFd, follow, "c0", 0, RightsAll, 0); errno == ESUCCESS {
			t.Errorf("open of a %d-link chain succeeded", n)
		}
		if _, errno := g.open(preopenFd, follow, "c55", 0, RightsAll, 0); errno != ENOTCAPABLE {
			t.Errorf("open of a short chain out = %v, want ENOTCAPABLE", errno)
		}
		if _, _, errno := g.stat(preopenFd, follow, "c0"); errno != ELOOP {
			t.Errorf("stat of a long chain = %v, want ELOOP", errno)
		}
	})

	t.Run("mutations", func(t *testing.T) {
		for _, p := range append(escapes, absolute...) {
			if errno := g.path(pathCreateDirectory, preopenFd, p); errno == ESUCCESS {
				t.Errorf("path_create_directory(%q) succeeded", p)
			}
			if errno := g.path(pathCreateDirectory, preopenFd, p+"/newdir"); errno == ESUCCESS {
				t.Errorf("path_create_directory(%q) succeeded", p+"/newdir")
			}
			if strings.HasPrefix(p, "abs") || strings.HasPrefix(p, "rel") || strings.HasPrefix(p, "deep") ||
				strings.HasPrefix(p, "proc") {
				continue // unlinking a planted symlink itself is allowed, and harmless
			}
			if errno := g.path(pathUnlinkFile, preopenFd, p); errno == ESUCCESS {
				t.Errorf("path_unlink_file(%q) succeeded", p)
			}
			if errno := g.path(pathRemoveDirectory, preopenFd, p); errno == ESUCCESS {
				t.Errorf("path_remove_directory(%q) succeeded", p)
			}
			if errno := g.rename(preopenFd, p, preopenFd, "stolen"); errno == ESUCCESS {
				t.Errorf("path_rename(%q -> stolen) succeeded", p)
			}
			if errno := g.link(preopenFd, 0, p, preopenFd, "hardlink"); errno == ESUCCESS {
				t.Errorf("path_link(%q) succeeded", p)
			}
		}
		for _, p := range []string{"absdir_link/secret", "reldir_link/secret", "sub/../../secret"} {
			if errno := g.path(pathUnlinkFile, preopenFd, p); errno != ENOTCAPABLE {
				t.Errorf("path_unlink_file(%q) = %v, want ENOTCAPABLE", p, errno)
			}
		}
		for _, p := range []string{"../newdir", "../../newdir", "sub/../../newdir", "reldir_link/newdir", "absdir_link/newdir"} {
			if errno := g.path(pathCreateDirectory, preopenFd, p); errno != ENOTCAPABLE {
				t.Errorf("path_create_directory(%q) = %v, want ENOTCAPABLE", p, errno)
			}
		}
		for _, to := range []string{"../stolen", "../../stolen", "absdir_link/stolen", "reldir_link/stolen", "/tmp/stolen", ".."} {
			if errno := g.rename(preopenFd, "file", preopenFd, to); errno == ESUCCESS {
				t.Errorf("path_rename(file -> %q) succeeded", to)
			}
			if errno := g.link(preopenFd, 0, "file", preopenFd, to); errno == ESUCCESS {
				t.Errorf("path_link(file -> %q) succeeded", to)
			}
			if errno := g.symlink("file", preopenFd, to); errno == ESUCCESS {
				t.Errorf("path_symlink(-> %q) succeeded", to)
			}
		}
		for _, p := range []string{"abs_link", "rel_link", "deep_link", "proc_link", "evila"} {
			if errno := g.link(preopenFd, follow, p, preopenFd, "hardlink"); errno == ESUCCESS {
				t.Errorf("path_link(follow %q) succeeded", p)
			}
			pp, pl := g.str(p)
			if errno := g.call(pathFilestatSetTimes, preopenFd, uint64(follow), pp, pl, 1, 1, uint64(FstflagAtim|FstflagMtim)); errno == ESUCCESS {
				t.Errorf("path_filestat_set_times(follow %q) succeeded", p)
			}
		}
		// Through a descriptor for a subdirectory, ".." is out too.
		sub, errno := g.open(preopenFd, 0, "sub", OflagDirectory, dirRights, 0)
		if errno != ESUCCESS {
			t.Fatal(errno)
		}
		if _, errno := g.open(sub, 0, "../file", 0, RightFdRead, 0); errno != ENOTCAPABLE {
			t.Errorf("open(sub, ../file) = %v, want ENOTCAPABLE", errno)
		}
		if errno := g.rename(sub, "../file", sub, "x"); errno != ENOTCAPABLE {
			t.Errorf("rename(sub, ../file) = %v, want ENOTCAPABLE", errno)
		}
	})

	if after := treeState(t, outer, sandbox); after != before {
		t.Errorf("outside the sandbox changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	for _, e := range hooks.effects {
		if e.Root != 0 || filepath.IsAbs(e.Path) || filepath.IsAbs(e.Path2) && e.Op != FsSymlink {
			t.Errorf("effect %v names a path outside: root %d %q %q", e.Op, e.Root, e.Path, e.Path2)
		}
	}
	for _, in := range hooks.inputs {
		if bytes.Contains(in.Data, []byte(secretText)) {
			t.Errorf("the guest received the secret: %+v", in)
		}
	}
}

// TestHooks checks that every mutation reaches the output gate as an fs
// effect with its path, and every host-dependent result reaches the tap.
func TestHooks(t *testing.T) {
	sandbox := t.TempDir()
	hooks := &recorder{}
	g := newGuest(t, sandbox, hooks)
	must := func(what string, errno Errno) {
		t.Helper()
		if errno != ESUCCESS {
			t.Fatalf("%s: %v", what, errno)
		}
	}
	type want struct {
		op          FsOp
		path, path2 string
	}
	var wants []want
	expect := func(op FsOp, path, path2 string) { wants = append(wants, want{op, path, path2}) }

	must("mkdir", g.path(pathCreateDirectory, preopenFd, "d"))
	expect(FsMkdir, "d", "")
	dir, errno := g.open(preopenFd, 0, "d/", OflagDirectory, dirRights, 0)
	must("open dir", errno)
	f, errno := g.open(dir, 0, "f", OflagCreat, RightsAll, 0)
	must("create", errno)
	expect(FsCreate, "d/f", "")
	n, errno := g.write(f, "hello world")
	must("write", errno)
	if n != 11 {
		t.Fatalf("wrote %d", n)
	}
	expect(FsWrite, "d/f", "")
	iov, res := g.iovec([]byte("HELLO")), g.alloc(4)
	must("pwrite", g.call(fdPwrite, uint64(f), uint64(iov), 1, 0, uint64(res)))
	expect(FsWrite, "d/f", "")
	must("set size", g.call(fdFilestatSetSize, uint64(f), 20))
	expect(FsTruncate, "d/f", "")
	must("allocate", g.call(fdAllocate, uint64(f), 0, 40))
	expect(FsAllocate, "d/f", "")
	must("set times", g.call(fdFilestatSetTimes, uint64(f), 1e9, 2e9, uint64(FstflagAtim|FstflagMtim)))
	expect(FsSetTimes, "d/f", "")
	must("sync", g.call(fdSync, uint64(f)))
	expect(FsSync, "d/f", "")
	must("datasync", g.call(fdDatasync, uint64(f)))
	expect(FsSync, "d/f", "")
	must("symlink", g.symlink("f", dir, "s"))
	expect(FsSymlink, "d/s", "f")
	must("link", g.link(dir, 0, "f", preopenFd, "hard"))
	expect(FsLink, "d/f", "hard")
	pp, pl := g.str("d/s")
	must("path set times", g.call(pathFilestatSetTimes, preopenFd, 0, pp, pl, 0, 0, uint64(FstflagMtimNow)))
	expect(FsSetTimes, "d/s", "")
	must("rename", g.rename(preopenFd, "d", preopenFd, "e"))
	expect(FsRename, "d", "e")
	if fd, _ := g.d.fds.Get(f); fd.Path != "e/f" {
		t.Errorf("after rename, the open file's path is %q, want e/f", fd.Path)
	}
	// Reads.
	must("seek", g.call(fdSeek, uint64(f), 0, uint64(WhenceSet), uint64(g.alloc(8))))
	got, errno := g.read(f, 11)
	must("read", errno)
	if got != "HELLO world" {
		t.Errorf("read %q", got)
	}
	iov, res = g.iovec(make([]byte, 5)), g.alloc(4)
	must("pread", g.call(fdPread, uint64(f), uint64(iov), 1, 6, uint64(res)))
	must("fd stat", g.call(fdFilestatGet, uint64(f), uint64(g.alloc(sizeFilestat))))
	if size, _, errno := g.stat(preopenFd, 0, "e/f"); errno != ESUCCESS || size != 40 {
		t.Errorf("stat e/f: size %d, %v", size, errno)
	}
	if target, errno := g.readlink(preopenFd, "e/s"); errno != ESUCCESS || target != "f" {
		t.Errorf("readlink: %q, %v", target, errno)
	}
	must("readdir", g.call(fdReaddir, uint64(dir), uint64(g.alloc(512)), 512, 0, uint64(g.alloc(4))))
	// Removals.
	must("unlink", g.path(pathUnlinkFile, preopenFd, "e/s"))
	expect(FsUnlink, "e/s", "")
	// f is still open (fd 5): it is kept as a ghost first (ghost.go).
	must("unlink", g.path(pathUnlinkFile, preopenFd, "e/f"))
	expect(FsMkdir, ghostDir, "")
	expect(FsLink, "e/f", ghostDir+"/*")
	expect(FsUnlink, "e/f", "")
	must("rmdir", g.path(pathRemoveDirectory, preopenFd, "e"))
	expect(FsRmdir, "e", "")

	if len(hooks.effects) != len(wants) {
		t.Fatalf("%d effects, want %d: %+v", len(hooks.effects), len(wants), hooks.effects)
	}
	for i, w := range wants {
		e := hooks.effects[i]
		if strings.HasSuffix(w.path2, "/*") && strings.HasPrefix(e.Path2, strings.TrimSuffix(w.path2, "*")) {
			e.Path2 = w.path2 // a ghost's name is random
		}
		if e.Kind != EffectFs || e.Op != w.op || e.Root != 0 || e.Path != w.path || e.Path2 != w.path2 {
			t.Errorf("effect %d = %v %v %q %q, want fs %v %q %q", i, e.Kind, e.Op, e.Path, e.Path2, w.op, w.path, w.path2)
		}
	}
	if w := hooks.effects[2]; w.Offset != 0 || string(w.Data) != "hello world" {
		t.Errorf("write effect: offset %d data %q", w.Offset, w.Data)
	}
	if w := hooks.effects[3]; w.Call != CallFdPwrite || w.Offset != 0 || string(w.Data) != "HELLO" {
		t.Errorf("pwrite effect: %v offset %d data %q", w.Call, w.Offset, w.Data)
	}
	seen := map[Call]InputKind{}
	for _, in := range hooks.inputs {
		seen[in.Call] = in.Kind
	}
	for c, k := range map[Call]InputKind{CallFdRead: InputRead, CallFdPread: InputRead, CallFdFilestatGet: InputStat,
		CallPathFilestatGet: InputStat, CallPathReadlink: InputStat, CallFdReaddir: InputStat, CallPathOpen: InputResult} {
		if seen[c] != k {
			t.Errorf("%v: tap saw %v, want %v", c, seen[c], k)
		}
	}
	for _, in := range hooks.inputs {
		if in.Call == CallFdPread && string(in.Data) != "world" {
			t.Errorf("pread tapped %q", in.Data)
		}
	}
	if in, out := g.d.counters.BytesIn.Load(), g.d.counters.BytesOut.Load(); in != 16 || out != 16 {
		t.Errorf("counted %d bytes in, %d out; want 16, 16", in, out)
	}
}

// TestReaddir checks cookies, the dot entries and truncation of the last
// entry in a small buffer.
func TestReaddir(t *testing.T) {
	sandbox := t.TempDir()
	names := []string{"b", "a", "ccc", "dir"}
	for _, n := range names[:3] {
		if err := os.WriteFile(filepath.Join(sandbox, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(sandbox, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	g := newGuest(t, sandbox, nil)
	readdir := func(bufLen uint32, cookie uint64) []byte {
		buf, res := g.alloc(int(bufLen)), g.alloc(4)
		if errno := g.call(fdReaddir, preopenFd, uint64(buf), uint64(bufLen), cookie, uint64(res)); errno != ESUCCESS {
			t.Fatalf("fd_readdir: %v", errno)
		}
		return bytes.Clone(g.mem[buf : buf+g.u32(res)])
	}
	type ent struct {
		next uint64
		name string
		typ  Filetype
	}
	parse := func(b []byte) (out []ent) {
		for len(b) >= sizeDirent {
			n := int(binary.LittleEndian.Uint32(b[16:]))
			if len(b) < sizeDirent+n {
				break
			}
			out = append(out, ent{binary.LittleEndian.Uint64(b), string(b[sizeDirent : sizeDirent+n]), Filetype(b[20])})
			b = b[sizeDirent+n:]
		}
		return out
	}
	all := parse(readdir(4096, 0))
	want := []ent{{1, ".", FiletypeDirectory}, {2, "..", FiletypeDirectory}, {3, "a", FiletypeRegularFile},
		{4, "b", FiletypeRegularFile}, {5, "ccc", FiletypeRegularFile}, {6, "dir", FiletypeDirectory}}
	if len(all) != len(want) {
		t.Fatalf("entries %+v, want %+v", all, want)
	}
	for i := range want {
		if all[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, all[i], want[i])
		}
	}
	// A buffer that ends inside the third entry's header: full, and cut there.
	const smallLen = 2*sizeDirent + len(".") + len("..") + sizeDirent/2
	small := readdir(uint32(smallLen), 0)
	if len(small) != smallLen {
		t.Errorf("small buffer used %d bytes", len(small))
	}
	if got := parse(small); len(got) != 2 || got[1].name != ".." {
		t.Errorf("small buffer entries %+v", got)
	}
	// Resuming from a cookie; past the end is empty.
	if got := parse(readdir(4096, 4)); len(got) != 2 || got[0].name != "ccc" {
		t.Errorf("from cookie 4: %+v", got)
	}
	if got := readdir(4096, 100); len(got) != 0 {
		t.Errorf("past the end: %d bytes", len(got))
	}
	// Cookies stay stable while the directory changes, until restarted at 0.
	if err := os.WriteFile(filepath.Join(sandbox, "0first"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := parse(readdir(4096, 4)); len(got) != 2 || got[0].name != "ccc" {
		t.Errorf("stale cookie 4: %+v", got)
	}
	if got := parse(readdir(4096, 0)); len(got) != 7 || got[2].name != "0first" {
		t.Errorf("restarted: %+v", got)
	}
}

// TestFileOffsets checks positional I/O against the kept offset, append mode
// and seeking.
func TestFileOffsets(t *testing.T) {
	g := newGuest(t, t.TempDir(), nil)
	f, errno := g.open(preopenFd, 0, "f", OflagCreat, RightsAll, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	res := g.alloc(8)
	seek := func(off int64, whence uint8) uint64 {
		t.Helper()
		if errno := g.call(fdSeek, uint64(f), uint64(off), uint64(whence), uint64(res)); errno != ESUCCESS {
			t.Fatalf("seek(%d, %d): %v", off, whence, errno)
		}
		return g.u64(res)
	}
	g.write(f, "0123456789")
	if pos := seek(0, WhenceCur); pos != 10 {
		t.Errorf("after write at %d", pos)
	}
	if pos := seek(-4, WhenceEnd); pos != 6 {
		t.Errorf("seek end-4 = %d", pos)
	}
	if got, _ := g.read(f, 10); got != "6789" {
		t.Errorf("read %q", got)
	}
	if errno := g.call(fdSeek, uint64(f), uint64(1<<64-20), uint64(WhenceCur), uint64(res)); errno != EINVAL {
		t.Errorf("seek before 0 = %v", errno)
	}
	if errno := g.call(fdSeek, uint64(f), 0, 3, uint64(res)); errno != EINVAL {
		t.Errorf("bad whence = %v", errno)
	}
	// Append mode ignores the offset and leaves it at the end.
	must := func(errno Errno) {
		t.Helper()
		if errno != ESUCCESS {
			t.Fatal(errno)
		}
	}
	must(g.call(fdFdstatSetFlags, uint64(f), uint64(FdflagAppend)))
	seek(0, WhenceSet)
	g.write(f, "ab")
	if pos := seek(0, WhenceCur); pos != 12 {
		t.Errorf("after append at %d", pos)
	}
	must(g.call(fdFdstatSetFlags, uint64(f), 0))
	seek(0, WhenceSet)
	g.write(f, "X")
	seek(0, WhenceSet)
	if got, _ := g.read(f, 20); got != "X123456789ab" {
		t.Errorf("content %q", got)
	}
	// fd_tell and fd_seek need their rights.
	must(g.call(fdFdstatSetRights, uint64(f), RightsRegularFile&^(RightFdSeek|RightFdTell), 0))
	if errno := g.call(fdSeek, uint64(f), 0, uint64(WhenceSet), uint64(res)); errno != ENOTCAPABLE {
		t.Errorf("seek without right = %v", errno)
	}
	if errno := g.call(fdTell, uint64(f), uint64(res)); errno != ENOTCAPABLE {
		t.Errorf("tell without right = %v", errno)
	}
}

// TestFastPathAllocs keeps the hot calls free of allocations.
func TestFastPathAllocs(t *testing.T) {
	g := newGuest(t, t.TempDir(), nil)
	f, errno := g.open(preopenFd, 0, "f", OflagCreat, RightsAll, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	two := g.alloc(16)
	a, b := g.alloc(64), g.alloc(64)
	binary.LittleEndian.PutUint32(g.mem[two:], a)
	binary.LittleEndian.PutUint32(g.mem[two+4:], 64)
	binary.LittleEndian.PutUint32(g.mem[two+8:], b)
	binary.LittleEndian.PutUint32(g.mem[two+12:], 64)
	res := g.alloc(8)
	m := g.m()
	calls := map[string]func(){
		"fd_write":  func() { fdWrite(g.d, m, []uint64{uint64(f), uint64(two), 2, uint64(res)}) },
		"fd_seek":   func() { fdSeek(g.d, m, []uint64{uint64(f), 0, uint64(WhenceSet), uint64(res)}) },
		"fd_read":   func() { fdRead(g.d, m, []uint64{uint64(f), uint64(two), 2, uint64(res)}) },
		"fd_pread":  func() { fdPread(g.d, m, []uint64{uint64(f), uint64(two), 2, 0, uint64(res)}) },
		"fd_pwrite": func() { fdPwrite(g.d, m, []uint64{uint64(f), uint64(two), 2, 0, uint64(res)}) },
		"fd_tell":   func() { fdTell(g.d, m, []uint64{uint64(f), uint64(res)}) },
		"stdout":    func() { fdWrite(g.d, m, []uint64{1, uint64(two), 2, uint64(res)}) },
	}
	for name, call := range calls {
		call()
		if n := testing.AllocsPerRun(100, call); n != 0 {
			t.Errorf("%s allocates %.1f times per call", name, n)
		}
	}
}

// benchGuest opens a file with a 64-byte iovec for the benchmarks.
func benchGuest(b *testing.B) (g *guest, m Mem, f uint32, iov, res uint32) {
	g = &guest{mem: make([]byte, 1<<16), top: 64}
	d, err := New(Config{Preopens: []Preopen{{HostPath: b.TempDir(), GuestPath: "/"}},
		Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	g.d = d
	f, errno := g.open(preopenFd, 0, "f", OflagCreat, RightsAll, 0)
	if errno != ESUCCESS {
		b.Fatal(errno)
	}
	return g, g.m(), f, g.iovec(make([]byte, 64)), g.alloc(8)
}

func BenchmarkFdWriteFile(b *testing.B) {
	g, m, f, iov, res := benchGuest(b)
	p := []uint64{uint64(f), uint64(iov), 1, uint64(res)}
	seek := []uint64{uint64(f), 0, uint64(WhenceSet), uint64(res)}
	for b.Loop() {
		fdWrite(g.d, m, p)
		fdSeek(g.d, m, seek)
	}
}

func BenchmarkFdReadFile(b *testing.B) {
	g, m, f, iov, res := benchGuest(b)
	fdWrite(g.d, m, []uint64{uint64(f), uint64(iov), 1, uint64(res)})
	p := []uint64{uint64(f), uint64(iov), 1, 0, uint64(res)}
	for b.Loop() {
		fdPread(g.d, m, p)
	}
}

func BenchmarkFdSeek(b *testing.B) {
	g, m, f, _, res := benchGuest(b)
	p := []uint64{uint64(f), 0, uint64(WhenceCur), uint64(res)}
	for b.Loop() {
		fdSeek(g.d, m, p)
	}
}

// TestReaddirHidesThePreopensParent: a directory listing's ".." names its
// parent by inode, and a preopen's parent is outside the sandbox: it is
// hidden (the preopen's own inode instead), whatever path names the
// preopen ("sub/.." did not, and told the guest the host's inode).
func TestReaddirHidesThePreopensParent(t *testing.T) {
	outer := t.TempDir()
	sandbox := filepath.Join(outer, "sandbox")
	os.MkdirAll(filepath.Join(sandbox, "sub"), 0o755)
	g := newGuest(t, sandbox, nil)
	dotdot := func(fd uint32) uint64 {
		buf, res := g.alloc(256), g.alloc(4)
		if errno := g.call(fdReaddir, uint64(fd), uint64(buf), 256, 0, uint64(res)); errno != ESUCCESS {
			t.Fatal(errno)
		}
		// The first entry is ".", 24 bytes and its name; the second "..":
		// its inode 8 bytes into its header.
		return binary.LittleEndian.Uint64(g.mem[buf+24+1+8:])
	}
	var outside, root unix.Stat_t
	unix.Stat(outer, &outside)
	unix.Stat(sandbox, &root)
	for _, path := range []string{".", "sub/.."} {
		fd, errno := g.open(preopenFd, 0, path, OflagDirectory, dirRights, 0)
		if errno != ESUCCESS {
			t.Fatal(errno)
		}
		if ino := dotdot(fd); ino == outside.Ino || ino != root.Ino {
			t.Errorf("%q: \"..\" has inode %d; the sandbox's is %d, its parent's (outside) %d", path, ino, root.Ino, outside.Ino)
		}
	}
}

// TestReaddirCachesAreBounded: each directory descriptor keeps its listing
// for fd_readdir's cookies; a guest opening one large directory hundreds
// of times and reading one entry of each kept hundreds of copies (the
// host's memory, not the guest's). Past maxDirBytes in all, the others'
// listings are dropped, and a descriptor whose listing was dropped reads
// on from its cookie as if nothing happened.
func TestReaddirCachesAreBounded(t *testing.T) {
	dir := t.TempDir()
	for i := range 500 {
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("%0200d", i)), nil, 0o644)
	}
	g := newGuest(t, dir, nil)
	first := func(fd uint32, cookie uint64) (string, uint64) {
		buf, res := g.alloc(4096), g.alloc(4)
		if errno := g.call(fdReaddir, uint64(fd), uint64(buf), 4096, cookie, uint64(res)); errno != ESUCCESS {
			t.Fatal(errno)
		}
		n := binary.LittleEndian.Uint32(g.mem[buf+16:])
		return string(g.mem[buf+sizeDirent : buf+sizeDirent+n]), binary.LittleEndian.Uint64(g.mem[buf:])
	}
	var fds []uint32
	for range 300 { // 300 listings of ~130 KiB: 39 MiB unbounded
		fd, errno := g.open(preopenFd, 0, ".", OflagDirectory, dirRights, 0)
		if errno != ESUCCESS {
			t.Fatal(errno)
		}
		first(fd, 0)
		fds = append(fds, fd)
	}
	if g.d.dirBytes > maxDirBytes+200<<10 {
		t.Fatalf("the descriptors' listings hold %d bytes, bound %d", g.d.dirBytes, maxDirBytes)
	}
	// The first descriptor's listing was dropped: it reads on.
	name, next := first(fds[0], 5)
	if want := fmt.Sprintf("%0200d", 3); name != want || next != 6 {
		t.Fatalf("from cookie 5 after its listing was dropped: %.12s… (next %d), want %.12s… (next 6)", name, next, want)
	}
}
