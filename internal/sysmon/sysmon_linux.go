package sysmon

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Relax finds the monitor's thread and sets its timer slack (DefaultSlack
// if slack is 0), in the background: the monitor can only be told apart
// while it sleeps in nanosleep(2), which it does whenever a goroutine has
// run in the last few milliseconds, so a process too idle to tell is
// checked again, at growing intervals up to 2 s, until it is found.
// Setting another thread's slack takes CAP_SYS_NICE; without it, Read
// reports why and nothing changes.
func Relax(slack time.Duration) {
	if slack <= 0 {
		slack = DefaultSlack
	}
	set(Status{Err: "monitor thread not found yet"})
	go func() {
		wait := 250 * time.Millisecond
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
			time.Sleep(wait)
			wait = min(2*wait, 2*time.Second)
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

// find returns the monitor's thread, 0 if it cannot tell which it is. It
// samples every thread's current system call ten times, 2 ms apart: the
// monitor sleeps in nanosleep(2) whenever it is not working, so under load
// it is seen there in most samples (and running in the rest), while the
// runtime's other uses of nanosleep are spin waits of a few microseconds,
// seldom caught even once. The thread seen there most, at least four
// times, with no other seen more than once, is the monitor.
func find() (int, error) {
	self := unix.Gettid()
	seen := map[int]int{}
	readable := false
	for round := 0; round < 10; round++ {
		if round > 0 {
			time.Sleep(2 * time.Millisecond)
		}
		tids, err := threads()
		if err != nil {
			return 0, err
		}
		for _, tid := range tids {
			if tid == self || tid == os.Getpid() {
				continue
			}
			in, ok := inNanosleep(tid)
			readable = readable || ok
			if in {
				seen[tid]++
			}
		}
	}
	if !readable {
		return 0, errors.New("sysmon: no thread's current system call can be read (/proc/self/task/*/syscall)")
	}
	best, others := 0, 0
	for tid, n := range seen {
		if n > seen[best] {
			if seen[best] > others {
				others = seen[best]
			}
			best = tid
		} else if n > others {
			others = n
		}
	}
	if seen[best] >= 4 && others <= 1 {
		return best, nil
	}
	return 0, nil
}

// CanSetSlack reports whether this process has CAP_SYS_NICE (bit 23 of
// CapEff in /proc/self/status), without which another thread's timer
// slack can be neither read nor set.
func CanSetSlack() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<unix.CAP_SYS_NICE) != 0
		}
	}
	return false
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
func inNanosleep(tid int) (in, ok bool) {
	b, err := os.ReadFile("/proc/self/task/" + strconv.Itoa(tid) + "/syscall")
	if err != nil {
		return false, false // it may have exited meanwhile
	}
	nr, _, _ := bytes.Cut(b, []byte(" "))
	return string(nr) == strconv.Itoa(unix.SYS_NANOSLEEP), true
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
