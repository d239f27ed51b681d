//go:build !linux

package sysmon

import "time"

// Relax does nothing where threads have no timer slack.
func Relax(slack time.Duration) { set(Status{Err: "not supported on this system"}) }

// CanSetSlack reports false: there is no timer slack to set.
func CanSetSlack() bool { return false }
