package remus

import (
	"encoding/json"
	"math"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// CheckpointRecord is one checkpoint as the primary took it: what an
// operator (or a benchmark) needs to see the pause distribution against
// the pages each pause carried, every checkpoint and not a sample of them.
type CheckpointRecord struct {
	Seq     uint64 `json:"seq"`
	Session uint64 `json:"session"`
	Full    bool   `json:"full,omitempty"`
	// At is when the capture was handed to the sender: as the pause
	// ends (under back-pressure, before the pause waits for acks).
	At time.Time `json:"at"`
	// PauseUS is how long the guest was stopped: from the safe point to
	// its running on (unwind, capture, rewind, hand-off, and a
	// back-pressure stall); the capture's alone until the guest resumed.
	PauseUS    float64 `json:"pause_us"`
	DirtyPages int     `json:"dirty_pages"`
	// AheadPages of the DirtyPages were copied before the pause, while
	// the guest ran (a checkpoint after one of many pages).
	AheadPages int `json:"ahead_pages,omitempty"`
	// CommitUS is from At to the backup's acknowledgement's arrival: how
	// long the epoch's output waited beyond the pause (0: not
	// acknowledged, yet or ever, if its session ended).
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
	l.pages.Observe(float64(r.DirtyPages))
}

// paused sets the pause of checkpoint seq, the last added, to the whole
// pause (add had the capture's time): observed then, once.
func (l *checkpointLog) paused(seq uint64, us float64) {
	if l.n == 0 {
		return
	}
	r := &l.ring[(l.n-1)%recentCheckpoints]
	if r.Seq != seq {
		return
	}
	r.PauseUS = us
	l.pause.Observe(us / 1e6)
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
	i := first
	for i < l.n && l.ring[i%recentCheckpoints].Seq <= seq {
		i++
	}
	if i < l.n {
		recs = make([]CheckpointRecord, 0, l.n-i)
	}
	for ; i < l.n; i++ {
		recs = append(recs, l.ring[i%recentCheckpoints])
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

// CheckpointSummary condenses checkpoint records: what `ftvm status` shows
// of the recent ones.
type CheckpointSummary struct {
	Count                int
	PauseP50, PauseP99   time.Duration
	Pages50              int
	Acked                int // records with a commit time
	CommitP50, CommitP99 time.Duration
}

// Summarize computes a CheckpointSummary of recs (nearest-rank
// percentiles; commit times over the acknowledged records only).
func Summarize(recs []CheckpointRecord) CheckpointSummary {
	s := CheckpointSummary{Count: len(recs)}
	if len(recs) == 0 {
		return s
	}
	pause := make([]float64, 0, len(recs))
	pages := make([]int, 0, len(recs))
	var commit []float64
	for _, r := range recs {
		pause = append(pause, r.PauseUS)
		pages = append(pages, r.DirtyPages)
		if r.CommitUS > 0 {
			commit = append(commit, r.CommitUS)
		}
	}
	slices.Sort(pause)
	slices.Sort(pages)
	slices.Sort(commit)
	us := func(v float64) time.Duration { return time.Duration(v * float64(time.Microsecond)) }
	s.PauseP50, s.PauseP99 = us(rank(pause, 0.5)), us(rank(pause, 0.99))
	s.Pages50 = pages[(len(pages)+1)/2-1]
	s.Acked = len(commit)
	if len(commit) > 0 {
		s.CommitP50, s.CommitP99 = us(rank(commit, 0.5)), us(rank(commit, 0.99))
	}
	return s
}

// rank is the q-quantile of sorted (not empty) by the nearest-rank method.
func rank(sorted []float64, q float64) float64 {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}
