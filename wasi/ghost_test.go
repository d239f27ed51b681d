package wasi

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGhostFiles: files the guest holds open and unlinks, or renames
// another file over, keep their contents for its descriptors across a
// capture and restore (they were re-opened by their old name: gone, an
// error and a failed failover, or another file's contents), and the
// effects a Remus backup replays name them where they now are: the writes
// after the unlink went, by path, to the file that took the name. The
// hidden directory they live in is out of the guest's sight and reach,
// and the last descriptor closed removes each.
func TestGhostFiles(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), []byte("AAAA"), 0o644)
	os.WriteFile(filepath.Join(dir, "b"), []byte("BBBB"), 0o644)
	os.WriteFile(filepath.Join(dir, "tmp"), []byte("0123"), 0o644)
	rec := &recorder{}
	g := newGuest(t, dir, rec)
	a, errno := g.open(preopenFd, 0, "a", 0, RightFdRead|RightFdSeek|RightFdTell, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	tmp, errno := g.open(preopenFd, 0, "tmp", 0, RightFdRead|RightFdWrite|RightFdSeek|RightFdTell, 0)
	if errno != ESUCCESS {
		t.Fatal(errno)
	}
	if errno := g.rename(preopenFd, "b", preopenFd, "a"); errno != ESUCCESS {
		t.Fatal(errno)
	}
	if errno := g.path(pathUnlinkFile, preopenFd, "tmp"); errno != ESUCCESS {
		t.Fatal(errno)
	}
	rec.effects = nil
	if _, errno := g.write(tmp, "xy"); errno != ESUCCESS {
		t.Fatal(errno)
	}
	if len(rec.effects) != 1 || !strings.HasPrefix(rec.effects[0].Path, ghostDir+"/") {
		t.Fatalf("the write to the unlinked file is journaled as %+v, want it to name its ghost", rec.effects)
	}
	// Out of the guest's sight and reach.
	names := g.readdirNames(preopenFd)
	if strings.Contains(strings.Join(names, " "), ghostDir) {
		t.Fatalf("the root lists %v", names)
	}
	if _, _, errno := g.stat(preopenFd, 0, ghostDir); errno != ENOENT {
		t.Fatalf("stat of %s: %v, want ENOENT", ghostDir, errno)
	}

	st := g.d.Capture()
	d2, err := Restore(Config{Preopens: []Preopen{{HostPath: dir, GuestPath: "/"}},
		Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}, st)
	if err != nil {
		t.Fatalf("restore with an unlinked and a replaced file open: %v", err)
	}
	g2 := &guest{t: t, d: d2, mem: make([]byte, 1<<20), top: 64}
	if s, _ := g2.read(a, 4); s != "AAAA" {
		t.Fatalf("the descriptor of the file renamed over reads %q after a restore, want its own \"AAAA\"", s)
	}
	if s, _ := g2.read(tmp, 4); s != "23" {
		t.Fatalf("the descriptor of the unlinked file reads %q after a restore, want \"23\" (written \"xy\" over \"01\")", s)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a")); string(b) != "BBBB" {
		t.Fatalf("a holds %q", b)
	}
	// The last descriptors closed, the ghosts go.
	g.d.Close()
	for _, fd := range []uint32{a, tmp} {
		if errno := g2.call(fdClose, uint64(fd)); errno != ESUCCESS {
			t.Fatal(errno)
		}
	}
	left, _ := os.ReadDir(filepath.Join(dir, ghostDir))
	if len(left) != 0 {
		t.Fatalf("%d ghosts left after the last descriptors closed", len(left))
	}
}

// readdirNames lists directory fd's entry names (one buffer's worth).
func (g *guest) readdirNames(fd uint32) []string {
	buf, res := g.alloc(8192), g.alloc(4)
	if errno := g.call(fdReaddir, uint64(fd), uint64(buf), 8192, 0, uint64(res)); errno != ESUCCESS {
		g.t.Fatalf("fd_readdir: %v", errno)
	}
	var names []string
	for b := g.mem[buf : buf+g.u32(res)]; len(b) >= sizeDirent; {
		n := int(binary.LittleEndian.Uint32(b[16:]))
		if len(b) < sizeDirent+n {
			break
		}
		names = append(names, string(b[sizeDirent:sizeDirent+n]))
		b = b[sizeDirent+n:]
	}
	return names
}
