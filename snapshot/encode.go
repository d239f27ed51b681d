package snapshot

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"hash"
	"hash/crc32"
	"io"
	"runtime"
	"sync"
)

// Options tune Encode; the zero value is the default.
type Options struct {
	// BatchPages is the number of pages compressed together in one page
	// section (0: DefaultBatchPages; at most MaxBatchPages).
	BatchPages int
	// Workers is how many batches are compressed at once (0: GOMAXPROCS).
	// A Remus primary that encodes while its guest runs may want 1.
	Workers int
	// Uncompressed stores pages raw (CodecNone): for links faster than
	// the compressor, and for measuring what compression saves.
	Uncompressed bool
	// Mappable stores a full snapshot's memory as it lies in the guest:
	// one memory section whose data is the whole memory, uncompressed and
	// aligned to a 4 KiB boundary of the file, zero pages left as holes
	// where the writer can seek (a file). A restore then maps that data
	// copy-on-write instead of reading it (Image.Map), so restoring costs
	// a checksum pass over the non-zero pages rather than decompressing
	// and copying them, at the price of disk space (the non-zero pages,
	// uncompressed). Incremental snapshots ignore it.
	Mappable bool
	// WorkerInit, if set, runs first on each goroutine that compresses
	// batches in parallel (Workers > 1): a Remus primary lowers those
	// threads' priority there, as it does its encoding thread's, so that
	// they take what CPU the guest leaves.
	WorkerInit func()
	// deltaS2 stores delta pages as version 3 did (CodecDeltaS2, S2 of
	// the XOR) instead of as sparse runs: for tests of the decoder.
	deltaS2 bool
}

// Encode writes s with the default options. See EncodeOptions.
func (s *Snapshot) Encode(w io.Writer) error { return s.EncodeOptions(w, Options{}) }

// EncodeOptions validates s (ErrInvalid, nothing written, if it breaks the
// format's rules) and writes its encoding to w. It sets s.ID and
// s.Sections, and s.Nonce if it was zero. It only reads s's page data, so
// the pages may be a staging copy that the guest no longer touches while
// this runs on another goroutine.
func (s *Snapshot) EncodeOptions(w io.Writer, o Options) error {
	if msg := s.checkContent(); msg != "" {
		return newError(ErrInvalid, "%s", msg)
	}
	return s.encode(w, o)
}

// encode writes s without checking it (tests use it to forge snapshots
// that are well framed but break the rules).
func (s *Snapshot) encode(w io.Writer, o Options) error {
	if o.BatchPages <= 0 {
		o.BatchPages = DefaultBatchPages
	}
	if o.BatchPages > MaxBatchPages {
		o.BatchPages = MaxBatchPages
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if s.Nonce == [16]byte{} {
		if _, err := rand.Read(s.Nonce[:]); err != nil {
			return err
		}
	}
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(w)
	defer func() {
		bw.Reset(nil)
		writerPool.Put(bw)
	}()
	e := &encoder{w: bw, id: sha256.New()}
	if sk, ok := w.(io.Seeker); ok {
		e.seeker = sk
	}
	e.id.Write([]byte(idSalt))
	mappable := o.Mappable && s.Kind == Full

	var prefix [prefixSize]byte
	version := uint32(versionPaged)
	switch {
	case mappable:
		version = versionMemory
	case s.Kind == Incremental && hasBase(s.Pages) && (o.Uncompressed || o.deltaS2):
		version = versionDelta
	case s.Kind == Incremental && hasBase(s.Pages):
		version = versionSparse
	}
	putPrefix(prefix[:], version)
	e.write(prefix[:])
	e.section(SecHeader, s.headerPayload())
	e.section(SecMeta, s.metaPayload())
	e.section(SecGlobals, s.globalsPayload())
	e.section(SecStack, s.stackPayload())
	e.section(SecDevices, s.Devices)
	if len(s.ModuleCode) > 0 {
		e.moduleSection(s.ModuleName, s.ModuleCode)
	}
	if mappable {
		e.memory(s, o)
	} else {
		e.pages(s.Pages, o)
	}

	endOff := e.off
	var end [endSize]byte
	le.PutUint32(end[0:], uint32(len(e.sections)))
	le.PutUint64(end[8:], uint64(endOff))
	var id Hash
	e.id.Sum(id[:0])
	copy(end[16:], id[:])
	e.frame(frame{typ: SecEnd, stored: endSize, raw: endSize, sum: crc(end[:])}, 0)
	e.write(end[:])
	if e.err == nil {
		e.err = e.w.Flush()
	}
	if e.err != nil {
		return e.err
	}
	s.ID = id
	s.Sections = append(e.sections, SectionInfo{Type: SecEnd, Offset: endOff, Stored: endSize, Raw: endSize})
	return nil
}

// writerPool keeps the encoder's output buffers: a Remus primary encodes a
// checkpoint every few milliseconds, and a fresh 256 KiB buffer each time
// cost more than compressing a small checkpoint.
var writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 256<<10) }}

