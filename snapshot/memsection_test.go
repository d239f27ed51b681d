package snapshot

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// mappableSnapshot is a full snapshot whose memory has runs of zero pages
// (holes) and non-zero pages, the last page non-zero.
func mappableSnapshot(seed uint64, memSize uint64, n int) *Snapshot {
	rng := rand.New(rand.NewPCG(seed, 99))
	s := testSnapshot(rng, Full, memSize, n)
	for _, p := range s.Pages { // no page of the test content may be zero
		p.Data[0] |= 1
	}
	return s
}

// mapTo is an Image.Map for tests: a private file mapping of its own.
func mapTo(t *testing.T) func(f *os.File, off int64, n int) ([]byte, error) {
	return func(f *os.File, off int64, n int) ([]byte, error) {
		b, err := unix.Mmap(int(f.Fd()), off, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
		if err == nil {
			t.Cleanup(func() { unix.Munmap(b) })
		}
		return b, err
	}
}

// A mappable encoding holds the same snapshot as a paged one: the same
// ID, the same content through every reader (stream, file, mapped file),
// with the memory data page-aligned and zero pages left as holes.
func TestMappableRoundTrip(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		mem  uint64
		n    int
	}{{"empty memory", 0, 0}, {"no pages", 1 << 20, 0}, {"sparse", 4 << 20, 40}, {"dense", 1 << 20, 256}} {
		t.Run(tc.name, func(t *testing.T) {
			s := mappableSnapshot(1, tc.mem, tc.n)
			s.Nonce = [16]byte{7}
			if tc.mem == 0 {
				s.StackAddr, s.Stack = 0, nil
			}
			paged := encodeT(t, s, Options{})
			pagedID := s.ID
			path := filepath.Join(dir, tc.name+".snap")
			if err := WriteFileOptions(path, s, Options{Mappable: true}); err != nil {
				t.Fatal(err)
			}
			if s.ID != pagedID {
				t.Fatal("the mappable encoding changed the ID")
			}
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if v := le.Uint32(raw[8:]); v != versionMemory {
				t.Fatalf("version %d", v)
			}
			var mem SectionInfo
			for _, sec := range s.Sections {
				if sec.Type == SecMemory {
					mem = sec
				}
			}
			if mem.Type != SecMemory || mem.DataOffset%PageSize != 0 || mem.DataLength != int64(tc.mem) {
				t.Fatalf("memory section %+v", mem)
			}
			for _, p := range s.Pages {
				off := mem.DataOffset + int64(p.Index)*PageSize
				if !bytes.Equal(raw[off:off+PageSize], p.Data) {
					t.Fatalf("page %d is not at its place in the file", p.Index)
				}
			}
			if tc.name == "sparse" {
				var st syscall.Stat_t
				if err := syscall.Stat(path, &st); err != nil {
					t.Fatal(err)
				}
				if used := st.Blocks * 512; used > int64(len(paged))+int64(len(s.Pages)+64)*PageSize {
					t.Errorf("%d bytes on disk for %d non-zero pages of %d: zero pages were written, not left as holes",
						used, len(s.Pages), tc.mem/PageSize)
				}
			}
			streamed, err := DecodeBytes(raw, &testModule)
			if err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, streamed, s)
			read, err := ReadFile(path, &testModule)
			if err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, read, s)
			if sum := Describe(read); sum.MemoryData != int64(tc.mem) || sum.Pages != tc.n {
				t.Fatalf("describe: %+v", sum)
			}
			img := &Image{Map: mapTo(t)}
			if err := RestoreInto(img, nil, path); err != nil {
				t.Fatal(err)
			}
			want, err := Restore(nil, writeTemp(t, paged))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(img.Memory, want.Memory) || img.ID != want.ID {
				t.Fatal("the mapped restore differs from the paged one")
			}
		})
	}
}

