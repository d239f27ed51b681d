package remus

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftvm/ftvm/internal/sysmon"
	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/remus/engine"
	"github.com/ftvm/ftvm/remus/store"
	"github.com/ftvm/ftvm/remus/wire"
	"github.com/ftvm/ftvm/snapshot"
	"github.com/ftvm/ftvm/transport"
	"github.com/ftvm/ftvm/wasi"
)

// BackupConfig configures a backup process.
type BackupConfig struct {
	// Listen is the replication address primaries connect to.
	Listen string
	// TLS, if set, is the server side of mutual TLS.
	TLS *tls.Config
	// StateDir holds one slot per protected VM: its last committed
	// checkpoint on disk and the replica of its directories.
	StateDir string
	Engine   engine.Config
	// Rebind maps guest listener fds to the addresses a failed-over guest
	// binds; by default it binds the primary's own addresses.
	Rebind []wasi.Listener
	// Stdout and Stderr of failed-over guests (the process's own by default).
	Stdout, Stderr io.Writer
	// CacheDir and InstrumentCacheDir as in machine.Config.
	CacheDir, InstrumentCacheDir string
	Log                          *slog.Logger
	// OnFailover is called with each VM a failover started, e.g. to serve
	// its API. The backup runs it until ctx ends or the guest exits.
	OnFailover func(vm string, m *machine.Machine)
	// MaxSlots bounds the VMs one backup protects (0: DefaultMaxSlots).
	// Each slot reserves address space for a memory image, keeps a state
	// directory and runs goroutines: a peer naming a new VM id in every
	// Hello must not make them without end.
	MaxSlots int
}

// DefaultMaxSlots is MaxSlots unless set.
const DefaultMaxSlots = 64

// Backup is a passive backup: it keeps the last committed checkpoint of
// each primary that protects itself with it, and runs none of them until
// their primary falls silent.
type Backup struct {
	cfg  BackupConfig
	ln   net.Listener
	lock io.Closer // the state directory's (lockStateDir), until Serve returns
	log  *slog.Logger
	t0   time.Time
	ctx  context.Context

	mu    sync.Mutex
	slots map[string]*slot
	wg    sync.WaitGroup
}

// ListenBackup binds the replication address.
func ListenBackup(cfg BackupConfig) (*Backup, error) {
	cfg.Engine = cfg.Engine.WithDefaults()
	if err := cfg.Engine.Validate(); err != nil {
		return nil, err
	}
	if cfg.StateDir == "" {
		return nil, errors.New("a backup needs a state directory")
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "slots"), 0o755); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Stdout == nil {
		cfg.Stdout = os.Stdout
	}
	if cfg.Stderr == nil {
		cfg.Stderr = os.Stderr
	}
	ln, err := transport.Listen(cfg.Listen, cfg.TLS)
	if err != nil {
		lock.Close()
		return nil, err
	}
	return &Backup{cfg: cfg, ln: ln, lock: lock, log: cfg.Log.With("role", "backup"), t0: time.Now(), slots: map[string]*slot{}}, nil
}

// lockStateDir takes dir's lock (the store's lock on dir/LOCK) for one
// backup process: a second backup on the same state would start, listen,
// and show its misconfiguration only once a primary of a VM the first
// holds came to it (each slot has its own lock).
func lockStateDir(dir string) (io.Closer, error) {
	lock, err := store.OS().Lock(filepath.Join(dir, "LOCK"))
	switch {
	case errors.Is(err, store.ErrLocked):
		return nil, fmt.Errorf("state directory %s is in use by another backup process", dir)
	case err != nil:
		return nil, fmt.Errorf("state directory: %w", err)
	}
	return lock, nil
}

// Addr is the replication address actually bound.
func (b *Backup) Addr() net.Addr { return b.ln.Addr() }

func (b *Backup) now() engine.Time { return time.Since(b.t0) }

// Serve accepts primaries until ctx ends, then waits for failed-over VMs
// (which end with ctx too).
func (b *Backup) Serve(ctx context.Context) error {
	b.ctx = ctx
	go warmDeviceJSON() // for the first checkpoint's check, and failover
	go func() {
		<-ctx.Done()
		b.ln.Close()
	}()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			b.log.Warn("accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go b.handshake(ctx, transport.NewConn(c, transport.Options{}))
	}
	b.wg.Wait()
	b.mu.Lock()
	for _, s := range b.slots {
		s.close()
	}
	b.mu.Unlock()
	b.lock.Close()
	return nil
}

// validVM keeps slot directory names harmless: the VM id comes from the
// network.
func validVM(vm string) bool {
	if vm == "" || len(vm) > 64 {
		return false
	}
	for _, c := range vm {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func (b *Backup) handshake(ctx context.Context, c *transport.Conn) {
	c.SetDeadline(time.Now().Add(b.cfg.Engine.Timeout))
	msg, err := wire.Recv(c)
	if err != nil {
		b.log.Debug("handshake", "from", c.RemoteAddr(), "err", err)
		c.Close()
		return
	}
	hello, ok := msg.(*wire.Hello)
	reject := func(why string) {
		wire.SendFlush(c, &wire.Reject{Reason: why})
		c.Close()
	}
	switch {
	case !ok:
		reject(fmt.Sprintf("expected hello, got %s", msg.Type()))
		return
	case hello.Version != wire.Version:
		reject(fmt.Sprintf("protocol version %d; this backup speaks %d", hello.Version, wire.Version))
		return
	case !validVM(hello.VM):
		reject(fmt.Sprintf("invalid VM id %q", hello.VM))
		return
	}
	c.SetDeadline(time.Time{})
	s, err := b.slot(ctx, hello.VM, len(hello.Preopens))
	if err != nil {
		reject(err.Error())
		return
	}
	if why := s.refusal(hello.Module); why != "" {
		b.mu.Lock()
		s.attaching--
		b.mu.Unlock()
		reject(why)
		return
	}
	s.attach(c, hello)
}

// rootsMismatch refuses a primary of vm with want preopened directories
// where its slot has have: the slot's store keeps a replica of each, and
// their number is the slot's for good.
func rootsMismatch(vm string, have, want int) error {
	return fmt.Errorf("VM %s is protected here with %d preopened directories, this primary has %d "+
		"(give it another --vm-id, or start the backup on a fresh --state)", vm, have, want)
}

// testStoreFS, if set, is where slots keep their journals: tests make
// the disk fail (atomic, as testApplyDelay).
var testStoreFS atomic.Pointer[store.FS]

// storeOptions are a slot's store's: its encoding goroutines at the
// persister's priority, unless a failover hurried it (hurried).
func storeOptions(roots int, hurried *atomic.Bool) store.Options {
	return store.Options{Roots: roots, FS: storeFS(), EncodeWorkerInit: func() {
		if !hurried.Load() {
			niceThread(persistNice)
		}
	}}
}

// storeFS is testStoreFS's file system, nil (the real one) if unset.
func storeFS() store.FS {
	if f := testStoreFS.Load(); f != nil {
		return *f
	}
	return nil
}

// slot returns the slot of vm, creating it.
func (b *Backup) slot(ctx context.Context, vm string, roots int) (*slot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s, ok := b.slots[vm]; ok {
		if s.roots != roots {
			return nil, rootsMismatch(vm, s.roots, roots)
		}
		s.attaching++
		return s, nil
	}
	if limit := cmp.Or(b.cfg.MaxSlots, DefaultMaxSlots); len(b.slots) >= limit {
		return nil, fmt.Errorf("this backup protects %d VMs already, its limit (--max-slots %d)", len(b.slots), limit)
	}
	eng, err := engine.NewBackup(b.cfg.Engine, vm, b.now())
	if err != nil {
		return nil, err
	}
	hurried := new(atomic.Bool)
	st, err := store.Open(filepath.Join(b.cfg.StateDir, "slots", vm), storeOptions(roots, hurried))
	if err != nil {
		return nil, fmt.Errorf("slot state: %w", err)
	}
	if have := st.Roots(); have != roots {
		// A slot with a checkpoint and 0 asked for: the store took the
		// committed value.
		st.Close()
		return nil, rootsMismatch(vm, have, roots)
	}
	mi, err := machine.NewMemoryImage(0)
	if err != nil {
		st.Close()
		return nil, err
	}
	s := &slot{b: b, vm: vm, eng: eng, store: st, mi: mi, hurried: hurried, roots: roots, dir: filepath.Join(b.cfg.StateDir, "slots", vm), events: make(chan any, 64),
		conns: map[uint64]*transport.Conn{}, hellos: map[uint64]*wire.Hello{}, staged: map[engine.Staged]*staged{}, heard: map[uint64][]engine.Time{},
		persistQ: newPersistQueue(), log: b.log.With("vm", vm)}
	s.img = &snapshot.Image{Resize: mi.Resize}
	s.attaching = 1
	b.slots[vm] = s
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		s.loop(ctx)
	}()
	go s.persister()
	return s, nil
}

// Status is what `ftvm status` shows of a backup: one entry per slot.
func (b *Backup) Status() BackupStatus {
	b.mu.Lock()
	slots := make([]*slot, 0, len(b.slots))
	for _, s := range b.slots {
		slots = append(slots, s)
	}
	b.mu.Unlock()
	st := BackupStatus{Role: "backup", Listen: b.ln.Addr().String(), RuntimeMonitor: sysmon.Read()}
	for _, s := range slots {
		s.mu.Lock()
		st.Slots = append(st.Slots, s.status)
		s.mu.Unlock()
	}
	sort.Slice(st.Slots, func(i, j int) bool { return st.Slots[i].VM < st.Slots[j].VM })
	return st
}

// Machines returns the VMs running after failovers.
func (b *Backup) Machines() map[string]*machine.Machine {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]*machine.Machine{}
	for vm, s := range b.slots {
		s.mu.Lock()
		if s.vmRun != nil {
			out[vm] = s.vmRun
		}
		s.mu.Unlock()
	}
	return out
}

// BackupStatus describes a backup process.
type BackupStatus struct {
	Role   string       `json:"role"`
	Listen string       `json:"listen"`
	Slots  []SlotStatus `json:"slots"`
	// RuntimeMonitor: whether this process's Go runtime monitor sleeps
	// longer (package internal/sysmon).
	RuntimeMonitor sysmon.Status `json:"runtime_monitor"`
}

// SlotStatus describes one protected VM on a backup.
type SlotStatus struct {
	VM            string  `json:"vm"`
	State         string  `json:"state"`
	Primary       string  `json:"primary,omitempty"`
	Term          uint64  `json:"term"`
	Session       uint64  `json:"session"`
	Committed     uint64  `json:"committed"`
	Persisted     uint64  `json:"persisted"`
	Checkpoints   uint64  `json:"checkpoints"`
	BytesReceived uint64  `json:"bytes_received"`
	LastApplyUS   float64 `json:"last_apply_us"`
	LastHeardMS   float64 `json:"primary_last_heard_ms"`
	ProgramReady  bool    `json:"program_ready"`
	// ProgramError is why the module could not be prepared for failover
	// (the slot refuses its primaries meanwhile: refusal).
	ProgramError string  `json:"program_error,omitempty"`
	FailoverMS   float64 `json:"failover_ms,omitempty"`
	// FailoverError is why the failover could not resume the VM: the
	// engine has failed over, so nothing runs it, and the last committed
	// state stays in the slot's directory for a restore by hand.
	FailoverError string `json:"failover_error,omitempty"`
	// RestoreCommand, after a failed failover, resumes the VM by hand.
	RestoreCommand string `json:"restore_command,omitempty"`
	Reason         string `json:"reason,omitempty"`
	// StoodStill counts the times the slot's loop stood still for most
	// of the timeout (engine StoodStill) while it protected.
	StoodStill uint64 `json:"stood_still"`
	// DiskBehind: storing a checkpoint failed, and no full one was stored
	// since. The slot acknowledges nothing meanwhile (its failover would
	// be refused), so its primary holds its output, then, once a full
	// checkpoint fails too, runs unprotected. DiskError says why.
	DiskBehind bool   `json:"disk_behind"`
	DiskError  string `json:"disk_error,omitempty"`
}

