// Package api serves a VM's HTTP API on a unix socket, in the manner of
// Firecracker: the socket is the VM's control plane, and its file mode is
// the access control.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/snapshot"
)

// VM is what the API needs of a machine.
type VM interface {
	Info() machine.Info
	Snapshot(ctx context.Context, path string, opt machine.SnapshotOptions) (*snapshot.Snapshot, error)
}

// SnapshotRequest is the body of PUT /snapshot/create.
type SnapshotRequest struct {
	Path        string `json:"snapshot_path"`
	Incremental bool   `json:"incremental,omitempty"`
	Stop        bool   `json:"stop,omitempty"`
	// Mappable writes a full snapshot's memory uncompressed and page
	// aligned, so that a restore maps it instead of reading it.
	Mappable bool `json:"mappable,omitempty"`
}

// ErrMappableIncremental refuses a request for a snapshot both
// incremental and mappable, which wrote an incremental one and dropped
// mappable without a word.
var ErrMappableIncremental = errors.New("mappable applies to a full snapshot's memory; " +
	"an incremental one holds only the pages written since the last, which a restore reads")

// Check refuses a request no snapshot can honour as asked (the server
// checks it; a client may, before asking).
func (r SnapshotRequest) Check() error {
	if r.Incremental && r.Mappable {
		return ErrMappableIncremental
	}
	return nil
}

// SnapshotResponse describes the snapshot written.
type SnapshotResponse struct {
	Path    string           `json:"snapshot_path"`
	Summary snapshot.Summary `json:"summary"`
	Millis  float64          `json:"elapsed_ms"`
}

// errorBody is every error response.
type errorBody struct {
	Error string `json:"error"`
}

// Route is an extra endpoint a mode adds to the API (GET /status of a
// protected primary or a backup, GET /metrics).
type Route struct {
	Pattern string // e.g. "GET /status"
	Handler http.Handler
}

// JSON is a Route handler serving what fn returns, as JSON.
func JSON(fn func() any) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, fn()) })
}

// noVM answers for a process that runs no VM (yet): a backup.
type noVM struct{}

func (noVM) Info() machine.Info { return machine.Info{State: "none"} }
func (noVM) Snapshot(context.Context, string, machine.SnapshotOptions) (*snapshot.Snapshot, error) {
	return nil, errors.New("this process runs no VM")
}

// swapVM lets a server change the VM it serves (a backup that failed
// over starts serving the VM it resumed).
type swapVM struct{ vm atomic.Value }

func (s *swapVM) get() VM { return s.vm.Load().(vmBox).VM }

type vmBox struct{ VM }

func (s *swapVM) Info() machine.Info { return s.get().Info() }
func (s *swapVM) Snapshot(ctx context.Context, path string, opt machine.SnapshotOptions) (*snapshot.Snapshot, error) {
	return s.get().Snapshot(ctx, path, opt)
}

// Handler routes the API. vm may be nil (a process that runs no VM).
func Handler(vm VM, routes ...Route) http.Handler {
	if vm == nil {
		vm = noVM{}
	}
	mux := http.NewServeMux()
	for _, r := range routes {
		mux.Handle(r.Pattern, r.Handler)
	}
	mux.HandleFunc("GET /vm", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, vm.Info())
	})
	mux.HandleFunc("PUT /snapshot/create", func(w http.ResponseWriter, r *http.Request) {
		var req SnapshotRequest
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{"bad request body: " + err.Error()})
			return
		}
		if req.Path == "" {
			writeJSON(w, http.StatusBadRequest, errorBody{"snapshot_path is required"})
			return
		}
		if err := req.Check(); err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
			return
		}
		if !filepath.IsAbs(req.Path) {
			// The VM's process opens it, in a working directory the
			// client does not see: a relative path would land wherever
			// that happens to be.
			writeJSON(w, http.StatusBadRequest, errorBody{fmt.Sprintf("snapshot_path must be absolute (the VM's process writes it; got %q)", req.Path)})
			return
		}
		t0 := time.Now()
		s, err := vm.Snapshot(r.Context(), req.Path, machine.SnapshotOptions{Incremental: req.Incremental,
			Stop: req.Stop, Mappable: req.Mappable, Reason: "api"})
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, machine.ErrNotInstrumented) || errors.Is(err, machine.ErrNotRunning) {
				code = http.StatusConflict
			}
			writeJSON(w, code, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, SnapshotResponse{Path: req.Path, Summary: snapshot.Describe(s),
			Millis: float64(time.Since(t0).Microseconds()) / 1000})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Server is a running API server.