type encoder struct {
	w        *bufio.Writer
	seeker   io.Seeker // the writer under w, if it can skip (holes)
	off      int64
	err      error
	id       hash.Hash
	sections []SectionInfo
}

// skip writes n zero bytes: as a hole where the writer can seek past
// them, else as zeros.
func (e *encoder) skip(n int64) {
	if e.err != nil || n == 0 {
		return
	}
	if e.seeker != nil {
		if e.err = e.w.Flush(); e.err != nil {
			return
		}
		if _, err := e.seeker.Seek(n, io.SeekCurrent); err == nil {
			e.off += n
			return
		}
		e.seeker = nil // a pipe: write the zeros
	}
	for n > 0 && e.err == nil {
		k := min(n, PageSize)
		e.write(zeroPage[:k])
		n -= k
	}
}

// memory writes the memory section (Options.Mappable): the index of the
// non-zero pages with their checksums, padding to a page boundary, then
// the memory itself.
func (e *encoder) memory(s *Snapshot, o Options) {
	n := len(s.Pages)
	head := make([]byte, 4+8*n)
	le.PutUint32(head, uint32(n))
	sums := make([]uint32, n)
	parallelPages(n, o.Workers, func(i int) { sums[i] = crc(s.Pages[i].Data) })
	idSums := make([]byte, 8*n)
	for i, p := range s.Pages {
		le.PutUint32(head[4+4*i:], p.Index)
		le.PutUint32(head[4+4*n+4*i:], sums[i])
		le.PutUint32(idSums[8*i:], p.Index)
		le.PutUint32(idSums[8*i+4:], sums[i])
	}
	e.frame(frame{typ: SecMemory, stored: uint32(len(head)), raw: uint32(len(head)), sum: crc(head)}, n)
	sec := len(e.sections) - 1
	e.write(head)
	e.skip(padding(e.off))
	start := e.off
	for _, p := range s.Pages {
		e.skip(int64(p.Index)*PageSize - (e.off - start))
		e.write(p.Data)
	}
	e.skip(int64(s.MemorySize) - (e.off - start))
	e.sections[sec].DataOffset, e.sections[sec].DataLength = start, int64(s.MemorySize)
	e.id.Write(idSums)
}

// padding is how many bytes take off to the next page boundary.
func padding(off int64) int64 { return (PageSize - off%PageSize) % PageSize }

// parallelPages calls f(0..n-1) on up to workers goroutines (0:
// GOMAXPROCS), each taking a contiguous share.
func parallelPages(n, workers int, f func(i int)) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	workers = min(workers, max(1, n/256))
	if workers <= 1 {
		for i := 0; i < n; i++ {
			f(i)
		}
		return
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			for i := lo; i < hi; i++ {
				f(i)
			}
		}(n*w/workers, n*(w+1)/workers)
	}
	wg.Wait()
}

func (e *encoder) write(b []byte) {
	if e.err != nil {
		return
	}
	n, err := e.w.Write(b)
	e.off += int64(n)
	e.err = err
}

func (e *encoder) frame(f frame, pages int) {
	var b [frameSize]byte
	f.put(b[:])
	if f.typ != SecEnd {
		e.sections = append(e.sections, SectionInfo{Type: f.typ, Codec: f.codec, Offset: e.off,
			Stored: f.stored, Raw: f.raw, Pages: pages})
	}
	e.write(b[:])
}

// section writes an uncompressed section and adds it to the ID.
func (e *encoder) section(t SectionType, payload []byte) {
	n := uint32(len(payload))
	e.frame(frame{typ: t, stored: n, raw: n, sum: crc(payload)}, 0)
	e.write(payload)
	hashSection(e.id, t, payload)
}

