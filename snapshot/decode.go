package snapshot

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"time"
	"unicode/utf8"
)

// Decode reads one snapshot from r and verifies all of it: every checksum,
// every length, every rule of the format, and the ID in the trailer. It
// reads exactly the snapshot's bytes and no more, so snapshots can follow
// each other on one stream (give it a buffered reader). An empty stream is
// an error that is both ErrTruncated and io.EOF.
func Decode(r io.Reader) (*Snapshot, error) { return decode(r, nil) }

// DecodeFor is Decode for a receiver that knows its module: a snapshot of
// another module fails with ErrModuleMismatch as soon as its header is
// read, before its pages are.
func DecodeFor(r io.Reader, module Hash) (*Snapshot, error) { return decode(r, &module) }

// DecodeBytes decodes a snapshot that must fill b exactly.
func DecodeBytes(b []byte, module *Hash) (*Snapshot, error) {
	return DecodeBytesWorkers(b, module, 1)
}

// DecodeBytesWorkers is DecodeBytes decompressing up to workers page
// batches at once: a large checkpoint (a heap's growth, a full sync) whose
// acknowledgement, and so the primary's output, waits for its decoding.
// Everything is verified as by DecodeBytes, and the result is the same.
func DecodeBytesWorkers(b []byte, module *Hash, workers int) (*Snapshot, error) {
	return DecodeBytesInto(b, module, workers, nil)
}

// DecodeBytesInto is DecodeBytesWorkers with the pages' memory from alloc
// (nil: fresh memory), which must return n bytes of any content. The
// decoder writes every byte of them, except for pages sent as sparse
// deltas: those keep their runs, and Resolve writes the page. A Remus
// backup decodes hundreds of small checkpoints a second: fresh memory for
// each cost it more (the runtime clearing it, the kernel faulting it in,
// the collector freeing it) than the decoding itself.
func DecodeBytesInto(b []byte, module *Hash, workers int, alloc func(n int) []byte) (*Snapshot, error) {
	br := bytes.NewReader(b)
	d := newDecoder(br, module)
	d.workers, d.alloc = workers, alloc
	s, err := d.run()
	if err != nil {
		return nil, err
	}
	if br.Len() != 0 {
		return nil, &Error{Kind: ErrCorrupt, Offset: int64(len(b) - br.Len()), Msg: "data after the end of the snapshot"}
	}
	return s, nil
}

// DecodeReaderWorkers is DecodeBytesWorkers reading from r, which must end
// (io.EOF) where the snapshot does: a Remus backup decodes a large
// checkpoint while the rest of it still arrives.
func DecodeReaderWorkers(r io.Reader, module *Hash, workers int) (*Snapshot, error) {
	d := newDecoder(r, module)
	d.workers = workers
	s, err := d.run()
	if err != nil {
		return nil, err
	}
	var one [1]byte
	if n, _ := io.ReadFull(r, one[:]); n != 0 {
		return nil, &Error{Kind: ErrCorrupt, Offset: d.off, Msg: "data after the end of the snapshot"}
	}
	return s, nil
}

// readChunk bounds what one read allocates: a stated length is only
// trusted as far as the bytes that actually arrive, so a truncated or
// lying stream cannot make the decoder allocate more than it sent (×2).
const readChunk = 1 << 20

type decoder struct {
	r         io.Reader
	off       int64
	id        hash.Hash
	s         *Snapshot
	want      *Hash       // the module the caller expects, if any
	sec       SectionType // the section being read, for errors
	secStart  int64
	next      int    // index into sectionOrder of the next fixed section
	pages     uint32 // pages read so far
	batches   int    // page sections read so far
	module    bool   // the module section was read
	wantPages uint32 // pages the header announced
	lastPage  int64  // last page index read, -1 before the first
	version   uint32 // the prefix's
	memory    bool   // the memory section was read
	// src, when decoding a file, lets the memory section be mapped
	// rather than read.
	src *fileSource
	// workers > 1 decompresses page batches on that many goroutines;
	// pending are those started and not yet hashed into the ID, in order.
	workers int
	sem     chan struct{}
	pending []*batchJob
	// alloc, if set, gives the page batches' memory (DecodeBytesInto).
	alloc func(n int) []byte
}

