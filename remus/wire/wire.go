// Package wire is the Remus replication protocol's messages and their
// encoding. Each message travels as one transport frame whose type byte is
// the message's Type and whose payload is the message's encoding.
//
// # Encoding (protocol version 1)
//
// Fields are encoded in declaration order: unsigned integers as minimal
// uvarints (u32 fields checked against the u32 range), signed ones as
// minimal zigzag varints, bool as one byte 0 or 1, Hello.Version and
// CheckpointEnd.SnapshotCRC as little-endian u32, snapshot.Hash as its 32
// bytes, strings and byte slices as a uvarint length then the bytes, lists
// as a uvarint count then the elements. Hello.Version comes first so that
// a peer of another version is recognised before anything else is read.
//
// Decoding checks every length and count against the bytes that remain
// before allocating, refuses non-minimal varints, trailing bytes and
// unknown types, and requires strings to be valid UTF-8 within the limits
// below (paths also free of NUL bytes). So an encoding that decodes is the
// only encoding of its message: Marshal(Unmarshal(b)) == b. Decoding never
// aliases its input. Validate applies the same rules to a message about to
// be sent; Send refuses a message that breaks them.
package wire

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unsafe"

	"github.com/ftvm/ftvm/snapshot"
)

// Version is the protocol version this build speaks, carried in Hello.
// Version 2: incremental checkpoints may carry pages as deltas against the
// backup's copies (snapshot format version 3). Version 3: as sparse runs
// (snapshot format version 4, CodecDeltaSparse). Version 4: an Exit
// carries the disk operations of the epoch the guest ended in. Version 5:
// an Exit names the checkpoint its disk operations follow (After).
// Version 6: Hello and Welcome carry each side's failure-detection
// timeout, so that each sends heartbeats often enough for the other.
// Version 7: Hello carries the primary's Run, so that a backup tells a
// redial of the run whose checkpoints it holds from a new run of the VM.
// Version 8: Hello carries Released, GiveUp and Dial, and Reject a Code, so that
// a primary gives its backup up through it (RejectReleased) before it
// releases output the backup does not have, and the backup never resumes
// a checkpoint older than output its primary released.
const Version = 8

// Limits on strings, enforced by Validate and Unmarshal.
const (
	// MaxPath bounds a path (FsOp.Path and Path2, DiskFile.Path and
	// Target, each Hello.Preopens entry), in bytes.
	MaxPath = 4096
	// MaxName bounds Hello.VM, Name, Host and each Listener.Addr.
	MaxName = 4096
	// MaxReason bounds Reject.Reason and NeedFull.Reason.
	MaxReason = 64 << 10
	// MaxListBytes bounds the total bytes of the strings of one list
	// (Hello.Listen's addresses; Hello.Preopens).
	MaxListBytes = 64 << 10
)

// Type is a message's type: the transport frame's type byte.
type Type uint8

const (
	TypeHello Type = iota + 1
	TypeWelcome
	TypeReject
	TypeCheckpointBegin
	TypeCheckpointData
	TypeDiskOps
	TypeDiskFile
	TypeCheckpointEnd
	TypeAck
	TypeHeartbeat
	TypeNeedFull
	TypeExit
)

var typeNames = [...]string{
	TypeHello:           "Hello",
	TypeWelcome:         "Welcome",
	TypeReject:          "Reject",
	TypeCheckpointBegin: "CheckpointBegin",
	TypeCheckpointData:  "CheckpointData",
	TypeDiskOps:         "DiskOps",
	TypeDiskFile:        "DiskFile",
	TypeCheckpointEnd:   "CheckpointEnd",
	TypeAck:             "Ack",
	TypeHeartbeat:       "Heartbeat",
	TypeNeedFull:        "NeedFull",
	TypeExit:            "Exit",
}

