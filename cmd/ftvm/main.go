// Command ftvm runs WASI programs in a VM whose whole state it owns.
package main

import (
	"os"
)

func main() {
	os.Exit(execute(os.Args[1:]))
}