// batchJob is one page batch decompressed off the decoder's goroutine.
type batchJob struct {
	codec Codec
	src   []byte
	pages []Page // its pages, their data filled by the job
	at    int64  // the section's offset, for errors
	sums  []byte // what hashPages would write for them
	done  chan struct{}
	err   error
}

// sectionOrder is the fixed order of the sections before the pages.
var sectionOrder = []SectionType{SecHeader, SecMeta, SecGlobals, SecStack, SecDevices}

func decode(r io.Reader, module *Hash) (*Snapshot, error) {
	return newDecoder(r, module).run()
}

func newDecoder(r io.Reader, module *Hash) *decoder {
	d := &decoder{r: r, id: sha256.New(), s: &Snapshot{}, want: module, lastPage: -1}
	d.id.Write([]byte(idSalt))
	return d
}

func (d *decoder) run() (*Snapshot, error) {
	if err := d.prefix(); err != nil {
		return nil, err
	}
	for {
		f, err := d.frame()
		if err == nil {
			var done bool
			if done, err = d.section(f); err == nil && done {
				return d.s, nil
			}
		}
		if err != nil {
			// A batch still decompressing that fails came first in the
			// file: its error is the one a sequential decoder reports.
			if ferr := d.flush(); ferr != nil {
				return nil, ferr
			}
			return nil, err
		}
	}
}

func (d *decoder) fail(kind error, msg string, args ...any) *Error {
	return &Error{Kind: kind, Offset: d.secStart, Section: d.sec, Msg: fmt.Sprintf(msg, args...)}
}

// read reads exactly n bytes.
func (d *decoder) read(n int) ([]byte, error) {
	buf := make([]byte, 0, min(n, readChunk))
	for len(buf) < n {
		if len(buf) == cap(buf) { // what came so far, once more
			buf = slices.Grow(buf, min(n-len(buf), len(buf)))
		}
		m, err := io.ReadFull(d.r, buf[len(buf):min(cap(buf), n)])
		buf = buf[:len(buf)+m]
		d.off += int64(m)
		if err != nil {
			return nil, d.readError(err)
		}
	}
	return buf, nil
}

func (d *decoder) readError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		cause := io.ErrUnexpectedEOF
		if d.off == 0 {
			cause = io.EOF // nothing at all: a stream's clean end
		}
		return &Error{Kind: ErrTruncated, Offset: d.off, Section: d.sec, Msg: "the data ends before the snapshot's end", Cause: cause}
	}
	return fmt.Errorf("snapshot: reading at byte %d: %w", d.off, err)
}

func (d *decoder) prefix() error {
	b, err := d.read(prefixSize)
	if err != nil {
		return err
	}
	if string(b[:len(Magic)]) != Magic {
		return &Error{Kind: ErrCorrupt, Offset: 0, Msg: "not an ftvm snapshot (bad magic)"}
	}
	if crc(b[:12]) != le.Uint32(b[12:]) {
		return &Error{Kind: ErrCorrupt, Offset: 0, Msg: "prefix checksum mismatch"}
	}
	// Every version keeps this prefix, so an old reader can tell a newer
	// file from a damaged one.
	v := le.Uint32(b[8:])
	if v < versionPaged || v > Version {
		return &Error{Kind: ErrVersion, Offset: 8, Msg: fmt.Sprintf("format version %d, this build reads %d to %d", v, versionPaged, Version)}
	}
	d.version = v
	return nil
}

