// Package netns gives end-to-end tests several "hosts" on one machine: each
// host is a Linux network namespace with its own loopback and one Ethernet
// interface plugged into a bridge that lives in a namespace of its own (the
// "switch"). Nothing is created in the machine's own namespace, so a test
// network never touches the real one, and two networks never see each other.
//
//	n := netns.New(t, "failover", "primary", "backup", "client")
//	srv := n.Host("primary").Command(ctx, ftvm, "run", "--listen", n.Host("primary").Addr(7000), ...)
//	conn, err := n.Host("client").DialContext(ctx, "tcp", n.Host("primary").Addr(7000))
//	n.Partition("primary", "backup")
//
// Everything is built with the ip command of iproute2 and needs root; New
// skips the test (with the reason Available gives) where that is not at hand.
// Namespaces are named ftvmnet-PID-N-NAME[.HOST], deleted in t.Cleanup (after
// killing any process still inside them), and namespaces of that prefix left
// behind by dead test processes are deleted by the next New.
package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace this package creates.
const Prefix = "ftvmnet-"

// netnsDir is where ip netns keeps its named namespaces.
const netnsDir = "/run/netns"

var (
	counter   atomic.Int64
	available struct {
		once sync.Once
		err  error
	}
)

// Available reports why network namespaces cannot be used here, or nil when
// they can. It checks for root and the ip command and then actually creates
// (and deletes) a namespace with a bridge and a veth pair, so a container
// without the needed capabilities or kernel support answers with the real
// error. The answer is computed once per process.
func Available() error {
	available.once.Do(func() { available.err = probe() })
	return available.err
}

func probe() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("network namespaces need Linux, not %s", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("network namespaces need root (euid %d)", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("the ip command (iproute2) is not installed: %v", err)
	}
	ns := fmt.Sprintf("%s%d-probe", Prefix, os.Getpid())
	defer exec.Command("ip", "netns", "del", ns).Run()
	for _, args := range [][]string{
		{"netns", "add", ns},
		{"-n", ns, "link", "add", "br0", "type", "bridge"},
		{"-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"},
	} {
		if err := ip(args...); err != nil {
			return fmt.Errorf("cannot build a test network: %v", err)
		}
	}
	return nil
}

// ip runs the ip command and returns its error output as the error.
func ip(args ...string) error {
	var stderr bytes.Buffer
	cmd := exec.Command("ip", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// Net is one test network: a switch and the hosts plugged into it.
type Net struct {
	t      testing.TB
	name   string // the switch namespace; hosts are name.HOST
	subnet string // "10.77.X."
	hosts  []*Host
	byName map[string]*Host

	mu         sync.Mutex
	closed     bool
	partitions map[[2]string]bool
}

// Host is one namespace of a Net.
type Host struct {
	net  *Net
	name string
	ns   string
	ip   string
	port string // its veth end in the switch namespace
}

// New builds a network with one host per name (letters, digits, '_' and
// '-'), addresses 10.77.X.1, .2, ... in the order given. It skips the test
// when Available says namespaces cannot be used, and fails it when building
// the network fails. Everything is removed in t.Cleanup, whether the test
// passed or not, or earlier by Close.
//
// The subnet's third byte X differs between networks of one process and
// between processes, which keeps logs readable; it does not need to be
// unique, since every network is isolated in its own namespaces.
func New(t testing.TB, name string, hosts ...string) *Net {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("netns: %v", err)
	}
	if len(hosts) == 0 || len(hosts) > 250 {
		t.Fatalf("netns.New: %d hosts, want 1 to 250", len(hosts))
	}
	removeStale(t)
	seq := counter.Add(1)
	n := &Net{
		t:          t,
		name:       fmt.Sprintf("%s%d-%d-%s", Prefix, os.Getpid(), seq, sanitize(name)),
		subnet:     fmt.Sprintf("10.77.%d.", (os.Getpid()*7+int(seq))%250+1),
		byName:     map[string]*Host{},
		partitions: map[[2]string]bool{},
	}
	for i, h := range hosts {
		if h == "" || sanitize(h) != h {
			t.Fatalf("netns.New: host name %q: use letters, digits, '_' and '-'", h)
		}
		if n.byName[h] != nil {
			t.Fatalf("netns.New: host %q given twice", h)
		}
		host := &Host{net: n, name: h, ns: n.name + "." + h, ip: n.subnet + strconv.Itoa(i+1),
			port: fmt.Sprintf("p%d", i)}
		n.hosts = append(n.hosts, host)
		n.byName[h] = host
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("netns cleanup: %v", err)
		}
	})
	if err := n.build(); err != nil {
		t.Fatalf("netns.New(%q): %v", name, err)
	}
	return n
}