// slot is the backup side of one protected VM. Its loop goroutine owns
// the engine, the staged checkpoints and the image.
type slot struct {
	b      *Backup
	vm     string
	dir    string // the slot's state directory
	roots  int    // the guest's preopened directories
	eng    *engine.Backup
	store  *store.Slot
	mi     *machine.MemoryImage
	img    *snapshot.Image
	events chan any
	log    *slog.Logger

	exiting *exitEv     // loop only: an Exit heard, to finish once the Ready before it is done
	exitJob *persistJob // loop only: a finished exit's disk job, queued after its ack (queueExit)
	exitOps []wire.FsOp // loop only: the disk ops of the Exit being stepped (finishExit)
	// exitPush, if not nil, is closed once an exit's job is in the
	// persister's queue, behind the copies before it (queueExit).
	exitPush chan struct{}
	conns    map[uint64]*transport.Conn // loop only
	hellos   map[uint64]*wire.Hello
	staged   map[engine.Staged]*staged // by session and number
	hello    *wire.Hello               // of the session that committed last
	// applying are the commits whose copies into img may be pending, in
	// order, each done closed when its copy is done (loop only).
	applying []applyingCopy
	// pages recycles the memory of small checkpoints' pages.
	pages pagePool
	// heard maps a session to when its receiver read messages since the
	// loop last looked (heardLog, heardSince).
	heardMu  sync.Mutex
	heard    map[uint64][]engine.Time
	persistQ *persistQueue
	// mergeBuf is the persister's, for the merged checkpoints it encodes
	// (mergeIncrementals).
	mergeBuf bytes.Buffer

	mu       sync.Mutex
	nextSess uint64
	status   SlotStatus
	prog     *machine.Program
	progHash snapshot.Hash
	progErr  error
	progDone chan struct{}
	progTid  int       // the thread preparing it, while it does (0: none)
	progFail time.Time // when preparing progHash last failed (refusal)
	// persistTid is the persister's thread, at nice persistNice (0: not
	// lowered); a failover, which waits for its commit, raises it again
	// (where the process may).
	persistTid int
	// attaching counts the handshakes given this slot (Backup.slot) whose
	// connection the loop has not taken yet (under b.mu): a slot is let
	// go only without any. idleSince is when the loop last found the slot
	// idle (evictable), zero while it is not.
	attaching int
	idleSince time.Time
	// hurried is set once a failover hurried the persister: its store's
	// encoding goroutines then keep their priority (storeOptions).
	hurried *atomic.Bool
	vmRun   *machine.Machine
	persSeq uint64
	bytesIn uint64
	// diskBehind: storing a checkpoint failed; until a full one is
	// stored, the replica of the guest's files is older than the image.
	diskBehind bool
	// diskErr is why storing last failed, diskFailed when; diskWait is
	// how long after a full checkpoint failed to store the slot refuses
	// primaries (refusal): diskRetryFirst, doubled by each such failure
	// up to diskRetryMax, 0 again once a full checkpoint is stored.
	diskErr    error
	diskFailed time.Time
	diskWait   time.Duration
	// fullCommits counts the full checkpoints the loop committed
	// (persistJob.fullNo); withheld is the last ack the loop kept back
	// while the disk was behind (session 0: none), which ackWithheld
	// sends once a full checkpoint is stored. Both the loop's.
	fullCommits uint64
	withheld    struct{ session, seq uint64 }
	closed      bool
}

// staged is a checkpoint that arrived whole and verified, awaiting the
// engine's commit.
type staged struct {
	seq     uint64
	session uint64 // the primary's session that sent it
	full    bool
	// raw is the encoded snapshot as it arrived: the CheckpointData
	// pieces, each its own allocation, kept apart rather than appended
	// into one buffer, which for a large checkpoint copied every byte
	// again into memory faulted in twice over; size and crc are theirs.
	raw  chunks
	size uint64
	crc  uint32
	// tail gathers pieces smaller than minPiece until it is that large:
	// a primary sending a byte per message must not make a piece (and a
	// decoder round trip) per byte.
	tail []byte
	snap *snapshot.Snapshot
	// mem holds snap's pages if they are in the slot's pool (nil if not):
	// this checkpoint's hold on it is passed on as it commits.
	mem  *pageMem
	ops  []wire.FsOp
	tree []wire.DiskFile
	// begun is when its CheckpointBegin arrived (for the debug log).
	begun time.Time
	// stream decodes it while it arrives, once it is larger than
	// streamDecodeFrom.
	stream *decodeStream
}

type (
	attachEv struct {
		session uint64
		conn    *transport.Conn
		hello   *wire.Hello
	}
	// unresumableEv: the module could not be prepared for failover, or
	// a full checkpoint could not be stored.
	unresumableEv struct {
		reason string
		fullNo uint64 // the full checkpoint whose store failed (0: not the disk)
	}
	// diskCaughtUpEv: a full checkpoint was stored after storing had
	// failed: the acknowledgements withheld meanwhile may go.
	diskCaughtUpEv struct{}
	exitEv         struct {
		session uint64
		seq     uint64
		code    uint32
		after   uint64      // the checkpoint ops follow (wire.Exit.After)
		ops     []wire.FsOp // of the epochs after it, through the one the guest ended in
		conn    *transport.Conn
	}
	stagedEv struct {
		cp  *staged
		now engine.Time
	}
)

// attach registers a new connection with the slot and serves it.
func (s *slot) attach(c *transport.Conn, hello *wire.Hello) {
	s.mu.Lock()
	s.nextSess++
	id := s.nextSess
	s.mu.Unlock()
	s.events <- attachEv{session: id, conn: c, hello: hello}
	s.receive(id, c, hello)
}

