// Command kvserver is an in-memory key-value server for the end-to-end,
// snapshot, replication and benchmark tests. It serves a line protocol on a
// listener the host preopens (fd 3 by default):
//
//	SET key value  ->  OK
//	GET key        ->  VALUE value | NOTFOUND
//	DEL key        ->  OK
//	COUNT          ->  COUNT n
//
// Anything else gets "ERR ...". With -wal FILE every SET and DEL is also
// appended to FILE (in a preopened directory) before it is acknowledged:
// the replication tests check that file on a failed-over backup. Requests
// may be pipelined: replies are
// buffered and flushed whenever no further request is already buffered. The
// server keeps no clocks or randomness, so its state depends only on the
// requests it received.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
)

// store is the shared table. Guests are single-threaded, but goroutines
// still interleave at I/O, so a mutex keeps each command atomic.
type store struct {
	mu  sync.Mutex
	m   map[string]string
	wal *os.File
}

func main() {
	fd := flag.Int("fd", 3, "guest descriptor of the preopened listener")
	walPath := flag.String("wal", "", "append every SET and DEL to this file")
	flag.Parse()
	// os.NewFile only registers a non-blocking descriptor with the runtime's
	// poller; a blocking one would stall every goroutine in accept.
	if err := syscall.SetNonblock(*fd, true); err != nil {
		fatal("set nonblock on fd %d: %v", *fd, err)
	}
	ln, err := net.FileListener(os.NewFile(uintptr(*fd), "listener"))
	if err != nil {
		fatal("listener on fd %d: %v", *fd, err)
	}
	fmt.Fprintf(os.Stderr, "kvserver: serving on fd %d\n", *fd)
	s := &store{m: map[string]string{}}
	if *walPath != "" {
		f, err := os.OpenFile(*walPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			fatal("wal: %v", err)
		}
		s.wal = f
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			fmt.Fprintf(os.Stderr, "kvserver: accept: %v\n", err)
			continue
		}
		go s.serve(c)
	}
}

func fatal(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "kvserver: "+format+"\n", a...)
	os.Exit(1)
}

// serve answers one connection's requests in order until it closes.
func (s *store) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 16<<10)
	w := bufio.NewWriterSize(c, 16<<10)
	for {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			w.WriteString("ERR line too long\n")
			w.Flush()
			return
		}
		if err != nil {
			w.Flush()
			return
		}
		s.exec(w, bytes.TrimRight(line, "\r\n"))
		if r.Buffered() == 0 {
			if w.Flush() != nil {
				return
			}
		}
	}
}

// exec runs one request and writes its reply.
func (s *store) exec(w *bufio.Writer, line []byte) {
	cmd, rest, _ := bytes.Cut(line, []byte(" "))
	s.mu.Lock()
	defer s.mu.Unlock()
	switch string(cmd) {
	case "SET":
		key, value, ok := bytes.Cut(rest, []byte(" "))
		if !ok || len(key) == 0 {
			w.WriteString("ERR usage: SET key value\n")
			return
		}
		if !s.log(w, line) {
			return
		}
		s.m[string(key)] = string(value)
		w.WriteString("OK\n")
	case "GET":
		if v, ok := s.m[string(rest)]; ok {
			w.WriteString("VALUE ")
			w.WriteString(v)
			w.WriteByte('\n')
		} else {
			w.WriteString("NOTFOUND\n")
		}
	case "DEL":
		if !s.log(w, line) {
			return
		}
		delete(s.m, string(rest))
		w.WriteString("OK\n")
	case "COUNT":
		w.WriteString("COUNT ")
		w.WriteString(strconv.Itoa(len(s.m)))
		w.WriteByte('\n')
	default:
		w.WriteString("ERR unknown command\n")
	}
}

// log appends a mutation to the write-ahead log, if there is one.
func (s *store) log(w *bufio.Writer, line []byte) bool {
	if s.wal == nil {
		return true
	}
	if _, err := s.wal.Write(append(append([]byte(nil), line...), '\n')); err != nil {
		w.WriteString("ERR wal: " + err.Error() + "\n")
		return false
	}
	return true
}
