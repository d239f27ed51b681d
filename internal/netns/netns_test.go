package netns

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The test binary doubles as the programs the tests run inside namespaces
// and as a test process that dies without cleaning up.
func TestMain(m *testing.M) {
	switch mode := os.Getenv("NETNS_TEST_HELPER"); {
	case strings.HasPrefix(mode, "echo:"):
		echoServer(strings.TrimPrefix(mode, "echo:"))
		return
	case mode == "":
	default:
		// Runs the test named by -test.run in a child process.
	}
	os.Exit(m.Run())
}

// echoServer answers each line with "FROM-IP line" and exits after 60 s.
func echoServer(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("listening")
	time.AfterFunc(60*time.Second, func() { os.Exit(0) })
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		go func() {
			defer c.Close()
			from, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			s := bufio.NewScanner(c)
			for s.Scan() {
				fmt.Fprintf(c, "%s %s\n", from, s.Text())
			}
		}()
	}
}

// ping sends ICMP echo requests from h to ip until one is answered or the
// timeout passes (the ping program is not installed on every machine).
func ping(h *Host, ip string, timeout time.Duration) error {
	c, err := h.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return err
	}
	defer c.Close()
	id := uint16(os.Getpid())
	deadline := time.Now().Add(timeout)
	for seq := uint16(1); time.Now().Before(deadline); seq++ {
		msg := []byte{8, 0, 0, 0, 0, 0, 0, 0, 'f', 't', 'v', 'm'}
		binary.BigEndian.PutUint16(msg[4:], id)
		binary.BigEndian.PutUint16(msg[6:], seq)
		binary.BigEndian.PutUint16(msg[2:], checksum(msg))
		if _, err := c.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(ip)}); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				break // try again with the next sequence number
			}
			// ip4:icmp sockets return the ICMP message without the IP header.
			if n >= 8 && buf[0] == 0 && from.String() == ip &&
				binary.BigEndian.Uint16(buf[4:]) == id && binary.BigEndian.Uint16(buf[6:]) == seq {
				return nil
			}
		}
	}
	return fmt.Errorf("no echo reply from %s within %v", ip, timeout)
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// startEcho runs the echo helper inside h, listening on addr, and waits for
// it to listen.
func startEcho(t *testing.T, h *Host, addr string) *exec.Cmd {
	t.Helper()
	cmd := h.Command(context.Background(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NETNS_TEST_HELPER=echo:"+addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "listening\n" {
		t.Fatalf("echo helper in %s: %q, %v", h.Name(), line, err)
	}
	return cmd
}

// roundTrip dials addr from h, sends a line and returns the answer.
func roundTrip(h *Host, addr, msg string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := h.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func TestAvailable(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("netns unavailable: %v", err)
	}
}

// TestPingAndTCP: two hosts reach each other over the switch by ICMP and
// TCP; a server started with Command in one namespace is reached by
// DialContext from the other, and sees the other's address; loopbacks are
// separate.
func TestPingAndTCP(t *testing.T) {
	n := New(t, t.Name(), "a", "b")
	a, b := n.Host("a"), n.Host("b")
	if a.IP() == b.IP() || !strings.HasPrefix(a.IP(), "10.77.") {
		t.Fatalf("addresses %s, %s", a.IP(), b.IP())
	}
	for _, p := range [][2]*Host{{a, b}, {b, a}} {
		if err := ping(p[0], p[1].IP(), 3*time.Second); err != nil {
			t.Fatalf("ping %s -> %s: %v", p[0].Name(), p[1].Name(), err)
		}
	}

	startEcho(t, b, b.Addr(7000))
	got, err := roundTrip(a, b.Addr(7000), "hello", 5*time.Second)
	if err != nil || got != a.IP()+" hello" {
		t.Fatalf("a -> b: %q, %v; want %q", got, err, a.IP()+" hello")
	}
	// b's own loopback server is not on a's loopback.
	startEcho(t, b, "127.0.0.1:7001")
	if got, err := roundTrip(b, "127.0.0.1:7001", "lo", 5*time.Second); err != nil || got != "127.0.0.1 lo" {
		t.Fatalf("b -> b loopback: %q, %v", got, err)
	}
	if _, err := roundTrip(a, "127.0.0.1:7001", "lo", time.Second); err == nil {
		t.Fatal("a reached b's loopback")
	}

	// A listener made by the test process inside a, dialed from b.
	l, err := a.Listen("tcp", a.Addr(0))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	got, err = roundTrip(b, l.Addr().String(), "", 5*time.Second)
	if err != nil || !strings.HasPrefix(got, b.IP()+":") {
		t.Fatalf("b -> a's in-process listener: %q, %v", got, err)
	}
}

// TestPartition: Partition cuts one pair silently, Heal restores it;
// Disconnect isolates a host.
func TestPartition(t *testing.T) {
	n := New(t, t.Name(), "a", "b", "c")
	a, b, c := n.Host("a"), n.Host("b"), n.Host("c")
	startEcho(t, b, b.Addr(7000))
	addr := b.Addr(7000)
	// A dial expected to succeed gets seconds (a fresh network on a
	// loaded machine took over 500 ms once in CI); one expected to be
	// lost silently is given up after half a second.
	reach := func(h *Host) error {
		_, err := roundTrip(h, addr, "x", 5*time.Second)
		return err
	}
	blocked := func(h *Host) error {
		_, err := roundTrip(h, addr, "x", 500*time.Millisecond)
		return err
	}
	for _, h := range []*Host{a, c} {
		if err := reach(h); err != nil {
			t.Fatalf("%s -> b before partition: %v", h.Name(), err)
		}
	}
	n.Partition("a", "b")
	t0 := time.Now()
	err := blocked(a)
	if err == nil {
		t.Fatal("a reached b across a partition")
	}
	if !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) {
		t.Fatalf("partitioned dial failed fast (%v), want silent loss and a timeout", err)
	}
	t.Logf("a -> b while partitioned: %v after %v", err, time.Since(t0).Round(time.Millisecond))
	if err := reach(c); err != nil {
		t.Fatalf("c -> b during a|b partition: %v", err)
	}
	n.Partition("a", "b") // idempotent
	n.Heal("a", "b")
	if err := reach(a); err != nil {
		t.Fatalf("a -> b after heal: %v", err)
	}

	n.Disconnect("b")
	if err := blocked(c); err == nil {
		t.Fatal("c reached a disconnected b")
	}
	if err := ping(a, b.IP(), 300*time.Millisecond); err == nil {
		t.Fatal("ping reached a disconnected b")
	}
	n.Reconnect("b")
	if err := reach(c); err != nil {
		t.Fatalf("c -> b after reconnect: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestParallelNets: networks of one process are independent.
func TestParallelNets(t *testing.T) {
	for i := 0; i < 3; i++ {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			n := New(t, t.Name(), "x", "y")
			if err := ping(n.Host("x"), n.Host("y").IP(), 3*time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// namespaces lists the namespaces this package made for process pid.
func namespaces(t *testing.T, pid int) []string {
	t.Helper()
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), fmt.Sprintf("%s%d-", Prefix, pid)) {
			out = append(out, e.Name())
		}
	}
	return out
}

func rootLinks(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	// Counters and flags of real interfaces may change; names may not.
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

// TestCleanup: after a test that used a network ends, its namespaces are
// gone, a process it left running inside is killed, and the machine's own
// links are as before.
func TestCleanup(t *testing.T) {
	if err := Available(); err != nil {
		t.Skip(err)
	}
	links := rootLinks(t)
	var sleeper *exec.Cmd
	var name string
	t.Run("use", func(t *testing.T) {
		n := New(t, "cleanup", "a", "b")
		name = n.Name()
		if got := len(namespaces(t, os.Getpid())); got < 3 {
			t.Fatalf("%d namespaces, want at least 3", got)
		}
		sleeper = n.Host("a").Command(context.Background(), "sleep", "60")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
	})
	werr := make(chan error, 1)
	go func() { werr <- sleeper.Wait() }()
	select {
	case err := <-werr:
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Errorf("process left in the namespace: %v, want killed", err)
		}
	case <-time.After(10 * time.Second):
		sleeper.Process.Kill()
		t.Fatal("process left in the namespace still runs after cleanup")
	}
	for _, ns := range namespaces(t, os.Getpid()) {
		if strings.HasPrefix(ns, name) {
			t.Errorf("namespace %s left behind", ns)
		}
	}
	if got := rootLinks(t); got != links {
		t.Errorf("root namespace links changed:\nbefore %s\nafter  %s", links, got)
	}
}

// TestHelperFailing and TestHelperDie run only in a child process: one
// fails after building a network, the other exits without cleanup.
func TestHelperFailing(t *testing.T) {
	if os.Getenv("NETNS_TEST_HELPER") != "child" {
		t.Skip("run by TestCleanupAfterFailure")
	}
	New(t, "failing", "a")
	t.Fatal("deliberate failure")
}

func TestHelperDie(t *testing.T) {
	if os.Getenv("NETNS_TEST_HELPER") != "child" {
		t.Skip("run by TestStaleRemoved")
	}
	New(t, "dying", "a", "b")
	os.Exit(3) // no cleanup
}

func runChild(t *testing.T, test string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.v")
	cmd.Env = append(os.Environ(), "NETNS_TEST_HELPER=child")
	out, _ := cmd.CombinedOutput()
	return cmd, string(out)
}

// TestCleanupAfterFailure: a failing test still deletes its network.
func TestCleanupAfterFailure(t *testing.T) {
	if err := Available(); err != nil {
		t.Skip(err)
	}
	cmd, out := runChild(t, "TestHelperFailing")
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(out, "deliberate failure") {
		t.Fatalf("child: %v\n%s", cmd.ProcessState, out)
	}
	if left := namespaces(t, cmd.Process.Pid); len(left) > 0 {
		t.Fatalf("failed test left %v\n%s", left, out)
	}
}

// TestStaleRemoved: namespaces of a test process that died without cleanup
// are removed by the next New.
func TestStaleRemoved(t *testing.T) {
	if err := Available(); err != nil {
		t.Skip(err)
	}
	cmd, out := runChild(t, "TestHelperDie")
	pid := cmd.Process.Pid
	if cmd.ProcessState.ExitCode() != 3 {
		t.Fatalf("child: %v\n%s", cmd.ProcessState, out)
	}
	left := namespaces(t, pid)
	switch {
	case len(left) == 0:
		// Another test process's New (go test runs packages in
		// parallel) may have been first.
		t.Skip("the stale namespaces were already removed by another process")
	case len(left) > 3:
		t.Fatalf("dead child left %v, want 3 namespaces", left)
	}
	New(t, "after-stale", "a")
	for _, ns := range left {
		if _, err := os.Stat(filepath.Join(netnsDir, ns)); err == nil {
			t.Errorf("stale %s not removed", ns)
		}
	}
}

// TestDoConcurrent: many goroutines switching namespaces at once each get
// their own host's view, and the test process's threads stay in the root
// namespace.
func TestDoConcurrent(t *testing.T) {
	n := New(t, t.Name(), "a", "b")
	rootNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 64; i++ {
		h := n.Hosts()[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := h.Do(func() error {
				ifs, err := net.InterfaceAddrs()
				if err != nil {
					return err
				}
				for _, a := range ifs {
					if strings.HasPrefix(a.String(), h.IP()+"/") {
						return nil
					}
				}
				return fmt.Errorf("%s sees addresses %v", h.Name(), ifs)
			})
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Threads that ran Do are back in the root namespace: new threads and
	// this one see the same namespace as before.
	for i := 0; i < 100; i++ {
		if ns, _ := os.Readlink("/proc/thread-self/ns/net"); ns != rootNS {
			t.Fatalf("thread in %s, want root %s", ns, rootNS)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestServiceIP: a service address moves from one host to another and
// clients reach the new owner right away.
func TestServiceIP(t *testing.T) {
	n := New(t, t.Name(), "a", "b", "c")
	vip := n.ServiceIP(0)
	serve := func(h *Host) net.Listener {
		l, err := h.Listen("tcp", net.JoinHostPort(vip, "7000"))
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s\n", h.Name())
				c.Close()
			}
		}()
		return l
	}
	a, b, c := n.Host("a"), n.Host("b"), n.Host("c")
	a.AddIP(vip)
	la := serve(a)
	defer la.Close()
	if got, err := roundTrip(c, net.JoinHostPort(vip, "7000"), "", 2*time.Second); err != nil || got != "a" {
		t.Fatalf("before takeover: %q, %v", got, err)
	}
	a.DelIP(vip)
	b.AddIP(vip)
	lb := serve(b)
	defer lb.Close()
	if got, err := roundTrip(c, net.JoinHostPort(vip, "7000"), "", 2*time.Second); err != nil || got != "b" {
		t.Fatalf("after takeover: %q, %v", got, err)
	}
}