func (d *decoder) frame() (frame, error) {
	d.sec, d.secStart = 0, d.off
	b, err := d.read(frameSize)
	if err != nil {
		return frame{}, err
	}
	if crc(b[:16]) != le.Uint32(b[16:]) {
		return frame{}, d.fail(ErrCorrupt, "section header checksum mismatch")
	}
	f := frame{typ: SectionType(le.Uint16(b[0:])), codec: Codec(le.Uint16(b[2:])),
		stored: le.Uint32(b[4:]), raw: le.Uint32(b[8:]), sum: le.Uint32(b[12:])}
	d.sec = f.typ

	// The type must be the one the fixed order expects next.
	switch {
	case d.next < len(sectionOrder):
		if f.typ != sectionOrder[d.next] {
			return f, d.fail(ErrCorrupt, "expected a %s section", sectionOrder[d.next])
		}
	case f.typ == SecModule:
		if d.module || d.batches > 0 || d.memory {
			return f, d.fail(ErrCorrupt, "a module section must come once, before the pages")
		}
	case f.typ == SecMemory:
		switch {
		case d.version < versionMemory:
			return f, d.fail(ErrCorrupt, "a memory section in a version %d snapshot", d.version)
		case d.memory || d.batches > 0:
			return f, d.fail(ErrCorrupt, "a memory section must come once, instead of page sections")
		case d.s.Kind != Full:
			return f, d.fail(ErrCorrupt, "a memory section in an incremental snapshot")
		}
	case f.typ == SecPages && d.memory:
		return f, d.fail(ErrCorrupt, "page sections after the memory section")
	case f.typ != SecPages && f.typ != SecEnd:
		return f, d.fail(ErrCorrupt, "unexpected section type %d", uint16(f.typ))
	}
	// Lengths are checked against the section's own cap before the
	// payload is read.
	if f.typ == SecPages {
		switch {
		case f.codec > CodecDeltaSparse:
			return f, d.fail(ErrCorrupt, "unknown codec %d", uint16(f.codec))
		case f.codec.delta() && d.version < versionDelta, f.codec == CodecDeltaSparse && d.version < versionSparse:
			return f, d.fail(ErrCorrupt, "codec %s in a version %d snapshot", f.codec, d.version)
		case f.codec.delta() && d.s.Kind != Incremental:
			return f, d.fail(ErrCorrupt, "codec %s in a full snapshot: it has no base to be a delta against", f.codec)
		}
		head := f.codec.pageHead()
		n := (uint64(f.raw) - 4) / (head + PageSize)
		if f.raw < 4 || n == 0 || n > MaxBatchPages || uint64(f.raw) != 4+n*(head+PageSize) {
			return f, d.fail(ErrCorrupt, "raw size %d is not that of 1..%d pages", f.raw, MaxBatchPages)
		}
		if !f.codec.compressed() && f.stored != f.raw ||
			f.codec.compressed() && (f.stored >= f.raw || uint64(f.stored) < 4+n*head) {
			return f, d.fail(ErrCorrupt, "stored size %d does not fit raw size %d with codec %s", f.stored, f.raw, f.codec)
		}
		return f, nil
	}
	if f.codec != CodecNone {
		return f, d.fail(ErrCorrupt, "codec %d on an uncompressed section", uint16(f.codec))
	}
	if f.stored != f.raw {
		return f, d.fail(ErrCorrupt, "stored size %d differs from raw size %d", f.stored, f.raw)
	}
	var max uint64
	switch f.typ {
	case SecHeader:
		max = headerSize
	case SecMeta:
		max = 8 + 3*(2+maxMetaString)
	case SecGlobals:
		max = 4 + globalSize*maxGlobals
	case SecStack:
		max = 8 + maxStackBytes
	case SecDevices:
		max = maxDeviceBytes
	case SecModule:
		max = 2 + maxModuleName + maxModuleBytes
	case SecMemory:
		max = 4 + 8*uint64(d.wantPages)
	case SecEnd:
		max = endSize
	}
	if uint64(f.stored) > max {
		return f, d.fail(ErrCorrupt, "section of %d bytes exceeds its limit %d", f.stored, max)
	}
	return f, nil
}