// receive assembles checkpoints from one connection and hands each, whole
// and verified, to the loop.
func (s *slot) receive(id uint64, c *transport.Conn, hello *wire.Hello) {
	defer func() { s.events <- engine.Disconnected{Now: s.b.now(), Session: id} }()
	var cur *staged
	var want wire.CheckpointBegin
	var opsMsgs, fileMsgs uint32
	var diskBytes uint64 // disk ops and files of the checkpoint being received
	// The disk ops of the epoch the guest ended in, which come right
	// before its Exit (exitOpsSeq 0: none yet).
	var exitOps []wire.FsOp
	var exitOpsSeq uint64
	var exitOpsMsgs uint32
	var devs deviceCheck // the device state of the session's checkpoints
	abandon := func() {
		if cur != nil && cur.stream != nil {
			cur.stream.abort()
			cur.stream = nil
		}
	}
	defer abandon()
	lastEvent := engine.Time(-1 << 62) // when the loop last got a heartbeat event from here
	for {
		msg, err := wire.Recv(c)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
				s.log.Warn("primary connection ended", "session", id, "err", err)
			}
			return
		}
		// Every message is a sign of life. The loop reads when it was
		// last heard (heardSince) before it decides on a silence, so that
		// a loop busy for longer than the timeout cannot mistake its own
		// absence for the primary's; it also gets an event, at most one
		// per eighth of the timeout, never waited for, and only into a
		// queue less than half full: those must not fill it, where a
		// checkpoint waiting for room stops this reader, and what the
		// primary sends meanwhile goes unread (the primary keeps at most
		// --max-inflight checkpoints unacknowledged, far fewer than half).
		heardNow := s.b.now()
		s.heardLog(id, heardNow)
		if heardNow-lastEvent >= s.b.cfg.Engine.Timeout/8 && len(s.events) < cap(s.events)/2 {
			lastEvent = heardNow
			select {
			case s.events <- engine.Heartbeat{Now: heardNow, Session: id}:
			default:
			}
		}
		fail := func(format string, a ...any) {
			abandon()
			s.log.Error("bad checkpoint stream: dropping the session", "session", id, "err", fmt.Sprintf(format, a...))
			// The slot hears of it before the primary can: its redial
			// must not find this session still live.
			s.events <- engine.Disconnected{Now: s.b.now(), Session: id}
			c.Close()
		}
		if cur != nil && cur.stream != nil {
			if err := cur.stream.failed(); err != nil {
				// Corrupt: no need to take the rest of it.
				fail("checkpoint %d: %v", cur.seq, err)
				return
			}
		}
		switch m := msg.(type) {
		case *wire.Heartbeat, *wire.Hello:
			// Liveness only (a primary waiting for its Welcome sends these).
		case *wire.Exit:
			// A checkpoint the primary abandoned mid-stream (the guest
			// ended: Finish) is dropped.
			abandon()
			cur = nil
			if m.DiskOps != exitOpsMsgs || (exitOpsMsgs > 0 && exitOpsSeq != m.Seq) {
				fail("exit %d: %d disk ops messages arrived (of epoch %d), %d announced", m.Seq, exitOpsMsgs, exitOpsSeq, m.DiskOps)
				return
			}
			if err := s.checkDisk(nil, exitOps); err != nil {
				fail("exit %d: %v", m.Seq, err)
				return
			}
			s.events <- exitEv{session: id, seq: m.Seq, code: m.Code, after: m.After, ops: exitOps, conn: c}
			exitOps, exitOpsSeq, exitOpsMsgs = nil, 0, 0
		case *wire.DiskOps:
			if cur != nil && m.Seq == cur.seq {
				if cur.full {
					fail("disk ops out of place (seq %d)", m.Seq)
					return
				}
				if diskBytes += opsBytes(m.Ops); diskBytes > maxDiskBytes {
					fail("checkpoint %d carries more than %d bytes of disk data", m.Seq, maxDiskBytes)
					return
				}
				cur.ops = append(cur.ops, m.Ops...)
				opsMsgs++
				break
			}
			// The last epoch's, before an Exit. A checkpoint being
			// received was abandoned (it holds no ops, or the primary
			// would have finished it), unless it is of a later epoch.
			if (cur != nil && m.Seq < cur.seq) || (exitOpsSeq != 0 && m.Seq != exitOpsSeq) {
				fail("disk ops out of place (seq %d)", m.Seq)
				return
			}
			if exitOpsSeq == 0 {
				abandon()
				cur, diskBytes = nil, 0
			}
			if diskBytes += opsBytes(m.Ops); diskBytes > maxDiskBytes {
				fail("the guest's last epoch %d carries more than %d bytes of disk data", m.Seq, maxDiskBytes)
				return
			}
			exitOps, exitOpsSeq = append(exitOps, m.Ops...), m.Seq
			exitOpsMsgs++
		case *wire.CheckpointBegin:
			if exitOpsSeq != 0 {
				fail("checkpoint %d begins after the disk ops of the guest's last epoch %d", m.Seq, exitOpsSeq)
				return
			}
			if m.SnapshotSize > maxSnapshot {
				fail("checkpoint %d declares %d bytes", m.Seq, m.SnapshotSize)
				return
			}
			abandon()
			want, cur, opsMsgs, fileMsgs, diskBytes = *m, &staged{seq: m.Seq, full: m.Full, begun: time.Now()}, 0, 0, 0
			if want.SnapshotSize == 0 {
				want.SnapshotSize = maxSnapshot // streamed: the size comes with the end
			}
		case *wire.CheckpointData:
			if cur == nil || m.Seq != cur.seq || m.Offset != cur.size ||
				cur.size+uint64(len(m.Data)) > want.SnapshotSize {
				fail("checkpoint data out of order (seq %d offset %d)", m.Seq, m.Offset)
				return
			}
			cur.size += uint64(len(m.Data))
			cur.crc = crc32.Update(cur.crc, castagnoli, m.Data)
			if len(m.Data) < minPiece || len(cur.tail) > 0 {
				if len(cur.tail) == 0 {
					cur.tail = m.Data // no copy for a checkpoint of one small piece
				} else {
					cur.tail = append(cur.tail, m.Data...)
				}
				if len(cur.tail) < minPiece {
					break
				}
				m.Data, cur.tail = cur.tail, nil
			}
			// m.Data is the message's own copy (or the tail's): kept as
			// it is, never written again.
			cur.raw = append(cur.raw, m.Data)
			switch {
			case cur.stream != nil:
				cur.stream.feed(cur.raw)
			case cur.size > streamDecodeFrom:
				cur.stream = startDecodeStream(cur.raw, &hello.Module)
			}
		case *wire.DiskFile:
			if cur == nil || m.Seq != cur.seq || !cur.full {
				fail("disk file out of place (seq %d)", m.Seq)
				return
			}
			if diskBytes += m.HeldBytes(); diskBytes > maxDiskBytes {
				fail("checkpoint %d carries more than %d bytes of disk data", m.Seq, maxDiskBytes)
				return
			}
			if n := len(cur.tree); m.Offset > 0 {
				last := n - 1
				if n == 0 || cur.tree[last].Path != m.Path || cur.tree[last].Root != m.Root ||
					uint64(len(cur.tree[last].Data)) != m.Offset {
					fail("disk file chunk out of order (%s at %d)", m.Path, m.Offset)
					return
				}
				cur.tree[last].Data = append(cur.tree[last].Data, m.Data...)
			} else {
				cur.tree = append(cur.tree, *m)
			}
			fileMsgs++
		case *wire.CheckpointEnd:
			if cur == nil || m.Seq != cur.seq {
				fail("checkpoint end out of place (seq %d)", m.Seq)
				return
			}
			switch {
			case m.SnapshotSize != cur.size || (want.SnapshotSize != maxSnapshot && m.SnapshotSize != want.SnapshotSize):
				fail("checkpoint %d: %d snapshot bytes arrived, %d announced", m.Seq, cur.size, m.SnapshotSize)
				return
			case cur.crc != m.SnapshotCRC:
				fail("checkpoint %d: snapshot checksum mismatch", m.Seq)
				return
			case m.DiskOps != opsMsgs || m.DiskFiles != fileMsgs:
				fail("checkpoint %d: %d/%d disk messages arrived, %d/%d announced", m.Seq, opsMsgs, fileMsgs, m.DiskOps, m.DiskFiles)
				return
			}
			if err := s.checkDisk(cur.tree, cur.ops); err != nil {
				fail("checkpoint %d: %v", m.Seq, err)
				return
			}
			if len(cur.tail) > 0 {
				cur.raw, cur.tail = append(cur.raw, cur.tail), nil
				if cur.stream != nil {
					cur.stream.feed(cur.raw)
				}
			}
			t0 := time.Now()
			// Decoding a large checkpoint (a burst of dirty pages) takes
			// long, and meanwhile nothing is read from the primary: the
			// primary is as alive as the data just received says, so the
			// slot hears that, or its own slowness would look like the
			// primary's silence and fail over a live primary.
			stopKeepAlive := s.keepAlive(id)
			var snap *snapshot.Snapshot
			if cur.stream != nil {
				snap, err = cur.stream.finish()
				cur.stream = nil
			} else {
				snap, cur.mem, err = s.decode(cur.raw.bytes(), &hello.Module, !cur.full)
			}
			stopKeepAlive()
			if err != nil {
				fail("checkpoint %d: %v", m.Seq, err)
				return
			}
			if snap.Seq != cur.seq || (snap.Kind == snapshot.Full) != cur.full {
				fail("checkpoint %d: the snapshot inside is seq %d (%s)", m.Seq, snap.Seq, snap.Kind)
				return
			}
			if err := devs.check(snap.Devices, hello.Preopens); err != nil {
				fail("checkpoint %d: device state: %v", m.Seq, err)
				return
			}
			if why := s.refusal(hello.Module); why != "" {
				// Learnt since the session began: not acknowledged, so
				// that the primary does not count on this backup.
				fail("checkpoint %d: %s", m.Seq, why)
				return
			}
			cur.snap = snap
			if s.log.Enabled(context.Background(), slog.LevelDebug) {
				s.log.Debug("checkpoint received", "seq", cur.seq, "full", cur.full, "bytes", cur.size,
					"pages", len(snap.Pages), "receive", t0.Sub(cur.begun), "decode", time.Since(t0))
			}
			s.mu.Lock()
			s.bytesIn += cur.size
			s.mu.Unlock()
			cur.session = id
			s.events <- stagedEv{cp: cur, now: s.b.now()}
			cur = nil
		default:
			fail("unexpected %s", msg.Type())
			return
		}
	}
}

// checkDisk checks a checkpoint's (or an exit's) disk changes as the
// slot's store will when it commits them, before they are acknowledged:
// the commit to disk comes after the ack, and must not refuse them then
// (a primary's device layer never makes such ops; a faulty or hostile
// peer might).
func (s *slot) checkDisk(tree []wire.DiskFile, ops []wire.FsOp) error {
	if len(tree) == 0 && len(ops) == 0 {
		return nil
	}
	if err := store.Validate(toStoreTree(tree), toStoreOps(ops), store.Options{Roots: s.roots}); err != nil {
		return fmt.Errorf("disk changes: %w", err)
	}
	return nil
}

// opsBytes is what disk ops hold in memory, for maxDiskBytes (each op's
// own size too: a stream of empty ops, counted as nothing, grew the backup
// by ten times what it sent).
func opsBytes(ops []wire.FsOp) (n uint64) {
	for i := range ops {
		n += ops[i].HeldBytes()
	}
	return n
}

// keepAlive tells the slot, every quarter of the timeout until the
// returned function is called, that session id is still heard from.
func (s *slot) keepAlive(id uint64) (stop func()) {
	// A timer, not a goroutine: nearly every checkpoint decodes in far
	// less than the period, and a goroutine started and waited for per
	// checkpoint cost its acknowledgement a hand-off between threads.
	every := max(s.b.cfg.Engine.Timeout/4, time.Millisecond)
	done := make(chan struct{})
	var mu sync.Mutex // held by a beat while it sends: stop waits for it
	stopped := false
	var t *time.Timer
	mu.Lock() // the beat uses t: not before it is set
	defer mu.Unlock()
	t = time.AfterFunc(every, func() {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		select {
		case s.events <- engine.Heartbeat{Now: s.b.now(), Session: id}:
			t.Reset(every)
		case <-done:
		}
	})
	return func() {
		close(done) // a beat waiting for room in the queue gives up
		mu.Lock()
		stopped = true
		mu.Unlock()
		t.Stop()
	}
}

// decode decodes a checkpoint that arrived whole, slowed down in tests by
// testDecodeDelay. A large checkpoint is decompressed on all cores: its
// acknowledgement, and the primary's output, wait for it (the final epoch
// of a long computation, 9,797 pages: 145 ms on one core here). pooled
// puts its pages in the slot's pool memory (mem; not for a full
// checkpoint, whose pages become the program's memory).
func (s *slot) decode(raw []byte, module *snapshot.Hash, pooled bool) (*snapshot.Snapshot, *pageMem, error) {
	if d := time.Duration(testDecodeDelay.Load()); d > 0 {
		time.Sleep(d)
	}
	workers := 1
	if len(raw) >= parallelDecodeFrom {
		workers = runtime.GOMAXPROCS(0)
	}
	if !pooled {
		snap, err := snapshot.DecodeBytesWorkers(raw, module, workers)
		return snap, nil, err
	}
	mem := s.pages.newMem()
	snap, err := snapshot.DecodeBytesInto(raw, module, workers, mem.alloc)
	if err != nil {
		mem.release() // nothing refers to it
		return nil, nil, err
	}
	return snap, mem, nil
}

// parallelDecodeFrom is the checkpoint size from which decode uses every
// core.
const parallelDecodeFrom = 1 << 20

// minPiece is the least a piece of a checkpoint being received holds,
// its last excepted (see staged.tail).
const minPiece = 64 << 10

// streamDecodeFrom is the size from which a checkpoint is decoded while
// it arrives (decodeStream): more than the primary's first chunk, so as
// soon as a second one comes.
const streamDecodeFrom = chunk

// testDecodeDelay makes every checkpoint's decoding take that many
// nanoseconds longer (atomic, as testApplyDelay).
var testDecodeDelay atomic.Int64

// testApplyDelay makes every commit of a checkpoint take that many
// nanoseconds longer (atomic: slots of earlier tests may still read it).
var testApplyDelay atomic.Int64

// testPreparing, if set, runs on the thread that prepares a slot's
// program, before it does.
var testPreparing atomic.Pointer[func()]

// maxDiskBytes bounds the file data one checkpoint may carry (a full
// sync's directory contents, or an epoch's writes): the primary is a peer,
// and what it sends is held in memory until the checkpoint commits. (A
// variable for tests.)
var maxDiskBytes uint64 = 1 << 30

// maxSnapshot bounds a checkpoint's declared size: 4 GiB of memory plus
// the format's overhead.
const maxSnapshot = 4<<30 + 64<<20

