// Command callbench measures, inside the guest, what one WASI host call
// costs a Go program: raw calls through //go:wasmimport, and the standard
// library operations built on them. Each benchmark is timed with the
// monotonic clock around its loop and reported on stderr as
//
//	callbench NAME NS_PER_OP OPS
//
// usage: callbench N [FILE]. Writes go to stdout (point it at a sink). FILE,
// a guest path in a preopened directory of at least 64 bytes, enables the
// file benchmarks. With CALLBENCH_ONLY set in the environment, only the
// benchmarks whose name contains it run.
package main

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

//go:wasmimport wasi_snapshot_preview1 clock_time_get
func clockTimeGet(id uint32, precision uint64, out unsafe.Pointer) uint32

//go:wasmimport wasi_snapshot_preview1 random_get
func randomGet(buf unsafe.Pointer, n uint32) uint32

//go:wasmimport wasi_snapshot_preview1 args_sizes_get
func argsSizesGet(argc, size unsafe.Pointer) uint32

var sink uint64

func bench(name string, n int, f func(i int)) {
	if only := os.Getenv("CALLBENCH_ONLY"); only != "" && !strings.Contains(name, only) {
		return
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		f(i)
	}
	el := time.Since(t0)
	fmt.Fprintf(os.Stderr, "callbench %s %.1f %d\n", name, float64(el.Nanoseconds())/float64(n), n)
}

func must(errno uint32, what string) {
	if errno != 0 {
		fmt.Fprintf(os.Stderr, "callbench: %s: errno %d\n", what, errno)
		os.Exit(2)
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: callbench N [FILE]")
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[1])
	if err != nil || n < 10 {
		n = 10
	}

	var t uint64
	bench("raw clock_time_get(monotonic)", n, func(int) {
		must(clockTimeGet(1, 1, unsafe.Pointer(&t)), "clock_time_get")
		sink += t
	})
	var r [8]byte
	bench("raw random_get(8B)", n, func(int) {
		must(randomGet(unsafe.Pointer(&r[0]), 8), "random_get")
		sink += uint64(r[0])
	})
	var argc, size uint32
	bench("raw args_sizes_get", n, func(int) {
		must(argsSizesGet(unsafe.Pointer(&argc), unsafe.Pointer(&size)), "args_sizes_get")
		sink += uint64(argc + size)
	})
	bench("time.Now", n, func(int) {
		sink += uint64(time.Now().UnixNano())
	})
	bench("crypto/rand.Read(8B)", n, func(int) {
		if _, err := rand.Read(r[:]); err != nil {
			panic(err)
		}
		sink += uint64(r[0])
	})
	one := []byte{'x'}
	bench("os.Stdout.Write(1B)", n, func(int) {
		if _, err := os.Stdout.Write(one); err != nil {
			panic(err)
		}
	})
	if len(os.Args) < 3 {
		return
	}
	f, err := os.Open(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "callbench:", err)
		os.Exit(2)
	}
	buf := make([]byte, 64)
	bench("File.ReadAt(64B)", n, func(int) {
		if _, err := f.ReadAt(buf, 0); err != nil {
			panic(err)
		}
	})
	bench("File.Read(64B)", n, func(int) {
		if _, err := f.Read(buf); err == io.EOF {
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				panic(err)
			}
		} else if err != nil {
			panic(err)
		}
	})
	f.Close()
	bench("os.Open+Close", n/10, func(int) {
		g, err := os.Open(os.Args[2])
		if err != nil {
			panic(err)
		}
		g.Close()
	})
}
