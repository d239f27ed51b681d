// Command wazerowasi runs a WASI preview1 command module on wazero's compiler
// with wazero's own wasi_snapshot_preview1 (not ftvm's device layer): the
// comparison point of `make bench`.
//
//	wazerowasi [-listen HOST:PORT]... [-dir HOST:GUEST]... [-env K=V]... [-cache DIR] app.wasm [args...]
//
// Listeners are preopened after the directories (fd 3 when there are none).
// The guest's exit code becomes the runner's.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/ftvm/ftvm/bench/internal/wzrun"
)

type list []string

func (l *list) String() string     { return fmt.Sprint(*l) }
func (l *list) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var listen, dirs, env list
	flag.Var(&listen, "listen", "preopen a TCP listener HOST:PORT (repeatable)")
	flag.Var(&dirs, "dir", "preopen host directory HOST as GUEST (HOST:GUEST, repeatable)")
	flag.Var(&env, "env", "guest environment variable K=V (repeatable)")
	cache := flag.String("cache", "", "compiled-code cache directory (default none)")
	closeOnDone := flag.Bool("close-on-context-done", false, "compile in wazero's termination checks (WithCloseOnContextDone), for comparison")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: wazerowasi [flags] app.wasm [args...]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 1 {
		flag.Usage()
		os.Exit(2)
	}
	path := flag.Arg(0)
	module, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wazerowasi:", err)
		os.Exit(126)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// wazero's WASI cannot interrupt a guest blocked in a host call;
		// a signal ends the process.
		<-ctx.Done()
		os.Exit(130)
	}()
	r, err := wzrun.New(ctx, wzrun.Options{Module: module, Name: path, Args: flag.Args()[1:], Env: env,
		Dirs: dirs, Listen: listen, CacheDir: *cache, CloseOnContextDone: *closeOnDone,
		Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		fmt.Fprintln(os.Stderr, "wazerowasi:", err)
		os.Exit(126)
	}
	code, err := r.Run(ctx)
	r.Close(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "wazerowasi:", err)
		os.Exit(134)
	}
	os.Exit(int(code))
}
