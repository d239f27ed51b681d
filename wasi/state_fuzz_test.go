package wasi

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzRestore restores device states decoded from arbitrary JSON, as a
// snapshot file or a primary's checkpoint may carry them, against one
// preopened directory that sits beside a secret file. Properties: no panic;
// a refused state leaves no host descriptor open; a restored one opens
// nothing outside the preopen (every descriptor it holds is checked by
// its /proc link), and Close releases all it opened. Listeners are bound
// to 127.0.0.1:0 whatever the state says (Config.Listen by descriptor), so
// that the fuzzer binds no address of its choosing.
func FuzzRestore(f *testing.F) {
	for _, seed := range []string{
		`{"preopens":[{"HostPath":"/x","GuestPath":"/"}],"monotonic_ns":7,"fds":[` +
			`{"num":0,"kind":1,"stdio":0},{"num":1,"kind":1,"stdio":1},{"num":3,"kind":2,"root":0},` +
			`{"num":4,"kind":3,"root":0,"path":"f","readable":true,"pos":1},{"num":5,"kind":4,"addr":"10.0.0.1:80"},` +
			`{"num":6,"kind":5,"addr":"1.2.3.4:5","shut":1}]}`,
		`{"preopens":[{"HostPath":"/x","GuestPath":"/"}],"fds":[{"num":4,"kind":3,"root":0,"path":"../secret"}]}`,
		`{"preopens":[{"HostPath":"/x","GuestPath":"/"}],"fds":[{"num":4,"kind":3,"root":0,"path":"/etc/passwd"}]}`,
		`{"preopens":[{"HostPath":"/x","GuestPath":"/"}],"fds":[{"num":4,"kind":2,"root":0,"path":"link"}]}`,
		`{"fds":[{"num":65535,"kind":1,"stdio":2},{"num":4294967295,"kind":1}]}`,
		`{"fds":[{"num":1,"kind":1,"stdio":-1}]}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var st State
		if json.Unmarshal(data, &st) != nil {
			return
		}
		top := t.TempDir()
		root := filepath.Join(top, "root")
		secret := filepath.Join(top, "secret")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(secret, []byte("s"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "f"), []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../secret", filepath.Join(root, "link")); err != nil {
			t.Fatal(err)
		}
		cfg := Config{Stdin: strings.NewReader(""), Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}}
		for _, p := range st.Preopens {
			cfg.Preopens = append(cfg.Preopens, Preopen{HostPath: root, GuestPath: p.GuestPath})
		}
		for _, fs := range st.FDs {
			if fs.Kind == KindListener {
				cfg.Listen = append(cfg.Listen, Listener{Fd: fs.Num, Addr: "127.0.0.1:0"})
			}
		}
		before := openFiles(t)
		d, err := Restore(cfg, &st)
		if err != nil {
			if after := openFiles(t); after != before {
				t.Fatalf("refused (%v), yet %d host descriptors open against %d before", err, after, before)
			}
			return
		}
		d.fds.Each(func(fd uint32, f *FD) {
			if f.Host < 0 || f.Kind == KindStdio {
				return
			}
			link, err := os.Readlink("/proc/self/fd/" + itoa(f.Host))
			if err != nil {
				return
			}
			if !strings.HasPrefix(link, root) && (f.Kind == KindFile || f.Kind == KindDir) {
				t.Errorf("guest fd %d is %s, outside the preopen %s", fd, link, root)
			}
		})
		d.Close()
		if after := openFiles(t); after != before {
			t.Fatalf("%d host descriptors open after Close, %d before the restore", after, before)
		}
	})
}
