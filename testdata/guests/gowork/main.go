// Command gowork is a deterministic Go guest for snapshot-equivalence tests:
// it computes, keeps files open across many host calls, writes, seeks, reads
// back, renames and prints. Its output and the files it leaves depend only on
// its arguments, so a run snapshotted at any host call and restored elsewhere
// must produce exactly what an uninterrupted run does.
package main

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
)

func main() {
	dir := "/data"
	rounds := 40
	if len(os.Args) > 1 {
		rounds, _ = strconv.Atoi(os.Args[1])
	}
	log, err := os.OpenFile(filepath.Join(dir, "log.txt"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	check(err)
	state, err := os.OpenFile(filepath.Join(dir, "state.bin"), os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
	check(err)
	h := sha256.New()
	table := map[string]int{}
	out := bufio.NewWriter(os.Stdout)
	for i := 0; i < rounds; i++ {
		// Compute a little, keep heap state.
		h.Write([]byte(strconv.Itoa(i * i)))
		sum := h.Sum(nil)
		key := fmt.Sprintf("k%02d", sum[0]%17)
		table[key] += int(sum[1])
		// Positional and sequential I/O on files held open.
		_, err := state.WriteAt(sum[:8], int64(i%5)*8)
		check(err)
		fmt.Fprintf(log, "round %d %x\n", i, sum[:4])
		if i%7 == 6 {
			check(log.Sync())
			buf := make([]byte, 40)
			_, err := state.ReadAt(buf, 0)
			check(err)
			fmt.Fprintf(out, "round %d: state %x\n", i, buf[:6])
			check(out.Flush())
		}
		if i%10 == 9 {
			name := filepath.Join(dir, fmt.Sprintf("part-%d.txt", i/10))
			check(os.WriteFile(name+".tmp", []byte(fmt.Sprintf("part %d of %d\n", i/10, rounds)), 0o644))
			check(os.Rename(name+".tmp", name))
		}
	}
	check(log.Close())
	_, err = state.Seek(0, io.SeekStart)
	check(err)
	all, err := io.ReadAll(state)
	check(err)
	check(state.Close())
	keys := make([]string, 0, len(table))
	for k := range table {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(out, "%s=%d ", k, table[k])
	}
	entries, err := os.ReadDir(dir)
	check(err)
	fmt.Fprintf(out, "\nfiles=%d state=%x final=%x\n", len(entries), all[:8], h.Sum(nil)[:8])
	check(out.Flush())
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "gowork:", err)
		os.Exit(1)
	}
}
