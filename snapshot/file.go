package snapshot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// WriteFile writes s to path so that path holds either its old content or
// all of s, whatever crashes when: the bytes go to a temporary file in the
// same directory, are fsynced, the file is renamed over path, and the
// directory is fsynced so that the rename itself is durable. The file is
// private (0600): it holds the guest's memory.
//
// The temporary file has no name while it is written (O_TMPFILE, where the
// file system has it): a process killed mid-write, or stopped, leaves
// nothing behind, where a named one left a file of the memory's size that
// nothing would remove. It gets a name just before the rename. A path that
// exists and is not a regular file (a device, a socket, a directory) is
// refused: the rename would replace it.
func WriteFile(path string, s *Snapshot) error {
	return WriteFileOptions(path, s, Options{})
}

// WriteFileOptions is WriteFile with encoding options.
func WriteFileOptions(path string, s *Snapshot, o Options) (err error) {
	if err := checkTarget(path); err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, tmp, err := createTemp(dir, base)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			if tmp != "" {
				os.Remove(tmp)
			}
			err = withPath(err, path)
		}
	}()
	if err = s.EncodeOptions(f, o); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("snapshot: fsync %s: %w", f.Name(), err)
	}
	if tmp == "" {
		if tmp, err = linkTemp(f, dir, base); err != nil {
			return fmt.Errorf("snapshot: naming the written file: %w", err)
		}
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return syncDir(dir)
}

// checkTarget refuses a path that exists and is not a regular file (after
// symbolic links): renaming over it would replace a device node, a socket
// or a FIFO with the snapshot, and a directory is no file name.
func checkTarget(path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("snapshot: %w", err)
	case fi.IsDir():
		return fmt.Errorf("snapshot: %s is a directory: give a file name", path)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("snapshot: %s exists and is not a regular file (%s): it is not replaced", path, fileKind(fi.Mode()))
	}
	return nil
}

func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeDevice != 0:
		return "a device"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	}
	return m.Type().String()
}

// createTemp opens the file a snapshot is written to in dir: unnamed (tmp
// "") where the file system can (O_TMPFILE, and /proc to name it later),
// else named after base.
func createTemp(dir, base string) (f *os.File, tmp string, err error) {
	if procFdWorks() {
		fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
		if err == nil {
			return os.NewFile(uintptr(fd), filepath.Join(dir, "(unnamed "+base+")")), "", nil
		}
		// EOPNOTSUPP (a file system without it), EISDIR or EINVAL
		// (older kernels): the named way. Anything else, the named
		// way reports too.
	}
	f, err = os.CreateTemp(dir, tempPrefix(base)+"*")
	if err != nil {
		return nil, "", err
	}
	return f, f.Name(), nil
}

// linkTemp names the unnamed file f in dir, for the rename.
func linkTemp(f *os.File, dir, base string) (string, error) {
	from := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	for {
		name := filepath.Join(dir, tempPrefix(base)+strconv.FormatUint(rand.Uint64(), 36))
		switch err := unix.Linkat(unix.AT_FDCWD, from, unix.AT_FDCWD, name, unix.AT_SYMLINK_FOLLOW); {
		case err == nil:
			return name, nil
		case !errors.Is(err, unix.EEXIST):
			return "", err
		}
	}
}

// tempPrefix is the start of a temporary file's name for base: hidden and
// named after it, unless that would be too long a name.
func tempPrefix(base string) string {
	if len(base) > 200 {
		return ".ftvm-snapshot.tmp-"
	}
	return "." + base + ".tmp-"
}

// procFdWorks says whether /proc/self/fd names open files (linkTemp needs
// it; a chroot or container may lack /proc).
var procFdWorks = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/self/fd")
	return err == nil
})

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("snapshot: fsync directory %s: %w", dir, err)
	}
	return nil
}

// ReadFile reads and verifies the snapshot in path. With module non-nil, a
// snapshot of another module is ErrModuleMismatch (found from the header,
// before the pages are read); nil accepts any module (ftvm inspect). The
// file must end where the snapshot does. A memory section is checked
// through a mapping of the file and its pages copied out.
func ReadFile(path string, module *Hash) (*Snapshot, error) {
	return readFile(path, module, nil)
}

// readFile is ReadFile; with mapMem, a memory section is mapped through it
// and the snapshot's pages alias that mapping (Image.Map).
func readFile(path string, module *Hash, mapMem func(*os.File, int64, int) ([]byte, error)) (*Snapshot, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	d := newDecoder(br, module)
	d.src = &fileSource{f: f, br: br, mapMem: mapMem}
	// A restore waits for this: decompress page batches on every core.
	d.workers = runtime.GOMAXPROCS(0)
	s, err := d.run()
	if err != nil {
		return nil, withPath(err, path)
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: %w", path, err)
		}
		return nil, &Error{Kind: ErrCorrupt, Path: path, Offset: d.off, Msg: "data after the end of the snapshot"}
	}
	return s, nil
}
