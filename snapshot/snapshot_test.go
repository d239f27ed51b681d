package snapshot

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	cases := []struct {
		name  string
		s     *Snapshot
		batch int
	}{
		{"empty memory", &Snapshot{Kind: Full, Module: testModule}, 0},
		{"no pages", testSnapshot(rng, Full, 1<<20, 0), 0},
		{"one page", testSnapshot(rng, Full, 64<<10, 1), 0},
		{"many batches", testSnapshot(rng, Full, 16<<20, 700), 0},
		{"batch of one", testSnapshot(rng, Incremental, 1<<20, 40), 1},
		{"max batch", testSnapshot(rng, Incremental, 8<<20, 1500), MaxBatchPages},
		{"last page of 4GiB", &Snapshot{Kind: Full, MemorySize: MaxMemorySize, StackAddr: MaxMemorySize,
			Pages: []Page{{Index: MaxMemorySize/PageSize - 1, Data: bytes.Repeat([]byte{7}, PageSize)}}}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := encodeT(t, c.s, Options{BatchPages: c.batch})
			got, err := DecodeBytes(b, nil)
			if err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, got, c.s)
			if len(got.Sections) != len(c.s.Sections) {
				t.Fatalf("%d sections decoded, %d encoded", len(got.Sections), len(c.s.Sections))
			}
			for i := range got.Sections {
				if got.Sections[i] != c.s.Sections[i] {
					t.Fatalf("section %d: %+v, encoder said %+v", i, got.Sections[i], c.s.Sections[i])
				}
			}
			if sum := Describe(got); sum.FileBytes != int64(len(b)) {
				t.Fatalf("Describe says %d bytes, file has %d", sum.FileBytes, len(b))
			}
		})
	}
}

// WorkerInit runs on every goroutine that compresses a batch in parallel,
// and only then: the encoding is the same bytes with it.
func TestWorkerInit(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	s := testSnapshot(rng, Full, 4<<20, 300) // 19 batches of 16 pages
	want := encodeT(t, s, Options{BatchPages: 16, Workers: 1})
	var calls atomic.Int32
	init := func() { calls.Add(1) }
	if got := encodeT(t, s, Options{BatchPages: 16, Workers: 2, WorkerInit: init}); !bytes.Equal(got, want) {
		t.Fatal("WorkerInit changed the encoding")
	}
	if n := calls.Load(); n != 19 {
		t.Fatalf("WorkerInit ran %d times for 19 batches on 2 workers", n)
	}
	calls.Store(0)
	encodeT(t, s, Options{BatchPages: 16, Workers: 1, WorkerInit: init})
	if n := calls.Load(); n != 0 {
		t.Fatalf("WorkerInit ran %d times with one worker (no goroutine of its own)", n)
	}
}

// The ID names content, not an encoding: batch size, worker count and the
// codec's choices do not change it; any change of content does.
func TestIDIsContent(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	s := testSnapshot(rng, Full, 4<<20, 300)
	a := encodeT(t, s, Options{BatchPages: 16, Workers: 1})
	id := s.ID
	b := encodeT(t, s, Options{BatchPages: 200, Workers: 4})
	if s.ID != id {
		t.Fatal("batching changed the ID")
	}
	if bytes.Equal(a, b) {
		t.Fatal("different batching, same bytes?")
	}
	c := encodeT(t, s, Options{BatchPages: 16, Workers: 3})
	if !bytes.Equal(a, c) {
		t.Fatal("parallel encoding is not deterministic")
	}
	s.Pages[17].Data[100] ^= 1
	encodeT(t, s, Options{})
	if s.ID == id {
		t.Fatal("a changed page kept the ID")
	}
	s.Pages[17].Data[100] ^= 1
	s.Nonce[0] ^= 1
	encodeT(t, s, Options{})
	if s.ID == id {
		t.Fatal("another nonce kept the ID")
	}
}

func TestStagerIsZeroCopyAndCorrect(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	mem := make([]byte, 2<<20)
	for i := 0; i < len(mem); i += PageSize {
		fillPage(rng, mem[i:i+PageSize])
	}
	var st Stager
	pages, err := st.Stage(mem, []uint32{9, 3, 3, 200, 4, 511})
	if err != nil {
		t.Fatal(err)
	}
	if contiguous(pages) == nil {
		t.Fatal("staged pages are not contiguous")
	}
	want := []uint32{3, 4, 9, 200, 511}
	for i, p := range pages {
		if p.Index != want[i] || !bytes.Equal(p.Data, mem[int(p.Index)*PageSize:][:PageSize]) {
			t.Fatalf("staged page %d wrong", i)
		}
	}
	s := &Snapshot{Kind: Incremental, Module: testModule, Seq: 1, Parent: Hash{1}, MemorySize: uint64(len(mem)), Pages: pages}
	got, err := DecodeBytes(encodeT(t, s, Options{}), nil)
	if err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, got, s)
	if _, err := st.Stage(mem, []uint32{512}); err == nil {
		t.Fatal("staged a page beyond memory")
	}
}