func (t Type) String() string {
	if int(t) < len(typeNames) && typeNames[t] != "" {
		return typeNames[t]
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Message is one of the pointer types below (*Hello, *Welcome, ...).
type Message interface{ Type() Type }

// Hello opens a session: the primary says which VM it replicates and how.
type Hello struct {
	Version  uint32 // protocol version: Version
	VM       string
	Term     uint64
	Module   snapshot.Hash
	Name     string
	Host     string
	Listen   []Listener
	Preopens []string
	// Timeout is how long this primary waits to hear from its backup
	// before it gives it up: the backup heartbeats at least every fifth
	// of it.
	Timeout time.Duration
	// Run identifies the primary's process (random, nonzero): its
	// redials carry the same, a new run of the VM another.
	Run uint64
	// Released is the newest epoch some of whose output has left the
	// primary: a checkpoint of this run older than it is not resumed.
	Released uint64
	// GiveUp: the primary gives this backup up and runs unprotected; the
	// backup drops what it holds of the VM and answers a Reject with
	// Code RejectReleased instead of a Welcome.
	GiveUp bool
	// Dial numbers the run's connections, from 1: a Hello the backup
	// handles after a later one of its run is refused.
	Dial uint64
}

// Listener is a listening socket of the guest: its fd and address.
type Listener struct {
	Fd   uint32
	Addr string
}

// Welcome accepts a Hello.
type Welcome struct {
	Session   uint64
	Committed uint64
	// Timeout is how long this backup waits to hear from the primary
	// before it fails over: the primary heartbeats at least every fifth
	// of it.
	Timeout time.Duration
}

// Reject refuses a Hello.
type Reject struct {
	Reason string
	Code   RejectCode
}

// RejectCode says what a Reject means for the primary.
type RejectCode uint8

const (
	// RejectRefused: not now (a duplicate, a full disk, a limit); the
	// primary dials again.
	RejectRefused RejectCode = iota
	// RejectFenced: the backup runs the VM, or holds another run's
	// checkpoints: the primary is stale, stops its guest and does not
	// dial again.
	RejectFenced
	// RejectReleased answers a Hello with GiveUp: the backup holds
	// nothing of the VM to resume, so the primary may release output.
	RejectReleased
)

// CheckpointBegin opens checkpoint Seq. SnapshotSize 0 means the size is
// not known yet (the snapshot is streamed while it is encoded); the
// CheckpointEnd always carries it.
type CheckpointBegin struct {
	Seq          uint64
	Full         bool
	SnapshotSize uint64
}

// CheckpointData is a chunk of checkpoint Seq's encoded snapshot (the
// snapshot package's format) at Offset.
type CheckpointData struct {
	Seq    uint64
	Offset uint64
	Data   []byte
}

// DiskOps carries filesystem operations of checkpoint Seq, in order.
type DiskOps struct {
	Seq uint64
	Ops []FsOp
}

// FsOp is one filesystem operation; Op's values are the disk replicator's.
// Paths are relative to the preopen numbered Root (Root2 for Path2).
type FsOp struct {
	Op     uint8
	Root   uint32
	Path   string
	Root2  uint32
	Path2  string
	Offset int64
	Size   int64
	Flags  uint32
	Data   []byte
}

// HeldBytes is what o holds in memory: its data, its paths and itself.
// The primary's journal (bounded by --hold-limit) and the backup (bounded
// by what one checkpoint may carry) count it alike: an op with empty
// paths and no data, nine bytes on the wire, is a hundred in memory.
func (o *FsOp) HeldBytes() uint64 {
	return uint64(len(o.Data)+len(o.Path)+len(o.Path2)) + uint64(unsafe.Sizeof(*o))
}

// DiskFile kinds.
const (
	FileRegular uint8 = iota + 1
	FileDir
	FileSymlink
)

// DiskFile is an entry of a full sync's tree. A regular file's contents
// may come in several DiskFile messages, by Offset; only a regular file
// carries Data or a nonzero Offset, and only a symlink (and every symlink)
// a Target.
type DiskFile struct {
	Seq    uint64
	Root   uint32
	Path   string
	Kind   uint8 // FileRegular, FileDir, FileSymlink
	Mode   uint32
	Offset uint64
	Data   []byte
	Target string
}

// HeldBytes is what f holds in memory: its data, its names and itself.
func (f *DiskFile) HeldBytes() uint64 {
	return uint64(len(f.Data)+len(f.Path)+len(f.Target)) + uint64(unsafe.Sizeof(*f))
}

// CheckpointEnd closes checkpoint Seq: the snapshot's size and CRC-32C,
// and how many DiskOps and DiskFile messages were sent for Seq, so that
// the receiver knows everything arrived.
type CheckpointEnd struct {
	Seq          uint64
	SnapshotSize uint64
	SnapshotCRC  uint32
	DiskOps      uint32 // DiskOps messages sent for Seq
	DiskFiles    uint32 // DiskFile messages sent for Seq
}

// Ack says the backup committed checkpoint Seq.
type Ack struct{ Seq uint64 }

// Heartbeat carries the sender's latest taken (primary) or committed
// (backup) seq.
type Heartbeat struct{ Seq uint64 }

// Exit says the guest ended by itself in epoch Seq, with Code: the backup
// must not resume it. No checkpoint has that number (the last one taken
// is Seq-1, and the primary may have abandoned those not yet acknowledged,
// even mid-stream: the backup drops a part it holds). DiskOps messages of
// Seq, as many as DiskOps says, come right before it: the file system
// operations of every epoch after checkpoint After, the last one the
// primary sent whole, in order. Checkpoints after an abandoned one are
// never sent (the backup lacks their base), so their operations travel
// here. The backup applies them to its replica of the guest's files only
// on top of checkpoint After, its last commit of the session. It answers
// with an Ack of Seq; then the primary releases all output still held.
type Exit struct {
	Seq     uint64
	Code    uint32
	DiskOps uint32 // DiskOps messages sent for Seq
	After   uint64 // the checkpoint the disk operations follow (0: none was sent whole)
}

// NeedFull refuses checkpoint Seq and asks the primary for a full one.
type NeedFull struct {
	Seq    uint64
	Reason string
}

func (*Hello) Type() Type           { return TypeHello }
func (*Welcome) Type() Type         { return TypeWelcome }
func (*Reject) Type() Type          { return TypeReject }
func (*CheckpointBegin) Type() Type { return TypeCheckpointBegin }
func (*CheckpointData) Type() Type  { return TypeCheckpointData }
func (*DiskOps) Type() Type         { return TypeDiskOps }
func (*DiskFile) Type() Type        { return TypeDiskFile }
func (*CheckpointEnd) Type() Type   { return TypeCheckpointEnd }
func (*Ack) Type() Type             { return TypeAck }
func (*Heartbeat) Type() Type       { return TypeHeartbeat }
func (*NeedFull) Type() Type        { return TypeNeedFull }
func (*Exit) Type() Type            { return TypeExit }

// ErrVersion is the cause of the error Unmarshal returns for a Hello of
// another protocol version (test with errors.Is); the receiver may answer
// with a Reject.
var ErrVersion = errors.New("unsupported protocol version")

// Error is every error about a message's encoding or contents. Field names
// the field ("Ops[2].Path"; empty when about the whole message). Offset is
// the byte of the payload where decoding failed, -1 from Validate.
type Error struct {
	Type   Type
	Field  string
	Offset int
	Msg    string
	Err    error // ErrVersion, or nil
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("wire: ")
	b.WriteString(e.Type.String())
	if e.Field != "" {
		b.WriteString(".")
		b.WriteString(e.Field)
	}
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " at byte %d", e.Offset)
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }
