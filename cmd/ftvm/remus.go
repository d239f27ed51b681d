package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/remus"
	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/transport"
)

// replFlags are the replication flags `run --protect` and `backup` share:
// both sides must agree on the timeout.
type replFlags struct {
	epoch      time.Duration
	policy     string
	minEpoch   time.Duration
	timeout    time.Duration
	heartbeat  time.Duration
	maxFlight  int
	tlsCert    string
	tlsKey     string
	tlsCA      string
	serverName string
	holdLimit  string
	raw        bool
}

func (f *replFlags) register(fs *pflag.FlagSet, primary bool) {
	if primary {
		fs.DurationVar(&f.epoch, "epoch", 25*time.Millisecond, "longest epoch between checkpoints")
		fs.StringVar(&f.policy, "epoch-policy", "output", "when an epoch ends: output (early, once output is waiting and the epoch is at least --min-epoch old) or fixed")
		fs.DurationVar(&f.minEpoch, "min-epoch", 2*time.Millisecond, "with --epoch-policy output: while the guest keeps running, the rate limit on checkpoints for waiting output (one per --min-epoch on average, bursts of 4); a guest that goes idle with output waiting is checkpointed at once")
		fs.IntVar(&f.maxFlight, "max-inflight", 4, "checkpoints streamed but not yet acknowledged before epochs stretch (back-pressure)")
		fs.StringVar(&f.serverName, "tls-server-name", "", "the backup's name in its certificate (default: the host of --protect)")
		fs.StringVar(&f.holdLimit, "hold-limit", "64MiB", "output held for acknowledgement beyond which the guest is stopped until acks release it (back-pressure)")
		fs.BoolVar(&f.raw, "uncompressed", false, "send checkpoint pages uncompressed and whole, not as deltas (fast links; measuring compression)")
	}
	fs.DurationVar(&f.timeout, "timeout", 500*time.Millisecond, "silence after which the peer is declared failed (each side its own: both send heartbeats at a fifth of the shorter timeout)")
	fs.DurationVar(&f.heartbeat, "heartbeat", 0, "heartbeat interval (default --timeout/5)")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "mutual TLS: this side's certificate (PEM)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "mutual TLS: this side's key (PEM)")
	fs.StringVar(&f.tlsCA, "tls-ca", "", "mutual TLS: the CA that signs both sides (PEM)")
}

func (f *replFlags) engine() (engine.Config, error) {
	cfg := engine.Config{Epoch: f.epoch, MinEpoch: f.minEpoch, Timeout: f.timeout, HeartbeatInterval: f.heartbeat,
		MaxInflight: f.maxFlight}
	switch f.policy {
	case "", "output":
		cfg.Policy = engine.PolicyOutput
	case "fixed":
		cfg.Policy = engine.PolicyFixed
	default:
		return cfg, usage("--epoch-policy %q: want output or fixed", f.policy)
	}
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return cfg, usage("%v", err)
	}
	return cfg, nil
}

// tls builds the TLS configuration, nil without --tls-cert.
func (f *replFlags) tls(server bool, addr string) (*tls.Config, error) {
	if f.tlsCert == "" && f.tlsKey == "" && f.tlsCA == "" {
		return nil, nil
	}
	if f.tlsCert == "" || f.tlsKey == "" || f.tlsCA == "" {
		return nil, usage("mutual TLS needs --tls-cert, --tls-key and --tls-ca")
	}
	files := transport.TLSFiles{Cert: f.tlsCert, Key: f.tlsKey, CA: f.tlsCA}
	if server {
		return files.ServerConfig()
	}
	name := f.serverName
	if name == "" {
		if h, _, err := splitHostPort(addr); err == nil {
			name = h
		}
	}
	return files.ClientConfig(name)
}

// runProtected runs m as a Remus primary: the replication driver beside
// the guest, its status on the API socket.
func runProtected(ctx context.Context, p *remus.Primary, m *machine.Machine, module []byte, name string,
	f runFlags, sig *caught, limit uint64) error {
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := p.Run(dctx, m, module, name); err != nil {
			slog.Error("replication driver", "err", err)
		}
	}()
	defer func() {
		cancel()
		<-done
	}()
	f.beforeRun = func() { p.WaitSession(ctx) }
	f.afterRun = func(code uint32, err error) {
		// A guest that ended by itself (not a signal to ftvm) must not be
		// resumed by the backup, and its last output must still leave.
		if err == nil || !errors.Is(err, context.Canceled) {
			p.Finish(code)
		}
	}
	f.routes = append(f.routes, api.Route{Pattern: "GET /status", Handler: api.JSON(func() any { return p.Status() })},
		api.Route{Pattern: "GET /metrics", Handler: p.MetricsHandler()},
		api.Route{Pattern: "GET /checkpoints", Handler: p.CheckpointsHandler()})
	// A fenced primary stops its guest: the backup runs the VM now.
	vctx, stopVM := context.WithCancel(ctx)
	defer stopVM()
	go func() {
		select {
		case <-p.Fenced():
			stopVM()
			// A guest computing without host calls does not see it.
			select {
			case <-time.After(stopGrace):
				slog.Error("the fenced guest did not reach a host call; exiting", "grace", stopGrace)
				os.Exit(exitFenced)
			case <-done:
			}
		case <-done:
		case <-vctx.Done():
		}
	}()
	err := serveAndRun(vctx, m, f, sig, limit)
	select {
	case <-p.Fenced():
		return fencedError(p)
	default:
	}
	return err
}

