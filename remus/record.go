package remus

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// CheckpointRecord is one checkpoint as the primary took it: what an
// operator (or a benchmark) needs to see the pause distribution against
// the pages each pause carried, every checkpoint and not a sample of them.
type CheckpointRecord struct {
	Seq        uint64    `json:"seq"`
	Session    uint64    `json:"session"`
	Full       bool      `json:"full,omitempty"`
	At         time.Time `json:"at"` // the end of its pause
	PauseUS    float64   `json:"pause_us"`
	DirtyPages int       `json:"dirty_pages"`
	// CommitUS is from the end of the pause to the backup's
	// acknowledgement: how long the epoch's output waited beyond the
	// pause (0: not acknowledged, yet or ever, if its session ended).
	CommitUS float64 `json:"commit_us,omitempty"`
}

// recentCheckpoints is how many CheckpointRecords a primary keeps: at the
// output policy's highest rates (about 1,000 a second) a second of them,
// for a reader polling at least that often.
const recentCheckpoints = 1024

// checkpointLog keeps the last recentCheckpoints records, and the
// histograms Prometheus scrapes. Callers hold the primary's mu.
type checkpointLog struct {
	ring   [recentCheckpoints]CheckpointRecord
	n      uint64 // records ever added
	pause  prometheus.Histogram
	pages  prometheus.Histogram
	commit prometheus.Histogram
}

func newCheckpointLog() *checkpointLog {
	return &checkpointLog{
		pause: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "ftvm", Subsystem: "remus",
			Name: "checkpoint_pause_seconds", Help: "How long each checkpoint stopped the guest.",
			// 25 µs to ~100 ms.
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 13)}),
		pages: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "ftvm", Subsystem: "remus",
			Name: "checkpoint_dirty_pages", Help: "Pages (4 KiB) each checkpoint carried.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 10)}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "ftvm", Subsystem: "remus",
			Name: "checkpoint_commit_seconds", Help: "From the end of each checkpoint's pause to the backup's " +
				"acknowledgement: how long the epoch's output waited beyond the pause.",
			// 50 µs to ~200 ms.
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 13)}),
	}
}

// acked records the backup's acknowledgement, at now, of every checkpoint
// up to seq of session (acks are cumulative).
func (l *checkpointLog) acked(session, seq uint64, now time.Time) {
	first := l.n - min(l.n, recentCheckpoints)
	for i := l.n; i > first; i-- {
		r := &l.ring[(i-1)%recentCheckpoints]
		if r.Session != session || r.Seq > seq {
			continue
		}
		if r.CommitUS != 0 {
			return // and so are those before it
		}
		r.CommitUS = max(float64(now.Sub(r.At).Nanoseconds())/1000, 0.001)
		l.commit.Observe(r.CommitUS / 1e6)
	}
}

func (l *checkpointLog) add(r CheckpointRecord) {
	l.ring[l.n%recentCheckpoints] = r
	l.n++
	l.pause.Observe(r.PauseUS / 1e6)
	l.pages.Observe(float64(r.DirtyPages))
}

// since returns the records kept with a sequence number above seq, oldest
// first, and how many checkpoints after seq are no longer kept (the reader
// polled too seldom).
func (l *checkpointLog) since(seq uint64) (recs []CheckpointRecord, missed uint64) {
	first := l.n - min(l.n, recentCheckpoints)
	if first > 0 {
		if old := l.ring[first%recentCheckpoints]; old.Seq > seq+1 {
			missed = old.Seq - seq - 1
		}
	}
	for i := first; i < l.n; i++ {
		if r := l.ring[i%recentCheckpoints]; r.Seq > seq {
			recs = append(recs, r)
		}
	}
	return recs, missed
}

// CheckpointsList is GET /checkpoints's answer.
type CheckpointsList struct {
	Checkpoints []CheckpointRecord `json:"checkpoints"`
	// Missed counts checkpoints after since that are no longer kept.
	Missed uint64 `json:"missed"`
}

// CheckpointsHandler serves GET /checkpoints?since=SEQ: every checkpoint
// taken after SEQ (0 if absent) that the primary still keeps.
func (p *Primary) CheckpointsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var since uint64
		if v := r.URL.Query().Get("since"); v != "" {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				http.Error(w, "since: want a checkpoint number, got "+strconv.Quote(v), http.StatusBadRequest)
				return
			}
			since = n
		}
		recs, missed := p.CheckpointsSince(since)
		if recs == nil {
			recs = []CheckpointRecord{}
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(CheckpointsList{Checkpoints: recs, Missed: missed})
	})
}
