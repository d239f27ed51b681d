package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/wasi"
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
				code := exitModule // a snapshot that cannot be restored
				if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
					code = exitUsage // a file it cannot open, as for --dir
				}
				return &exitError{code: code, err: err}
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
			if err := checkRestoreListen(listen, f.listen, img.Devices); err != nil {
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

// checkRestoreListen refuses a --listen of a restore that would not be
// used: one without its guest descriptor, one given twice, or one whose
// descriptor is not a listener in the snapshot. The guest would bind its
// recorded address instead, so the mistake showed only if that address
// was taken.
func checkRestoreListen(listen []wasi.Listener, specs []string, devices []byte) error {
	have, err := wasi.ListenersOf(devices)
	if err != nil {
		return &exitError{code: exitModule, err: err}
	}
	var list []string
	for fd, addr := range have {
		list = append(list, fmt.Sprintf("%d=%s", fd, addr))
	}
	slices.Sort(list)
	its := "it has none"
	if len(list) > 0 {
		its = "its listeners: " + strings.Join(list, ", ")
	}
	seen := map[uint32]bool{}
	for i, l := range listen {
		switch {
		case l.Fd == 0:
			return usage("--listen %q: give the guest descriptor it re-maps (FD=HOST:PORT; %s)", specs[i], its)
		case seen[l.Fd]:
			return usage("--listen %q: guest descriptor %d is re-mapped twice", specs[i], l.Fd)
		case have[l.Fd] == "":
			return usage("--listen %q: guest descriptor %d is not a listener in the snapshot (%s)", specs[i], l.Fd, its)
		}
		seen[l.Fd] = true
	}
	return nil
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