// moduleSection writes the module copy without gathering it into one
// buffer. It is not part of the ID.
func (e *encoder) moduleSection(name string, code []byte) {
	head := le.AppendUint16(nil, uint16(len(name)))
	head = append(head, name...)
	n := uint32(len(head) + len(code))
	e.frame(frame{typ: SecModule, stored: n, raw: n, sum: crc32.Update(crc(head), castagnoli, code)}, 0)
	e.write(head)
	e.write(code)
}

// hashSection is a non-page section's contribution to the ID.
func hashSection(h hash.Hash, t SectionType, payload []byte) {
	var b [6]byte
	le.PutUint16(b[0:], uint16(t))
	le.PutUint32(b[2:], uint32(len(payload)))
	h.Write(b[:])
	h.Write(payload)
}

// batch is one page section in the making.
type batch struct {
	pages   []Page
	head    []byte // u32 count, then the indices (and for a delta batch the pages' checksums)
	sums    []byte // per page: u32 index, u32 crc32c(data) — the ID's input
	codec   Codec
	data    []byte // compressed (or raw) page data
	done    chan struct{}
	raw     bool // store uncompressed (Options.Uncompressed)
	delta   bool // every page has a Base: store Data XOR Base
	deltaS2 bool // Options.deltaS2
}

func hasBase(pages []Page) bool {
	for _, p := range pages {
		if p.Base != nil {
			return true
		}
	}
	return false
}

var bufPool sync.Pool // *[]byte, for batch raw and compressed data

// getBuf returns a pooled buffer of n bytes, or a new one in transparent
// huge pages (HugeBuffer) where n is a huge page or more: the pool is emptied
// at garbage collections, so a guest's few large checkpoints (a heap's
// growth) fill fresh buffers, and in 4 KiB pages that cost the encoder a
// fault per page (2,100 faults of a 0.6 s CPU-bound Go guest's run).
func getBuf(n int) []byte {
	if p, ok := bufPool.Get().(*[]byte); ok && cap(*p) >= n {
		return (*p)[:n]
	}
	return HugeBuffer(n)
}

func putBuf(b []byte) { bufPool.Put(&b) }

// run builds and compresses the batch. It touches nothing shared, so
// batches run in parallel.
func (b *batch) run() {
	n := len(b.pages)
	headLen := 4 + pageRefSize*n
	if b.delta {
		headLen += 4 * n
	}
	b.head = make([]byte, headLen)
	b.sums = make([]byte, 8*n)
	le.PutUint32(b.head, uint32(n))
	if b.delta && !b.raw && !b.deltaS2 {
		// Sparse runs straight from the page and its base, without the
		// XOR written out; a batch they do not shrink goes as DeltaNone.
		if b.sparse(n) {
			return
		}
	}
	var raw []byte
	if !b.delta {
		raw = contiguous(b.pages)
	}
	pooled := raw == nil
	if pooled {
		raw = getBuf(n * PageSize)
	}
	for i, p := range b.pages {
		b.list(i, p)
		switch {
		case b.delta:
			xorPage(raw[i*PageSize:(i+1)*PageSize], p.Data, p.Base)
		case pooled:
			copy(raw[i*PageSize:], p.Data)
		}
	}
	switch {
	case b.delta && !b.deltaS2 || b.raw:
		b.codec, b.data = CodecNone, append(getBuf(len(raw))[:0], raw...)
	default:
		b.codec, b.data = compressBatch(raw)
	}
	if b.delta {
		if b.codec == CodecS2 {
			b.codec = CodecDeltaS2
		} else {
			b.codec = CodecDeltaNone
		}
	}
	if pooled {
		putBuf(raw)
	}
}

// list enters page i of the batch in its head (its index, and for a delta
// batch its checksum) and in the ID's input.
func (b *batch) list(i int, p Page) {
	sum := crc(p.Data)
	le.PutUint32(b.head[4+pageRefSize*i:], p.Index)
	if b.delta {
		le.PutUint32(b.head[4+pageRefSize*len(b.pages)+4*i:], sum)
	}
	le.PutUint32(b.sums[8*i:], p.Index)
	le.PutUint32(b.sums[8*i+4:], sum)
}

