package store

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// errCrash is what every operation returns from the injected crash on.
var errCrash = errors.New("injected crash")

// crasher counts the slot's file operations (journal and replica) and
// crashes at operation at (1-based; 0 never): that operation and every
// later one fail with errCrash and have no effect.
type crasher struct {
	n       int
	at      int
	half    bool // a write at the crash point leaves half its data
	crashed bool
	now     bool // the crash happened at the current operation
	trace   []string
	// fn, if set, decides instead of at: nil, errCrash, or for a replica
	// effect errSkip or errHalf.
	fn func(op string) error
}

func (c *crasher) step(op string) error {
	c.now = false
	if c.crashed {
		return errCrash
	}
	c.n++
	c.trace = append(c.trace, op)
	if c.fn != nil {
		err := c.fn(op)
		if err == errCrash {
			c.crashed, c.now = true, true
		}
		return err
	}
	if c.at > 0 && c.n == c.at {
		c.crashed, c.now = true, true
		return errCrash
	}
	return nil
}

// memFS is a journal FS that forgets what was not made durable: a file's
// data becomes durable with File.Sync, a directory's entries with SyncDir.
// crash then models a power loss: each unsynced file keeps its durable
// data, its current data, or (mode random) a prefix in between, and each
// unsynced directory entry its durable or its current binding.
type memFS struct {
	mu   sync.Mutex
	dirs map[string]*memDir
	c    *crasher
}

type memInode struct {
	data, durable []byte
}

type memDir struct {
	cur, durable map[string]*memInode
}

func newMemFS(c *crasher) *memFS { return &memFS{dirs: map[string]*memDir{}, c: c} }

func (m *memFS) split(name string) (*memDir, string, error) {
	d := m.dirs[filepath.Dir(name)]
	if d == nil {
		return nil, "", &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return d, filepath.Base(name), nil
}

func (m *memFS) Create(name string) (File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.c.step("create " + filepath.Base(name)); err != nil {
		return nil, err
	}
	d, base, err := m.split(name)
	if err != nil {
		return nil, err
	}
	ino := &memInode{}
	d.cur[base] = ino
	return &memFile{m: m, ino: ino, name: base}, nil
}

func (m *memFS) Open(name string) (File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, base, err := m.split(name)
	if err != nil {
		return nil, err
	}
	ino := d.cur[base]
	if ino == nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return &memFile{m: m, ino: ino, r: bytes.NewReader(bytes.Clone(ino.data)), name: base}, nil
}

func (m *memFS) Rename(oldname, newname string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.c.step("rename " + filepath.Base(oldname) + " " + filepath.Base(newname)); err != nil {
		return err
	}
	sd, sb, err := m.split(oldname)
	if err != nil {
		return err
	}
	dd, db, err := m.split(newname)
	if err != nil {
		return err
	}
	ino := sd.cur[sb]
	if ino == nil {
		return &fs.PathError{Op: "rename", Path: oldname, Err: fs.ErrNotExist}
	}
	delete(sd.cur, sb)
	dd.cur[db] = ino
	return nil
}

func (m *memFS) Remove(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.c.step("remove " + filepath.Base(name)); err != nil {
		return err
	}
	d, b, err := m.split(name)
	if err != nil {
		return err
	}
	if d.cur[b] == nil {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(d.cur, b)
	return nil
}

func (m *memFS) MkdirAll(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for p := filepath.Clean(name); ; p = filepath.Dir(p) {
		if m.dirs[p] == nil {
			m.dirs[p] = &memDir{cur: map[string]*memInode{}, durable: map[string]*memInode{}}
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func (m *memFS) ReadDir(name string) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.dirs[filepath.Clean(name)]
	if d == nil {
		return nil, &fs.PathError{Op: "readdir", Path: name, Err: fs.ErrNotExist}
	}
	var out []string
	for n := range d.cur {
		out = append(out, n)
	}
	slices.Sort(out)
	return out, nil
}

func (m *memFS) SyncDir(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.c.step("syncdir"); err != nil {
		return err
	}
	d := m.dirs[filepath.Clean(name)]
	if d == nil {
		return &fs.PathError{Op: "sync", Path: name, Err: fs.ErrNotExist}
	}
	d.durable = maps(d.cur)
	return nil
}

func (m *memFS) Lock(string) (io.Closer, error) { return io.NopCloser(nil), nil }

func maps(m map[string]*memInode) map[string]*memInode {
	out := make(map[string]*memInode, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

type crashMode int

const (
	crashDrop   crashMode = iota // power loss: only what was synced survives
	crashKeep                    // process crash: the kernel keeps everything
	crashRandom                  // power loss where the file system wrote some unsynced state back
)

func (m crashMode) String() string { return [...]string{"drop", "keep", "random"}[m] }

// crash applies the crash model; what survives becomes durable.
func (m *memFS) crash(mode crashMode, rng *rand.Rand) {
	m.mu.Lock()
	defer m.mu.Unlock()
	inodes := map[*memInode]bool{}
	for _, d := range m.dirs {
		switch mode {
		case crashDrop:
			d.cur = maps(d.durable)
		case crashRandom:
			names := map[string]bool{}
			for n := range d.cur {
				names[n] = true
			}
			for n := range d.durable {
				names[n] = true
			}
			next := map[string]*memInode{}
			for n := range names {
				pick := d.durable[n]
				if rng.IntN(2) == 0 {
					pick = d.cur[n]
				}
				if pick != nil {
					next[n] = pick
				}
			}
			d.cur = next
		}
		d.durable = maps(d.cur)
		for _, ino := range d.cur {
			inodes[ino] = true
		}
	}
	for ino := range inodes {
		switch mode {
		case crashDrop:
			ino.data = bytes.Clone(ino.durable)
		case crashRandom:
			if bytes.HasPrefix(ino.data, ino.durable) {
				ino.data = bytes.Clone(ino.data[:len(ino.durable)+rng.IntN(len(ino.data)-len(ino.durable)+1)])
			} else if rng.IntN(2) == 0 {
				ino.data = bytes.Clone(ino.durable)
			}
		}
		ino.durable = bytes.Clone(ino.data)
	}
}

type memFile struct {
	m    *memFS
	ino  *memInode
	r    *bytes.Reader
	name string
}

func (f *memFile) Read(p []byte) (int, error) {
	if f.r == nil {
		return 0, errors.New("memfs: not open for reading")
	}
	return f.r.Read(p)
}

func (f *memFile) Write(p []byte) (int, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.m.c.step("write " + f.name); err != nil {
		if f.m.c.now && f.m.c.half {
			f.ino.data = append(f.ino.data, p[:len(p)/2]...)
		}
		return 0, err
	}
	f.ino.data = append(f.ino.data, p...)
	return len(p), nil
}

func (f *memFile) Sync() error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.m.c.step("fsync " + f.name); err != nil {
		return err
	}
	f.ino.durable = bytes.Clone(f.ino.data)
	return nil
}

func (f *memFile) Close() error { return nil }

// isCrash reports whether err came from the injected crash.
func isCrash(err error) bool {
	return errors.Is(err, errCrash) || strings.Contains(err.Error(), errCrash.Error())
}