// TestStagerAddKeepsAndUpdates: pages staged before a pause and pages added
// in it form one sorted set; a page in both holds its later contents, the
// others their own; the result encodes and decodes to the same snapshot.
// Added pages past a chunk take more chunks.
func TestStagerAddKeepsAndUpdates(t *testing.T) {
	// Few pages added fit the room Stage leaves (merged in place); more
	// than a chunk's worth do not.
	for _, count := range []int{addRoom(5) - 3, stageChunkPages + 10} {
		t.Run(fmt.Sprint(count), func(t *testing.T) {
			stagerAdd(t, count)
		})
	}
}

func stagerAdd(t *testing.T, count int) {
	rng := rand.New(rand.NewPCG(7, 8))
	mem := make([]byte, (4*stageChunkPages+4096)*PageSize)
	for i := 0; i < len(mem); i += PageSize {
		fillPage(rng, mem[i:i+PageSize])
	}
	var st Stager
	first := []uint32{40, 7, 900, 3000, 41}
	if _, err := st.Stage(mem, first); err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(mem)
	// Written after the early copy: two of the staged pages and many new
	// ones.
	var added []uint32
	for i := range uint32(count) {
		added = append(added, 1000+3*i)
	}
	added = append(added, 900, 7, 7)
	for _, p := range added {
		fillPage(rng, mem[int(p)*PageSize:][:PageSize])
	}
	pages, err := st.Add(mem, added)
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Sorted(slices.Values(append(slices.Clone(first), added...)))
	want = slices.Compact(want)
	if len(pages) != len(want) || st.Len() != len(want) {
		t.Fatalf("%d pages staged, want %d", len(pages), len(want))
	}
	for i, p := range pages {
		if p.Index != want[i] {
			t.Fatalf("page %d is %d, want %d", i, p.Index, want[i])
		}
		src := mem
		if !slices.Contains(added, p.Index) {
			src = before // staged early, unwritten since: its early copy
		}
		if !bytes.Equal(p.Data, src[int(p.Index)*PageSize:][:PageSize]) {
			t.Fatalf("page %d holds the wrong contents", p.Index)
		}
	}
	s := &Snapshot{Kind: Incremental, Module: testModule, Seq: 1, Parent: Hash{1}, MemorySize: uint64(len(mem)), Pages: pages}
	got, err := DecodeBytes(encodeT(t, s, Options{}), nil)
	if err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, got, s)
	if _, err := st.Add(mem, []uint32{uint32(len(mem) / PageSize)}); err == nil {
		t.Fatal("added a page beyond memory")
	}
	// A Stage after starts over.
	if pages, _ := st.Stage(mem, []uint32{5}); len(pages) != 1 || st.Len() != 1 {
		t.Fatalf("Stage after Add: %d pages", len(pages))
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	page := func(i uint32) Page { return Page{Index: i, Data: make([]byte, PageSize)} }
	base := func() *Snapshot { return &Snapshot{Kind: Full, Module: testModule, MemorySize: 1 << 20} }
	cases := map[string]func(s *Snapshot){
		"unsorted pages":       func(s *Snapshot) { s.Pages = []Page{page(3), page(2)} },
		"duplicate pages":      func(s *Snapshot) { s.Pages = []Page{page(2), page(2)} },
		"page beyond memory":   func(s *Snapshot) { s.Pages = []Page{page(256)} },
		"short page":           func(s *Snapshot) { s.Pages = []Page{{Index: 1, Data: make([]byte, 100)}} },
		"memory not 64KiB":     func(s *Snapshot) { s.MemorySize = 4096 },
		"memory over 4GiB":     func(s *Snapshot) { s.MemorySize = MaxMemorySize + WasmPageSize },
		"full with parent":     func(s *Snapshot) { s.Parent[0] = 1 },
		"incremental orphan":   func(s *Snapshot) { s.Kind = Incremental },
		"unknown kind":         func(s *Snapshot) { s.Kind = 9 },
		"global type":          func(s *Snapshot) { s.Globals = []Global{{0, 0x7b, 0}} },
		"i32 too wide":         func(s *Snapshot) { s.Globals = []Global{{0, I32, 1 << 32}} },
		"globals unsorted":     func(s *Snapshot) { s.Globals = []Global{{2, I32, 0}, {1, I32, 0}} },
		"stack outside":        func(s *Snapshot) { s.StackAddr, s.Stack = 1<<20-2, []byte("abc") },
		"meta not utf8":        func(s *Snapshot) { s.Meta.Host = "\xff" },
		"meta reason too long": func(s *Snapshot) { s.Meta.Reason = strings.Repeat("x", 1<<16) },
	}
	for name, mutate := range cases {
		s := base()
		mutate(s)
		var b bytes.Buffer
		err := s.Encode(&b)
		if !errors.Is(err, ErrInvalid) || b.Len() != 0 {
			t.Errorf("%s: err %v, %d bytes written", name, err, b.Len())
		}
	}
}

