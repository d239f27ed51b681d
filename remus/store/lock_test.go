package store

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestLockOutlivesAForkedCopy: a slot's lock closed while a copy of its
// descriptor lives on (a child forked by another goroutine, not yet
// exec'd; a dup here shares the open file as the child's copy does) is
// taken again once the copy goes, not refused; a lock another holder
// keeps is refused, after the wait, saying so.
func TestLockOutlivesAForkedCopy(t *testing.T) {
	name := filepath.Join(t.TempDir(), lockName)
	first, err := OS().Lock(name)
	if err != nil {
		t.Fatal(err)
	}
	fd := int(first.(interface{ Fd() uintptr }).Fd())
	child, err := unix.Dup(fd) // the forked child's copy
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	const execAfter = 50 * time.Millisecond
	go func() {
		time.Sleep(execAfter)
		unix.Close(child) // the child execs
	}()
	t0 := time.Now()
	second, err := OS().Lock(name)
	if err != nil {
		t.Fatalf("the lock, closed while a forked copy lived on: %v", err)
	}
	if el := time.Since(t0); el < execAfter {
		t.Fatalf("taken after %v, while the copy still held it (until %v)", el, execAfter)
	}

	// Held for good (another process, in effect): refused.
	t0 = time.Now()
	_, err = OS().Lock(name)
	if err == nil || !strings.Contains(err.Error(), "open in another process") {
		t.Fatalf("a lock held throughout: %v, want refused as open in another process", err)
	}
	if el := time.Since(t0); el < lockWait {
		t.Fatalf("refused after %v, before its wait of %v", el, lockWait)
	}
	second.Close()
}
