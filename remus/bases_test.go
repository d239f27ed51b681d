package remus

import (
	"bytes"
	"testing"

	"github.com/ftvm/ftvm/snapshot"
)

// TestPageBases: a page sent before goes next time as a delta against the
// copy last sent (not against the data of the checkpoint being encoded, nor
// an older copy); pages unsent for baseAge checkpoints are forgotten; a full
// checkpoint forgets them all; and a large checkpoint (a heap's growth)
// adds no copies.
func TestPageBases(t *testing.T) {
	page := func(v byte) []byte { return bytes.Repeat([]byte{v}, snapshot.PageSize) }
	pages := func(v byte, idx ...uint32) []snapshot.Page {
		var ps []snapshot.Page
		for _, i := range idx {
			ps = append(ps, snapshot.Page{Index: i, Data: page(v)})
		}
		return ps
	}
	var b pageBases
	first := pages(1, 3, 5)
	if n := b.attach(first); n != 0 {
		t.Fatalf("%d deltas before anything was sent", n)
	}
	b.keep(1, first)
	first[0].Data[0] = 99 // the staging copy is reused once sent
	second := pages(2, 3, 4)
	if n := b.attach(second); n != 1 || !bytes.Equal(second[0].Base, page(1)) || second[1].Base != nil {
		t.Fatalf("second checkpoint: %d deltas, bases %v/%v", n, second[0].Base != nil, second[1].Base != nil)
	}
	b.keep(2, second)
	if second[0].Base != nil {
		t.Error("a page keeps its base after the encoding")
	}
	third := pages(3, 3, 4, 5)
	if n := b.attach(third); n != 3 || !bytes.Equal(third[0].Base, page(2)) || !bytes.Equal(third[2].Base, page(1)) {
		t.Fatalf("third checkpoint: %d deltas", n)
	}
	b.keep(3, third)
	// Page 5 is not sent again for long: its copy is dropped.
	for seq := uint64(4); seq < 4+2*baseAge; seq++ {
		b.keep(seq, pages(byte(seq), 3))
	}
	if _, ok := b.pages[5]; ok {
		t.Error("a page unsent for long is still kept")
	}
	if _, ok := b.pages[3]; !ok {
		t.Error("a page sent every checkpoint was dropped")
	}
	// A full checkpoint makes the backup's memory anew: no copy is its.
	b.reset()
	if n := b.attach(pages(9, 3, 4)); n != 0 {
		t.Errorf("%d deltas right after a full checkpoint", n)
	}
	b.keep(200, pages(9, 3))
	// A growth: no copies added.
	var growth []snapshot.Page
	for i := uint32(100); i < 100+maxNewBases+1; i++ {
		growth = append(growth, snapshot.Page{Index: i, Data: page(7)})
	}
	before := len(b.pages)
	b.keep(100, growth)
	if len(b.pages) != before {
		t.Errorf("a checkpoint of %d pages added %d copies", len(growth), len(b.pages)-before)
	}
}