// Snapshots forged with valid framing and checksums but content that
// breaks the rules must still be refused, with ErrCorrupt.
func TestDecodeRefusesForgedContent(t *testing.T) {
	page := func(i uint32) Page { return Page{Index: i, Data: bytes.Repeat([]byte{byte(i)}, PageSize)} }
	base := func() *Snapshot { return &Snapshot{Kind: Full, Module: testModule, MemorySize: 1 << 20} }
	cases := map[string]func(s *Snapshot){
		"unsorted pages":       func(s *Snapshot) { s.Pages = []Page{page(3), page(2)} },
		"duplicate pages":      func(s *Snapshot) { s.Pages = []Page{page(2), page(2)} },
		"page beyond memory":   func(s *Snapshot) { s.Pages = []Page{page(256)} },
		"memory not 64KiB":     func(s *Snapshot) { s.MemorySize = 4096 * 17 },
		"memory over 4GiB":     func(s *Snapshot) { s.MemorySize = MaxMemorySize + WasmPageSize },
		"full with parent":     func(s *Snapshot) { s.Parent[0] = 1 },
		"incremental orphan":   func(s *Snapshot) { s.Kind = Incremental },
		"unknown kind":         func(s *Snapshot) { s.Kind = 0 },
		"global type":          func(s *Snapshot) { s.Globals = []Global{{0, 0x7b, 0}} },
		"f32 too wide":         func(s *Snapshot) { s.Globals = []Global{{0, F32, 1 << 33}} },
		"globals duplicate":    func(s *Snapshot) { s.Globals = []Global{{1, I32, 0}, {1, I32, 0}} },
		"stack outside":        func(s *Snapshot) { s.StackAddr, s.Stack = 1<<20-2, []byte("abc") },
		"stack addr overflows": func(s *Snapshot) { s.StackAddr, s.Stack = ^uint64(0), []byte("abc") },
		"meta not utf8":        func(s *Snapshot) { s.Meta.Version = "\xc3" },
	}
	for name, mutate := range cases {
		s := base()
		mutate(s)
		var b bytes.Buffer
		if err := s.encode(&b, Options{}); err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeBytes(b.Bytes(), nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// frames walks an encoding's sections: offset of each frame header.
func frames(b []byte) []int {
	var offs []int
	for off := prefixSize; off+frameSize <= len(b); {
		offs = append(offs, off)
		off += frameSize + int(le.Uint32(b[off+4:]))
	}
	return offs
}

// reframe replaces the payload of the frame at off and fixes the frame's
// lengths and checksums, as a forger would.
func reframe(b []byte, off int, fix func(f *frame, payload []byte) []byte) []byte {
	f := frame{typ: SectionType(le.Uint16(b[off:])), codec: Codec(le.Uint16(b[off+2:])),
		stored: le.Uint32(b[off+4:]), raw: le.Uint32(b[off+8:])}
	payload := append([]byte(nil), b[off+frameSize:off+frameSize+int(f.stored)]...)
	rest := b[off+frameSize+int(f.stored):]
	payload = fix(&f, payload)
	f.stored = uint32(len(payload))
	f.sum = crc(payload)
	out := append([]byte(nil), b[:off]...)
	var h [frameSize]byte
	f.put(h[:])
	out = append(out, h[:]...)
	out = append(out, payload...)
	return append(out, rest...)
}

func TestDecodeRefusesForgedFraming(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	s := testSnapshot(rng, Full, 1<<20, 20)
	valid := encodeT(t, s, Options{BatchPages: 8})
	offs := frames(valid)
	const (
		hdr, meta, glob, stack, dev, pages0 = 0, 1, 2, 3, 4, 5
	)
	end := len(offs) - 1
	cases := map[string][]byte{
		"sections swapped": func() []byte {
			b := append([]byte(nil), valid[:offs[meta]]...)
			b = append(b, valid[offs[glob]:offs[stack]]...)
			b = append(b, valid[offs[meta]:offs[glob]]...)
			return append(b, valid[offs[stack]:]...)
		}(),
		"meta missing":       append(append([]byte(nil), valid[:offs[meta]]...), valid[offs[glob]:]...),
		"page batch twice":   append(append(append([]byte(nil), valid[:offs[pages0+1]]...), valid[offs[pages0]:offs[pages0+1]]...), valid[offs[pages0+1]:]...),
		"page batch missing": append(append([]byte(nil), valid[:offs[pages0]]...), valid[offs[pages0+1]:]...),
		"unknown type":       reframe(valid, offs[dev], func(f *frame, p []byte) []byte { f.typ = 9; return p }),
		"codec on meta":      reframe(valid, offs[meta], func(f *frame, p []byte) []byte { f.codec = CodecS2; return p }),
		"unknown codec":      reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { f.codec = 7; return p }),
		"zstd not accepted":  reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { f.codec = 2; return p }),
		"raw size lies":      reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { f.raw += PageSize + 4; return p }),
		"count lies":         reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { p[0]--; return p }),
		"s2 garbage": reframe(valid, offs[pages0], func(f *frame, p []byte) []byte {
			for i := 4 + 8*4 + 4; i < len(p); i++ {
				p[i] ^= 0x5a
			}
			return p
		}),
		"s2 short":        reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { return p[:len(p)-3] }),
		"raw stored lies": reframe(valid, offs[pages0], func(f *frame, p []byte) []byte { f.codec = CodecNone; return p }),
		"header reserved": reframe(valid, offs[hdr], func(f *frame, p []byte) []byte { p[2] = 1; return p }),
		"header short": reframe(valid, offs[hdr], func(f *frame, p []byte) []byte {
			f.raw--
			return p[:len(p)-1]
		}),
		"page size":              reframe(valid, offs[hdr], func(f *frame, p []byte) []byte { p[5] = 0x20; return p }),
		"header page count high": reframe(valid, offs[hdr], func(f *frame, p []byte) []byte { p[88]++; return p }),
		"header page count low":  reframe(valid, offs[hdr], func(f *frame, p []byte) []byte { p[88]--; return p }),
		"globals count lies":     reframe(valid, offs[glob], func(f *frame, p []byte) []byte { p[0]++; return p }),
		"meta trailing":          reframe(valid, offs[meta], func(f *frame, p []byte) []byte { f.raw++; return append(p, 0) }),
		"meta string cut":        reframe(valid, offs[meta], func(f *frame, p []byte) []byte { p[8] = 0xff; return p }),
		"stack too short":        reframe(valid, offs[stack], func(f *frame, p []byte) []byte { f.raw = 4; return p[:4] }),
		"device blob changed":    reframe(valid, offs[dev], func(f *frame, p []byte) []byte { p[0] ^= 1; return p }),
		"trailer count":          reframe(valid, offs[end], func(f *frame, p []byte) []byte { p[0]++; return p }),
		"trailer offset":         reframe(valid, offs[end], func(f *frame, p []byte) []byte { p[8]++; return p }),
		"trailer reserved":       reframe(valid, offs[end], func(f *frame, p []byte) []byte { p[5] = 1; return p }),
		"trailer id":             reframe(valid, offs[end], func(f *frame, p []byte) []byte { p[40] ^= 1; return p }),
		"trailer long":           reframe(valid, offs[end], func(f *frame, p []byte) []byte { f.raw++; return append(p, 0) }),
		"devices over cap": reframe(valid, offs[dev], func(f *frame, p []byte) []byte {
			f.raw = maxDeviceBytes + 1
			return p
		}),
	}
	if _, err := DecodeBytes(valid, nil); err != nil {
		t.Fatal(err)
	}
	for name, b := range cases {
		_, err := DecodeBytes(b, nil)
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// A frame that states a huge length, then ends, must cost what arrived,
// not what was stated.
func TestLyingLengthDoesNotAllocate(t *testing.T) {
	s := &Snapshot{Kind: Full, Module: testModule, MemorySize: 1 << 20, Devices: []byte("x")}
	valid := encodeT(t, s, Options{})
	offs := frames(valid)
	dev := offs[4]
	var h [frameSize]byte
	frame{typ: SecDevices, stored: maxDeviceBytes, raw: maxDeviceBytes, sum: 0}.put(h[:])
	b := append(append(append([]byte(nil), valid[:dev]...), h[:]...), bytes.Repeat([]byte{1}, 1000)...)
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	_, err := DecodeBytes(b, nil)
	runtime.ReadMemStats(&m1)
	if !errors.Is(err, ErrTruncated) {
		t.Fatal(err)
	}
	if alloc := m1.TotalAlloc - m0.TotalAlloc; alloc > 4<<20 {
		t.Fatalf("decoding a 256 MiB claim backed by 1000 bytes allocated %d bytes", alloc)
	}
}

func corruptibleSnapshot(t testing.TB) []byte {
	rng := rand.New(rand.NewPCG(9, 10))
	s := testSnapshot(rng, Incremental, 1<<20, 12)
	// random pages so that one batch is stored raw, the others s2
	for _, p := range s.Pages[:4] {
		for i := range p.Data {
			p.Data[i] = byte(rng.Uint32())
		}
	}
	b := encodeT(t, s, Options{BatchPages: 4})
	codecs := map[Codec]bool{}
	for _, sec := range s.Sections {
		if sec.Type == SecPages {
			codecs[sec.Codec] = true
		}
	}
	if !codecs[CodecNone] || !codecs[CodecS2] {
		t.Fatalf("want both codecs in the test snapshot, have %v", codecs)
	}
	return b
}

// Every single-byte change anywhere in a snapshot is detected as
// corruption: not a panic, not a truncation, not a silent success.
func TestEverySingleByteCorruptionDetected(t *testing.T) {
	t.Parallel()
	valid := corruptibleSnapshot(t)
	t.Logf("%d bytes", len(valid))
	b := append([]byte(nil), valid...)
	for i := range b {
		for _, x := range []byte{0x01, 0x80, 0xff, byte(i*7 + 3)} {
			if x == 0 {
				continue
			}
			b[i] ^= x
			_, err := DecodeBytes(b, nil)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("byte %d ^ %#x: %v", i, x, err)
			}
			b[i] ^= x
		}
	}
}

