package transport

import (
	"context"
	"crypto/tls"
	"net"
)

// Dial connects to addr (host:port) over TCP with TCP_NODELAY set and, when
// tlsCfg is not nil, completes the TLS handshake before returning (bounded
// by ctx). tlsCfg without a ServerName gets addr's host. With TLS 1.3 a
// server that refuses the client's certificate says so after the client's
// handshake is done: the refusal then arrives as the first Recv's error.
func Dial(ctx context.Context, addr string, tlsCfg *tls.Config, opts Options) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	setNoDelay(nc)
	if tlsCfg != nil {
		cfg := tlsCfg
		if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				host = addr
			}
			cfg = cfg.Clone()
			cfg.ServerName = host
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, err
		}
		nc = tc
	}
	return NewConn(nc, opts), nil
}

// Listen listens on addr over TCP. Accepted connections have TCP_NODELAY
// set and, when tlsCfg is not nil, are *tls.Conn that handshake on first
// use; wrap them with NewConn and call Conn.Handshake to handshake (and
// learn the peer's certificate) at once.
func Listen(addr string, tlsCfg *tls.Config) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	var nl net.Listener = noDelayListener{l}
	if tlsCfg != nil {
		nl = tls.NewListener(nl, tlsCfg)
	}
	return nl, nil
}

type noDelayListener struct{ net.Listener }

func (l noDelayListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	setNoDelay(c)
	return c, nil
}

func setNoDelay(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true) // Go's default already; made explicit
	}
}
