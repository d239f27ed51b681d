package store

import (
	"bytes"
	"testing"
)

// FuzzDecodeJournal feeds arbitrary bytes to every decoder of the slot's
// own files (COMMIT, APPLIED, the ops records, disk/TREE): none may panic,
// and whatever one accepts must encode back to the same bytes (the
// formats are canonical, so a file either is what was written or is
// refused).
func FuzzDecodeJournal(f *testing.F) {
	seeds := [][]byte{
		(&commitRec{Roots: 1, Gen: 2, BaseSeq: 3, Seq: 4, TreeSeq: 3}).encode(),
		(&commitRec{Roots: 1, Gen: 2, BaseSeq: 3, Seq: 4, TreeSeq: 3, ExitSeq: 5, ExitCode: 1}).encode(),
		(&appliedRec{Seq: 4}).encode(),
		(&opsRec{Seq: 4, Gen: 2, Ops: []FsOp{{Op: 1, Path: "a", Data: []byte("x")}, {Op: 9, Path: "a", Root2: 0, Path2: "b"}}}).encode(),
		(&treeRec{}).encode(),
	}
	for _, s := range seeds {
		f.Add(uint8(0), s)
		f.Add(uint8(1), s)
		f.Add(uint8(2), s)
		f.Add(uint8(3), s)
	}
	f.Fuzz(func(t *testing.T, which uint8, b []byte) {
		switch which % 4 {
		case 0:
			if c, err := decodeCommit("COMMIT", b); err == nil && !bytes.Equal(c.encode(), b) {
				t.Fatalf("COMMIT re-encodes differently")
			}
		case 1:
			if a, err := decodeApplied("APPLIED", b); err == nil && !bytes.Equal(a.encode(), b) {
				t.Fatalf("APPLIED re-encodes differently")
			}
		case 2:
			if o, err := decodeOps("rec.ops", b); err == nil && !bytes.Equal(o.encode(), b) {
				t.Fatalf("ops record re-encodes differently")
			}
		case 3:
			if tr, err := decodeTree("TREE", b); err == nil && !bytes.Equal(tr.encode(), b) {
				t.Fatalf("TREE re-encodes differently")
			}
		}
	})
}