// loop drives the slot's engine.
func (s *slot) loop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	linger := time.NewTimer(time.Hour)
	defer linger.Stop()
	for {
		rd := s.eng.Ready()
		failover, failed := s.do(ctx, rd)
		s.eng.Advance()
		s.exitOps = nil // taken by this Ready, or the Exit was refused
		// An Exit is finished once every checkpoint before it is
		// committed: all were handled before it, so this Ready had them.
		if e := s.exiting; e != nil {
			s.exiting = nil
			if failed == nil && !failover {
				s.finishExit(*e)
				continue // its Ready (the ack, the session's end) at once
			}
			e.conn.Close()
		}
		// The exit's disk job is queued once its ack is out: the
		// persister starts on it at once, and its fsyncs need not
		// compete with the ack for the cores.
		if j := s.exitJob; j != nil {
			s.exitJob = nil
			s.queueExit(*j)
		}
		if failed != nil {
			// What was heard while the commit ran counts first, as
			// before every event: a slow apply must not look like the
			// primary's silence.
			s.heardSince()
			if err := s.eng.Step(*failed); err != nil {
				s.log.Error("the engine refused the report of a failed commit", "seq", failed.Seq, "err", err)
			}
			if !failover {
				s.publish()
				continue // its Ready (the session's end) at once
			}
		}
		s.publish()
		if failover {
			// Off the loop: the loop goes on answering (rejecting stale
			// primaries) while the VM is set up, however long that takes.
			// Nothing commits into the image any more, and the last
			// commit's copy is done.
			s.waitApply()
			committed := s.eng.Committed()
			s.b.wg.Add(1)
			go func() {
				defer s.b.wg.Done()
				s.failover(ctx, committed)
			}()
			// The slot's engine is terminal now; keep answering (stale
			// primaries get rejected) until ctx ends.
		}
		if rd.Wake != engine.Never {
			timer.Reset(max(rd.Wake-s.b.now(), 0))
		}
		if s.evictable() {
			if s.idleSince.IsZero() {
				s.idleSince = time.Now()
			}
			if wait := lingerFor() - time.Since(s.idleSince); wait > 0 {
				linger.Reset(wait)
			} else if s.evict() {
				return
			} else {
				// A handshake holds it: attached, the loop hears of
				// it; refused, it does not, so look again.
				linger.Reset(min(time.Second, lingerFor()))
			}
		} else {
			s.idleSince = time.Time{}
		}
		select {
		case <-linger.C: // evictable long enough, unless something came
		case ev := <-s.events:
			s.heardSince()
			s.handle(ev)
		case <-timer.C:
			// Events queued while the loop was busy (applying a large
			// checkpoint, say) happened before now: a heartbeat among
			// them must count before the timeout is checked, or a slow
			// apply fails over a live primary.
			s.heardSince()
			s.handleQueued()
			s.heardSince()
			s.step(engine.Tick{Now: s.b.now()})
		case <-ctx.Done():
			for _, c := range s.conns {
				c.Close()
			}
			return
		}
	}
}

// slotLinger is how long a slot stays idle (no session, and either
// nothing committed or its VM exited) before the backup lets it go: its
// memory image, store and goroutines. The slots of short runs, each with
// a VM id of its own, otherwise stayed for as long as the backup ran, and
// after --max-slots of them it refused every new primary.
const slotLinger = time.Minute

// testSlotLinger, if set, replaces slotLinger (tests; atomic, as
// testApplyDelay).
var testSlotLinger atomic.Int64

func lingerFor() time.Duration {
	if d := testSlotLinger.Load(); d > 0 {
		return time.Duration(d)
	}
	return slotLinger
}

