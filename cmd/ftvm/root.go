package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
)

// Exit codes of ftvm itself; a guest's own exit code passes through.
const (
	exitUsage   = 125 // bad flags, or ftvm could not set the VM up
	exitModule  = 126 // the module cannot be run (invalid, unsupported, missing imports)
	exitTrap    = 134 // the guest trapped (as a native program that aborts)
	exitFenced  = 69  // a protected primary stopped: its backup runs the VM now (EX_UNAVAILABLE)
	exitSigint  = 130
	exitSigterm = 143
)

// exitError carries an exit code out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit %d", e.code)
	}
	return e.err.Error()
}

func newRoot() *cobra.Command {
	var logLevel string
	root := &cobra.Command{
		Use:           "ftvm",
		Short:         "ftvm runs unmodified WASI programs in a VM whose entire state it owns",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return &exitError{code: exitUsage, err: fmt.Errorf("--log-level: %w", err)}
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})))
			return nil
		},
	}
	root.PersistentFlags().StringVar(&logLevel, "log-level", "warn", "ftvm's own log level (debug, info, warn, error); logs go to stderr")
	root.AddCommand(newRunCmd(), newSnapshotCmd(), newRestoreCmd(), newInspectCmd(), newBackupCmd(), newStatusCmd())
	return root
}

func execute(args []string) int {
	root := newRoot()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(os.Stderr, "ftvm:", ee.err)
		}
		return ee.code
	}
	fmt.Fprintln(os.Stderr, "ftvm:", err)
	return exitUsage
}
