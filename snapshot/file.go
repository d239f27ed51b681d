package snapshot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
)

// WriteFile writes s to path so that path holds either its old content or
// all of s, whatever crashes when: the bytes go to a temporary file in the
// same directory, are fsynced, the file is renamed over path, and the
// directory is fsynced so that the rename itself is durable. The file is
// private (0600): it holds the guest's memory.
func WriteFile(path string, s *Snapshot) error {
	return WriteFileOptions(path, s, Options{})
}

// WriteFileOptions is WriteFile with encoding options.
func WriteFileOptions(path string, s *Snapshot, o Options) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = withPath(err, path)
		}
	}()
	if err = s.EncodeOptions(f, o); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("snapshot: fsync %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return syncDir(dir)
}

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