// evictable reports whether the slot is idle (loop's): no session or
// handshake, no failover, and either nothing committed in this process
// (the engine Idle) or its VM's exit stored, with nothing left for the
// disk or the module's preparation.
func (s *slot) evictable() bool {
	if len(s.conns) > 0 || s.exiting != nil || s.exitJob != nil || !s.persistQ.idle() {
		return false
	}
	switch s.eng.State() {
	case engine.Idle:
	case engine.Exited:
		if _, ok := s.store.Exited(); !ok {
			return false
		}
	default:
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vmRun != nil {
		return false
	}
	if s.progDone != nil {
		select {
		case <-s.progDone:
		default:
			return false
		}
	}
	return true
}

// evict lets the idle slot go (loop's; it returns true if it did, and the
// loop ends): out of the backup's slots, closed, and its directory removed
// if it holds no checkpoint (a primary gone before its first, or whose
// machine failed to build after its Hello). A slot with a stored
// checkpoint or exit keeps its directory: a primary of the VM reopens it.
func (s *slot) evict() bool {
	b := s.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.attaching > 0 || len(s.events) > 0 || b.slots[s.vm] != s {
		return false // a primary is on its way in
	}
	delete(b.slots, s.vm)
	_, exited := s.store.Exited()
	empty := s.store.Committed() == 0 && !exited
	s.close()
	if empty {
		if err := os.RemoveAll(s.dir); err != nil {
			s.log.Warn("removing the empty slot's directory", "dir", s.dir, "err", err)
		}
	}
	s.log.Info("slot let go: idle", "for", lingerFor(), "exited", exited, "directory_removed", empty)
	return true
}

// heardLog records that session id's receiver read a message at now,
// keeping one time per eighth of the timeout: the loop replays them
// (heardSince), so that after a stretch busy for longer than the timeout
// it learns the primary spoke all along, not only that it speaks now,
// which the engine would take for a message after a silence: too late.
func (s *slot) heardLog(id uint64, now engine.Time) {
	s.heardMu.Lock()
	defer s.heardMu.Unlock()
	log := s.heard[id]
	if n := len(log); n >= 2 && now-log[n-2] < s.b.cfg.Engine.Timeout/8 {
		log[n-1] = now // the last one moves on until it is an eighth past the one before
	} else {
		log = append(log, now)
	}
	s.heard[id] = log
}

// heardSince steps, in order, the times each session was heard since the
// loop last looked. It runs before every event and tick: nothing fresher
// may reach the engine before them.
func (s *slot) heardSince() {
	s.heardMu.Lock()
	heard := s.heard
	s.heard = map[uint64][]engine.Time{}
	s.heardMu.Unlock()
	for id, log := range heard {
		for _, at := range log {
			s.step(engine.Heartbeat{Now: at, Session: id})
		}
	}
}

// handleQueued handles every event already queued, without waiting for
// more.
func (s *slot) handleQueued() {
	for {
		select {
		case ev := <-s.events:
			s.handle(ev)
		default:
			return
		}
	}
}

func (s *slot) step(ev engine.BackupEvent) {
	if err := s.eng.Step(ev); err != nil {
		s.log.Debug("engine refused event", "event", fmt.Sprintf("%T", ev), "err", err)
	}
}

func (s *slot) handle(ev any) {
	switch e := ev.(type) {
	case exitEv:
		// Checkpoints that arrived before it may still wait in the
		// engine's Ready: the loop commits them first (finishExit).
		s.exiting = &e
	case unresumableEv:
		if e.fullNo != 0 && s.fullCommits > e.fullNo {
			// A later full checkpoint was committed since: it is
			// stored, or fails, on its own.
			s.log.Debug("a full checkpoint's failed store is stale", "full", e.fullNo, "fulls", s.fullCommits)
			break
		}
		s.step(engine.Unresumable{Now: s.b.now(), Reason: e.reason})
	case diskCaughtUpEv:
		s.ackWithheld()
	case attachEv:
		s.b.mu.Lock()
		s.attaching--
		s.b.mu.Unlock()
		s.conns[e.session] = e.conn
		s.hellos[e.session] = e.hello
		s.step(engine.Hello{Now: s.b.now(), Session: e.session, VM: e.hello.VM, Term: e.hello.Term, PeerTimeout: e.hello.Timeout,
			Run: e.hello.Run, Released: e.hello.Released, GiveUp: e.hello.GiveUp, Dial: e.hello.Dial})
	case stagedEv:
		s.staged[engine.Staged{Session: e.cp.session, Seq: e.cp.seq}] = e.cp
		s.step(engine.Checkpoint{Now: e.now, Session: e.cp.session, Seq: e.cp.seq, Full: e.cp.full})
	case engine.Disconnected:
		if c := s.conns[e.Session]; c != nil {
			c.Close()
		}
		delete(s.conns, e.Session)
		delete(s.hellos, e.Session)
		s.step(e)
	case engine.BackupEvent:
		s.step(e)
	}
}

// finishExit ends the run of the VM once its guest exited on its primary
// (the loop's, after it committed every checkpoint that came before the
// Exit): the engine acknowledges the Exit, drops the session and never
// fails over to the run; a later primary of the VM starts a new one.
func (s *slot) finishExit(e exitEv) {
	s.exitOps = e.ops // for the Ready that takes it (exitTaken)
	s.step(engine.Exit{Now: s.b.now(), Session: e.session, Seq: e.seq, Code: e.code, After: e.after})
}

// exitTaken records an Exit the engine took (its Ready's): its disk job,
// with the Exit's disk operations if they follow the session's last
// commit. Like a checkpoint, the exit is acknowledged once it is held
// here, not once it is on disk (queueExit, after the ack).
func (s *slot) exitTaken(x *engine.ExitTaken) {
	ops := s.exitOps
	s.exitOps = nil
	s.log.Info("the protected VM exited on its primary", "exit_code", x.Code, "seq", x.Seq, "last_epochs_disk_ops", len(ops))
	if !x.OpsFollow {
		// A checkpoint of the session was refused here (NeedFull),
		// or none was committed: a primary of this build sends none
		// after one it abandoned (their operations come with the Exit).
		s.log.Error("the guest's last disk operations do not follow the last checkpoint committed here: not applied; its files here are as of that checkpoint, not as it left them",
			"seq", x.Seq, "committed", x.Committed, "ops", len(ops))
		ops = nil
	}
	s.exitJob = &persistJob{exit: true, seq: x.Seq, code: x.Code, ops: ops}
}

// queueExit queues an exit's disk job (loop's). Its last epoch's disk ops
// follow every committed checkpoint to the disk: the persister's queue is
// in order, and each checkpoint joins it once its copy into the image is
// done, the copies in order, so the job goes in behind the last of them.
func (s *slot) queueExit(job persistJob) {
	n := len(s.applying)
	if n == 0 || isClosed(s.applying[n-1].done) {
		s.persistQ.push(job)
		return
	}
	last, pushed := s.applying[n-1].done, make(chan struct{})
	s.exitPush = pushed // a full checkpoint's commit waits for it (waitApply)
	s.b.wg.Add(1)
	go func() {
		defer s.b.wg.Done()
		defer close(pushed)
		<-last
		s.persistQ.push(job)
	}()
}

// do carries out one Ready; it reports whether to fail over, and a commit
// that failed, to be stepped once the Ready is advanced.
func (s *slot) do(ctx context.Context, rd engine.BackupReady) (failover bool, failed *engine.CommitFailed) {
	if rd.Exit != nil {
		s.exitTaken(rd.Exit)
	}
	if rd.StoodStill != 0 {
		s.log.Warn("this backup stood still: the primary's silence meanwhile is not its failure; failing over only if it stays silent for the timeout",
			"for", rd.StoodStill)
		s.mu.Lock()
		s.status.StoodStill++
		s.mu.Unlock()
	}
	for _, sc := range rd.StateChanges {
		s.log.Info("slot state", "from", sc.From.String(), "to", sc.To.String(), "reason", sc.Reason)
		s.mu.Lock()
		s.status.Reason = sc.Reason
		s.mu.Unlock()
	}
	// A checkpoint's pages are copied into the image on a goroutine of
	// their own, while its ack goes out and the loop goes on: everything
	// that can fail has been done first (snapshot.Prepare), and the copy,
	// a page fault per page the image never held, would otherwise hold
	// the primary's output back (a 2,000-page heap growth: about 15 ms
	// here), and at a guest's exit its last handshake. The next
	// incremental checkpoint is committed and acknowledged at once too,
	// its copy queued behind (a C guest's exit waited 15 ms for the copy
	// of the growth before it); a full one replaces the memory, so it
	// waits for the copies, and so does a failover (waitApply). At most
	// maxApplying copies wait, each holding its checkpoint's pages. Pages
	// sent as deltas are resolved against those pages where they hold
	// the page (baseOf), so they need not wait either, except behind a
	// full checkpoint's copy.
	// The copies start once this Ready's acks are out (or before a wait
	// for them): starting a goroutine wakes a thread for it, and the ack
	// need not wait for that.
	var copies []pendingCopy
	// startCopies starts the copies; once the acks are out (inline), a
	// small one whose predecessor is done runs right here instead: its
	// goroutine would cost a thread's wake-up, more than its copy.
	startCopies := func(inline bool) {
		for _, c := range copies {
			s.b.wg.Add(1)
			// (testApplyDelay makes every copy a long one.)
			if inline && c.pages <= inlineCopyPages && testApplyDelay.Load() == 0 && (c.prev == nil || isClosed(c.prev)) {
				c.run()
				continue
			}
			go c.run()
		}
		copies = nil
	}
	defer startCopies(true)
	for _, ref := range rd.Commit {
		seq := ref.Seq
		if failed != nil {
			delete(s.staged, ref) // nothing after a failed one applies
			continue
		}
		s.pruneApplied()
		// A checkpoint with pages sent as deltas is resolved against
		// the checkpoints before it (baseOf), which cannot be done while
		// a full one is still being copied.
		st := s.staged[ref]
		if st == nil || st.full || len(s.applying) >= maxApplying || st.snap.HasDeltas() && s.fullApplying() {
			startCopies(false)
			s.waitApply()
		}
		f, err := s.commit(ref)
		if err != nil {
			s.log.Error("applying checkpoint failed: dropping the session", "seq", seq, "err", err)
			failed = &engine.CommitFailed{Now: s.b.now(), Session: ref.Session, Seq: seq, Committed: s.img.Seq}
			for _, c := range s.conns {
				c.Close()
			}
			continue
		}
		var prev chan struct{}
		if n := len(s.applying); n > 0 {
			prev = s.applying[n-1].done
		}
		done := make(chan struct{})
		st.mem.hold() // the copy's, until pruned: deltas resolve against its pages
		s.applying = append(s.applying, applyingCopy{done: done, snap: st.snap, mem: st.mem})
		copies = append(copies, pendingCopy{pages: len(st.snap.Pages), prev: prev, run: func() {
			defer s.b.wg.Done()
			defer close(done)
			if prev != nil {
				<-prev // in order: each copy builds on the one before
			}
			f()
		}})
	}
	for _, ref := range rd.Discard {
		delete(s.staged, ref)
	}
	s.mu.Lock()
	behind := s.diskBehind
	s.mu.Unlock()
	for _, m := range rd.Messages {
		c := s.conns[m.Session]
		if c == nil {
			continue
		}
		var msg wire.Message
		switch m.Kind {
		case engine.MsgAccept:
			msg = &wire.Welcome{Session: m.Session, Committed: s.eng.Committed(), Timeout: s.b.cfg.Engine.Timeout}
		case engine.MsgReject:
			code := wire.RejectRefused
			if m.Fenced {
				code = wire.RejectFenced
			}
			msg = &wire.Reject{Reason: m.Reason, Code: code}
		case engine.MsgReleased:
			s.log.Warn("the primary gave this backup up: it runs unprotected, and nothing here is resumed", "reason", m.Reason)
			msg = &wire.Reject{Reason: m.Reason, Code: wire.RejectReleased}
		case engine.MsgAck:
			if failed != nil {
				continue // every connection is closed: none is acked
			}
			if behind {
				// The disk lacks what this acknowledges, and the
				// failover would be refused: the primary must not count
				// on it. It hears a heartbeat instead; the ack goes
				// once a full checkpoint is stored (ackWithheld).
				msg = &wire.Heartbeat{Seq: s.eng.Committed()}
				s.withheld.session, s.withheld.seq = m.Session, m.Seq
				break
			}
			s.withheld.session = 0
			msg = &wire.Ack{Seq: m.Seq}
		case engine.MsgHeartbeat:
			msg = &wire.Heartbeat{Seq: s.eng.Committed()}
		case engine.MsgNeedFull:
			msg = &wire.NeedFull{Reason: m.Reason, Seq: m.Seq}
		case engine.MsgExited:
			msg = &wire.Ack{Seq: m.Seq}
		default:
			continue
		}
		s.sendTo(c, msg)
		if m.Kind == engine.MsgReject || m.Kind == engine.MsgReleased {
			c.Close()
		}
	}
	for _, d := range rd.DropSession {
		if c := s.conns[d.Session]; c != nil {
			level := slog.LevelWarn
			if s.eng.State() == engine.Exited {
				level = slog.LevelInfo // the run's normal end
			}
			s.log.Log(context.Background(), level, "dropping primary session", "session", d.Session, "reason", d.Reason)
			c.Close()
		}
	}
	// A session that ended leaves nothing staged behind.
	for ref := range s.staged {
		if ref.Seq <= s.eng.Committed() || ref.Session != s.eng.Session() {
			delete(s.staged, ref)
		}
	}
	return rd.Failover, failed
}

// commit applies staged checkpoint seq to the image (in memory, at once:
// this is what the ack promises) and queues it for the disk, in two steps:
// commit makes every check and takes the memory (snapshot.Prepare), and
// finish, which cannot fail, copies the pages and queues the checkpoint.
// The image must not be used between the two; finish may run on another
// goroutine (it touches nothing else of the loop's).
func (s *slot) commit(ref engine.Staged) (finish func(), err error) {
	seq := ref.Seq
	st := s.staged[ref]
	delete(s.staged, ref)
	if st == nil {
		return nil, fmt.Errorf("checkpoint %d of session %d is not staged", seq, ref.Session)
	}
	if st.snap.HasDeltas() {
		// Pages the primary sent as deltas against what it sent before.
		// A page that does not resolve to its checksum means this copy
		// is not what the primary thinks: the session is dropped and
		// resyncs.
		if err := st.snap.Resolve(s.baseOf); err != nil {
			return nil, err
		}
		// The encoding as it arrived needs this image to be read: the
		// disk gets the resolved pages, encoded again.
		st.raw = nil
	}
	apply, err := snapshot.Prepare(s.img, st.snap)
	if err != nil {
		return nil, err
	}
	var fullNo uint64
	if st.full {
		s.fullCommits++
		fullNo = s.fullCommits
	}
	for sess, h := range s.hellos {
		if sess == s.eng.Session() {
			s.hello = h
		}
	}
	return func() {
		t0 := time.Now() // the copy's own time, not its wait in the queue
		if d := time.Duration(testApplyDelay.Load()); d > 0 {
			time.Sleep(d)
		}
		apply()
		if s.log.Enabled(context.Background(), slog.LevelDebug) {
			s.log.Debug("checkpoint applied", "seq", seq, "apply", time.Since(t0))
		}
		s.mu.Lock()
		s.status.LastApplyUS = float64(time.Since(t0).Nanoseconds()) / 1000
		s.status.Checkpoints++
		s.mu.Unlock()
		if st.full {
			s.prepare(st.snap)
		}
		st.mem.hold() // the disk's
		s.persistQ.push(persistJob{seq: seq, full: st.full, fullNo: fullNo, raw: st.raw, snap: st.snap, mem: st.mem, ops: st.ops, tree: st.tree})
		st.mem.release() // the staged checkpoint's
	}, nil
}

// pendingCopy is a committed checkpoint's copy into the image, not started
// yet (do).
type pendingCopy struct {
	run   func()
	pages int
	prev  chan struct{} // the copy before it, if any: closed when done
}

// inlineCopyPages is the largest copy the loop makes itself, once the acks
// are out (about 0.1 ms of copying here).
const inlineCopyPages = 256

// maxApplying bounds the committed checkpoints whose copies into the image
// may be pending at once (do).
const maxApplying = 4

// applyingCopy is a committed checkpoint whose copy into the image may be
// pending: done is closed once it is in.
type applyingCopy struct {
	done chan struct{}
	snap *snapshot.Snapshot
	mem  *pageMem
}

// baseOf is the backup's copy of page idx as of the last commit: in the
// newest checkpoint still being copied that holds the page, or else in the
// image (where no pending copy writes it). Deltas are resolved against it.
// Not while a full checkpoint's copy is pending: that one rewrites the
// whole memory.
func (s *slot) baseOf(idx uint32) []byte {
	for i := len(s.applying) - 1; i >= 0; i-- {
		if d := snapshot.PageData(s.applying[i].snap.Pages, idx); d != nil {
			return d
		}
	}
	mem := s.img.Memory
	if off := uint64(idx) * snapshot.PageSize; off+snapshot.PageSize <= uint64(len(mem)) {
		return mem[off : off+snapshot.PageSize]
	}
	return nil
}

// fullApplying reports whether a full checkpoint's copy may be pending.
func (s *slot) fullApplying() bool {
	for _, a := range s.applying {
		if a.snap.Kind == snapshot.Full {
			return true
		}
	}
	return false
}

// pruneApplied forgets the copies that are done.
func (s *slot) pruneApplied() {
	n := 0
	for n < len(s.applying) && isClosed(s.applying[n].done) {
		s.applying[n].mem.release()
		n++
	}
	m := copy(s.applying, s.applying[n:])
	clear(s.applying[m:])
	s.applying = s.applying[:m]
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// waitApply waits for the copies of the committed checkpoints into the
// image (do), sending the primary heartbeats meanwhile: on this project's
// VM a page the image never held costs ~12 µs to write (64 MiB, 200 ms),
// and only the loop sends them. A guest's exit queued for the disk behind
// them (finishExit) is queued when it returns.
func (s *slot) waitApply() {
	if s.exitPush != nil {
		<-s.exitPush // right behind the copies
		s.exitPush = nil
	}
	n := len(s.applying)
	if n == 0 {
		return
	}
	last := s.applying[n-1].done // closed after all the others
	select {
	case <-last:
	default:
		stop := s.heartbeatWhileBusy()
		<-last
		stop()
	}
	for _, a := range s.applying {
		a.mem.release()
	}
	clear(s.applying)
	s.applying = s.applying[:0]
}

// heartbeatWhileBusy sends the current session's primary a heartbeat at
// the engine's pace until the returned function is called. The loop sends
// heartbeats only between events: while it applies a large checkpoint it
// is silent, and once that took longer than the timeout the primary took
// its backup for dead and resynchronised — with a full checkpoint as slow
// to apply, without end. Only the loop writes to a session's connection,
// and it is inside the caller until stop returns, so the writes do not
// interleave.
func (s *slot) heartbeatWhileBusy() (stop func()) {
	c := s.conns[s.eng.Session()]
	if c == nil {
		return func() {}
	}
	seq := s.eng.Committed()
	every := s.eng.HeartbeatInterval()
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				c.SetWriteDeadline(time.Now().Add(s.b.cfg.Engine.Timeout))
				if err := wire.SendFlush(c, &wire.Heartbeat{Seq: seq}); err != nil {
					return // the loop finds the connection broken itself
				}
			case <-done:
				return
			}
		}
	}()
	return func() { close(done); <-finished }
}

