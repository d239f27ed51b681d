package remus

import (
	"bytes"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
)

// largeSnapshot is a full snapshot of n random pages (incompressible, so
// it encodes to about n pages), of a fake module.
func largeSnapshot(t *testing.T, seed uint64, n int) (*snapshot.Snapshot, []byte) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	module, _ := fakeModule()
	s := &snapshot.Snapshot{Kind: snapshot.Full, Module: snapshot.ModuleHash(module), Seq: 1,
		MemorySize: uint64(2*n) * snapshot.PageSize, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	for i := 0; i < n; i++ {
		data := make([]byte, snapshot.PageSize)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		s.Pages = append(s.Pages, snapshot.Page{Index: uint32(2*i + rng.IntN(2)), Data: data})
	}
	return s, encodeSnap(t, s)
}

// stream feeds raw to a decodeStream the way the receiver does: in pieces
// of random sizes.
func stream(rng *rand.Rand, raw []byte, module *snapshot.Hash) *decodeStream {
	var buf chunks
	var d *decodeStream
	for off := 0; off < len(raw); {
		n := min(1+rng.IntN(300<<10), len(raw)-off)
		buf = append(buf, bytes.Clone(raw[off:off+n]))
		off += n
		switch {
		case d != nil:
			d.feed(buf)
		case buf.len() > 64<<10:
			d = startDecodeStream(buf, module)
		}
	}
	if d == nil {
		d = startDecodeStream(buf, module)
	}
	return d
}

// A checkpoint decoded while it arrives is the one decoded at the end:
// same ID, same pages.
func TestDecodeStreamMatchesDecodeBytes(t *testing.T) {
	for seed := uint64(1); seed <= 4; seed++ {
		want, raw := largeSnapshot(t, seed, 600)
		rng := rand.New(rand.NewPCG(seed, 2))
		got, err := stream(rng, raw, &want.Module).finish()
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if got.ID != want.ID || len(got.Pages) != len(want.Pages) {
			t.Fatalf("seed %d: decoded %s with %d pages, want %s with %d", seed, got.ID.Short(), len(got.Pages), want.ID.Short(), len(want.Pages))
		}
		for i := range got.Pages {
			if got.Pages[i].Index != want.Pages[i].Index || !bytes.Equal(got.Pages[i].Data, want.Pages[i].Data) {
				t.Fatalf("seed %d: page %d differs", seed, i)
			}
		}
	}
}

