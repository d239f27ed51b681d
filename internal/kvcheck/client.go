package kvcheck

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// DialFunc dials like net.Dialer.DialContext (netns.Host.DialContext fits).
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// ServerError is an ERR reply, or a reply that is not what the request
// calls for. A workload counts the request as failed and does not check it.
type ServerError struct {
	Request, Reply string
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("%s: server replied %q", e.Request, e.Reply)
}

// NotSentError means the request never left: no server address could be
// connected to before the context ended. The request took no effect.
type NotSentError struct{ Err error }

func (e *NotSentError) Error() string { return "not sent: " + e.Err.Error() }
func (e *NotSentError) Unwrap() error { return e.Err }

// Client is one connection to the KV server, one request at a time, with
// failover: it connects to Addrs in order, starting with the last one that
// worked, and after an error it drops the connection and connects again on
// the next request. Any error other than ServerError and NotSentError
// leaves the outcome of the request unknown. Not safe for concurrent use.
type Client struct {
	Addrs []string
	Dial  DialFunc // nil: net.Dialer
	// Timeout bounds each connection attempt and each request (0: 2 s).
	Timeout time.Duration

	cur  int
	conn net.Conn
	r    *bufio.Reader
	// Dials counts connections made; DialErrors failed attempts.
	Dials, DialErrors int
}

func (c *Client) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return 2 * time.Second
}

// connect dials until an address answers or ctx ends, backing off after
// each round over all addresses.
func (c *Client) connect(ctx context.Context) error {
	if c.conn != nil {
		return nil
	}
	if len(c.Addrs) == 0 {
		return &NotSentError{errors.New("no server address")}
	}
	dial := c.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	backoff := 5 * time.Millisecond
	var last error
	for {
		for i := range c.Addrs {
			idx := (c.cur + i) % len(c.Addrs)
			dctx, cancel := context.WithTimeout(ctx, c.timeout())
			conn, err := dial(dctx, "tcp", c.Addrs[idx])
			cancel()
			if err == nil {
				c.cur, c.conn, c.r = idx, conn, bufio.NewReader(conn)
				c.Dials++
				return nil
			}
			c.DialErrors++
			last = err
			if ctx.Err() != nil {
				return &NotSentError{fmt.Errorf("%w (last dial: %v)", ctx.Err(), last)}
			}
		}
		select {
		case <-ctx.Done():
			return &NotSentError{fmt.Errorf("%w (last dial: %v)", ctx.Err(), last)}
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// Addr is the address of the current connection ("" when none).
func (c *Client) Addr() string {
	if c.conn == nil {
		return ""
	}
	return c.Addrs[c.cur]
}

// Close drops the connection.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn, c.r = nil, nil
	return err
}

// Connect makes sure there is a connection, dialing as requests do.
func (c *Client) Connect(ctx context.Context) error { return c.connect(ctx) }

// Do sends one request line and returns the reply line without its newline.
// The connection is dropped on any error but ServerError, which Do does not
// produce (see Get, Set, Del).
func (c *Client) Do(ctx context.Context, req string) (string, error) {
	if err := c.connect(ctx); err != nil {
		return "", err
	}
	conn := c.conn
	conn.SetDeadline(time.Now().Add(c.timeout()))
	// Give up at once when ctx ends.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := conn.Write([]byte(req + "\n")); err != nil {
		c.Close()
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.Close()
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// Set stores value under key. value must not contain a newline.
func (c *Client) Set(ctx context.Context, key, value string) error {
	return c.write(ctx, "SET "+key+" "+value)
}

// Del removes key.
func (c *Client) Del(ctx context.Context, key string) error {
	return c.write(ctx, "DEL "+key)
}

func (c *Client) write(ctx context.Context, req string) error {
	reply, err := c.Do(ctx, req)
	if err != nil {
		return err
	}
	if reply != "OK" {
		return c.unexpected(req, reply)
	}
	return nil
}

// unexpected makes the ServerError for a reply, dropping the connection
// unless the reply is an ERR line (after anything else, replies may no
// longer match requests).
func (c *Client) unexpected(req, reply string) error {
	if !strings.HasPrefix(reply, "ERR") {
		c.Close()
	}
	return &ServerError{Request: req, Reply: reply}
}

// Get reads key: its value and true, or "" and false for NOTFOUND.
func (c *Client) Get(ctx context.Context, key string) (string, bool, error) {
	req := "GET " + key
	reply, err := c.Do(ctx, req)
	if err != nil {
		return "", false, err
	}
	if reply == "NOTFOUND" {
		return "", false, nil
	}
	if v, ok := strings.CutPrefix(reply, "VALUE "); ok {
		return v, true, nil
	}
	return "", false, c.unexpected(req, reply)
}