// prepare compiles the module of a full checkpoint in the background, so
// that failover does not pay for it.
func (s *slot) prepare(snap *snapshot.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.progDone != nil && s.progHash == snap.Module && (s.progErr == nil || s.failedLately()) {
		return // prepared, being prepared, or failed lately
	}
	code, name := snap.ModuleCode, snap.ModuleName
	done := make(chan struct{})
	s.progHash, s.progDone, s.prog, s.progErr, s.progTid = snap.Module, done, nil, nil, 0
	go func() {
		defer close(done)
		s.lowerPriority(done)
		if f := testPreparing.Load(); f != nil {
			(*f)()
		}
		// Instrumented as the primary's module was (its loop polls, say),
		// which the checkpoint's device state records.
		polls := false
		if in := wasi.InstrumentationOf(snap.Devices); in != nil {
			polls = in.LoopPolls
		}
		// Under the backup's context: a backup that stops does not wait
		// for a compile whose result it will not keep (close waits for
		// this goroutine).
		ctx := cmp.Or(s.b.ctx, context.Background())
		prog, err := machine.Prepare(ctx, machine.Config{Module: code, Name: name, Instrument: true,
			LoopPolls: polls, CacheDir: s.b.cfg.CacheDir, InstrumentCacheDir: s.b.cfg.InstrumentCacheDir})
		if err != nil && ctx.Err() != nil {
			return // stopping: not a failure of the module
		}
		if !s.prepared(done, prog, err) || err == nil {
			return
		}
		s.log.Error("preparing the module for failover failed: the primary is refused until it is prepared "+
			"(tried again at a full checkpoint after "+retryAfter().String()+")", "err", err)
		// What the slot committed cannot be resumed: the loop lets the
		// session go and keeps nothing to fail over to.
		select {
		case s.events <- unresumableEv{reason: "preparing the module for failover failed: " + err.Error()}:
		case <-s.b.ctx.Done():
		}
	}()
}

// prepared records the outcome of preparation done, unless a newer one
// replaced it (false).
func (s *slot) prepared(done chan struct{}, prog *machine.Program, err error) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.progDone != done {
		if prog != nil {
			prog.Close(context.Background())
		}
		return false
	}
	s.prog, s.progErr, s.progTid = prog, err, 0
	s.status.ProgramReady, s.status.ProgramError = err == nil, ""
	if err != nil {
		s.progFail = time.Now()
		s.status.ProgramError = err.Error()
	}
	return true
}

// failedLately: preparing progHash failed less than prepareRetryAfter ago
// (s.mu held).
func (s *slot) failedLately() bool {
	return s.progErr != nil && time.Since(s.progFail) < retryAfter()
}

// prepareRetryAfter is how long, in nanoseconds, after a failed
// preparation of a module the backup refuses its primaries (refusal)
// before it tries again: 30 s. Atomic, since a test shortens it while
// preparations of earlier tests' backups may still be running (go test
// -race saw one read it).
var prepareRetryAfter atomic.Int64

func init() { prepareRetryAfter.Store(int64(30 * time.Second)) }

func retryAfter() time.Duration { return time.Duration(prepareRetryAfter.Load()) }

// refusal says why the backup refuses a primary of module, "" if it
// does not. A backup that failed to prepare the module for failover (its
// instrumentation or compilation failed: binaryen missing on this host, a
// module wasm-opt rejects, a full cache directory) cannot resume the VM,
// nor can one whose disk could not store the VM's full checkpoint lately
// (persistFailed), and a primary that took it for protection would be
// wrong. The primary then stays unprotected and says why; the backup tries
// again after prepareRetryAfter (diskWait for the disk). A preparation
// still under way is not a refusal.
func (s *slot) refusal(module snapshot.Hash) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.diskWait > 0 && s.diskErr != nil && time.Since(s.diskFailed) < s.diskWait {
		// persistFailed: a full checkpoint could not be stored lately.
		return fmt.Sprintf("this backup cannot protect the VM now: storing its full checkpoint on the backup's disk "+
			"failed (%v); it tries again %s after the failure", s.diskErr, s.diskWait)
	}
	if s.progHash != module || s.progErr == nil || !s.failedLately() {
		return ""
	}
	return "this backup cannot resume the VM: preparing its module for failover failed: " + s.progErr.Error()
}

// lowerPriority runs the calling goroutine, which prepares the program of
// done, on a thread of its own at nice prepareNice: the compile (from the
// cache, still about 140 ms of CPU for a 3 MB Go module) runs while the
// primary's guest does, and a backup sharing the primary's cores took them
// from the guest (its thread waited twice as long to run). A failover
// restores the thread's priority (hurry). The thread ends with the
// goroutine (it stays locked), its priority with it.
func (s *slot) lowerPriority(done chan struct{}) {
	tid, ok := niceThread(prepareNice)
	if !ok {
		return // not lowered: nothing to restore
	}
	s.mu.Lock()
	if s.progDone == done {
		s.progTid = tid
	}
	s.mu.Unlock()
}

// persistNice is the niceness of the persister's thread.
const persistNice = 10

// prepareNice is the niceness of the thread that prepares the program:
// when the cores are busy it gets about a tenth of one (a weight of 110
// against 1,024), so it still finishes, in about a second and a half.
const prepareNice = 10

// hurry restores the priority of the threads a failover waits for: the
// persister's, whose last commit it drains, and the one preparing the
// program, if it still is.
func (s *slot) hurry() {
	s.hurried.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	// Each thread clears its id under s.mu before it ends, so an id here
	// is still its thread's.
	for _, tid := range []*int{&s.persistTid, &s.progTid} {
		if *tid != 0 {
			raiseThread(*tid)
			*tid = 0
		}
	}
}

type persistJob struct {
	seq  uint64
	from uint64 // the first checkpoint it holds, if several (compact); 0: seq
	full bool
	// fullNo numbers a full checkpoint among the slot's (fullCommits at
	// its commit): a failure to store it is stale once a later one was
	// committed, which is stored, or fails, on its own.
	fullNo uint64
	raw    chunks
	snap   *snapshot.Snapshot // decoded raw
	mem    *pageMem           // snap's pages' pool memory (or nil): released once stored
	ops    []wire.FsOp
	tree   []wire.DiskFile
	// exit: the guest ended on its primary in epoch seq, with code; ops
	// are that epoch's (no snapshot). Nothing of its run follows it (a
	// new run starts with a full checkpoint, which empties the queue).
	exit bool
	code uint32
}

// first is the first checkpoint the job holds.
func (j persistJob) first() uint64 {
	if j.from != 0 {
		return j.from
	}
	return j.seq
}

// size is about the bytes the job holds: its encoding as it arrived, and
// its pages (the pool's buffers, whole, if they are in them).
func (j persistJob) size() int {
	n := 0
	if j.raw != nil {
		n = j.raw.len()
	}
	if j.mem != nil {
		for _, b := range j.mem.bufs {
			n += cap(b)
		}
	} else if j.snap != nil {
		n += len(j.snap.Pages) * snapshot.PageSize
	}
	for _, op := range j.ops {
		n += len(op.Data)
	}
	return n
}

// persistQueue hands committed checkpoints to the persister. It never
// blocks the slot's loop: a loop stuck behind the disk would stop acking
// and heartbeating, and the primary would take the backup for dead.
type persistQueue struct {
	hurry   chan struct{} // closed by drain: stop spacing commits
	mu      sync.Mutex
	cond    *sync.Cond
	jobs    []persistJob
	busy    bool
	closed  bool
	pending int // bytes queued
	// compactAt is the size past which push compacts: persistCompactAt,
	// or twice what the last compaction left (0: persistCompactAt), so
	// that a merged queue larger than that is not copied again at every
	// push.
	compactAt   int
	compactions int // (tests)
}

func newPersistQueue() *persistQueue {
	q := &persistQueue{hurry: make(chan struct{})}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *persistQueue) push(j persistJob) {
	q.mu.Lock()
	if j.full {
		// A full checkpoint supersedes everything queued before it.
		for _, old := range q.jobs {
			old.mem.release()
		}
		clear(q.jobs)
		q.jobs, q.pending, q.compactAt = q.jobs[:0], 0, 0
	}
	q.jobs = append(q.jobs, j)
	q.pending += j.size()
	if q.pending > max(q.compactAt, persistCompactAt) {
		q.compact()
		q.compactions++
		q.compactAt = 2 * q.pending
	}
	q.cond.Broadcast()
	q.mu.Unlock()
}

// persistCompactAt is the size of the queued checkpoints past which push
// compacts them (a variable for tests).
var persistCompactAt = 16 << 20

// compact merges the queued incremental checkpoints (after a full one,
// which stays as it is) into one that holds the latest copy of each of
// their pages, in memory of its own, and lets go of theirs: a disk slower
// than the epochs (a long fsync, say) then holds the queue to about the
// guest's memory, not to every checkpoint since it fell behind. The
// persister merges a batch the same way (mergeIncrementals); this is that
// merge done early, without the encoding.
func (q *persistQueue) compact() {
	start, end := 0, len(q.jobs)
	if len(q.jobs) > 0 && q.jobs[0].full {
		start = 1
	}
	var exit []persistJob
	if end > start && q.jobs[end-1].exit {
		end--
		exit = []persistJob{q.jobs[end]}
	}
	inc := q.jobs[start:end]
	if len(inc) < 2 {
		return
	}
	last := inc[len(inc)-1]
	m := *last.snap // its CPU and device state; the pages are all of them
	m.Pages = latestPages(inc)
	mem := make([]byte, len(m.Pages)*snapshot.PageSize)
	for i := range m.Pages {
		page := mem[i*snapshot.PageSize : (i+1)*snapshot.PageSize : (i+1)*snapshot.PageSize]
		copy(page, m.Pages[i].Data)
		m.Pages[i].Data = page
	}
	merged := persistJob{seq: last.seq, from: inc[0].first(), snap: &m, ops: jobOps(inc)}
	q.pending = 0
	if start == 1 {
		q.pending = q.jobs[0].size()
	}
	for _, j := range inc {
		j.mem.release()
	}
	clear(inc)
	q.jobs = append(append(q.jobs[:start], merged), exit...)
	q.pending += merged.size()
	for _, j := range exit {
		q.pending += j.size()
	}
}

// take waits for work and returns all of it.
func (q *persistQueue) take() ([]persistJob, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.busy = false
	q.cond.Broadcast()
	for len(q.jobs) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.jobs) == 0 {
		return nil, false
	}
	jobs := q.jobs
	q.jobs, q.pending, q.busy, q.compactAt = nil, 0, true, 0
	return jobs, true
}

// space waits d before the next commit, so that a batch has time to
// gather (a commit costs the same fsyncs whatever it holds), unless a
// drain is waiting.
func (q *persistQueue) space(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-q.hurry:
	}
}

// idle reports whether nothing is queued or being stored.
func (q *persistQueue) idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.jobs) == 0 && !q.busy
}

// drain waits until everything queued is on disk.
func (q *persistQueue) drain() {
	q.mu.Lock()
	select {
	case <-q.hurry:
	default:
		close(q.hurry)
	}
	defer q.mu.Unlock()
	for (len(q.jobs) > 0 || q.busy) && !q.closed {
		q.cond.Wait()
	}
}

