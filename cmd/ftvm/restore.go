package main

import (
	"bytes"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/snapshot"
)

func newRestoreCmd() *cobra.Command {
	var f runFlags
	var modulePath string
	cmd := &cobra.Command{
		Use:   "restore [flags] SNAPSHOT [INCREMENTAL...]",
		Short: "Continue a VM from a snapshot (a full snapshot, then its incrementals in order)",
		Long: `Continue a VM from a snapshot chain: a full snapshot followed by its
incremental snapshots in order. The guest continues at the safe point it was
captured at, with its memory, stack, open files (re-opened by path at their
offsets) and listeners (bound again); connections that were open see a reset.

--dir re-maps the snapshot's preopened directories by guest path (by default
the same host directories); --listen re-maps listeners by guest descriptor
(by default the same addresses).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// Memory goes straight into a mapping the VM takes over
			// (mremap), so it is written once, not copied again.
			mi, err := machine.NewMemoryImage(0)
			if err != nil {
				return &exitError{code: exitUsage, err: err}
			}
			defer mi.Close()
			// A mappable snapshot's memory is mapped copy-on-write
			// (verified through the mapping), not read.
			img := &snapshot.Image{Resize: mi.Resize, Map: mi.MapFile}
			if err := snapshot.RestoreInto(img, nil, args...); err != nil {
				return &exitError{code: exitModule, err: err}
			}
			module, name, err := restoreModule(img, modulePath)
			if err != nil {
				return &exitError{code: exitModule, err: err}
			}
			dirs, err := parseDirs(f.dirs)
			if err != nil {
				return err
			}
			listen, err := parseListen(f.listen)
			if err != nil {
				return err
			}
			ctx, sig := withSignals(cmd.Context())
			m, err := machine.New(ctx, machine.Config{Module: module, Name: name, Dirs: dirs, Listen: listen,
				CacheDir: f.cacheDir, Restore: img, RestoreMemory: mi})
			if err != nil {
				return setupError(err)
			}
			return serveAndRun(ctx, m, f, sig, 0)
		},
	}
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().StringVar(&modulePath, "module", "", "the module the snapshot was taken of (default: the copy inside the snapshot)")
	cmd.Flags().StringArrayVar(&f.dirs, "dir", nil, "re-map a preopened directory (HOST:GUEST)")
	cmd.Flags().StringArrayVar(&f.listen, "listen", nil, "re-map a listener (FD=HOST:PORT)")
	cmd.Flags().StringVar(&f.apiSock, "api-sock", "", "serve the VM's HTTP API on this unix socket")
	cmd.Flags().StringVar(&f.cacheDir, "cache-dir", "", "compiled-code cache")
	return cmd
}

// restoreModule finds the module a snapshot chain was taken of: the file
// given, which must match the snapshot's module hash, or the copy the full
// snapshot carries.
func restoreModule(img *snapshot.Image, path string) ([]byte, string, error) {
	if path == "" {
		if len(img.ModuleCode) == 0 {
			return nil, "", fmt.Errorf("the snapshot does not carry its module (%s): give it with --module", img.Module.Short())
		}
		return bytes.Clone(img.ModuleCode), img.ModuleName, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	if snapshot.ModuleHash(b) != img.Module {
		return nil, "", fmt.Errorf("%s is not the module the snapshot was taken of (%s)", path, img.Module.Short())
	}
	return b, path, nil
}