// section reads and checks one section's payload; done is true after the
// trailer.
func (d *decoder) section(f frame) (done bool, err error) {
	if f.typ != SecPages {
		// Batches are hashed into the ID in file order, before anything
		// that follows them.
		if err := d.flush(); err != nil {
			return false, err
		}
	}
	payload, err := d.read(int(f.stored))
	if err != nil {
		return false, err
	}
	if crc(payload) != f.sum {
		return false, d.fail(ErrCorrupt, "payload checksum mismatch")
	}
	s := d.s
	switch f.typ {
	case SecHeader:
		err = d.header(payload)
	case SecMeta:
		err = d.meta(payload)
	case SecGlobals:
		err = d.globals(payload)
	case SecStack:
		if len(payload) < 8 {
			return false, d.fail(ErrCorrupt, "stack section of %d bytes", len(payload))
		}
		s.StackAddr = le.Uint64(payload)
		s.Stack = payload[8:]
		if msg := checkStack(s.StackAddr, len(s.Stack), s.MemorySize); msg != "" {
			err = d.fail(ErrCorrupt, "%s", msg)
		}
	case SecDevices:
		s.Devices = payload
	case SecModule:
		err = d.moduleCode(payload)
	case SecPages:
		err = d.pageBatch(f, payload)
		d.batches++
	case SecMemory:
		// memorySection records the section itself.
		return false, d.memorySection(f, payload)
	case SecEnd:
		return true, d.end(payload)
	}
	if err != nil {
		return false, err
	}
	if f.typ != SecPages && f.typ != SecModule {
		hashSection(d.id, f.typ, payload)
		d.next++
	}
	s.Sections = append(s.Sections, SectionInfo{Type: f.typ, Codec: f.codec, Offset: d.secStart,
		Stored: f.stored, Raw: f.raw, Pages: pagesIn(f)})
	return false, nil
}

func pagesIn(f frame) int {
	if f.typ != SecPages {
		return 0
	}
	return int((uint64(f.raw) - 4) / (f.codec.pageHead() + PageSize))
}

func (d *decoder) header(b []byte) error {
	if len(b) != headerSize {
		return d.fail(ErrCorrupt, "header of %d bytes, want %d", len(b), headerSize)
	}
	s := d.s
	s.Kind = Kind(b[0])
	if b[1] != 0 || b[2] != 0 || b[3] != 0 {
		return d.fail(ErrCorrupt, "reserved header bytes are not zero")
	}
	if ps := le.Uint32(b[4:]); ps != PageSize {
		return d.fail(ErrCorrupt, "page size %d, want %d", ps, PageSize)
	}
	copy(s.Module[:], b[8:40])
	s.Seq = le.Uint64(b[40:])
	copy(s.Parent[:], b[48:80])
	s.MemorySize = le.Uint64(b[80:])
	pages := le.Uint32(b[88:])
	copy(s.Nonce[:], b[92:108])
	switch {
	case s.Kind != Full && s.Kind != Incremental:
		return d.fail(ErrCorrupt, "unknown snapshot kind %d", s.Kind)
	case s.Kind == Full && !s.Parent.IsZero():
		return d.fail(ErrCorrupt, "a full snapshot with a parent")
	case s.Kind == Incremental && s.Parent.IsZero():
		return d.fail(ErrCorrupt, "an incremental snapshot without a parent")
	}
	if msg := checkMemorySize(s.MemorySize); msg != "" {
		return d.fail(ErrCorrupt, "%s", msg)
	}
	if uint64(pages) > s.MemorySize/PageSize {
		return d.fail(ErrCorrupt, "%d pages do not fit in %d bytes of memory", pages, s.MemorySize)
	}
	if d.want != nil && *d.want != s.Module {
		return d.fail(ErrModuleMismatch, "snapshot of module %s, expected %s", s.Module.Short(), d.want.Short())
	}
	d.wantPages = pages
	s.Pages = make([]Page, 0, min(pages, MaxBatchPages)) // grows as pages arrive
	return nil
}

func (d *decoder) meta(b []byte) error {
	if len(b) < 8 {
		return d.fail(ErrCorrupt, "meta section of %d bytes", len(b))
	}
	if ns := int64(le.Uint64(b)); ns != 0 {
		d.s.Meta.Created = time.Unix(0, ns)
	}
	rest := b[8:]
	var strs [3]string
	for i := range strs {
		if len(rest) < 2 {
			return d.fail(ErrCorrupt, "meta string %d is cut", i)
		}
		n := int(le.Uint16(rest))
		if len(rest) < 2+n {
			return d.fail(ErrCorrupt, "meta string %d is cut", i)
		}
		strs[i] = string(rest[2 : 2+n])
		if !utf8.ValidString(strs[i]) {
			return d.fail(ErrCorrupt, "meta string %d is not UTF-8", i)
		}
		rest = rest[2+n:]
	}
	if len(rest) != 0 {
		return d.fail(ErrCorrupt, "%d bytes after the meta strings", len(rest))
	}
	d.s.Meta.Host, d.s.Meta.Version, d.s.Meta.Reason = strs[0], strs[1], strs[2]
	return nil
}