type Server struct {
	vm   *swapVM
	path string
	own  os.FileInfo // the socket file as bound: Close removes path only if it is still this
	srv  *http.Server
	ln   net.Listener
}

// Listen binds the unix socket at path (replacing a stale one) and serves
// the API until Close.
func Listen(path string, vm VM, routes ...Route) (*Server, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("api socket %s: exists and is not a socket", path)
		}
		// A live socket means another VM owns it.
		if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
			c.Close()
			return nil, fmt.Errorf("api socket %s: in use by another process", path)
		}
		os.Remove(path)
	}
	ln, err := listenPrivate(path)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	own, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("api socket: %w", err)
	}
	if vm == nil {
		vm = noVM{}
	}
	sw := &swapVM{}
	sw.vm.Store(vmBox{vm})
	// A client that trickles its request, or idles between requests,
	// must not hold a goroutine and a descriptor for ever. (No write
	// timeout: a snapshot's response comes once its file is written.)
	s := &Server{path: path, own: own, ln: ln, vm: sw, srv: &http.Server{Handler: Handler(sw, routes...),
		ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("api server stopped", "err", err)
		}
	}()
	return s, nil
}

// listenPrivate binds a unix socket at path that only this user can reach
// from the moment it exists: it is bound in a new directory of mode 0700
// beside path, made 0600, then renamed into place (bound at path, then
// chmodded, it was open to other users in between under a lax umask).
func listenPrivate(path string) (net.Listener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".api-sock-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	// The name it was bound at is gone once renamed: Close must not
	// unlink whatever has that name then (Server.Close removes path).
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// SetVM makes the server serve vm from now on.
func (s *Server) SetVM(vm VM) { s.vm.vm.Store(vmBox{vm}) }

// Close stops the server and removes the socket, if its path still names
// it: another VM may have bound the path since (after someone removed
// this one's), and must keep its socket.
func (s *Server) Close() error {
	// Before Shutdown closes the listener: while it is open the socket's
	// inode cannot be reused by another socket bound at the path.
	if fi, err := os.Lstat(s.path); err == nil && os.SameFile(fi, s.own) {
		os.Remove(s.path)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return s.srv.Shutdown(ctx)
}

// Client talks to a VM's API socket.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}}}}
}

// Snapshot asks the VM for a snapshot (PUT /snapshot/create).
func (c *Client) Snapshot(ctx context.Context, req SnapshotRequest) (*SnapshotResponse, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://vm/snapshot/create", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(hr)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var eb errorBody
		json.NewDecoder(resp.Body).Decode(&eb)
		return nil, fmt.Errorf("snapshot: %s: %s", resp.Status, eb.Error)
	}
	var out SnapshotResponse
	return &out, json.NewDecoder(resp.Body).Decode(&out)
}

// Info fetches GET /vm.
func (c *Client) Info(ctx context.Context) (machine.Info, error) {
	var info machine.Info
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://vm/vm", nil)
	if err != nil {
		return info, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return info, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return info, fmt.Errorf("GET /vm: %s", resp.Status)
	}
	return info, json.NewDecoder(resp.Body).Decode(&info)
}

// Get fetches path (e.g. "/status") and decodes its JSON into v.
func (c *Client) Get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://vm"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