// Damage anywhere, data past the end, or a stream cut short is an error,
// as from DecodeBytes; an abandoned stream ends its decoder.
func TestDecodeStreamRejects(t *testing.T) {
	want, raw := largeSnapshot(t, 9, 400)
	rng := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 6; i++ {
		bad := bytes.Clone(raw)
		bad[rng.IntN(len(bad))] ^= 1 << rng.IntN(8)
		if _, err := stream(rng, bad, &want.Module).finish(); err == nil {
			t.Errorf("a damaged checkpoint decoded without error")
		}
	}
	if _, err := stream(rng, append(bytes.Clone(raw), 0), &want.Module).finish(); err == nil || !strings.Contains(err.Error(), "after the end") {
		t.Errorf("data after the end: %v", err)
	}
	if _, err := stream(rng, raw[:len(raw)-100], &want.Module).finish(); !errors.Is(err, snapshot.ErrTruncated) {
		t.Errorf("a truncated checkpoint: %v, want ErrTruncated", err)
	}
	other := snapshot.ModuleHash([]byte("another"))
	if _, err := stream(rng, raw, &other).finish(); !errors.Is(err, snapshot.ErrModuleMismatch) {
		t.Errorf("another module's checkpoint: %v, want ErrModuleMismatch", err)
	}
	d := startDecodeStream(chunks{raw[:len(raw)/2]}, &want.Module)
	d.abort()
	select {
	case <-d.done:
		if !errors.Is(d.err, errDecodeAborted) {
			t.Errorf("an abandoned decode ended with %v", d.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("an abandoned decode did not end")
	}
}

// TestBackupDecodesLargeCheckpointsWhileTheyArrive: a checkpoint of
// several chunks is acknowledged once whole and valid, never when damaged
// inside or cut off (the backup decodes such a checkpoint as it arrives).
func TestBackupDecodesLargeCheckpointsWhileTheyArrive(t *testing.T) {
	full, raw := largeSnapshot(t, 5, 1000) // about 4 MiB
	b := serveBackup(t, time.Hour)
	addr := b.Addr().String()
	committed := func() uint64 { return committedOn(b) }
	send := func(f *fakePrimary, data []byte, crc uint32) {
		f.send(&wire.CheckpointBegin{Seq: 1, Full: true})
		for off := 0; off < len(data); off += 256 << 10 {
			f.send(&wire.CheckpointData{Seq: 1, Offset: uint64(off), Data: data[off:min(off+256<<10, len(data))]})
		}
		f.send(&wire.CheckpointEnd{Seq: 1, SnapshotSize: uint64(len(data)), SnapshotCRC: crc})
	}

	// Damaged inside, near the end, with a matching stream CRC.
	bad := bytes.Clone(raw)
	bad[len(bad)-5000] ^= 0x10
	f := dialBackup(t, addr, full.Module)
	send(f, bad, crc32.Checksum(bad, castagnoli))
	if expectDropped(t, f); committed() != 0 {
		t.Fatalf("a damaged large checkpoint: committed %d", committed())
	}

	// Damaged near the start: the session is dropped before the end
	// comes (here it never does; the primary sends heartbeats).
	bad = bytes.Clone(raw)
	bad[300<<10] ^= 0x10
	f = dialBackup(t, addr, full.Module)
	f.send(&wire.CheckpointBegin{Seq: 1, Full: true})
	for off := 0; off < len(bad); off += 256 << 10 {
		if f.sendErr(&wire.CheckpointData{Seq: 1, Offset: uint64(off), Data: bad[off:min(off+256<<10, len(bad))]}) != nil {
			break // dropped already
		}
	}
	go func(f *fakePrimary) { // this connection's: f is reassigned below
		for f.sendErr(&wire.Heartbeat{}) == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}(f)
	if expectDropped(t, f); committed() != 0 {
		t.Fatalf("a checkpoint damaged at its start: committed %d", committed())
	}

	// Cut off after five chunks, once decoding has begun.
	f = dialBackup(t, addr, full.Module)
	f.send(&wire.CheckpointBegin{Seq: 1, Full: true})
	for off := 0; off < 5*256<<10; off += 256 << 10 {
		f.send(&wire.CheckpointData{Seq: 1, Offset: uint64(off), Data: raw[off : off+256<<10]})
	}
	f.c.Close()
	time.Sleep(200 * time.Millisecond)
	if committed() != 0 {
		t.Fatalf("committed %d after a primary vanished mid-checkpoint", committed())
	}

	// Whole and valid, in pieces of a few kilobytes (the backup gathers
	// them into larger ones): acknowledged.
	f = dialBackup(t, addr, full.Module)
	f.send(&wire.CheckpointBegin{Seq: 1, Full: true})
	for off := 0; off < len(raw); off += 3000 {
		f.send(&wire.CheckpointData{Seq: 1, Offset: uint64(off), Data: raw[off:min(off+3000, len(raw))]})
	}
	f.send(&wire.CheckpointEnd{Seq: 1, SnapshotSize: uint64(len(raw)), SnapshotCRC: crc32.Checksum(raw, castagnoli)})
	if m, ok := f.next().(*wire.Ack); !ok || m.Seq != 1 {
		t.Fatalf("a valid large checkpoint in small pieces was answered with %v", m)
	}
}

// expectDropped fails the test unless the backup closes f's connection
// without acknowledging anything.
func expectDropped(t *testing.T, f *fakePrimary) {
	t.Helper()
	f.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		m, err := wire.Recv(f.c)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("the backup neither answered nor dropped the session")
		}
		if err != nil {
			return
		}
		if m.Type() != wire.TypeHeartbeat {
			t.Fatalf("answered with %v, want the session dropped", m)
		}
	}
}
