package remus

import (
	"testing"
	"time"

	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
)

// TestStagingChunksComeBackBeforeRefill: a pause that leaves free staging
// chunks does not top the pool up; the chunks its checkpoint took come
// back once it is sent, and the pool holds its two again without a chunk
// allocated for them. A pause that leaves it dry tops it up at once, while
// its chunks are still out.
func TestStagingChunksComeBackBeforeRefill(t *testing.T) {
	p, s, far := primaryOverTCP(t)
	p.stage.Refill()
	if p.stage.Made() != 2 || p.stage.Short() {
		t.Fatalf("the pool made %d chunks and is short %v, want its two", p.stage.Made(), p.stage.Short())
	}
	mem := make([]byte, 1<<20)
	staged := func(seq uint64) *checkpoint {
		st := p.getStager()
		pages, err := st.Stage(mem, []uint32{1, 2, 3})
		if err != nil {
			t.Fatal(err)
		}
		snap := &snapshot.Snapshot{Kind: snapshot.Incremental, Seq: seq, MemorySize: uint64(len(mem)), Pages: pages,
			Devices: []byte("{}")}
		return &checkpoint{seq: seq, snap: snap, stager: st, dirty: len(pages)}
	}
	sent := func(seq uint64) {
		for {
			m, err := wire.Recv(far)
			if err != nil {
				t.Fatal(err)
			}
			if e, ok := m.(*wire.CheckpointEnd); ok && e.Seq == seq {
				return
			}
		}
	}
	settled := func(made int, what string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); p.stage.Short() || p.refilling.Load(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the pool stayed short", what)
			}
		}
		if got := p.stage.Made(); got != made {
			t.Fatalf("%s: the pool made %d chunks, want %d", what, got, made)
		}
	}

	// One checkpoint: a chunk out, one left.
	cp := staged(1)
	p.refillIfDry()
	s.queue <- cp
	sent(1)
	settled(2, "a checkpoint sent with a chunk left free")

	// Two at once: the second pause leaves the pool dry.
	cp1, cp2 := staged(2), staged(3)
	if !p.stage.Dry() {
		t.Fatal("two stagings left the pool a chunk")
	}
	p.refillIfDry()
	settled(4, "a pause that left the pool dry")
	s.queue <- cp1
	s.queue <- cp2
	sent(3)
	settled(4, "two checkpoints sent after a top-up")
}