func writeTemp(t *testing.T, b []byte) string {
	p := filepath.Join(t.TempDir(), "s.snap")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A chain that starts with a mapped full snapshot applies its incrementals
// on top of the mapping (copy-on-write: the file keeps its bytes) and ends
// where the same chain read the ordinary way does.
func TestMappedChain(t *testing.T) {
	dir := t.TempDir()
	const steps = 8
	paths, g := writeChain(t, dir, 3, testModule, steps)
	img, err := Restore(&testModule, paths...)
	if err != nil {
		t.Fatal(err)
	}
	// Re-write the chain's full snapshot as mappable, keeping its ID.
	first, err := ReadFile(paths[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(paths[0])
	if err := WriteFileOptions(paths[0], first, Options{Mappable: true}); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(paths[0])
	if bytes.Equal(before, after) {
		t.Fatal("the rewrite changed nothing")
	}
	mapped := &Image{Map: mapTo(t)}
	if err := RestoreInto(mapped, &testModule, paths...); err != nil {
		t.Fatal(err)
	}
	g.check(t, mapped)
	if !bytes.Equal(mapped.Memory, img.Memory) || mapped.Seq != steps {
		t.Fatal("the mapped chain restores differently")
	}
	if now, _ := os.ReadFile(paths[0]); !bytes.Equal(now, after) {
		t.Fatal("applying incrementals wrote to the snapshot file")
	}
}

// Damage in a mappable snapshot is found by every reader: a changed byte
// of a page, of a zero page (even one stored as a hole), of the padding,
// of the index; a file cut anywhere.
func TestMappableDamage(t *testing.T) {
	s := mappableSnapshot(5, 256<<10, 12)
	path := filepath.Join(t.TempDir(), "m.snap")
	if err := WriteFileOptions(path, s, Options{Mappable: true}); err != nil {
		t.Fatal(err)
	}
	valid, _ := os.ReadFile(path)
	var mem SectionInfo
	for _, sec := range s.Sections {
		if sec.Type == SecMemory {
			mem = sec
		}
	}
	present := map[int64]bool{}
	for _, p := range s.Pages {
		present[int64(p.Index)] = true
	}
	zeroPage := int64(0)
	for present[zeroPage] {
		zeroPage++
	}
	targets := map[string]int64{
		"index":        mem.Offset + frameSize + 6,
		"padding":      mem.DataOffset - 1,
		"listed page":  mem.DataOffset + int64(s.Pages[3].Index)*PageSize + 100,
		"zero page":    mem.DataOffset + zeroPage*PageSize + 17,
		"last byte":    mem.DataOffset + mem.DataLength - 1,
		"end section":  int64(len(valid)) - 10,
		"header":       prefixSize + frameSize + 80,
		"module frame": mem.Offset + 4,
	}
	for name, off := range targets {
		b := bytes.Clone(valid)
		b[off] ^= 0x40
		if _, err := DecodeBytes(b, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s (byte %d), streamed: %v", name, off, err)
		}
		p := writeTemp(t, b)
		if _, err := ReadFile(p, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s (byte %d), read from a file: %v", name, off, err)
		}
		if err := RestoreInto(&Image{Map: mapTo(t)}, nil, p); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s (byte %d), mapped: %v", name, off, err)
		}
	}
	for _, n := range []int{len(valid) - 1, len(valid) - endSize - frameSize, int(mem.DataOffset + mem.DataLength/2),
		int(mem.DataOffset) - 5, int(mem.Offset) + 3} {
		p := writeTemp(t, valid[:n])
		if _, err := ReadFile(p, nil); !errors.Is(err, ErrTruncated) {
			t.Errorf("cut at %d, read from a file: %v", n, err)
		}
		if err := RestoreInto(&Image{Map: mapTo(t)}, nil, p); !errors.Is(err, ErrTruncated) {
			t.Errorf("cut at %d, mapped: %v", n, err)
		}
		if _, err := DecodeBytes(valid[:n], nil); !errors.Is(err, ErrTruncated) {
			t.Errorf("cut at %d, streamed: %v", n, err)
		}
	}
}

// Every single-byte change of a small mappable encoding is corruption.
func TestMappableEveryByte(t *testing.T) {
	t.Parallel()
	s := mappableSnapshot(9, 64<<10, 3)
	var buf bytes.Buffer
	if err := s.EncodeOptions(&buf, Options{Mappable: true}); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	for i := range b {
		b[i] ^= 0x21
		if _, err := DecodeBytes(b, nil); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("byte %d: %v", i, err)
		}
		b[i] ^= 0x21
	}
	if _, err := DecodeBytes(b, nil); err != nil {
		t.Fatal(err)
	}
}

// Rules of the memory section: only in version 2, only in full snapshots,
// once, never with page sections.
func TestMemorySectionRules(t *testing.T) {
	s := mappableSnapshot(11, 64<<10, 2)
	var buf bytes.Buffer
	if err := s.EncodeOptions(&buf, Options{Mappable: true}); err != nil {
		t.Fatal(err)
	}
	v1 := bytes.Clone(buf.Bytes())
	le.PutUint32(v1[8:], versionPaged)
	le.PutUint32(v1[12:], crc(v1[:12]))
	if _, err := DecodeBytes(v1, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("memory section in version 1: %v", err)
	}
	inc := mappableSnapshot(12, 64<<10, 2)
	inc.Kind, inc.Seq, inc.Parent = Incremental, 1, Hash{1}
	buf.Reset()
	if err := inc.EncodeOptions(&buf, Options{Mappable: true}); err != nil {
		t.Fatal(err)
	}
	for _, sec := range inc.Sections {
		if sec.Type == SecMemory {
			t.Fatal("an incremental snapshot was written with a memory section")
		}
	}
	if v := le.Uint32(buf.Bytes()[8:]); v != versionPaged {
		t.Fatalf("an incremental without a memory section is version %d", v)
	}
	if got := slices.Index([]SectionType{SecMemory}, SecMemory); got != 0 || SecMemory.String() != "memory" {
		t.Fatal(SecMemory.String())
	}
}
