package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// FS is the file system the slot's journal (COMMIT, APPLIED, the snapshot
// and ops files) lives on: the few operations the journal needs, so that a
// test can put it on a file system that crashes (Pebble's vfs idea). The
// replica trees under disk/ always live on the OS, because the guest gets
// them as real directories; their operations have their own test hook.
//
// Durability is as on a POSIX file system: File.Sync makes a file's data
// durable, SyncDir makes a directory's entries (creations, renames,
// removals) durable. Nothing else is.
type FS interface {
	// Create makes name a new empty file open for writing (0600),
	// replacing a file of that name.
	Create(name string) (File, error)
	// Open opens name for reading.
	Open(name string) (File, error)
	Rename(oldname, newname string) error
	Remove(name string) error
	MkdirAll(name string) error
	// ReadDir lists the names in a directory, sorted.
	ReadDir(name string) ([]string, error)
	SyncDir(name string) error
	// Lock takes an exclusive lock on name (created if missing) that
	// another process opening the same slot cannot take.
	Lock(name string) (io.Closer, error)
}

// File is an open journal file.
type File interface {
	io.Reader
	io.Writer
	Sync() error
	Close() error
}

// OS is the FS of the operating system.
func OS() FS { return osFS{} }

type osFS struct{}

func (osFS) Create(name string) (File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err // not a nil *os.File in a non-nil File
	}
	return f, nil
}

func (osFS) Open(name string) (File, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (osFS) Rename(oldname, newname string) error { return os.Rename(oldname, newname) }
func (osFS) Remove(name string) error             { return os.Remove(name) }
func (osFS) MkdirAll(name string) error           { return os.MkdirAll(name, 0o700) }

func (osFS) ReadDir(name string) ([]string, error) {
	es, err := os.ReadDir(name)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Name()
	}
	slices.Sort(out)
	return out, nil
}

func (osFS) SyncDir(name string) error {
	d, err := os.Open(name)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Lock takes an exclusive flock of name. A lock that is busy is tried
// again for up to lockWait: a slot closed and opened again in one process
// (a backup restarting a slot, reopening a broken one) finds its own old
// lock still held for a moment if any goroutine of the process forked a
// child meanwhile (to run wasm-opt, say) — the child holds a copy of every
// descriptor until it execs, close-on-exec or not, and the lock lives as
// long as any copy does. A slot open in another process stays locked, and
// is refused once the wait is over.
func (osFS) Lock(name string) (io.Closer, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(lockWait)
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			break
		}
		time.Sleep(lockRetry)
	}
	if err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("store: %s is locked: %w", name, ErrLocked)
		}
		return nil, fmt.Errorf("store: lock %s: %w", name, err)
	}
	return f, nil // closing the file releases the lock
}

// ErrLocked is the cause of Lock's error when another process holds the
// lock (test with errors.Is).
var ErrLocked = errors.New("the slot is open in another process")

// lockWait bounds Lock's retrying of a busy lock (a fork's exec takes a
// few milliseconds, more on a loaded machine). It stays well under a
// replication timeout: a backup refuses a primary whose slot another
// process holds after this wait, and the primary, which waits that long
// for an answer, must get the reason, not a timeout. lockRetry is its
// pace.
const (
	lockWait  = 100 * time.Millisecond
	lockRetry = 2 * time.Millisecond
)