func (q *persistQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// persister writes committed checkpoints to the slot's state directory in
// order, off the ack path: the disk always holds one complete checkpoint,
// possibly a few epochs behind memory, which is what a double failure
// restores. Failover first waits for it to catch up, so the replica of the
// guest's directories matches the image it resumes.
//
// A commit costs several fsyncs (tens of milliseconds here) while epochs
// may be a few milliseconds long, so whatever queued up while it wrote is
// merged into one record — the pages of the later checkpoints over the
// earlier ones, the last one's CPU and device state, the disk ops of all in
// order — which is the state of the last checkpoint of the batch. The
// store's records therefore have their own sequence numbers (storeSeq),
// consecutive, each naming the previous one's snapshot as its parent.
func (s *slot) persister() {
	// Nothing waits for the disk but a failover (which restores the
	// thread's priority first): the merging, compressing and fsyncs of a
	// batch take what the guest and the acknowledgements leave of the
	// cores they may share, not a share of their own. The thread ends
	// with the persister (it stays locked), its priority with it.
	if tid, ok := niceThread(persistNice); ok {
		s.mu.Lock()
		s.persistTid = tid
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.persistTid = 0 // the id may be another thread's once this one ends
			s.mu.Unlock()
		}()
	}
	var storeSeq uint64
	var tip snapshot.Hash // the snapshot ID of the last record stored
	for {
		jobs, ok := s.persistQ.take()
		if !ok {
			return
		}
		spaced := s.persistBatch(jobs, &storeSeq, &tip)
		for _, j := range jobs {
			j.mem.release()
		}
		if spaced {
			s.persistQ.space(persistSpacing)
		}
	}
}

// persistBatch stores one batch of committed checkpoints (persister's),
// and the guest's exit if it ends the batch; it reports whether it
// committed incremental ones, after which the persister spaces its
// commits.
func (s *slot) persistBatch(jobs []persistJob, storeSeq *uint64, tip *snapshot.Hash) (spaced bool) {
	for len(jobs) > 0 {
		i := slices.IndexFunc(jobs, func(j persistJob) bool { return j.exit })
		if i < 0 {
			i = len(jobs)
		}
		ok := true
		if i > 0 {
			var sp bool
			sp, ok = s.persistCheckpoints(jobs[:i], storeSeq, tip)
			spaced = spaced || sp
		}
		if i < len(jobs) {
			s.persistExit(jobs[i], ok && !tip.IsZero())
			i++
		}
		jobs = jobs[i:]
	}
	return spaced
}

// persistExit records the guest's exit in the slot and applies its last
// epoch's disk ops to the replica, if the disk holds the checkpoint
// before it (stored: every checkpoint of the session up to the exit is
// stored; a disk behind would take the ops onto older files).
func (s *slot) persistExit(j persistJob, stored bool) {
	// The run is over: no merge follows until a new one's full
	// checkpoint, which may be long in coming (the slot, exited, is let go
	// only after a minute idle).
	s.mergeBuf = bytes.Buffer{}
	s.mu.Lock()
	behind := s.diskBehind
	s.mu.Unlock()
	if !stored || behind {
		s.log.Error("the guest's last epoch's disk ops are not stored: the disk does not hold the checkpoint before it",
			"seq", j.seq, "ops", len(j.ops))
		return
	}
	t0 := time.Now()
	if err := s.store.CommitExit(j.code, toStoreOps(j.ops)); err != nil {
		s.stored(err, "the guest's exit", 0)
		return
	}
	s.log.Info("the guest's exit stored", "seq", j.seq, "exit_code", j.code, "last_epoch_disk_ops", len(j.ops),
		"took", time.Since(t0))
}

// persistCheckpoints stores checkpoints (persistBatch); ok says whether
// all of them are stored.
func (s *slot) persistCheckpoints(jobs []persistJob, storeSeq *uint64, tip *snapshot.Hash) (spaced, ok bool) {
	// A full checkpoint starts a new chain; the queue dropped what came
	// before it.
	if jobs[0].full {
		j := jobs[0]
		t0 := time.Now()
		err := s.store.CommitFullDecoded(j.seq, j.raw.bytes(), j.snap, toStoreTree(j.tree), toStoreOps(j.ops))
		s.log.Debug("full checkpoint stored", "seq", j.seq, "took", time.Since(t0), "err", err)
		if !s.stored(err, "a full checkpoint", j.fullNo) {
			return false, false
		}
		*storeSeq, *tip = j.seq, j.snap.ID
		s.persisted(j.seq)
		s.diskCaughtUp()
		jobs = jobs[1:]
	}
	if len(jobs) == 0 {
		return false, true
	}
	s.mu.Lock()
	behind := s.diskBehind
	s.mu.Unlock()
	if behind {
		// The disk holds an older checkpoint than these build on:
		// merged onto it they would make a state that never existed.
		// It keeps that older one, whole, until a full checkpoint.
		s.log.Debug("checkpoints not stored: the disk waits for a full checkpoint",
			"from", jobs[0].first(), "to", jobs[len(jobs)-1].seq)
		return false, false
	}
	if tip.IsZero() {
		s.persistFailed(errors.New("no stored checkpoint to merge these onto"), 0)
		return false, false
	}
	// Merged records are encoded onto the slot's own files (Tip), which
	// after a compaction have IDs of their own: encoded onto the last
	// record as this persister named it, they were encoded again there.
	raw, merged, err := mergeIncrementals(&s.mergeBuf, jobs, *storeSeq+1, s.store.Tip())
	ops := jobOps(jobs)
	if err != nil {
		s.log.Error("merging checkpoints for the disk failed", "err", err)
		s.persistFailed(fmt.Errorf("merging checkpoints for the disk: %w", err), 0)
		return false, false
	}
	err = s.store.CommitIncrementalDecoded(*storeSeq+1, raw, merged, toStoreOps(ops))
	if !s.stored(err, fmt.Sprintf("checkpoints %d-%d", jobs[0].first(), jobs[len(jobs)-1].seq), 0) {
		return false, false
	}
	*storeSeq, *tip = *storeSeq+1, merged.ID
	s.persisted(jobs[len(jobs)-1].seq)
	return true, true
}

// persistSpacing is the least time between two commits to the slot's
// directory. Each costs about ten fsyncs and a merge of the batch; spacing
// them bounds the backup's disk and CPU work per second whatever the epoch
// rate, while a failover's drain still waits for at most one commit.
const persistSpacing = 100 * time.Millisecond

// latestPages is every page jobs carry, in their latest copy (the jobs'
// memory), sorted: what a merge of them holds.
func latestPages(jobs []persistJob) []snapshot.Page {
	latest := map[uint32][]byte{}
	for _, j := range jobs {
		for _, p := range j.snap.Pages {
			latest[p.Index] = p.Data
		}
	}
	pages := make([]snapshot.Page, 0, len(latest))
	for idx, d := range latest {
		pages = append(pages, snapshot.Page{Index: idx, Data: d})
	}
	snapshot.SortPages(pages)
	return pages
}

// jobOps is the disk ops of jobs, in order.
func jobOps(jobs []persistJob) []wire.FsOp {
	var ops []wire.FsOp
	for _, j := range jobs {
		ops = append(ops, j.ops...)
	}
	return ops
}

// mergeIncrementals encodes one incremental snapshot with the state of the
// last of jobs: every page any of them carries (the latest copy), and the
// last one's memory size, globals, stack and devices; and that snapshot
// decoded, for the store not to decode it again. A single job whose
// numbering already fits is stored as it came. The encoding goes into buf,
// valid until the next call: grown from nothing for every merge, the
// buffer's doublings copied and cleared the encoding over again (a C
// guest's 8 MB heap growth: about 12 ms of the backup's CPU, as much as
// its compression).
func mergeIncrementals(buf *bytes.Buffer, jobs []persistJob, seq uint64, parent snapshot.Hash) ([]byte, *snapshot.Snapshot, error) {
	last := jobs[len(jobs)-1].snap
	if len(jobs) == 1 && last.Seq == seq && last.Parent == parent && jobs[0].raw != nil {
		return jobs[0].raw.bytes(), last, nil
	}
	m := &snapshot.Snapshot{Kind: snapshot.Incremental, Module: last.Module, Seq: seq, Parent: parent,
		MemorySize: last.MemorySize, Globals: last.Globals, StackAddr: last.StackAddr, Stack: last.Stack,
		Devices: last.Devices, Meta: last.Meta, Pages: latestPages(jobs)}
	m.Meta.Reason = fmt.Sprintf("remus checkpoints %d-%d", jobs[0].first(), jobs[len(jobs)-1].seq)

	if buf.Cap() > mergeBufKeep {
		*buf = bytes.Buffer{} // a burst's: not kept for ever
	}
	buf.Reset()
	// At most the pages uncompressed, with their frames, and the state;
	// in huge pages: a heap's growth (8 MB) faulted into 4 KiB pages cost
	// the backup about 30 ms of CPU here.
	if need := len(m.Pages)*(snapshot.PageSize+8) + len(m.Stack) + len(m.Devices) + 64<<10; buf.Cap() < need {
		*buf = *bytes.NewBuffer(snapshot.HugeBuffer(need)[:0])
	}
	if err := m.EncodeOptions(buf, snapshot.Options{Workers: 1}); err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), m, nil
}

// mergeBufKeep is the largest merge buffer the persister keeps between
// merges.
const mergeBufKeep = 32 << 20

// stored sorts out a store commit's error: whether the checkpoint is
// committed (the sequence moves on). A compaction failure after the commit
// is only logged; a replica that diverged marks the disk behind (the memory
// state is stored, the files are not); a broken slot is reopened (Open
// recovers what is durable) and waits for the next full checkpoint.
func (s *slot) stored(err error, what string, fullNo uint64) bool {
	switch {
	case err == nil:
		return true
	case errors.Is(err, store.ErrCompact):
		s.log.Warn("compacting the slot's journal failed (the checkpoint is stored)", "what", what, "err", err)
		return true
	case errors.Is(err, store.ErrDiverged):
		s.log.Error("the replica of the guest's files diverged; it is rebuilt at the next full checkpoint", "what", what, "err", err)
		s.persistFailed(err, 0)
		return true
	case errors.Is(err, store.ErrBroken):
		s.log.Error("the slot's state directory failed; reopening it", "what", what, "err", err)
		s.persistFailed(err, fullNo)
		s.store.Close()
		st, oerr := store.Open(s.dir, storeOptions(s.roots, s.hurried))
		if oerr != nil {
			s.log.Error("reopening the slot failed; nothing more is stored", "err", oerr)
			return false
		}
		s.mu.Lock()
		s.store = st
		s.mu.Unlock()
		return false
	default:
		s.log.Error("storing a checkpoint failed; the disk keeps the previous state until the next full checkpoint",
			"what", what, "err", err)
		s.persistFailed(err, fullNo)
		return false
	}
}

func (s *slot) persisted(seq uint64) {
	s.mu.Lock()
	s.persSeq, s.status.Persisted = seq, seq
	s.mu.Unlock()
}

// persistFailed: the disk keeps an older checkpoint. It stays consistent
// (one complete checkpoint), but a failover would now pair the newer
// memory image with older files, so the slot refuses to resume, stores no
// incremental checkpoint (they build on what the disk lacks), and
// acknowledges nothing (the primary must not count on a failover that
// would be refused), until a full checkpoint has been stored again; the
// engine asks the primary for one (WantFull). A full checkpoint that fails
// to store leaves the slot nothing it could resume: the session goes
// (Unresumable), so that the primary runs unprotected and says so instead
// of holding its output for ever, and primaries are refused for diskWait
// (refusal) before the next try, a full checkpoint whose acknowledgement
// waits until it is stored.
//
// fullNo is the full checkpoint whose store failed (persistJob.fullNo), 0
// if what failed was not one.
func (s *slot) persistFailed(err error, fullNo uint64) {
	full := fullNo != 0
	s.mu.Lock()
	was := s.diskBehind
	s.diskBehind = true
	s.diskErr, s.diskFailed = err, time.Now()
	if full {
		s.diskWait = min(max(2*s.diskWait, diskRetryFirst()), diskRetryMax)
	}
	s.status.DiskBehind, s.status.DiskError = true, err.Error()
	wait := s.diskWait
	s.mu.Unlock()
	var ev any
	switch {
	case full:
		s.log.Error("a full checkpoint could not be stored: the slot lets its primary go, which runs unprotected; "+
			"primaries are refused until the next try", "retry_in", wait, "err", err)
		ev = unresumableEv{reason: "storing a full checkpoint on the backup's disk failed: " + err.Error(), fullNo: fullNo}
	case !was:
		ev = engine.WantFull{Now: s.b.now(), Reason: "storing a checkpoint on the backup's disk failed"}
	default:
		return
	}
	select {
	case s.events <- ev:
	case <-s.b.ctx.Done():
	}
}

