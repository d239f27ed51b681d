// Command heapguest builds a heap that looks like a real service's (maps of
// records with strings and pointers, JSON text, float arrays, a little
// random data, garbage left behind by the collector), prints "ready" and
// blocks reading stdin, so that a host can copy its linear memory. The
// snapshot package measures page compression on that memory.
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime"
	"strings"
)

type item struct {
	ID      int64
	Name    string
	Tags    []string
	Score   float64
	Next    *item `json:"-"`
	Payload []byte
}

var words = strings.Fields(`the quick brown fox jumps over a lazy dog while
checkpoint replication keeps every guest page safe across hosts and restores
memory state after failure with incremental snapshots of dirty pages stored
compressed on disk request response handler connection buffer timeout error`)

var keep []any

func main() {
	seed := uint64(42)
	next := func() uint64 { // xorshift: deterministic heap contents
		seed ^= seed << 13
		seed ^= seed >> 7
		seed ^= seed << 17
		return seed
	}
	sentence := func(n int) string {
		var b strings.Builder
		for i := 0; i < n; i++ {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(words[next()%uint64(len(words))])
		}
		return b.String()
	}

	items := make(map[string]*item)
	var list []*item
	var prev *item
	for i := 0; i < 30000; i++ {
		it := &item{ID: int64(next() % 1e9), Name: fmt.Sprintf("user-%06d-%s", i, words[i%len(words)]),
			Score: math.Float64frombits(next()&0x000fffffffffffff | 0x4000000000000000), Next: prev,
			Payload: []byte(sentence(int(next()%12) + 2))}
		for j := 0; j < int(next()%4); j++ {
			it.Tags = append(it.Tags, words[next()%uint64(len(words))])
		}
		items[it.Name] = it
		list = append(list, it)
		prev = it
		if i%3 == 0 { // garbage the collector will leave behind
			_ = fmt.Sprintf("temporary %d %s", i, sentence(5))
		}
	}
	doc, _ := json.Marshal(list[:8000])
	floats := make([]float64, 100000)
	for i := range floats {
		floats[i] = math.Sin(float64(i)) * 1000
	}
	random := make([]byte, 512<<10) // stands for TLS records, compressed blobs
	rand.Read(random)
	keep = append(keep, items, list, doc, floats, random)
	runtime.GC()

	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	runtime.KeepAlive(keep)
}
