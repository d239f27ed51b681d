package snapshot

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

	"github.com/ftvm/ftvm/internal/guest"
	"github.com/ftvm/ftvm/wasi"
)

// memTap is the guest's stdin: the first read, which the guest makes once
// its heap is built, copies the guest's memory and ends the input.
type memTap struct {
	mod  api.Module
	heap []byte
}

func (m *memTap) Read(p []byte) (int, error) {
	if m.heap == nil && m.mod != nil {
		mem := m.mod.Memory()
		b, _ := mem.Read(0, mem.Size())
		m.heap = append([]byte(nil), b...)
	}
	return 0, io.EOF
}

// guestHeap runs testdata/heapguest (a Go program that builds a service-
// like heap) on ftvm's devices and returns its linear memory.
var guestHeap = sync.OnceValues(func() ([]byte, error) {
	path, err := guest.Go("snapshot/testdata/heapguest")
	if err != nil {
		return nil, err
	}
	wasm, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	tap := &memTap{}
	dev, err := wasi.New(wasi.Config{Args: []string{"heapguest"}, Stdin: tap, Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	if err := dev.Register(ctx, rt); err != nil {
		return nil, err
	}
	compiled, err := rt.CompileModule(ctx, wasm)
	if err != nil {
		return nil, err
	}
	mod, err := rt.InstantiateModule(ctx, compiled, wazero.NewModuleConfig().WithName("").WithStartFunctions())
	if err != nil {
		return nil, err
	}
	tap.mod = mod
	_, err = mod.ExportedFunction("_start").Call(ctx)
	if tap.heap == nil {
		return nil, fmt.Errorf("the guest ended without reading stdin: %v", err)
	}
	return tap.heap, nil
})

// heapPages are the non-zero pages of a memory: what a full snapshot holds.
func heapPages(mem []byte) []Page {
	var pages []Page
	for _, i := range NonZeroPages(mem) {
		pages = append(pages, Page{Index: i, Data: mem[int(i)*PageSize:][:PageSize]})
	}
	return pages
}

// syntheticPages is the fallback and second data set: the mix of fillPage
// (random, pointers, text, sparse, records) over 8 MiB.
func syntheticPages() []Page {
	rng := rand.New(rand.NewPCG(100, 200))
	mem := make([]byte, 8<<20)
	for i := 0; i < len(mem); i += PageSize {
		fillPage(rng, mem[i:i+PageSize])
	}
	return heapPages(mem)
}
