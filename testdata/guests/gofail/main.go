// Command gofail fails the way os.Args[1] names: a panic, a nil pointer
// dereference, or allocating until memory runs out. Tests use it to check
// that a Go guest's own crash report reaches stderr with its exit code and
// is not mistaken for, or mixed with, a crash of ftvm.
package main

import (
	"fmt"
	"os"
)

type node struct{ next *node }

var sink [][]byte

func main() {
	mode := ""
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	switch mode {
	case "panic":
		panic("gofail: deliberate panic")
	case "nil":
		var n *node
		fmt.Println(n.next.next)
	case "alloc":
		for i := 0; ; i++ {
			b := make([]byte, 1<<20)
			for j := range b {
				b[j] = byte(j)
			}
			sink = append(sink, b)
			if i%64 == 0 {
				fmt.Fprintf(os.Stderr, "allocated %d MiB\n", i+1)
			}
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: gofail panic|nil|alloc")
		os.Exit(3)
	}
}
