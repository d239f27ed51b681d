//go:build !linux

package dirty

import "errors"

var errNotLinux = errors.New("userfaultfd write-protect tracking needs Linux 6.7+")

func newUffd([]byte, Options) (Tracker, error) { return nil, errNotLinux }

func probe() error { return errNotLinux }

// HugePagesCoarsen: no kernel tracker, nothing to coarsen.
func HugePagesCoarsen() bool { return false }
