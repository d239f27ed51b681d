package wasi

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// FuzzDevices feeds hostile arguments to every device-layer handler. Each
// input is a short program: up to six calls, each with parameters chosen by
// the fuzzer, run against a fresh Devices whose one preopened directory sits
// in a temporary directory beside a secret file, with linear memory taken
// from the rest of the input. Properties:
//   - no handler panics, and none blocks once the Devices is stopped (the
//     program runs on a stopped Devices: every wait checks readiness once
//     and returns EINTR, so a blocking call costs nothing and the rest of
//     its logic is still exercised);
//   - nothing beside the preopened directory is created, removed or
//     modified, and the secret never shows up in guest memory or output;
//   - Close releases every host descriptor the program made the host open.
//
// Input layout: byte 0 is the number of calls (1 + b%6); each call is one
// byte naming it (mod NumCalls) and one encoded value per parameter (see
// fzValue); the remaining bytes are guest memory.

// fzSecret is what the file beside the preopen holds.
const fzSecret = "FUZZ-SECRET-7f3a"

// fzMaxAlloc caps fd_allocate: it reserves real disk blocks, and a fuzzer
// asking for terabytes would fill the disk rather than find a bug.
const fzMaxAlloc = 1 << 20

// fzCall is one decoded call.
type fzCall struct {
	call   Call
	params []uint64
	// fromEnd marks parameters to be taken as (memory size - value), so that
	// short inputs reach the end of memory, where bounds checks matter.
	fromEnd []bool
}

// fzValue decodes one parameter: a tag byte, then 1, 2, 4 or 8 little-endian
// bytes (tag&3); tag&4 measures the value from the end of memory; tag&8
// negates it (as a 64-bit value), for "negative" offsets and lengths.
func fzValue(b []byte) (v uint64, fromEnd bool, rest []byte) {
	if len(b) == 0 {
		return 0, false, b
	}
	tag := b[0]
	b = b[1:]
	n := 1 << (tag & 3)
	var buf [8]byte
	copy(buf[:], b[:min(n, len(b))])
	b = b[min(n, len(b)):]
	v = binary.LittleEndian.Uint64(buf[:])
	if tag&8 != 0 {
		v = -v
	}
	return v, tag&4 != 0, b
}

// fzDecode splits an input into calls and memory.
func fzDecode(data []byte) ([]fzCall, []byte) {
	if len(data) == 0 {
		return nil, nil
	}
	n := 1 + int(data[0])%6
	data = data[1:]
	var calls []fzCall
	for i := 0; i < n && len(data) > 0; i++ {
		c := Call(data[0] % byte(NumCalls))
		data = data[1:]
		if c == CallProcExit {
			c = CallSchedYield // proc_exit unwinds the guest; it is not a handler
		}
		fc := fzCall{call: c}
		for range signatures[c].params {
			v, end, rest := fzValue(data)
			data = rest
			fc.params = append(fc.params, v)
			fc.fromEnd = append(fc.fromEnd, end)
		}
		calls = append(calls, fc)
	}
	return calls, data
}

// fzEncode is the inverse of fzDecode for seeds: every parameter is written
// as 8 bytes (or from the end of memory when end is set for it).
func fzEncode(calls []fzCall, mem []byte) []byte {
	out := []byte{byte(len(calls) - 1)}
	for _, c := range calls {
		out = append(out, byte(c.call))
		for i, v := range c.params {
			tag := byte(3)
			if i < len(c.fromEnd) && c.fromEnd[i] {
				tag |= 4
			}
			out = append(out, tag)
			out = binary.LittleEndian.AppendUint64(out, v)
		}
	}
	return append(out, mem...)
}

// fzOpenFds counts this process's open descriptors.
func fzOpenFds(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents) - 1 // the ReadDir's own descriptor
}

// fzListing records name, kind and content of everything directly in dir.
func fzListing(t testing.TB, dir string) string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		fmt.Fprintf(&b, "%s %v", e.Name(), e.Type())
		if e.Type().IsRegular() {
			c, _ := os.ReadFile(filepath.Join(dir, e.Name()))
			fi, _ := e.Info()
			fmt.Fprintf(&b, " %q %v", c, fi.ModTime().UnixNano())
		}
		b.WriteString("\n")
	}
	return b.String()
}

var fzWarm sync.Once

