package remus

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MetricsHandler serves a primary's replication figures in the Prometheus
// text format (GET /metrics on its API socket). The figures are read from
// Status at scrape time, so nothing on the checkpoint path pays for them.
func (p *Primary) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	g := func(name, help string, f func(PrimaryStatus) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "ftvm", Subsystem: "remus",
			Name: name, Help: help}, func() float64 { return f(p.Status()) }))
	}
	c := func(name, help string, f func(PrimaryStatus) float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "ftvm", Subsystem: "remus",
			Name: name, Help: help}, func() float64 { return f(p.Status()) }))
	}
	g("protected", "1 while a backup acknowledges checkpoints, 0 while the VM runs unprotected.",
		func(s PrimaryStatus) float64 { return b2f(s.BackupHealthy) })
	g("epoch", "The running epoch.", func(s PrimaryStatus) float64 { return float64(s.Epoch) })
	g("acked_epoch", "The last checkpoint the backup acknowledged.", func(s PrimaryStatus) float64 { return float64(s.Acked) })
	g("lag_epochs", "Checkpoints taken but not yet acknowledged.", func(s PrimaryStatus) float64 { return float64(s.Lag) })
	g("last_pause_seconds", "How long the last checkpoint stopped the guest.",
		func(s PrimaryStatus) float64 { return s.LastPauseUS / 1e6 })
	g("last_dirty_pages", "Pages in the last checkpoint.", func(s PrimaryStatus) float64 { return float64(s.LastDirtyPages) })
	g("held_output_bytes", "Output held for acknowledgement now.", func(s PrimaryStatus) float64 { return float64(s.HeldBytes) })
	reg.MustRegister(p.recent.pause, p.recent.pages, p.recent.commit)
	c("checkpoints_total", "Checkpoints taken.", func(s PrimaryStatus) float64 { return float64(s.Checkpoints) })
	c("full_checkpoints_total", "Full checkpoints taken (one per backup session).",
		func(s PrimaryStatus) float64 { return float64(s.FullCheckpoints) })
	c("replicated_bytes_total", "Bytes sent to backups.", func(s PrimaryStatus) float64 { return float64(s.BytesSent) })
	c("delta_pages_total", "Pages sent as deltas against the backup's copies.",
		func(s PrimaryStatus) float64 { return float64(s.DeltaPages) })
	c("released_output_bytes_total", "Output released after acknowledgement.",
		func(s PrimaryStatus) float64 { return float64(s.ReleasedBytes) })
	c("stalls_total", "Times the guest was stopped because held output exceeded the limit.",
		func(s PrimaryStatus) float64 { return float64(s.Stalls) })
	c("gave_up_backup_total", "Times the primary gave up a backup that accepted sessions and acknowledged none (it let the VM go first).",
		func(s PrimaryStatus) float64 { return float64(s.GaveUp) })
	c("stood_still_total", "Times the primary's process stood still for most of the timeout (its backup may have failed over meanwhile).",
		func(s PrimaryStatus) float64 { return float64(s.StoodStill) })
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

// MetricsHandler serves a backup's figures, one series per slot.
func (b *Backup) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(backupCollector{b})
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

type backupCollector struct{ b *Backup }

var (
	descCommitted      = prometheus.NewDesc("ftvm_remus_backup_committed_epoch", "Last committed checkpoint.", []string{"vm"}, nil)
	descPersisted      = prometheus.NewDesc("ftvm_remus_backup_persisted_epoch", "Last checkpoint on disk.", []string{"vm"}, nil)
	descReceived       = prometheus.NewDesc("ftvm_remus_backup_received_bytes_total", "Checkpoint bytes received.", []string{"vm"}, nil)
	descFollowing      = prometheus.NewDesc("ftvm_remus_backup_following", "1 while a primary streams to the slot.", []string{"vm"}, nil)
	descFailedOver     = prometheus.NewDesc("ftvm_remus_backup_failed_over", "1 once the slot's VM runs here.", []string{"vm"}, nil)
	descFailoverFailed = prometheus.NewDesc("ftvm_remus_backup_failover_failed",
		"1 once a failover of the slot could not resume its VM (status failover_error says why).", []string{"vm"}, nil)
	descStoodStill = prometheus.NewDesc("ftvm_remus_backup_stood_still_total",
		"Times the slot's loop stood still for most of the timeout while it protected (no failover for that silence).", []string{"vm"}, nil)
	descDiskBehind = prometheus.NewDesc("ftvm_remus_backup_disk_behind",
		"1 while storing the slot's checkpoints fails: it acknowledges nothing and would not fail over (status disk_error says why).", []string{"vm"}, nil)
)

func (backupCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCommitted, descPersisted, descReceived, descFollowing, descFailedOver, descFailoverFailed, descStoodStill, descDiskBehind} {
		ch <- d
	}
}

func (c backupCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.b.Status().Slots {
		ch <- prometheus.MustNewConstMetric(descCommitted, prometheus.GaugeValue, float64(s.Committed), s.VM)
		ch <- prometheus.MustNewConstMetric(descPersisted, prometheus.GaugeValue, float64(s.Persisted), s.VM)
		ch <- prometheus.MustNewConstMetric(descReceived, prometheus.CounterValue, float64(s.BytesReceived), s.VM)
		ch <- prometheus.MustNewConstMetric(descFollowing, prometheus.GaugeValue, b2f(s.State == "following"), s.VM)
		ch <- prometheus.MustNewConstMetric(descFailedOver, prometheus.GaugeValue, b2f(s.FailoverMS > 0), s.VM)
		ch <- prometheus.MustNewConstMetric(descFailoverFailed, prometheus.GaugeValue, b2f(s.FailoverError != ""), s.VM)
		ch <- prometheus.MustNewConstMetric(descStoodStill, prometheus.CounterValue, float64(s.StoodStill), s.VM)
		ch <- prometheus.MustNewConstMetric(descDiskBehind, prometheus.GaugeValue, b2f(s.DiskBehind), s.VM)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
