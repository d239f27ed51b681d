package sysmon

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Relax finds the monitor's thread and sets its timer slack (DefaultSlack
// if slack is 0), in the background: the monitor can only be told apart
// while it sleeps in nanosleep(2), which it does whenever a goroutine has
// run in the last few milliseconds, so an idle process is checked again
// each second until it is found. Setting another thread's slack takes
// CAP_SYS_NICE; without it, Read reports why and nothing changes.
func Relax(slack time.Duration) {
	if slack <= 0 {
		slack = DefaultSlack
	}
	set(Status{Err: "monitor thread not found yet"})
	go func() {
		for {
			tid, err := find()
			if err != nil {
				set(Status{Err: err.Error()})
				return
			}
			if tid != 0 {
				if err := setSlack(tid, slack); err != nil {
					set(Status{TID: tid, Err: err.Error()})
					return
				}
				set(Status{TID: tid, SlackNS: slack.Nanoseconds()})
				sweep(tid)
				return
			}
			time.Sleep(time.Second)
		}
	}()
}

// sweep gives back the process's own slack to threads that inherited the
// monitor's: a thread the monitor creates (to run goroutines while others
// block in system calls) starts with its creator's slack, which would make
// that thread's timed waits, and so Go timers, late by up to the slack.
// Threads are created rarely, so once a second is enough.
func sweep(monitor int) {
	want, err := readSlack(os.Getpid())
	if err != nil {
		return
	}
	for {
		time.Sleep(time.Second)
		tids, err := threads()
		if err != nil {
			return
		}
		for _, tid := range tids {
			if tid == monitor {
				continue
			}
			if got, err := readSlack(tid); err == nil && got != want {
				setSlack(tid, time.Duration(want))
			}
		}
	}
}

func readSlack(tid int) (int64, error) {
	b, err := os.ReadFile(slackPath(tid))
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
}

// slackPath is where a thread's timer slack is: only thread-group
// directories have timerslack_ns, but every thread can be named there by
// its own id.
func slackPath(tid int) string { return "/proc/" + strconv.Itoa(tid) + "/timerslack_ns" }

// find returns the thread seen in nanosleep(2) in three samples 5 ms
// apart, 0 if none was. The runtime sleeps in nanosleep only in the monitor
// and in spin loops of a few microseconds (stealing work, stopping the
// world), which three samples in a row do not catch.
func find() (int, error) {
	self := unix.Gettid()
	var seen map[int]int
	for round := 0; round < 3; round++ {
		if round > 0 {
			time.Sleep(5 * time.Millisecond)
		}
		tids, err := threads()
		if err != nil {
			return 0, err
		}
		next := map[int]int{}
		for _, tid := range tids {
			if tid == self || tid == os.Getpid() || !inNanosleep(tid) {
				continue
			}
			if round == 0 || seen[tid] == round {
				next[tid] = round + 1
			}
		}
		seen = next
	}
	for tid, n := range seen {
		if n == 3 && len(seen) == 1 {
			return tid, nil
		}
	}
	return 0, nil
}

func threads() ([]int, error) {
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, fmt.Errorf("sysmon: listing threads: %w", err)
	}
	tids := make([]int, 0, len(entries))
	for _, e := range entries {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// inNanosleep reads the thread's current system call (its number is the
// first field of /proc/self/task/TID/syscall).
func inNanosleep(tid int) bool {
	b, err := os.ReadFile("/proc/self/task/" + strconv.Itoa(tid) + "/syscall")
	if err != nil {
		return false
	}
	nr, _, _ := bytes.Cut(b, []byte(" "))
	return string(nr) == strconv.Itoa(unix.SYS_NANOSLEEP)
}

func setSlack(tid int, slack time.Duration) error {
	f, err := os.OpenFile(slackPath(tid), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("sysmon: %w", err)
	}
	defer f.Close()
	if _, err := f.WriteString(strconv.FormatInt(slack.Nanoseconds(), 10)); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("sysmon: setting the monitor thread's timer slack needs CAP_SYS_NICE: %w", err)
		}
		return fmt.Errorf("sysmon: %w", err)
	}
	return nil
}