// Every proper prefix of a snapshot is detected as truncated.
func TestEveryTruncationDetected(t *testing.T) {
	t.Parallel()
	valid := corruptibleSnapshot(t)
	for n := 0; n < len(valid); n++ {
		_, err := DecodeBytes(valid[:n], nil)
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("prefix of %d bytes: %v", n, err)
		}
		if errors.Is(err, io.EOF) != (n == 0) {
			t.Fatalf("prefix of %d bytes: io.EOF is for the empty stream only: %v", n, err)
		}
	}
}

func TestTrailingDataAndStreams(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	a := testSnapshot(rng, Full, 1<<20, 10)
	b := testSnapshot(rng, Incremental, 1<<20, 5)
	ea, eb := encodeT(t, a, Options{}), encodeT(t, b, Options{})
	if _, err := DecodeBytes(append(append([]byte(nil), ea...), 0), nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte: %v", err)
	}
	// back to back on one stream, as a Remus primary sends them
	r := bufio.NewReader(io.MultiReader(bytes.NewReader(ea), bytes.NewReader(eb)))
	for _, want := range []*Snapshot{a, b} {
		got, err := Decode(r)
		if err != nil {
			t.Fatal(err)
		}
		sameSnapshot(t, got, want)
	}
	if _, err := Decode(r); !errors.Is(err, io.EOF) || !errors.Is(err, ErrTruncated) {
		t.Fatalf("end of stream: %v", err)
	}
}