func (d *decoder) globals(b []byte) error {
	if len(b) < 4 {
		return d.fail(ErrCorrupt, "globals section of %d bytes", len(b))
	}
	n := uint64(le.Uint32(b))
	if n > maxGlobals || uint64(len(b)) != 4+n*globalSize {
		return d.fail(ErrCorrupt, "%d globals in %d bytes", n, len(b))
	}
	gs := make([]Global, n)
	for i := range gs {
		e := b[4+i*globalSize:]
		gs[i] = Global{Index: le.Uint32(e), Type: ValType(e[4]), Value: le.Uint64(e[5:])}
	}
	if msg := checkGlobals(gs); msg != "" {
		return d.fail(ErrCorrupt, "%s", msg)
	}
	d.s.Globals = gs
	return nil
}

// moduleCode reads the module copy and checks it against the header's
// module hash: a copy that does not match is damage, not another module.
func (d *decoder) moduleCode(b []byte) error {
	if len(b) < 2 {
		return d.fail(ErrCorrupt, "module section of %d bytes", len(b))
	}
	n := int(le.Uint16(b))
	if n > maxModuleName || len(b) < 2+n {
		return d.fail(ErrCorrupt, "module name of %d bytes", n)
	}
	name, code := string(b[2:2+n]), b[2+n:]
	if !utf8.ValidString(name) {
		return d.fail(ErrCorrupt, "module name is not UTF-8")
	}
	if len(code) == 0 {
		return d.fail(ErrCorrupt, "empty module code")
	}
	if h := ModuleHash(code); h != d.s.Module {
		return d.fail(ErrCorrupt, "the module code hashes to %s, the header says %s", h.Short(), d.s.Module.Short())
	}
	d.module = true
	d.s.ModuleName, d.s.ModuleCode = name, code
	return nil
}

// decodePopulateMin is the batch size from which the decoder populates
// its page memory first: a small batch most likely reuses memory the heap
// already holds, where the madvise would only cost its syscall.
const decodePopulateMin = 256 * PageSize

func (d *decoder) pageBatch(f frame, b []byte) error {
	s := d.s
	n := pagesIn(f)
	if int(le.Uint32(b)) != n {
		return d.fail(ErrCorrupt, "page count %d, the section's size says %d", le.Uint32(b), n)
	}
	if uint64(d.pages)+uint64(n) > uint64(d.wantPages) {
		return d.fail(ErrCorrupt, "more pages than the header's %d", d.wantPages)
	}
	limit := s.MemorySize / PageSize
	idx := b[4 : 4+n*pageRefSize]
	for i := 0; i < n; i++ {
		p := int64(le.Uint32(idx[i*pageRefSize:]))
		if uint64(p) >= limit {
			return d.fail(ErrCorrupt, "page %d is beyond the memory size %d", p, s.MemorySize)
		}
		if p <= d.lastPage {
			return d.fail(ErrCorrupt, "page %d follows page %d: pages must be sorted, without duplicates", p, d.lastPage)
		}
		d.lastPage = p
	}
	// Only now, with the indices known good, is page memory allocated,
	// and the decompressor may fill exactly that.
	var data []byte
	if d.alloc != nil {
		if data = d.alloc(n * PageSize); len(data) != n*PageSize {
			return d.fail(ErrCorrupt, "page memory of %d bytes for %d pages", len(data), n) // a broken alloc
		}
		data = data[:len(data):len(data)]
	} else {
		data = HugeBuffer(n * PageSize)
	}
	// Sparse deltas into memory that may hold anything are kept as their
	// runs, checked here, for Resolve to apply onto the base.
	keepRuns := d.alloc != nil && f.codec == CodecDeltaSparse
	first := len(s.Pages)
	delta := f.codec.delta()
	var sums []byte // a delta batch's checksums of the resolved pages
	if delta {
		sums = b[4+n*pageRefSize : 4+n*(pageRefSize+4)]
	}
	for i := 0; i < n; i++ {
		p := Page{Index: le.Uint32(idx[i*pageRefSize:]), Data: data[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]}
		if delta {
			p.Delta, p.Sum = true, le.Uint32(sums[4*i:])
		}
		s.Pages = append(s.Pages, p)
	}
	d.pages += uint32(n)
	src := b[4+n*pageRefSize+len(sums):]
	if keepRuns {
		runs := make([][]byte, n)
		if err := decodeSparse(src, data, runs); err != nil {
			return d.fail(ErrCorrupt, "%v", err)
		}
		var sums []byte
		for i, r := range runs {
			p := &s.Pages[first+i]
			p.runs = r
			sums = pageSums(sums, *p)
		}
		if d.workers <= 1 {
			d.id.Write(sums)
			return nil
		}
		// Hashed into the ID in order, after the batches before it.
		j := &batchJob{pages: s.Pages[first:len(s.Pages):len(s.Pages)], at: d.secStart, sums: sums, done: make(chan struct{})}
		close(j.done)
		d.pending = append(d.pending, j)
		return nil
	}
	if d.workers <= 1 {
		if d.alloc == nil {
			populateBatch(data)
		}
		if err := decompressBatch(f.codec, src, data); err != nil {
			return d.fail(ErrCorrupt, "%v", err)
		}
		var sums [8]byte
		for _, p := range s.Pages[first:] {
			d.id.Write(pageSums(sums[:0], p))
		}
		return nil
	}
	if d.sem == nil {
		d.sem = make(chan struct{}, d.workers)
	}
	j := &batchJob{codec: f.codec, src: src, pages: s.Pages[first:len(s.Pages):len(s.Pages)], at: d.secStart,
		done: make(chan struct{})}
	d.pending = append(d.pending, j)
	d.sem <- struct{}{}
	go func() {
		defer close(j.done)
		defer func() { <-d.sem }()
		if d.alloc == nil {
			populateBatch(data)
		}
		if j.err = decompressBatch(j.codec, j.src, data); j.err != nil {
			return
		}
		j.sums = make([]byte, 0, 8*len(j.pages))
		for _, p := range j.pages {
			j.sums = pageSums(j.sums, p)
		}
	}()
	return nil
}

