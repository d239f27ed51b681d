// Package procmaps finds the mapping of this process that holds an address,
// in /proc/self/smaps, so that tests can check what the kernel made of a
// reservation: whether it is still mapped, whether it may hold huge pages.
package procmaps

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// Mapping returns the lines /proc/self/smaps gives for the mapping that
// holds addr: its range line first, then its attributes ("THPeligible:
// 1", …). found is false when no mapping holds addr.
func Mapping(addr uintptr) (lines []string, found bool, err error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if lo, hi, ok := parseRange(line); ok {
			if found {
				break // the next mapping
			}
			found = lo <= addr && addr < hi
		}
		if found {
			lines = append(lines, line)
		}
	}
	return lines, found, sc.Err()
}

// Attr is the value of the attribute name in a mapping's lines, "" if it
// has none.
func Attr(lines []string, name string) string {
	for _, l := range lines {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// parseRange reads the "lo-hi" that starts a mapping's first line.
func parseRange(line string) (lo, hi uintptr, ok bool) {
	rng, _, found := strings.Cut(line, " ")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	x, err1 := strconv.ParseUint(a, 16, 64)
	y, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return uintptr(x), uintptr(y), true
}