func TestVersionAndMagic(t *testing.T) {
	valid := encodeT(t, &Snapshot{Kind: Full, Module: testModule}, Options{})
	b := append([]byte(nil), valid...)
	le.PutUint32(b[8:], Version+1)
	le.PutUint32(b[12:], crc(b[:12]))
	_, err := DecodeBytes(b, nil)
	if !errors.Is(err, ErrVersion) || errors.Is(err, ErrCorrupt) {
		t.Fatalf("newer version: %v", err)
	}
	if !strings.Contains(err.Error(), fmt.Sprintf("version %d", Version+1)) {
		t.Fatalf("message does not say the version: %v", err)
	}
	_, err = DecodeBytes([]byte("\x00asm\x01\x00\x00\x00 and then some more bytes"), nil)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "not an ftvm snapshot") {
		t.Fatalf("a wasm file: %v", err)
	}
}

func TestModuleMismatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	s := testSnapshot(rng, Full, 1<<20, 10)
	b := encodeT(t, s, Options{})
	if _, err := DecodeFor(bytes.NewReader(b), testModule); err != nil {
		t.Fatal(err)
	}
	other := ModuleHash([]byte("other"))
	// cut after the header: the mismatch is found before the pages arrive
	_, err := DecodeFor(bytes.NewReader(b[:prefixSize+frameSize+headerSize]), other)
	if !errors.Is(err, ErrModuleMismatch) {
		t.Fatalf("other module: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	s := testSnapshot(rng, Incremental, 4<<20, 150)
	b := encodeT(t, s, Options{BatchPages: 64})
	got, err := DecodeBytes(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	sum := Describe(got)
	if sum.Pages != 150 || sum.Batches != 3 || sum.PageRaw != 150*(PageSize+4)+3*4 || sum.FileBytes != int64(len(b)) ||
		sum.Parent != s.Parent.String() || sum.Module != testModule.String() || sum.ID != s.ID.String() || sum.Seq != 1 {
		t.Fatalf("%+v", sum)
	}
	if len(sum.Sections) != 7 || sum.Sections[5].Type != "pages" || sum.Sections[5].Count != 3 || sum.Sections[5].Pages != 150 {
		t.Fatalf("sections %+v", sum.Sections)
	}
	text := sum.String()
	for _, want := range []string{"incremental, seq 1", "parent   " + s.Parent.String(), "module   " + testModule.String(),
		"150 in 3 batches", "4.00 MiB", `reason "test"`, "globals  4"} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in:\n%s", want, text)
		}
	}
	t.Logf("\n%s", text)
}