// sparse encodes a delta batch with CodecDeltaSparse, unless that does not
// make it smaller than the pages (then it reports false, having set only
// the head).
func (b *batch) sparse(n int) bool {
	out := getBuf(n * PageSize)[:0]
	for i, p := range b.pages {
		b.list(i, p)
		var ok bool
		if out, ok = appendSparse(out, p.Data, p.Base, n*PageSize-1); !ok {
			putBuf(out)
			return false
		}
	}
	b.codec, b.data = CodecDeltaSparse, out
	return true
}

// contiguous returns the batch's data as one slice when the pages already
// sit back to back in one buffer (a Stager's), saving a copy.
func contiguous(pages []Page) []byte {
	first := pages[0].Data
	n := len(pages) * PageSize
	if cap(first) < n {
		return nil
	}
	all := first[:n]
	for i, p := range pages[1:] {
		if &all[(i+1)*PageSize] != &p.Data[0] {
			return nil
		}
	}
	return all
}

// pages writes the page sections, compressing up to o.Workers batches
// ahead of the writer while keeping the file's order.
func (e *encoder) pages(pages []Page, o Options) {
	// A batch is at most o.BatchPages pages, all sent whole or all as
	// deltas: a run of either kind is batched on its own.
	var batches []*batch
	for i := 0; i < len(pages); {
		delta := pages[i].Base != nil
		j := i + 1
		for j < len(pages) && j-i < o.BatchPages && (pages[j].Base != nil) == delta {
			j++
		}
		batches = append(batches, &batch{pages: pages[i:j], done: make(chan struct{}), raw: o.Uncompressed, delta: delta, deltaS2: o.deltaS2})
		i = j
	}
	if o.Workers == 1 || len(batches) <= 1 {
		for _, b := range batches {
			b.run()
			e.writeBatch(b)
		}
		return
	}
	sem := make(chan struct{}, o.Workers)
	go func() {
		for _, b := range batches {
			sem <- struct{}{}
			go func() {
				if o.WorkerInit != nil {
					o.WorkerInit()
				}
				b.run()
				close(b.done)
			}()
		}
	}()
	for _, b := range batches {
		<-b.done
		e.writeBatch(b)
		<-sem
	}
}

func (e *encoder) writeBatch(b *batch) {
	n := len(b.pages)
	sum := crc32.Update(crc(b.head), castagnoli, b.data)
	e.frame(frame{typ: SecPages, codec: b.codec,
		stored: uint32(len(b.head) + len(b.data)),
		raw:    uint32(len(b.head) + n*PageSize), sum: sum}, n)
	e.write(b.head)
	e.write(b.data)
	e.id.Write(b.sums)
	putBuf(b.data)
	b.data, b.head, b.sums = nil, nil, nil
}

func (s *Snapshot) headerPayload() []byte {
	b := make([]byte, headerSize)
	b[0] = byte(s.Kind)
	le.PutUint32(b[4:], PageSize)
	copy(b[8:], s.Module[:])
	le.PutUint64(b[40:], s.Seq)
	copy(b[48:], s.Parent[:])
	le.PutUint64(b[80:], s.MemorySize)
	le.PutUint32(b[88:], uint32(len(s.Pages)))
	copy(b[92:], s.Nonce[:])
	return b
}

func (s *Snapshot) metaPayload() []byte {
	var created int64
	if !s.Meta.Created.IsZero() {
		created = s.Meta.Created.UnixNano()
	}
	b := le.AppendUint64(nil, uint64(created))
	for _, str := range []string{s.Meta.Host, s.Meta.Version, s.Meta.Reason} {
		b = le.AppendUint16(b, uint16(len(str)))
		b = append(b, str...)
	}
	return b
}

func (s *Snapshot) globalsPayload() []byte {
	b := make([]byte, 4, 4+globalSize*len(s.Globals))
	le.PutUint32(b, uint32(len(s.Globals)))
	for _, g := range s.Globals {
		b = le.AppendUint32(b, g.Index)
		b = append(b, byte(g.Type))
		b = le.AppendUint64(b, g.Value)
	}
	return b
}

func (s *Snapshot) stackPayload() []byte {
	b := make([]byte, 8, 8+len(s.Stack))
	le.PutUint64(b, s.StackAddr)
	return append(b, s.Stack...)
}
