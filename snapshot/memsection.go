package snapshot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The memory section (version 2, Options.Mappable) holds a full snapshot's
// memory as it lies in the guest:
//
//	frame | u32 count | count × u32 page index | count × u32 crc32c(page) |
//	zero padding to a multiple of 4096 bytes from the start of the snapshot |
//	memory size bytes: page i at i × 4096, pages not listed all zero
//
// The frame's checksum covers the index; each listed page's checksum
// covers its data, and every byte of padding and of an unlisted page must
// be zero (a hole in the file, usually, which is checked without being
// read). The listed pages and their checksums enter the ID exactly as
// page sections' would, so a snapshot keeps its ID whichever way it is
// encoded.

// fileSource is the file a decoder reads, so that the memory section can
// be checked with pread on all cores and mapped instead of streamed.
type fileSource struct {
	f  *os.File
	br *bufio.Reader
	// mapMem, if set (Image.Map), maps n bytes of f at off (page aligned)
	// copy-on-write as the image's memory, and the snapshot's pages alias
	// it. If nil, the pages are read into memory of their own.
	mapMem func(f *os.File, off int64, n int) ([]byte, error)
}

func (d *decoder) memorySection(f frame, b []byte) error {
	s := d.s
	n := int(le.Uint32(b))
	if uint32(n) != d.wantPages || len(b) != 4+8*n {
		return d.fail(ErrCorrupt, "%d pages in a memory index of %d bytes; the header announced %d", n, len(b), d.wantPages)
	}
	limit := s.MemorySize / PageSize
	idx := make([]uint32, n)
	sums := make([]uint32, n)
	last := int64(-1)
	for i := range idx {
		idx[i] = le.Uint32(b[4+4*i:])
		sums[i] = le.Uint32(b[4+4*n+4*i:])
		if uint64(idx[i]) >= limit {
			return d.fail(ErrCorrupt, "page %d is beyond the memory size %d", idx[i], s.MemorySize)
		}
		if int64(idx[i]) <= last {
			return d.fail(ErrCorrupt, "page %d follows page %d: pages must be sorted, without duplicates", idx[i], last)
		}
		last = int64(idx[i])
	}
	d.memory = true
	info := SectionInfo{Type: SecMemory, Offset: d.secStart, Stored: f.stored, Raw: f.raw, Pages: n,
		DataOffset: d.off + padding(d.off), DataLength: int64(s.MemorySize)}
	var err error
	mapped := false
	if d.src != nil && s.MemorySize > 0 {
		mapped, err = d.mappedMemory(idx, sums, info.DataOffset)
	}
	if !mapped && err == nil {
		// Not a file, or one that cannot be mapped: read it.
		err = d.streamedMemory(idx, sums)
	}
	if err != nil {
		return err
	}
	var e [8]byte
	for i := range idx {
		le.PutUint32(e[0:], idx[i])
		le.PutUint32(e[4:], sums[i])
		d.id.Write(e[:])
	}
	d.pages = uint32(n)
	s.Sections = append(s.Sections, info)
	return nil
}

// readFull reads exactly len(b) bytes into b.
func (d *decoder) readFull(b []byte) error {
	m, err := io.ReadFull(d.r, b)
	d.off += int64(m)
	if err != nil {
		return d.readError(err)
	}
	return nil
}

// streamedMemory reads the padding and memory from the stream, checking
// each page as it arrives; page data is allocated only as it arrives.
func (d *decoder) streamedMemory(idx, sums []uint32) error {
	var buf [PageSize]byte
	if pad := padding(d.off); pad > 0 {
		if err := d.readFull(buf[:pad]); err != nil {
			return err
		}
		if !allZero(buf[:pad]) {
			return d.fail(ErrCorrupt, "non-zero padding before the memory data")
		}
	}
	const block = 256 // pages allocated at a time
	var data []byte
	next := 0
	for p := uint64(0); p < d.s.MemorySize/PageSize; p++ {
		if next < len(idx) && uint64(idx[next]) == p {
			if len(data) == 0 {
				data = make([]byte, min(block, len(idx)-next)*PageSize)
			}
			pg := data[:PageSize:PageSize]
			data = data[PageSize:]
			if err := d.readFull(pg); err != nil {
				return err
			}
			if crc(pg) != sums[next] {
				return d.fail(ErrCorrupt, "page %d checksum mismatch", p)
			}
			d.s.Pages = append(d.s.Pages, Page{Index: uint32(p), Data: pg})
			next++
			continue
		}
		if err := d.readFull(buf[:]); err != nil {
			return err
		}
		if !allZero(buf[:]) {
			return d.fail(ErrCorrupt, "page %d is not in the index but is not zero", p)
		}
	}
	return nil
}