// A snapshot may carry its module; the copy is checked against the module
// hash, and it is not part of the ID (it is not state).
func TestModuleCopy(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 20))
	code := []byte("\x00asm\x01\x00\x00\x00 a pretend module")
	s := testSnapshot(rng, Full, 1<<20, 10)
	s.Module = ModuleHash(code)
	s.Nonce = [16]byte{7}
	encodeT(t, s, Options{})
	bare := s.ID
	s.ModuleCode, s.ModuleName = code, "pretend.wasm"
	b := encodeT(t, s, Options{})
	if s.ID != bare {
		t.Fatal("the module copy changed the ID")
	}
	got, err := DecodeBytes(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.ModuleCode, code) || got.ModuleName != "pretend.wasm" {
		t.Fatalf("module copy: %q %q", got.ModuleCode, got.ModuleName)
	}
	if sum := Describe(got); sum.ModuleSize != len(code) || !strings.Contains(sum.String(), fmt.Sprintf(`(embedded: %d B, "pretend.wasm")`, len(code))) {
		t.Fatalf("describe: %+v\n%s", sum, sum.String())
	}
	img := &Image{}
	if err := Apply(img, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.ModuleCode, code) || img.ModuleName != "pretend.wasm" {
		t.Fatal("the image lost the module copy")
	}
	// an incremental without the copy keeps it
	inc := &Snapshot{Kind: Incremental, Module: s.Module, Seq: 1, Parent: got.ID, MemorySize: 1 << 20}
	encodeT(t, inc, Options{})
	if err := Apply(img, inc); err != nil || !bytes.Equal(img.ModuleCode, code) {
		t.Fatalf("after an incremental: %v, %d bytes of module", err, len(img.ModuleCode))
	}
	if cs := img.Snapshot(Meta{}); !bytes.Equal(cs.ModuleCode, code) {
		t.Fatal("compaction dropped the module copy")
	}

	// a copy of another module is refused by Encode and, forged, by Decode
	wrong := *s
	wrong.ModuleCode = []byte("other code")
	var buf bytes.Buffer
	if err := wrong.Encode(&buf); !errors.Is(err, ErrInvalid) {
		t.Fatalf("encode wrong module copy: %v", err)
	}
	buf.Reset()
	if err := wrong.encode(&buf, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeBytes(buf.Bytes(), nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("decode wrong module copy: %v", err)
	}
	nameOnly := *s
	nameOnly.ModuleCode = nil
	if err := nameOnly.Encode(&buf); !errors.Is(err, ErrInvalid) {
		t.Fatalf("encode module name without code: %v", err)
	}

	// the module section comes once, before the pages
	offs := frames(b)
	mod := offs[5]
	if SectionType(le.Uint16(b[mod:])) != SecModule {
		t.Fatal("no module section where expected")
	}
	modFrame := b[mod:offs[6]]
	twice := append(append(append([]byte(nil), b[:offs[6]]...), modFrame...), b[offs[6]:]...)
	late := append(append(append([]byte(nil), b[:mod]...), b[offs[6]:offs[7]]...), modFrame...)
	late = append(late, b[offs[7]:]...)
	for name, bad := range map[string][]byte{"twice": twice, "after pages": late} {
		if _, err := DecodeBytes(bad, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("module section %s: %v", name, err)
		}
	}
}

