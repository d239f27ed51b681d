package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/ftvm/ftvm/api"
	"github.com/ftvm/ftvm/snapshot"
)

func newSnapshotCmd() *cobra.Command {
	var sock, out string
	var stop, incremental, mappable, asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshot --api-sock PATH --out FILE [--stop] [--incremental] [--mappable]",
		Short: "Capture a running VM at its next safe point into a snapshot file",
		Long: `Capture a running VM (started with ftvm run --api-sock PATH) at its next safe
point: linear memory, globals, the wasm call stack and device state. With
--incremental only the pages dirtied since the VM's previous snapshot are
written (restore takes the chain). With --stop the VM ends at that safe point,
once the file is safely on disk. With --mappable a full snapshot's memory is
stored uncompressed and page-aligned (zero pages as holes), so that restore
maps it copy-on-write instead of reading it: a restore in milliseconds, for
the disk space of the memory's non-zero pages.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if sock == "" || out == "" {
				return usage("--api-sock and --out are required")
			}

			abs, err := filepath.Abs(out)
			if err != nil {
				return usage("--out: %v", err)
			}
			req := api.SnapshotRequest{Path: abs, Stop: stop, Incremental: incremental, Mappable: mappable}
			if err := req.Check(); err != nil {
				return usage("--mappable, --incremental: %v (take a full snapshot with --mappable)", err)
			}
			resp, err := api.NewClient(sock).Snapshot(cmd.Context(), req)
			if err != nil {
				return &exitError{code: 1, err: err}
			}
			if asJSON {
				return printJSON(resp)
			}
			s := resp.Summary
			fmt.Printf("%s: %s snapshot %s (seq %d), %d pages, %s on disk, %.1f ms\n", out, s.Kind, s.ID[:12],
				s.Seq, s.Pages, humanBytes(s.FileBytes), resp.Millis)
			return nil
		},
	}
	cmd.Flags().StringVar(&sock, "api-sock", "", "the VM's API socket")
	cmd.Flags().StringVar(&out, "out", "", "snapshot file to write")
	cmd.Flags().BoolVar(&stop, "stop", false, "end the VM at the snapshot's safe point")
	cmd.Flags().BoolVar(&incremental, "incremental", false, "write only the pages dirtied since the previous snapshot")
	cmd.Flags().BoolVar(&mappable, "mappable", false, "store memory uncompressed and page-aligned, for restores that map it")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func newInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect FILE",
		Short: "Print what a snapshot holds",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := snapshot.ReadFile(args[0], nil)
			if err != nil {
				return &exitError{code: 1, err: err}
			}
			sum := snapshot.Describe(s)
			if asJSON {
				return printJSON(sum)
			}
			fmt.Print(sum.String())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