// populateBatch faults a large batch's fresh memory in at once.
func populateBatch(data []byte) {
	if len(data) >= decodePopulateMin {
		populate(data)
	}
}

// pageSums appends what the ID hashes for a page: its index and checksum
// (for a delta, the checksum the section lists for the resolved page:
// Resolve checks it).
func pageSums(b []byte, p Page) []byte {
	b = le.AppendUint32(b, p.Index)
	if p.Delta {
		return le.AppendUint32(b, p.Sum)
	}
	return le.AppendUint32(b, crc(p.Data))
}

// flush waits for the pending batches and hashes them into the ID in
// order; the first that failed to decompress is the error.
func (d *decoder) flush() error {
	var err error
	for _, j := range d.pending {
		<-j.done
		if err != nil {
			continue
		}
		if j.err != nil {
			err = &Error{Kind: ErrCorrupt, Offset: j.at, Section: SecPages, Msg: j.err.Error()}
			continue
		}
		d.id.Write(j.sums)
	}
	clear(d.pending)
	d.pending = d.pending[:0]
	return err
}

func (d *decoder) end(b []byte) error {
	if len(b) != endSize {
		return d.fail(ErrCorrupt, "trailer of %d bytes, want %d", len(b), endSize)
	}
	s := d.s
	if n := le.Uint32(b[0:]); int(n) != len(s.Sections) {
		return d.fail(ErrCorrupt, "trailer counts %d sections, the file has %d", n, len(s.Sections))
	}
	if le.Uint32(b[4:]) != 0 {
		return d.fail(ErrCorrupt, "reserved trailer bytes are not zero")
	}
	if off := le.Uint64(b[8:]); off != uint64(d.secStart) {
		return d.fail(ErrCorrupt, "trailer says it starts at byte %d", off)
	}
	if d.pages != d.wantPages {
		return d.fail(ErrCorrupt, "the header announced %d pages, the file holds %d", d.wantPages, d.pages)
	}
	var id, want Hash
	d.id.Sum(id[:0])
	copy(want[:], b[16:])
	if id != want {
		return d.fail(ErrCorrupt, "content does not match the ID in the trailer")
	}
	s.ID = id
	s.Sections = append(s.Sections, SectionInfo{Type: SecEnd, Offset: d.secStart, Stored: endSize, Raw: endSize})
	return nil
}