// diskCaughtUp: a full checkpoint is stored. If storing had failed, the
// slot may acknowledge again, and primaries are no longer refused.
func (s *slot) diskCaughtUp() {
	s.mu.Lock()
	was := s.diskBehind
	s.diskBehind, s.diskErr, s.diskWait = false, nil, 0
	s.status.DiskBehind, s.status.DiskError = false, ""
	s.mu.Unlock()
	if !was {
		return
	}
	s.log.Info("a full checkpoint is stored again: the slot acknowledges checkpoints again")
	select {
	case s.events <- diskCaughtUpEv{}:
	case <-s.b.ctx.Done():
	}
}

// ackWithheld sends the live session the acknowledgement withheld while
// the disk was behind (loop's): the engine's next one may be a heartbeat
// away, and the primary holds its output until it comes.
//
// It sends the ack the loop kept back (withheld), not the engine's latest
// commit: a checkpoint stepped into the engine since may not be applied
// yet (do), and its apply may still fail.
func (s *slot) ackWithheld() {
	s.mu.Lock()
	behind := s.diskBehind
	s.mu.Unlock()
	w := s.withheld
	c := s.conns[w.session]
	if behind || w.session == 0 || c == nil || w.session != s.eng.Session() || s.eng.State() != engine.Following {
		return
	}
	s.withheld.session = 0
	s.sendTo(c, &wire.Ack{Seq: w.seq})
}

// sendTo sends the loop's message m on c within the timeout; a connection
// that cannot take it is closed (its reader then reports it lost).
func (s *slot) sendTo(c *transport.Conn, m wire.Message) {
	c.SetWriteDeadline(time.Now().Add(s.b.cfg.Engine.Timeout))
	if err := wire.SendFlush(c, m); err != nil {
		c.Close()
	}
}

// diskRetryMax bounds how long a slot whose full checkpoint could not be
// stored refuses primaries before it tries again.
const diskRetryMax = time.Minute

// diskRetryAfter is how long, in nanoseconds, a slot refuses primaries
// after the first full checkpoint that could not be stored (doubled by
// each one after it): 1 s. Atomic: tests shorten it.
var diskRetryAfter atomic.Int64

func init() { diskRetryAfter.Store(int64(time.Second)) }

func diskRetryFirst() time.Duration { return time.Duration(diskRetryAfter.Load()) }

// closeDrainWait bounds how long closing a slot waits for its disk.
const closeDrainWait = 5 * time.Second

// drain waits until everything queued for the disk is there.
func (s *slot) drain() { s.persistQ.drain() }

func toStoreOps(ops []wire.FsOp) []store.FsOp {
	out := make([]store.FsOp, len(ops))
	for i, o := range ops {
		out[i] = store.FsOp(o) // the same fields: the wire's op is the store's
	}
	return out
}

func toStoreTree(tree []wire.DiskFile) []store.TreeEntry {
	out := make([]store.TreeEntry, len(tree))
	for i, f := range tree {
		out[i] = store.TreeEntry{Root: f.Root, Path: f.Path, Kind: f.Kind, Mode: f.Mode, Data: f.Data, Target: f.Target}
	}
	return out
}

// failover resumes the last committed checkpoint: the module compiled in
// advance, the memory image taken over without a copy, the directories
// from the slot's replica, the guest's listen addresses bound here.
func (s *slot) failover(ctx context.Context, committed uint64) {
	t0 := time.Now()
	if s.img.ID.IsZero() {
		s.failoverFailed(errors.New("nothing committed to resume"))
		return
	}
	if committed == 0 {
		// The engine failed over to a commit that then failed to apply,
		// and what the image holds instead is a state it had dropped (a
		// given-up slot's, say): resuming it would take back output.
		s.failoverFailed(fmt.Errorf("the checkpoint it failed over to could not be applied, and checkpoint %d the image holds is not to be resumed", s.img.Seq))
		return
	}
	s.hurry()
	s.drain()
	tDrain := time.Since(t0)
	s.mu.Lock()
	behind := s.diskBehind
	s.mu.Unlock()
	if behind {
		s.failoverFailed(errors.New("refused: storing a checkpoint failed, so the replica of the guest's files is " +
			"older than its memory image; resuming would pair them"))
		return
	}
	s.mu.Lock()
	done := s.progDone
	s.mu.Unlock()
	if done != nil {
		<-done
	}
	tProg := time.Since(t0)
	s.mu.Lock()
	prog, perr := s.prog, s.progErr
	s.prog = nil
	s.mu.Unlock()
	if prog == nil {
		s.failoverFailed(fmt.Errorf("the module could not be prepared: %v", perr))
		return
	}
	var st wasi.State
	if err := json.Unmarshal(s.img.Devices, &st); err != nil {
		prog.Close(context.Background())
		s.failoverFailed(fmt.Errorf("device state: %w", err))
		return
	}
	var dirs []wasi.Preopen
	for i, p := range st.Preopens {
		dirs = append(dirs, wasi.Preopen{HostPath: s.store.DiskDir(i), GuestPath: p.GuestPath})
	}
	cfg := machine.Config{Program: prog, Restore: s.img, RestoreMemory: s.mi, Dirs: dirs, Listen: s.b.cfg.Rebind,
		Stdout: s.b.cfg.Stdout, Stderr: s.b.cfg.Stderr}
	var m *machine.Machine
	var err error
	// The dead primary's listening sockets may take a moment to go. An
	// address that stays taken means something still serves it — maybe
	// the primary itself, cut off from us but alive: keep trying (the
	// slot runs nothing meanwhile, and says so), never give the VM up.
	for try := 0; ; try++ {
		m, err = machine.New(ctx, cfg)
		if err == nil || ctx.Err() != nil || !isAddrInUse(err) {
			break
		}
		if try == 20 {
			s.log.Error("failover: the guest's address is still in use; retrying every second", "err", err)
			s.mu.Lock()
			s.status.Reason = "failover waiting: " + err.Error()
			s.mu.Unlock()
		}
		if try < 20 {
			time.Sleep(25 * time.Millisecond)
		} else {
			select {
			case <-time.After(time.Second):
			case <-ctx.Done():
			}
		}
	}
	if err != nil {
		prog.Close(context.Background())
		s.failoverFailed(err)
		return
	}
	elapsed := time.Since(t0)
	s.mu.Lock()
	s.vmRun = m
	s.status.FailoverMS = float64(elapsed.Microseconds()) / 1000
	// A wait for the guest's address said so in the reason: it is over.
	s.status.Reason = fmt.Sprintf("failed over: running checkpoint %d since %s", s.img.Seq, time.Now().UTC().Format(time.RFC3339))
	s.mu.Unlock()
	s.log.Warn("FAILOVER: resuming the protected VM from its last committed checkpoint",
		"seq", s.img.Seq, "listeners", m.Info().Listeners, "setup", elapsed, "disk_catch_up", tDrain,
		"program_wait", tProg-tDrain)
	if s.b.cfg.OnFailover != nil {
		s.b.cfg.OnFailover(s.vm, m)
	}
	s.b.wg.Add(1)
	go func() {
		defer s.b.wg.Done()
		defer m.Close(context.Background())
		code, err := m.Run(ctx)
		s.log.Info("failed-over VM ended", "exit_code", code, "err", err)
	}()
}

// failoverFailed reports a failover that could not resume the VM: in the
// log, the slot's status (failover_error, restore_command, reason) and its
// metric (ftvm_remus_backup_failover_failed), so an operator sees that
// nothing runs the guest, and how to resume it by hand from the slot's
// last committed checkpoint.
func (s *slot) failoverFailed(err error) {
	cmd := s.restoreCommand()
	s.log.Error("FAILOVER FAILED: the protected VM is not running anywhere; resume its last committed checkpoint "+
		"by hand", "err", err, "dir", s.dir, "restore_command", cmd)
	s.mu.Lock()
	s.status.FailoverError = err.Error()
	s.status.RestoreCommand = cmd
	s.status.Reason = fmt.Sprintf("failover failed: %v", err)
	s.mu.Unlock()
}

// restoreCommand is the ftvm restore command line that resumes the slot's
// committed chain, its preopens mapped to the slot's replicas ("" if
// nothing is committed). Nothing commits after a failover, so the files
// stay as named.
func (s *slot) restoreCommand() string {
	base, recs := s.store.Paths()
	if base == "" {
		return ""
	}
	args := []string{"ftvm", "restore"}
	var st wasi.State
	if json.Unmarshal(s.img.Devices, &st) == nil {
		for i, p := range st.Preopens {
			args = append(args, "--dir", s.store.DiskDir(i)+":"+p.GuestPath)
		}
	}
	// The listeners bind the primary's addresses unless --listen says
	// otherwise (the operator's choice: --rebind may be what failed).
	args = append(append(args, base), recs...)
	return strings.Join(args, " ")
}

func isAddrInUse(err error) bool {
	return err != nil && strings.Contains(err.Error(), "address already in use")
}

func (s *slot) publish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &s.status
	st.VM = s.vm
	st.State = s.eng.State().String()
	st.Term = s.eng.Term()
	st.Session = s.eng.Session()
	st.Committed = s.eng.Committed()
	st.Persisted = s.persSeq
	st.BytesReceived = s.bytesIn
	st.LastHeardMS = float64((s.b.now() - s.eng.LastHeard()).Microseconds()) / 1000
	if h := s.hellos[s.eng.Session()]; h != nil {
		st.Primary = h.Host
	}
}

func (s *slot) close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	// What is queued for the disk (the last checkpoints, a guest's exit)
	// goes there first, unless the disk takes too long.
	drained := make(chan struct{})
	go func() {
		s.persistQ.drain()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(closeDrainWait):
		s.log.Warn("closing the slot before the disk caught up: it keeps an older checkpoint", "waited", closeDrainWait)
	}
	s.persistQ.close()
	s.store.Close()
	s.mi.Close()
	// A preparation under way writes to the cache directories: it ends
	// (cancelled with the backup's context) before Serve returns, and
	// what it made is let go.
	s.mu.Lock()
	done := s.progDone
	s.mu.Unlock()
	if done != nil {
		select {
		case <-done:
		case <-time.After(closeDrainWait):
			s.log.Warn("closing the slot while its module is still being prepared", "waited", closeDrainWait)
		}
	}
	s.mu.Lock()
	if s.prog != nil {
		s.prog.Close(context.Background())
		s.prog = nil
	}
	s.mu.Unlock()
}