// A pause must not allocate staging memory: fresh memory faults on first
// touch (the tail of the pause on a VM). After Expect and Refill, staging
// that many pages takes only chunks already in the pool, and Release gives
// them back, keeping no more than MaxFree.
func TestStagePoolKeepsPausesFromAllocating(t *testing.T) {
	const pages = 3*stageChunkPages + 1 // four chunks
	mem := make([]byte, (pages+10)*PageSize)
	for i := 0; i < len(mem); i += PageSize {
		mem[i] = byte(i / PageSize)
	}
	idx := make([]uint32, pages)
	for i := range idx {
		idx[i] = uint32(pages + 9 - i) // reversed: Stage sorts
	}
	pool := &StagePool{MaxFree: 6}
	st := Stager{Pool: pool}
	pool.Expect(make([]Page, stageChunkPages+1), uint64(len(mem))) // two chunks, twice over
	pool.Refill()
	if got := pool.freeChunks(); got != 4 {
		t.Fatalf("Refill left %d chunks, want 4", got)
	}
	if _, err := st.Stage(mem, idx); err != nil {
		t.Fatal(err)
	}
	if got := pool.freeChunks(); got != 0 {
		t.Fatalf("staging four chunks' worth left %d free, want 0", got)
	}
	if allocs := testing.AllocsPerRun(20, func() {
		if _, err := st.Stage(mem, idx); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Fatalf("a repeated Stage allocated %v times", allocs)
	}
	pagesOut, _ := st.Stage(mem, idx)
	for i, p := range pagesOut {
		if want := uint32(10 + i); p.Index != want || p.Data[0] != byte(want) || len(p.Data) != PageSize {
			t.Fatalf("page %d: index %d, first byte %d", i, p.Index, p.Data[0])
		}
	}
	for b := 0; b < 4; b++ {
		if contiguous(pagesOut[b*stageChunkPages:min(len(pagesOut), (b+1)*stageChunkPages)]) == nil {
			t.Fatalf("batch %d is not one contiguous chunk", b)
		}
	}
	st.Release()
	if got := pool.freeChunks(); got != 4 {
		t.Fatalf("Release gave back %d chunks, want 4", got)
	}
	// More than MaxFree: the extra ones are dropped, not kept.
	other := Stager{Pool: pool}
	if _, err := other.Stage(mem, idx); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Stage(mem, idx); err != nil { // the pool is empty: allocates
		t.Fatal(err)
	}
	other.Release()
	st.Release()
	if got := pool.freeChunks(); got != 6 {
		t.Fatalf("the pool keeps %d chunks, want MaxFree = 6", got)
	}
}

// pagesFrom is n pages (indices only) from index from on.
func pagesFrom(from, n uint32) []Page {
	ps := make([]Page, n)
	for i := range ps {
		ps[i].Index = from + uint32(i)
	}
	return ps
}

// TestStagePoolIgnoresGrowth: a memory that grew is staged whole once; the
// pool's target follows the pages dirtied within the memory as it was.
func TestStagePoolIgnoresGrowth(t *testing.T) {
	pool := &StagePool{MaxFree: 16}
	pool.Expect(pagesFrom(0, 6), 32*PageSize)
	// The heap grows from 32 to 2,032 pages: 2,000 new pages and 4 old.
	grown := append(pagesFrom(20, 4), pagesFrom(32, 2000)...)
	pool.Expect(grown, 2032*PageSize)
	pool.Refill()
	if got := pool.freeChunks(); got != 2 {
		t.Fatalf("after a growth Refill keeps %d chunks, want the floor of 2", got)
	}
	// Pages dirtied again within the grown memory do count.
	pool.Expect(pagesFrom(100, 1500), 2032*PageSize)
	pool.Refill()
	if got := pool.freeChunks(); got != 4 {
		t.Fatalf("after 1,500 dirty pages Refill keeps %d chunks, want 4 (two chunks, twice over)", got)
	}
}

// TestStagePoolGrowthFromNothing: the machine announces a memory's first
// allocation as a growth from 0 bytes. A later growth, staged whole, must
// still not be taken for the working set (a C guest's 38 MiB sieve once
// had Refill fault in 120 MiB of staging it never used).
func TestStagePoolGrowthFromNothing(t *testing.T) {
	const initial = 48
	pool := &StagePool{MaxFree: 32}
	pool.ExpectGrowth(initial) // instantiation: 0 -> 48 pages
	pool.Expect(pagesFrom(0, 6), initial*PageSize)
	pool.Expect(pagesFrom(3, 31), initial*PageSize)
	const grow = 9776
	pool.ExpectGrowth(grow)
	pool.Expect(pagesFrom(initial, 9770), (initial+grow)*PageSize)
	if got := pool.want(); got > 3 {
		t.Fatalf("after a growth staged whole the pool wants %d chunks, want at most 3 (the floor and what is left of the growth)", got)
	}
	// Once stagings have carried the rest of the growth, pages of the
	// whole memory count as steady.
	pool.Expect(pagesFrom(0, 20), (initial+grow)*PageSize)
	pool.Expect(pagesFrom(initial, 1500), (initial+grow)*PageSize)
	if got := pool.want(); got != 4 {
		t.Fatalf("after 1,500 dirty pages the pool wants %d chunks, want 4", got)
	}
}

// TestStagePoolKeepsGrowthUntilStaged: a growth announced just before an
// unrelated pause keeps its chunks ready until a staging carries it (the
// Remus primary once allocated 40 MiB of staging in the pause after that),
// is not taken for a steady working set afterwards, and is given up on
// after growthPatience stagings that carry none of it.
func TestStagePoolKeepsGrowthUntilStaged(t *testing.T) {
	const old = 32
	grow := uint32(3 * stageChunkPages)
	pool := &StagePool{MaxFree: 16}
	pool.Expect(pagesFrom(0, 6), old*PageSize)
	pool.ExpectGrowth(int(grow))
	pool.Expect(pagesFrom(0, 6), (old+uint64(grow))*PageSize) // the pause between: none of it yet
	pool.Refill()
	if got := pool.freeChunks(); got != 2+3 {
		t.Fatalf("with a growth of 3 chunks pending Refill keeps %d chunks, want 5", got)
	}
	// The pause that carries it takes its chunks from the pool.
	mem := make([]byte, (old+int(grow))*PageSize)
	idx := make([]uint32, 0, grow+2)
	idx = append(idx, 1, 2)
	for p := uint32(old); p < old+grow; p++ {
		idx = append(idx, p)
	}
	st := Stager{Pool: pool}
	staged, err := st.Stage(mem, idx)
	if err != nil {
		t.Fatal(err)
	}
	if got := pool.freeChunks(); got != 1 {
		t.Fatalf("staging the growth left %d chunks free, want 1 (none allocated)", got)
	}
	pool.Expect(staged, uint64(len(mem)))
	st.Release()
	pool.Refill()
	if got := pool.want(); got != 2 {
		t.Fatalf("after the growth was staged the pool wants %d chunks, want the floor of 2", got)
	}
	// Within the grown memory, pages now count as steady.
	pool.Expect(pagesFrom(old, 1500), uint64(len(mem)))
	if got := pool.want(); got != 4 {
		t.Fatalf("after 1,500 dirty pages the pool wants %d chunks, want 4", got)
	}

	// A growth never written is given up after growthPatience stagings.
	pool2 := &StagePool{MaxFree: 16}
	pool2.Expect(pagesFrom(0, 6), old*PageSize)
	pool2.ExpectGrowth(int(grow))
	for i := 0; i < growthPatience; i++ {
		if got := pool2.want(); got != 5 {
			t.Fatalf("after %d stagings without the growth the pool wants %d chunks, want 5", i, got)
		}
		pool2.Expect(pagesFrom(0, 6), (old+uint64(grow))*PageSize)
	}
	if got := pool2.want(); got != 2 {
		t.Fatalf("after %d stagings without the growth the pool wants %d chunks, want 2", growthPatience, got)
	}

	// Grown before the first Expect (Remus's full checkpoint makes none):
	// the staging that carries the growth settles it, and its pages are
	// not taken for a working set.
	pool3 := &StagePool{MaxFree: 16}
	pool3.ExpectGrowth(int(grow))
	pool3.Expect(append(pagesFrom(1, 2), pagesFrom(old, grow)...), (old+uint64(grow))*PageSize)
	if got := pool3.want(); got != 2 {
		t.Fatalf("after a growth before the first Expect was staged the pool wants %d chunks, want 2", got)
	}
}