// mappedMemory checks the memory data in the file and, for an image's
// Map, maps it as the image's memory; otherwise it reads the pages out.
// It then moves the stream past the data. ok is false, with nothing
// consumed, if the file cannot be mapped.
//
// The check reads the file with pread into small buffers rather than
// through the mapping: touching every page of a fresh mapping costs a
// page-table fault per page (more under a hypervisor with shadow paging),
// which the guest then pays lazily, only for the pages it uses.
func (d *decoder) mappedMemory(idx, sums []uint32, dataOff int64) (bool, error) {
	src, size := d.src, int64(d.s.MemorySize)
	if st, err := src.f.Stat(); err == nil && st.Size() < dataOff+size {
		return false, &Error{Kind: ErrTruncated, Offset: st.Size(), Section: SecMemory,
			Msg: fmt.Sprintf("the memory data ends at byte %d, the file at %d", dataOff+size, st.Size()), Cause: io.ErrUnexpectedEOF}
	}
	if pad := padding(d.off); pad > 0 {
		buf := make([]byte, pad)
		if _, err := src.f.ReadAt(buf, d.off); err != nil {
			return false, d.readError(err)
		}
		if !allZero(buf) {
			return false, d.fail(ErrCorrupt, "non-zero padding before the memory data")
		}
	}
	keep := src.mapMem != nil
	var data []byte // without keep: the pages, in index order
	if !keep {
		data = make([]byte, len(idx)*PageSize)
	}
	if err := d.checkPages(idx, sums, dataOff, data); err != nil {
		return false, err
	}
	// The unlisted pages must be zero: only those where the file has data
	// need reading (none, usually: the encoder leaves holes).
	var extErr error
	zero := make([]byte, PageSize)
	dataExtents(src.f, dataOff, dataOff+size, func(from, to int64) bool {
		first, end := (from-dataOff)/PageSize, (to-dataOff+PageSize-1)/PageSize
		i := sort.Search(len(idx), func(i int) bool { return int64(idx[i]) >= first })
		for p := first; p < end; p++ {
			if i < len(idx) && int64(idx[i]) == p {
				i++
				continue
			}
			if _, err := src.f.ReadAt(zero, dataOff+p*PageSize); err != nil {
				extErr = d.readError(err)
				return false
			}
			if !allZero(zero) {
				extErr = d.fail(ErrCorrupt, "page %d is not in the index but is not zero", p)
				return false
			}
		}
		return true
	})
	if extErr != nil {
		return false, extErr
	}
	if keep {
		mem, err := src.mapMem(src.f, dataOff, int(size))
		if err != nil {
			return false, nil // e.g. a file system without mmap: read it
		}
		if len(mem) != int(size) {
			return false, fmt.Errorf("snapshot: the memory mapping has %d bytes, want %d", len(mem), size)
		}
		d.s.mapped = mem
		for _, x := range idx {
			p := int(x) * PageSize
			d.s.Pages = append(d.s.Pages, Page{Index: x, Data: mem[p : p+PageSize : p+PageSize]})
		}
	} else {
		for i, x := range idx {
			d.s.Pages = append(d.s.Pages, Page{Index: x, Data: data[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]})
		}
	}
	// Go on reading after the memory data.
	end := dataOff + size
	if _, err := src.f.Seek(end, io.SeekStart); err != nil {
		return false, fmt.Errorf("snapshot: %w", err)
	}
	src.br.Reset(src.f)
	d.off = end
	return true, nil
}

// checkPages reads the listed pages from the file, runs of consecutive
// pages at a time on all cores, and checks each one's checksum. With
// data, the pages are read into it (in index order); without, into
// per-worker buffers and dropped.
func (d *decoder) checkPages(idx, sums []uint32, dataOff int64, data []byte) error {
	const runPages = 64
	type run struct{ first, n int } // into idx
	var runs []run
	for i := 0; i < len(idx); {
		j := i + 1
		for j < len(idx) && j-i < runPages && idx[j] == idx[j-1]+1 {
			j++
		}
		runs = append(runs, run{i, j - i})
		i = j
	}
	var next atomic.Int64
	var bad atomic.Int64
	bad.Store(-1)
	var ioErr atomic.Pointer[error]
	work := func() {
		var buf []byte
		if data == nil {
			buf = make([]byte, runPages*PageSize)
		}
		for {
			k := int(next.Add(1) - 1)
			if k >= len(runs) || bad.Load() >= 0 || ioErr.Load() != nil {
				return
			}
			r := runs[k]
			var b []byte
			if data != nil {
				b = data[r.first*PageSize : (r.first+r.n)*PageSize]
			} else {
				b = buf[:r.n*PageSize]
			}
			if _, err := d.src.f.ReadAt(b, dataOff+int64(idx[r.first])*PageSize); err != nil {
				ioErr.CompareAndSwap(nil, &err)
				return
			}
			for i := 0; i < r.n; i++ {
				if crc(b[i*PageSize:(i+1)*PageSize]) != sums[r.first+i] {
					bad.CompareAndSwap(-1, int64(idx[r.first+i]))
					return
				}
			}
		}
	}
	workers := min(runtime.GOMAXPROCS(0), max(1, len(runs)/4))
	var wg sync.WaitGroup
	for w := 1; w < workers; w++ {
		wg.Add(1)
		go func() { defer wg.Done(); work() }()
	}
	work()
	wg.Wait()
	if p := bad.Load(); p >= 0 {
		return d.fail(ErrCorrupt, "page %d checksum mismatch", p)
	}
	if e := ioErr.Load(); e != nil {
		return d.readError(*e)
	}
	return nil
}

// dataExtents calls fn for each range of [from, to) where the file may
// hold data (not a hole), until fn returns false. Where the file system
// cannot say, the whole range is data.
func dataExtents(f *os.File, from, to int64, fn func(from, to int64) bool) {
	fd := int(f.Fd())
	for off := from; off < to; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return // only a hole from here to the end of the file
		}
		if err != nil {
			fn(off, to)
			return
		}
		if start >= to {
			return
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil || end > to {
			end = to
		}
		if !fn(start, end) {
			return
		}
		off = end
	}
}

// allZero reports whether b is all zeros.
func allZero(b []byte) bool {
	for len(b) >= PageSize {
		if !isZero(b[:PageSize]) {
			return false
		}
		b = b[PageSize:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
