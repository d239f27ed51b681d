// Package api serves a VM's HTTP API on a unix socket, in the manner of
// Firecracker: the socket is the VM's control plane, and its file mode is
// the access control.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/ftvm/ftvm/machine"
)

// VM is what the API needs of a machine.
type VM interface {
	Info() machine.Info
}

// Handler routes the API.
func Handler(vm VM) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /vm", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, vm.Info())
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
	path string
	srv  *http.Server
	ln   net.Listener
}

// Listen binds the unix socket at path (replacing a stale one) and serves
// the API until Close.
func Listen(path string, vm VM) (*Server, error) {
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
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("api socket: %w", err)
	}
	s := &Server{path: path, ln: ln, srv: &http.Server{Handler: Handler(vm), ReadHeaderTimeout: 5 * time.Second}}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("api server stopped", "err", err)
		}
	}()
	return s, nil
}

// Close stops the server and removes the socket.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	os.Remove(s.path)
	return err
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
		}}, Timeout: 10 * time.Second}}
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
