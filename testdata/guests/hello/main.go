// Command hello is the smallest useful guest: it prints its arguments,
// environment and a line of stdin, and exits with a chosen code.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	fmt.Printf("hello from a guest: args=%q\n", os.Args[1:])
	fmt.Printf("env FOO=%q\n", os.Getenv("FOO"))
	t0 := time.Now()
	time.Sleep(10 * time.Millisecond)
	fmt.Printf("slept>=10ms: %v\n", time.Since(t0) >= 10*time.Millisecond)
	if len(os.Args) > 1 && os.Args[1] == "stdin" {
		line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
		fmt.Printf("stdin: %q\n", line)
	}
	if code := os.Getenv("EXIT"); code != "" {
		n, _ := strconv.Atoi(code)
		fmt.Fprintln(os.Stderr, "exiting with", n)
		os.Exit(n)
	}
}