// sanitize keeps a name usable in a namespace name and short.
func sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= 40 {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

func (n *Net) build() error {
	sw := n.name
	cmds := [][]string{
		{"netns", "add", sw},
		{"-n", sw, "link", "set", "lo", "up"},
		// STP is off by default, so ports forward as soon as they are up.
		{"-n", sw, "link", "add", "br0", "type", "bridge"},
		{"-n", sw, "link", "set", "br0", "up"},
	}
	for _, h := range n.hosts {
		cmds = append(cmds,
			[]string{"netns", "add", h.ns},
			[]string{"-n", h.ns, "link", "set", "lo", "up"},
			// Interface names are per namespace: every host has an eth0.
			[]string{"-n", sw, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns},
			[]string{"-n", sw, "link", "set", h.port, "master", "br0", "up"},
			[]string{"-n", h.ns, "addr", "add", h.ip + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"},
			// Partition drops packets with policy rules, which must come
			// before the rule that delivers to local addresses: move that
			// one from preference 0 to 100.
			[]string{"-n", h.ns, "rule", "add", "pref", "100", "lookup", "local"},
			[]string{"-n", h.ns, "rule", "del", "pref", "0"},
		)
	}
	for _, c := range cmds {
		if err := ip(c...); err != nil {
			return err
		}
	}
	return nil
}

// Name is the switch namespace's name, the prefix of every host's.
func (n *Net) Name() string { return n.name }

// Host returns the named host; it fails the test for an unknown name.
func (n *Net) Host(name string) *Host {
	h := n.byName[name]
	if h == nil {
		n.t.Fatalf("netns: no host %q in %s", name, n.name)
	}
	return h
}

// Hosts returns the hosts in the order New got them.
func (n *Net) Hosts() []*Host { return append([]*Host(nil), n.hosts...) }

// Partition cuts the link between hosts a and b in both directions, as a
// network fault would: packets are dropped silently on arrival (by a
// blackhole policy rule on each side), so connections hang and connects time
// out rather than fail fast. Other pairs are unaffected.
func (n *Net) Partition(a, b string) {
	n.t.Helper()
	ha, hb := n.Host(a), n.Host(b)
	n.mu.Lock()
	defer n.mu.Unlock()
	key := pairKey(a, b)
	if n.partitions[key] {
		return
	}
	for _, c := range [][]string{
		{"-n", ha.ns, "rule", "add", "pref", "10", "from", hb.ip, "iif", "eth0", "blackhole"},
		{"-n", hb.ns, "rule", "add", "pref", "10", "from", ha.ip, "iif", "eth0", "blackhole"},
	} {
		if err := ip(c...); err != nil {
			n.t.Fatalf("netns.Partition(%s, %s): %v", a, b, err)
		}
	}
	n.partitions[key] = true
}

// Heal undoes Partition(a, b).
func (n *Net) Heal(a, b string) {
	n.t.Helper()
	ha, hb := n.Host(a), n.Host(b)
	n.mu.Lock()
	defer n.mu.Unlock()
	key := pairKey(a, b)
	if !n.partitions[key] {
		return
	}
	for _, c := range [][]string{
		{"-n", ha.ns, "rule", "del", "pref", "10", "from", hb.ip, "iif", "eth0", "blackhole"},
		{"-n", hb.ns, "rule", "del", "pref", "10", "from", ha.ip, "iif", "eth0", "blackhole"},
	} {
		if err := ip(c...); err != nil {
			n.t.Fatalf("netns.Heal(%s, %s): %v", a, b, err)
		}
	}
	delete(n.partitions, key)
}

func pairKey(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

// Disconnect unplugs a host from the switch (its switch port goes down):
// it can reach no other host and none can reach it; packets are lost
// silently. Its own loopback keeps working.
func (n *Net) Disconnect(host string) {
	n.t.Helper()
	h := n.Host(host)
	if err := ip("-n", n.name, "link", "set", h.port, "down"); err != nil {
		n.t.Fatalf("netns.Disconnect(%s): %v", host, err)
	}
}

// Reconnect plugs a host back in after Disconnect.
func (n *Net) Reconnect(host string) {
	n.t.Helper()
	h := n.Host(host)
	if err := ip("-n", n.name, "link", "set", h.port, "up"); err != nil {
		n.t.Fatalf("netns.Reconnect(%s): %v", host, err)
	}
}

// ServiceIP returns an address of the network's subnet that no host has
// (10.77.X.200+k, k from 0 to 49), for a service address that moves between
// hosts with AddIP and DelIP.
func (n *Net) ServiceIP(k int) string {
	if k < 0 || k >= 50 {
		n.t.Fatalf("netns.ServiceIP(%d): k must be in [0, 50)", k)
	}
	return n.subnet + strconv.Itoa(200+k)
}

// AddIP gives the host one more address of the subnet (see ServiceIP), as
// an IP takeover would, and makes the other hosts forget the address's old
// link-layer address so their next packet finds its new owner at once (in
// place of the gratuitous ARP a real takeover sends).
func (h *Host) AddIP(addr string) {
	n := h.net
	n.t.Helper()
	if err := ip("-n", h.ns, "addr", "add", addr+"/24", "dev", "eth0"); err != nil {
		n.t.Fatalf("netns: %s.AddIP(%s): %v", h.name, addr, err)
	}
	for _, o := range n.hosts {
		if o != h {
			// Fails harmlessly when there is no entry.
			exec.Command("ip", "-n", o.ns, "neigh", "flush", "to", addr).Run()
		}
	}
}

// DelIP removes an address AddIP gave. Sockets bound to it stay open but
// are unreachable.
func (h *Host) DelIP(addr string) {
	h.net.t.Helper()
	if err := ip("-n", h.ns, "addr", "del", addr+"/24", "dev", "eth0"); err != nil {
		h.net.t.Fatalf("netns: %s.DelIP(%s): %v", h.name, addr, err)
	}
}

// Close kills every process still running in the network's namespaces and
// deletes them. It is called by t.Cleanup; calling it earlier is fine, and
// later calls do nothing.
func (n *Net) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	n.mu.Unlock()
	var errs []error
	names := []string{}
	for _, h := range n.hosts {
		names = append(names, h.ns)
	}
	names = append(names, n.name)
	for _, ns := range names {
		if _, err := os.Stat(netnsDir + "/" + ns); err != nil {
			continue // never created: build failed before it
		}
		if pids := killAll(ns); len(pids) > 0 {
			n.t.Logf("netns: killed processes left in %s: %v", ns, pids)
		}
		if err := ip("netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killAll kills with SIGKILL the processes in namespace ns (they were
// started by the test that owns it) and waits up to 5 s for them to go.
// That includes processes started with Host.Command that are still the ip
// command, before it has entered the namespace: it holds the namespace
// open and would run its program there after the name is gone.
func killAll(ns string) []int {
	var st unix.Stat_t
	if err := unix.Stat(netnsDir+"/"+ns, &st); err != nil {
		return nil
	}
	var killed []int
	empty := 0
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		pids := inNamespace(ns, st.Dev, st.Ino)
		if len(pids) == 0 {
			// Twice in a row, 10 ms apart: a process seen by neither
			// test for the instant of a scan (one sleep outlived a
			// cleanup that stopped at its first empty scan, once in
			// many runs; a process mid-exec is the likely moment) is
			// seen by the next.
			if empty++; empty == 2 {
				break
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		empty = 0
		for _, pid := range pids {
			if !slices.Contains(killed, pid) {
				killed = append(killed, pid)
			}
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return killed
}

// inNamespace lists the processes in the namespace (dev, ino) or about to
// enter the one named ns: their command line is "ip netns exec NS ...".
// The command line is read first: ip enters the namespace before it execs
// the program, so a process is caught in one state or the other.
func inNamespace(ns string, dev, ino uint64) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) >= 4 && filepath.Base(args[0]) == "ip" && args[1] == "netns" && args[2] == "exec" && args[3] == ns {
			pids = append(pids, pid)
			continue
		}
		var st unix.Stat_t
		if unix.Stat("/proc/"+e.Name()+"/ns/net", &st) == nil && st.Dev == dev && st.Ino == ino {
			pids = append(pids, pid)
		}
	}
	return pids
}

// removeStale deletes namespaces of this package whose process is gone (a
// test binary killed before its cleanup ran). Their processes, if any, are
// left alone; deleting the name is enough for the namespace to vanish with
// its last process.
func removeStale(t testing.TB) {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, Prefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(name, Prefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := unix.Kill(pid, 0); !errors.Is(err, unix.ESRCH) {
			continue // alive (or not ours to judge)
		}
		if err := ip("netns", "del", name); err != nil {
			t.Logf("netns: removing stale %s: %v", name, err)
		} else {
			t.Logf("netns: removed stale namespace %s (process %d is gone)", name, pid)
		}
	}
}

// Name is the host's name as given to New.
func (h *Host) Name() string { return h.name }

// NS is the host's namespace name, for ip netns exec and ip -n.
func (h *Host) NS() string { return h.ns }

// IP is the host's IPv4 address, without a prefix length.
func (h *Host) IP() string { return h.ip }

// Addr is "IP:port" for this host.
func (h *Host) Addr(port int) string { return net.JoinHostPort(h.ip, strconv.Itoa(port)) }

// Command is exec.CommandContext for a program that runs inside the host's
// namespace (via ip netns exec, which execs the program: cmd.Process is the
// program itself, so killing it kills the program).
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
}

// Do runs fn on an OS thread switched into the host's namespace. Sockets
// fn creates belong to that namespace for their whole life, whatever thread
// uses them later; fn must create them itself, not hand the work to other
// goroutines (which run in the test process's namespace).
func (h *Host) Do(fn func() error) error {
	target, err := unix.Open(netnsDir+"/"+h.ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("netns %s: %w", h.ns, err)
	}
	defer unix.Close(target)
	done := make(chan error, 1)
	go func() {
		// A fresh goroutine locks a thread; if the thread cannot be moved
		// back, the goroutine exits locked and Go discards the thread.
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns %s: %w", h.ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			done <- errors.Join(ferr, fmt.Errorf("setns back: %w", err))
			return
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}

// DialContext is net.Dialer.DialContext from inside the host's namespace:
// the connection's source is this host. Give addresses as IP literals
// (name resolution would run outside the namespace). Its signature fits
// http.Transport.DialContext and the like.
func (h *Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen is net.Listen inside the host's namespace.
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket is net.ListenPacket inside the host's namespace.
func (h *Host) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := h.Do(func() error {
		var err error
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}