func FuzzDevices(f *testing.F) {
	for _, s := range fzSeeds() {
		f.Add(s)
	}
	// The first listener of a process makes Go's netpoller open its epoll
	// descriptor, which stays: open it before any descriptor count.
	fzWarm.Do(func() {
		if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
			ln.Close()
		}
	})
	f.Fuzz(func(t *testing.T, data []byte) {
		calls, memIn := fzDecode(data)
		if len(calls) == 0 {
			return
		}
		mem := bytes.Clone(memIn)
		outer := t.TempDir()
		box := filepath.Join(outer, "box")
		if err := os.Mkdir(box, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(outer, "secret"), []byte(fzSecret), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(box, "f"), []byte("inside"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../secret", filepath.Join(box, "up")); err != nil {
			t.Fatal(err)
		}
		before := fzListing(t, outer)
		fdsBefore := fzOpenFds(t)

		var stdout, stderr bytes.Buffer
		d, err := New(Config{Preopens: []Preopen{{HostPath: box, GuestPath: "/box"}},
			Listen: []Listener{{Addr: "127.0.0.1:0"}},
			Stdin:  strings.NewReader("stdin bytes"), Stdout: &stdout, Stderr: &stderr})
		if err != nil {
			t.Fatal(err)
		}
		d.Stop()
		m := NewMem(mem)
		for _, c := range calls {
			p := make([]uint64, len(c.params))
			for i, v := range c.params {
				if c.fromEnd[i] {
					v = uint64(m.Len()) - v
				}
				p[i] = v
			}
			if c.call == CallFdAllocate {
				p[1], p[2] = min(p[1], fzMaxAlloc), min(p[2], fzMaxAlloc)
			}
			start := time.Now()
			errno := handlers[c.call](d, m, p)
			if took := time.Since(start); took > 2*time.Second {
				t.Errorf("%v%v blocked for %v on a stopped Devices", c.call, p, took)
			}
			if int(errno) >= len(errnoNames) {
				t.Errorf("%v%v returned errno %d, which WASI does not define", c.call, p, errno)
			}
		}
		d.Close()

		if after := fzListing(t, outer); after != before {
			t.Errorf("outside the preopen:\nbefore:\n%safter:\n%s", before, after)
		}
		for _, b := range [][]byte{mem, stdout.Bytes(), stderr.Bytes()} {
			if bytes.Contains(b, []byte(fzSecret)) {
				t.Error("the secret beside the preopen reached the guest")
			}
		}
		if n := fzOpenFds(t); n != fdsBefore {
			t.Errorf("%d host descriptors open after Close, %d before", n, fdsBefore)
		}
	})
}

