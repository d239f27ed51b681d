package remus

import (
	"context"
	"encoding/binary"
	"hash/crc32"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/transport"
	"github.com/ftvm/ftvm/wasi"
)

// FuzzBackupStream: a primary is a network peer, so the backup's receiver
// (slot.receive: checkpoints assembled from pieces, disk ops and files,
// ends with sizes, counts and checksums, exits with their last epoch's
// ops) must take any sequence of well-formed messages without panicking
// or wedging its slot. The fuzzer picks the messages and their fields from
// a small vocabulary that includes valid snapshots, so that whole
// checkpoints commit and the later steps get past the first check. After
// the stream the connection closes; the backup must still answer a new
// primary, and what it committed must be a whole checkpoint of the chain.
func FuzzBackupStream(f *testing.F) {
	module, hash := fakeModule()
	full := &snapshot.Snapshot{Kind: snapshot.Full, Module: hash, Seq: 1, MemorySize: 1 << 17,
		Pages: []snapshot.Page{{Index: 0, Data: onePage(7)}}, Devices: []byte("{}"), ModuleCode: module, ModuleName: "fake"}
	fullRaw := encodeSnap(f, full)
	inc := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: hash, Seq: 2, Parent: full.ID, MemorySize: 1 << 17,
		Pages: []snapshot.Page{{Index: 1, Data: onePage(9)}}, Devices: []byte("{}")}
	incRaw := encodeSnap(f, inc)
	snaps := map[uint64][]byte{1: fullRaw, 2: incRaw}

	// Seeds: a session's life (full 1, incremental 2 with an op, an exit
	// with one), a checkpoint cut off by an exit, and damage.
	f.Add([]byte{0, 0x11, 1, 0x10, 4, 0x10, 0, 0x20, 1, 0x20, 2, 0x20, 4, 0x21, 2, 0x30, 5, 0x31})
	f.Add([]byte{0, 0x11, 1, 0x10, 4, 0x10, 0, 0x20, 1, 0x28, 5, 0x30})
	f.Add([]byte{0, 0x11, 1, 0x10, 4, 0x14, 3, 0x11, 6, 0, 7, 0})
	f.Add([]byte{2, 0x30, 2, 0x30, 5, 0x32, 0, 0x11})

	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 64 {
			data = data[:64]
		}
		b, err := ListenBackup(BackupConfig{Listen: "127.0.0.1:0", StateDir: t.TempDir(),
			Engine: engine.Config{Timeout: time.Hour}, CacheDir: "-", InstrumentCacheDir: filepath.Join(t.TempDir(), "i"),
			Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { b.Serve(ctx); close(done) }()
		defer func() { cancel(); <-done }()

		hello := &wire.Hello{Version: wire.Version, VM: "vm1", Term: 1, Module: hash, Name: "fake", Preopens: []string{"/data"}}
		c, err := transport.Dial(context.Background(), b.Addr().String(), nil, transport.Options{})
		if err != nil {
			t.Fatal(err)
		}
		wire.SendFlush(c, hello)
		// Answers are read and dropped, so that the backup's writes
		// never block on a full socket.
		go func() {
			for {
				if _, err := wire.Recv(c); err != nil {
					return
				}
			}
		}()
		var off uint64 // the offset of the next piece of the checkpoint being sent
		for i := 0; i+1 < len(data); i += 2 {
			op, arg := data[i]%8, data[i+1]
			seq := uint64(arg>>4) & 3 // 0-3
			raw := snaps[seq]
			var m wire.Message
			switch op {
			case 0:
				m, off = &wire.CheckpointBegin{Seq: seq, Full: arg&1 != 0}, 0
			case 1:
				// The checkpoint's snapshot whole, its first half, or
				// bytes of nothing.
				piece := raw
				switch arg & 0xc {
				case 4:
					piece = raw[:len(raw)/2]
				case 8:
					piece = []byte{arg, arg, arg}
				}
				m = &wire.CheckpointData{Seq: seq, Offset: off, Data: piece}
				off += uint64(len(piece))
			case 2:
				op := wire.FsOp{Op: uint8(wasi.FsCreate), Path: "f", Flags: uint32(wasi.OflagCreat)}
				switch arg & 3 {
				case 1:
					op = wire.FsOp{Op: uint8(wasi.FsWrite), Path: "f", Offset: -1, Data: []byte{arg}}
				case 2:
					op = wire.FsOp{Op: uint8(wasi.FsUnlink), Path: "g"}
				case 3:
					op = wire.FsOp{Op: uint8(wasi.FsWrite), Root: 3, Path: "../x", Data: []byte{arg}}
				}
				m = &wire.DiskOps{Seq: seq, Ops: []wire.FsOp{op}}
			case 3:
				m = &wire.DiskFile{Seq: seq, Path: "t", Kind: wire.FileRegular, Mode: 0o644, Data: []byte{arg}}
			case 4:
				end := &wire.CheckpointEnd{Seq: seq, SnapshotSize: off, SnapshotCRC: crc32.Checksum(raw, castagnoli),
					DiskOps: uint32(arg & 3), DiskFiles: uint32(arg>>2) & 1}
				if arg&8 != 0 {
					end.SnapshotCRC ^= 1
				}
				m = end
			case 5:
				m = &wire.Exit{Seq: seq, Code: uint32(arg & 1), DiskOps: uint32(arg & 3), After: seq - uint64(arg>>2&1)}
			case 6:
				m = &wire.Heartbeat{Seq: binary.LittleEndian.Uint64([]byte{arg, 0, 0, 0, 0, 0, 0, 0})}
			case 7:
				m = hello
			}
			if wire.SendFlush(c, m) != nil {
				break // the backup hung up: that is allowed
			}
		}
		c.Close()

		// The slot still answers a primary: accepted (a new session),
		// or refused, within seconds, not left hanging.
		c2, err := transport.Dial(context.Background(), b.Addr().String(), nil, transport.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		h2 := *hello
		h2.Term = 2
		if err := wire.SendFlush(c2, &h2); err != nil {
			t.Fatal(err)
		}
		c2.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			m, err := wire.Recv(c2)
			if err != nil {
				t.Fatalf("a new primary after the stream got no answer: %v", err)
			}
			if m.Type() == wire.TypeWelcome || m.Type() == wire.TypeReject {
				break
			}
		}
		// What is committed is a checkpoint of the chain (there are two).
		for _, st := range b.Status().Slots {
			if st.Committed > 2 {
				t.Fatalf("committed checkpoint %d, which was never sent whole", st.Committed)
			}
		}
	})
}
