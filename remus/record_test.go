package remus

import (
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// TestCheckpointLogSince: a reader gets every record after the one it
// names, oldest first, and is told how many it polled too late for.
func TestCheckpointLogSince(t *testing.T) {
	l := newCheckpointLog()
	if recs, missed := l.since(0); len(recs) != 0 || missed != 0 {
		t.Fatalf("empty log: %v, missed %d", recs, missed)
	}
	for seq := uint64(1); seq <= 10; seq++ {
		l.add(CheckpointRecord{Seq: seq, PauseUS: float64(seq), DirtyPages: int(seq)})
	}
	recs, missed := l.since(7)
	if missed != 0 || len(recs) != 3 || recs[0].Seq != 8 || recs[2].Seq != 10 {
		t.Fatalf("since 7 of 10: %v, missed %d", recs, missed)
	}
	if recs, _ := l.since(10); len(recs) != 0 {
		t.Fatalf("since the last: %v", recs)
	}
	// Past the ring's size: the oldest are gone, and said to be.
	for seq := uint64(11); seq <= recentCheckpoints+100; seq++ {
		l.add(CheckpointRecord{Seq: seq})
	}
	recs, missed = l.since(50)
	if missed != 50 || len(recs) != recentCheckpoints || recs[0].Seq != 101 || recs[len(recs)-1].Seq != recentCheckpoints+100 {
		t.Fatalf("since 50 after wrapping: %d records from %d, missed %d", len(recs), recs[0].Seq, missed)
	}
	for i := 1; i < len(recs); i++ {
		if recs[i].Seq != recs[i-1].Seq+1 {
			t.Fatalf("records out of order at %d: %d after %d", i, recs[i].Seq, recs[i-1].Seq)
		}
	}
	if recs, missed := l.since(200); missed != 0 || recs[0].Seq != 201 {
		t.Fatalf("since 200, still kept: first %d, missed %d", recs[0].Seq, missed)
	}
}

// TestCheckpointLogAcked: an ack stamps the commit latency on every
// checkpoint of its session up to its number, and on none of a session
// that ended unacknowledged.
func TestCheckpointLogAcked(t *testing.T) {
	l := newCheckpointLog()
	t0 := time.Now()
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	for seq := uint64(1); seq <= 7; seq++ {
		l.add(CheckpointRecord{Seq: seq, Session: 1, At: at(int(seq))})
	}
	l.acked(1, 3, at(10))
	l.acked(1, 5, at(20))
	l.add(CheckpointRecord{Seq: 8, Session: 2, Full: true, At: at(30)}) // 6 and 7 are lost with session 1
	l.acked(2, 8, at(32))
	recs, _ := l.since(0)
	want := map[uint64]float64{1: 9000, 2: 8000, 3: 7000, 4: 16000, 5: 15000, 6: 0, 7: 0, 8: 2000}
	for _, r := range recs {
		if r.CommitUS != want[r.Seq] {
			t.Errorf("checkpoint %d (session %d): commit %v µs, want %v", r.Seq, r.Session, r.CommitUS, want[r.Seq])
		}
	}
	var m dto.Metric
	l.commit.Write(&m)
	if got := m.GetHistogram().GetSampleCount(); got != 6 {
		t.Errorf("commit histogram counts %d, want 6", got)
	}
}

// TestCheckpointLogPaused: the whole pause, learnt once the guest runs on,
// replaces the capture's time in the last record, and is observed once.
func TestCheckpointLogPaused(t *testing.T) {
	l := newCheckpointLog()
	l.add(CheckpointRecord{Seq: 1, PauseUS: 10})
	l.paused(1, 50)
	l.add(CheckpointRecord{Seq: 2, PauseUS: 20})
	l.paused(1, 70) // not the last one: ignored
	recs, _ := l.since(0)
	if recs[0].PauseUS != 50 || recs[1].PauseUS != 20 {
		t.Fatalf("pauses %v and %v, want 50 and 20", recs[0].PauseUS, recs[1].PauseUS)
	}
	var m dto.Metric
	l.pause.Write(&m)
	if got := m.GetHistogram().GetSampleCount(); got != 1 {
		t.Errorf("pause histogram counts %d, want 1", got)
	}
}

// TestSummarize: nearest-rank percentiles of pause and pages over every
// record, of commit over the acknowledged ones only.
func TestSummarize(t *testing.T) {
	if s := Summarize(nil); s.Count != 0 || s.Acked != 0 {
		t.Fatalf("no records: %+v", s)
	}
	var recs []CheckpointRecord
	for i := 1; i <= 200; i++ {
		r := CheckpointRecord{Seq: uint64(i), PauseUS: float64(i), DirtyPages: i % 10}
		if i%2 == 0 {
			r.CommitUS = float64(1000 * i)
		}
		recs = append(recs, r)
	}
	s := Summarize(recs)
	want := CheckpointSummary{Count: 200, PauseP50: 100 * time.Microsecond, PauseP99: 198 * time.Microsecond,
		Pages50: 4, Acked: 100, CommitP50: 100 * time.Millisecond, CommitP99: 198 * time.Millisecond}
	if s != want {
		t.Fatalf("Summarize: %+v, want %+v", s, want)
	}
}