// fzSeeds are programs that reach deep into each device area, for the
// fuzzer to mutate: memory layouts with paths, iovecs and subscriptions at
// known offsets.
func fzSeeds() [][]byte {
	// 512 bytes of memory (small inputs minimize fast): strings at fixed
	// offsets, then iovecs, result slots, poll subscriptions and buffers.
	mem := make([]byte, 512)
	put := func(off int, s string) uint64 { copy(mem[off:], s); return uint64(off) }
	pF := put(0, "f")
	pNew := put(8, "new.txt")
	pUp := put(16, "../secret")
	pLink := put(32, "up")
	pSub := put(40, "sub/../../secret")
	pData := put(64, "hello, fuzz")
	pDir := put(80, "d")
	const (
		iovW   = 96  // iovec {64, 11}: the data above
		iovR   = 104 // iovec {448, 64}: the read buffer
		res    = 112 // result slots
		subs   = 128 // two subscriptions (96 bytes)
		events = 224 // two events (64 bytes)
		buf    = 288 // 160 bytes for stat, readdir, names
		rbuf   = 448
	)
	binary.LittleEndian.PutUint32(mem[iovW:], uint32(pData))
	binary.LittleEndian.PutUint32(mem[iovW+4:], 11)
	binary.LittleEndian.PutUint32(mem[iovR:], rbuf)
	binary.LittleEndian.PutUint32(mem[iovR+4:], 64)
	// Subscriptions: a clock, relative 1 ms; fd_read on the listener (4).
	binary.LittleEndian.PutUint64(mem[subs:], 1)
	mem[subs+8] = EventtypeClock
	binary.LittleEndian.PutUint32(mem[subs+16:], ClockMonotonic)
	binary.LittleEndian.PutUint64(mem[subs+24:], 1e6)
	binary.LittleEndian.PutUint64(mem[subs+48:], 2)
	mem[subs+56] = EventtypeFdRead
	binary.LittleEndian.PutUint32(mem[subs+64:], 4)

	all := uint64(RightsAll)
	c := func(call Call, params ...uint64) fzCall { return fzCall{call: call, params: params} }
	seeds := [][]fzCall{
		// Create, write, seek, read back, close.
		{c(CallPathOpen, 3, 1, pNew, 7, uint64(OflagCreat), all, all, 0, res),
			c(CallFdWrite, 5, iovW, 1, res+8), c(CallFdSeek, 5, 0, 0, res+8),
			c(CallFdRead, 5, iovR, 1, res+8), c(CallFdClose, 5)},
		// Escapes.
		{c(CallPathOpen, 3, 1, pUp, 9, 0, all, all, 0, res), c(CallPathOpen, 3, 1, pLink, 2, 0, all, all, 0, res),
			c(CallPathOpen, 3, 0, pSub, 16, 0, all, all, 0, res)},
		{c(CallPathSymlink, pUp, 9, 3, pNew, 7), c(CallPathOpen, 3, 1, pNew, 7, uint64(OflagCreat|OflagTrunc), all, all, 0, res),
			c(CallPathLink, 3, 1, pLink, 2, 3, pDir, 1), c(CallPathRename, 3, pF, 1, 3, pUp, 9)},
		// Directories.
		{c(CallPathCreateDirectory, 3, pDir, 1), c(CallFdReaddir, 3, buf, 160, 0, res),
			c(CallFdReaddir, 3, buf, 160, math.MaxUint64, res), c(CallPathRemoveDirectory, 3, pDir, 1),
			c(CallPathUnlinkFile, 3, pF, 1)},
		// Metadata.
		{c(CallPathFilestatGet, 3, 1, pLink, 2, buf), c(CallPathFilestatSetTimes, 3, 1, pLink, 2, 1, 1, 5),
			c(CallFdFilestatGet, 3, buf), c(CallPathReadlink, 3, pLink, 2, buf, 64, res)},
		// Open a file, then positional I/O, size, allocate, advise, sync.
		{c(CallPathOpen, 3, 1, pF, 1, 0, all, all, 0, res), c(CallFdPwrite, 5, iovW, 1, 3, res+8),
			c(CallFdPread, 5, iovR, 1, 0, res+8), c(CallFdFilestatSetSize, 5, 2), c(CallFdAllocate, 5, 0, 4096),
			c(CallFdAdvise, 5, 0, 0, uint64(AdviceRandom))},
		// Descriptor table and stdio.
		{c(CallFdWrite, 1, iovW, 1, res), c(CallFdRead, 0, iovR, 1, res), c(CallFdRenumber, 3, 1),
			c(CallFdFdstatGet, 1, buf), c(CallFdPrestatGet, 1, buf), c(CallFdPrestatDirName, 1, buf, 16)},
		// Poll and sockets: a clock and the listener; accept with nobody
		// connecting, non-blocking, then blocking (EINTR: stopped).
		{c(CallPollOneoff, subs, events, 2, res), c(CallFdFdstatSetFlags, 4, uint64(FdflagNonblock)),
			c(CallSockAccept, 4, 0, res), c(CallFdFdstatSetFlags, 4, 0), c(CallSockAccept, 4, 0, res),
			c(CallSockRecv, 4, iovR, 1, 0, res, res+4)},
		// Static data, clocks, random.
		{c(CallArgsSizesGet, res, res+4), c(CallEnvironGet, buf, rbuf), c(CallClockTimeGet, 1, 0, res),
			c(CallRandomGet, rbuf, 64), c(CallClockResGet, 3, res)},
	}
	var out [][]byte
	for _, s := range seeds {
		out = append(out, fzEncode(s, mem))
	}
	// Pointers near the end of memory and near 4 GiB.
	out = append(out, fzEncode([]fzCall{{call: CallFdWrite, params: []uint64{1, 8, 1, 4},
		fromEnd: []bool{false, true, false, true}}}, mem[:64]))
	out = append(out, fzEncode([]fzCall{c(CallPathOpen, 3, 1, math.MaxUint32-4, 16, 1, all, all, 0, res)}, mem))
	return out
}

// TestFuzzSeedsDecode keeps the seeds meaningful: each decodes back to the
// calls it was built from, so a change of the input layout cannot silently
// turn the corpus into noise.
func TestFuzzSeedsDecode(t *testing.T) {
	for i, s := range fzSeeds() {
		calls, _ := fzDecode(s)
		if len(calls) == 0 || int(s[0])+1 != len(calls) {
			t.Errorf("seed %d: decodes to %d calls, built with %d", i, len(calls), int(s[0])+1)
		}
	}
	// FTVM_WRITE_FUZZ_SEEDS=1 go test ./wasi -run TestFuzzSeedsDecode
	// regenerates the committed corpus from fzSeeds.
	if os.Getenv("FTVM_WRITE_FUZZ_SEEDS") != "" {
		dir := filepath.Join("testdata", "fuzz", "FuzzDevices")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		seeds := fzSeeds()
		names := make([]string, len(seeds))
		for i, s := range seeds {
			names[i] = fmt.Sprintf("seed-%02d", i)
			body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s)) + ")\n"
			if err := os.WriteFile(filepath.Join(dir, names[i]), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		sort.Strings(names)
		t.Logf("wrote %v", names)
	}
}