// fencedError is how a fenced primary ends: exit 69, saying why.
func fencedError(p *remus.Primary) error {
	why := "the backup failed this VM over (this primary stood still, or was cut off from it, for longer than --timeout) and runs it now"
	if strings.Contains(p.Status().Reason, "another run") {
		why = "the backup holds this VM's checkpoint from an earlier run of it that did not exit, and resumes that unless " +
			"the earlier run comes back; this new run would have started over it"
	}
	return &exitError{code: exitFenced, err: fmt.Errorf("fenced: %s; this copy was stopped", why)}
}

func newBackupCmd() *cobra.Command {
	var rf replFlags
	var listen, state, apiSock, cacheDir string
	var rebind []string
	var maxSlots int
	cmd := &cobra.Command{
		Use:   "backup --listen ADDR --state DIR",
		Short: "Run a passive Remus backup for protected primaries",
		Long: `Run a passive backup. Primaries started with 'ftvm run --protect ADDR' stream
checkpoints to it; it keeps the last committed checkpoint of each (memory image,
device state, a replica of its directories, on disk under --state) and never
runs a guest until its primary falls silent for --timeout. Then it resumes
that VM from its last committed checkpoint here, bound to the guest's listen
addresses (or --rebind FD=HOST:PORT), and runs it until ftvm is stopped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if listen == "" || state == "" {
				return usage("backup needs --listen and --state")
			}
			if maxSlots < 1 {
				return usage("--max-slots must be at least 1")
			}
			ecfg, err := rf.engine()
			if err != nil {
				return err
			}
			tcfg, err := rf.tls(true, listen)
			if err != nil {
				return &exitError{code: exitUsage, err: err}
			}
			rb, err := parseListen(rebind)
			if err != nil {
				return err
			}
			ctx, _ := withSignals(cmd.Context())
			var srv *api.Server
			var b *remus.Backup
			b, err = remus.ListenBackup(remus.BackupConfig{Listen: listen, StateDir: state, Engine: ecfg, TLS: tcfg,
				Rebind: rb, CacheDir: cacheDir, MaxSlots: maxSlots,
				OnFailover: func(vm string, m *machine.Machine) {
					slog.Warn("failed over", "vm", vm)
					if apiSock != "" && srv != nil {
						srv.SetVM(m)
					}
				}})
			if err != nil {
				return &exitError{code: exitUsage, err: err}
			}
			fmt.Fprintf(os.Stderr, "ftvm backup: listening for primaries on %s, state in %s\n", b.Addr(), state)
			if apiSock != "" {
				srv, err = api.Listen(apiSock, nil, api.Route{Pattern: "GET /status",
					Handler: api.JSON(func() any { return b.Status() })},
					api.Route{Pattern: "GET /metrics", Handler: b.MetricsHandler()})
				if err != nil {
					return &exitError{code: exitUsage, err: err}
				}
				defer srv.Close()
			}
			return b.Serve(ctx)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "", "replication address to listen on (HOST:PORT)")
	cmd.Flags().StringVar(&state, "state", "", "directory for the protected VMs' committed checkpoints and disk replicas")
	cmd.Flags().StringVar(&apiSock, "api-sock", "", "serve status (GET /status) and, after a failover, the VM's API on this unix socket")
	cmd.Flags().StringVar(&cacheDir, "cache-dir", "", "compiled-code cache")
	cmd.Flags().StringArrayVar(&rebind, "rebind", nil, "on failover, bind guest listener FD to this address instead of the primary's (FD=HOST:PORT)")
	cmd.Flags().IntVar(&maxSlots, "max-slots", remus.DefaultMaxSlots, "most VMs this backup protects at once; a primary of another VM is refused")
	rf.register(cmd.Flags(), false)
	return cmd
}

func newStatusCmd() *cobra.Command {
	var apiSock string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status --api-sock PATH",
		Short: "Show a protected primary's or a backup's replication status",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if apiSock == "" {
				return usage("status needs --api-sock")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			var st map[string]any
			if err := api.NewClient(apiSock).Get(ctx, "/status", &st); err != nil {
				return &exitError{code: 1, err: err}
			}
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(st)
			if st["role"] == "primary" {
				var list remus.CheckpointsList
				if err := api.NewClient(apiSock).Get(ctx, "/checkpoints", &list); err == nil {
					printRecent(remus.Summarize(list.Checkpoints))
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&apiSock, "api-sock", "", "the API socket of a primary (run --protect --api-sock) or a backup")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// num prints a JSON number as an integer when it is one (JSON numbers
// decode as float64, which %v prints as 6.9e+06).
func num(v any) string {
	if f, ok := v.(float64); ok && f == float64(int64(f)) {
		return fmt.Sprintf("%d", int64(f))
	}
	return fmt.Sprint(v)
}

func printStatus(st map[string]any) {
	if st["role"] == "backup" {
		fmt.Printf("role:    backup, listening on %v\n", st["listen"])
		slots, _ := st["slots"].([]any)
		if len(slots) == 0 {
			fmt.Println("slots:   none (no primary has connected)")
		}
		for _, s := range slots {
			m, _ := s.(map[string]any)
			fmt.Printf("vm %v: %v, term %s, session %s, committed %s (on disk %s), %s checkpoints, %s bytes received, primary heard %.1f ms ago",
				m["vm"], m["state"], num(m["term"]), num(m["session"]), num(m["committed"]), num(m["persisted"]),
				num(m["checkpoints"]), num(m["bytes_received"]), m["primary_last_heard_ms"])
			if fo, ok := m["failover_ms"].(float64); ok && fo > 0 {
				fmt.Printf(", FAILED OVER in %.1f ms", fo)
			}
			if n, ok := m["stood_still"].(float64); ok && n > 0 {
				fmt.Printf(", stood still %s times", num(n))
			}
			if r, ok := m["reason"].(string); ok && r != "" {
				fmt.Printf(" (%s)", r)
			}
			fmt.Println()
			if e, ok := m["program_error"].(string); ok && e != "" {
				fmt.Printf("  CANNOT FAIL OVER: preparing the module failed: %s\n", e)
			}
			if b, _ := m["disk_behind"].(bool); b {
				fmt.Printf("  CANNOT FAIL OVER, acknowledging nothing: storing a checkpoint failed (%v); waiting for a full checkpoint to store\n", m["disk_error"])
			}
			if e, ok := m["failover_error"].(string); ok && e != "" {
				fmt.Printf("  FAILOVER FAILED, the VM runs nowhere: %s\n", e)
				if c, ok := m["restore_command"].(string); ok && c != "" {
					fmt.Printf("  resume it by hand (add --listen FD=HOST:PORT to bind elsewhere):\n    %s\n", c)
				}
			}
		}
		return
	}
	fmt.Printf("role:        primary (vm %v, term %s)\n", st["vm"], num(st["term"]))
	fmt.Printf("state:       %v", st["state"])
	if r, ok := st["reason"].(string); ok && r != "" {
		fmt.Printf(" (%s)", r)
	}
	fmt.Println()
	fmt.Printf("backup:      %v, healthy %v, heard %.1f ms ago\n", st["backup"], st["backup_healthy"], st["backup_last_heard_ms"])
	if r, ok := st["backup_refused"].(string); ok && r != "" {
		fmt.Printf("refused:     %s\n", r)
	}
	fmt.Printf("epoch:       %s (acked %s, released %s, lag %s, in flight %s)\n", num(st["epoch"]), num(st["acked"]),
		num(st["released_epoch"]), num(st["lag_epochs"]), num(st["inflight"]))
	fmt.Printf("last pause:  %.0f µs, %s dirty pages, %s bytes\n", st["last_pause_us"], num(st["last_dirty_pages"]),
		num(st["last_checkpoint_bytes"]))
	fmt.Printf("replicated:  %s bytes in %s checkpoints (%s full), %s pages as deltas\n", num(st["bytes_replicated"]),
		num(st["checkpoints"]), num(st["full_checkpoints"]), num(st["delta_pages"]))
	fmt.Printf("output:      %s bytes held, %s released, %s stalls\n", num(st["held_output_bytes"]),
		num(st["released_output_bytes"]), num(st["stalls"]))
	fmt.Printf("disk:        %s bytes of file writes in this epoch's journal\n", num(st["journal_bytes"]))
	if n, ok := st["failed_checkpoints"].(float64); ok && n > 0 {
		fmt.Printf("failed:      %s checkpoints could not be captured (logged; each time the next was full)\n", num(n))
	}
	if n, ok := st["stood_still"].(float64); ok && n > 0 {
		fmt.Printf("stood still: %s times (the process stopped or starved for most of the timeout)\n", num(n))
	}
	if n, ok := st["gave_up_backup"].(float64); ok && n > 0 {
		fmt.Printf("gave up:     the backup %s times (it accepted sessions and acknowledged none; it let the VM go first)\n", num(n))
	}
}

// printRecent prints a primary's recent checkpoints in brief.
func printRecent(s remus.CheckpointSummary) {
	if s.Count == 0 {
		fmt.Println("recent:      no checkpoint yet")
		return
	}
	fmt.Printf("recent:      %d checkpoints: pause p50 %v, p99 %v; dirty pages p50 %d", s.Count,
		s.PauseP50.Round(time.Microsecond), s.PauseP99.Round(time.Microsecond), s.Pages50)
	if s.Acked > 0 {
		fmt.Printf("; commit p50 %v, p99 %v (pause end to the backup's ack)", s.CommitP50.Round(time.Microsecond),
			s.CommitP99.Round(time.Microsecond))
	}
	fmt.Println()
}
