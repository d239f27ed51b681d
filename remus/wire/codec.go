package wire

import (
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"time"
	"unicode/utf8"
)

// codec is what every message type implements besides Type.
type codec interface {
	Message
	appendTo(b []byte) []byte
	decode(d *decoder)
	check(c *checker)
	sizeHint() int
}

var (
	_ codec = (*Hello)(nil)
	_ codec = (*Welcome)(nil)
	_ codec = (*Reject)(nil)
	_ codec = (*CheckpointBegin)(nil)
	_ codec = (*CheckpointData)(nil)
	_ codec = (*DiskOps)(nil)
	_ codec = (*DiskFile)(nil)
	_ codec = (*CheckpointEnd)(nil)
	_ codec = (*Ack)(nil)
	_ codec = (*Heartbeat)(nil)
	_ codec = (*NeedFull)(nil)
	_ codec = (*Exit)(nil)
)

// newMessage is an empty message of type t, nil if t is unknown.
func newMessage(t Type) codec {
	switch t {
	case TypeHello:
		return &Hello{}
	case TypeWelcome:
		return &Welcome{}
	case TypeReject:
		return &Reject{}
	case TypeCheckpointBegin:
		return &CheckpointBegin{}
	case TypeCheckpointData:
		return &CheckpointData{}
	case TypeDiskOps:
		return &DiskOps{}
	case TypeDiskFile:
		return &DiskFile{}
	case TypeCheckpointEnd:
		return &CheckpointEnd{}
	case TypeAck:
		return &Ack{}
	case TypeHeartbeat:
		return &Heartbeat{}
	case TypeNeedFull:
		return &NeedFull{}
	case TypeExit:
		return &Exit{}
	}
	return nil
}

// Marshal encodes m (one of this package's pointer types; anything else
// panics). It does not check m: a message that Validate refuses encodes,
// but its receiver refuses it.
func Marshal(m Message) []byte {
	return AppendMarshal(make([]byte, 0, m.(codec).sizeHint()), m)
}

// AppendMarshal appends m's encoding to dst.
func AppendMarshal(dst []byte, m Message) []byte {
	return m.(codec).appendTo(dst)
}

// Unmarshal decodes a payload of type t. The message shares no memory
// with b. Errors are *Error naming the type and the field.
func Unmarshal(t Type, b []byte) (Message, error) {
	m := newMessage(t)
	if m == nil {
		return nil, &Error{Type: t, Offset: -1, Msg: "unknown message type"}
	}
	d := decoder{t: t, b: b}
	m.decode(&d)
	if d.err == nil && d.off != len(b) {
		d.fail("", "%d trailing bytes", len(b)-d.off)
	}
	if d.err != nil {
		return nil, d.err
	}
	return m, nil
}

// Validate checks m against the rules Unmarshal enforces (string limits,
// UTF-8, DiskFile kinds, Hello's version), so that a sender learns of a
// message its peer would refuse.
func Validate(m Message) error {
	cm, ok := m.(codec)
	if !ok || isNil(cm) {
		return &Error{Offset: -1, Msg: fmt.Sprintf("not a message of this package: %T", m)}
	}
	c := checker{t: m.Type()}
	cm.check(&c)
	if c.err != nil {
		return c.err
	}
	return nil
}

func isNil(m codec) bool {
	switch v := m.(type) {
	case *Hello:
		return v == nil
	case *Welcome:
		return v == nil
	case *Reject:
		return v == nil
	case *CheckpointBegin:
		return v == nil
	case *CheckpointData:
		return v == nil
	case *DiskOps:
		return v == nil
	case *DiskFile:
		return v == nil
	case *CheckpointEnd:
		return v == nil
	case *Ack:
		return v == nil
	case *Heartbeat:
		return v == nil
	case *NeedFull:
		return v == nil
	case *Exit:
		return v == nil
	}
	return true
}

// ---- shared rules ----

// stringProblem says what is wrong with s as a string of at most limit bytes
// (a path if path), or "".
func stringProblem(s string, limit int, path bool) string {
	switch {
	case len(s) > limit:
		return fmt.Sprintf("%d bytes, limit %d", len(s), limit)
	case !utf8.ValidString(s):
		return "not valid UTF-8"
	case path && strings.IndexByte(s, 0) >= 0:
		return "a path with a NUL byte"
	}
	return ""
}

// diskFileProblem checks the kind-dependent fields of f.
func diskFileProblem(f *DiskFile) (field, msg string) {
	switch {
	case f.Kind < FileRegular || f.Kind > FileSymlink:
		return "Kind", fmt.Sprintf("unknown file kind %d", f.Kind)
	case f.Kind != FileRegular && len(f.Data) > 0:
		return "Data", "only a regular file carries data"
	case f.Kind != FileRegular && f.Offset != 0:
		return "Offset", "only a regular file has an offset"
	case f.Kind != FileSymlink && f.Target != "":
		return "Target", "only a symlink has a target"
	case f.Kind == FileSymlink && f.Target == "":
		return "Target", "a symlink needs a target"
	}
	return "", ""
}

func versionProblem(v uint32) string {
	if v != Version {
		return fmt.Sprintf("protocol version %d, this build speaks %d", v, Version)
	}
	return ""
}

// ---- encoding ----

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, p []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(p)))
	return append(b, p...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// ---- decoding ----

// decoder reads fields in order; after the first error every read returns
// a zero value and the error stays the first one.
type decoder struct {
	t    Type
	b    []byte
	off  int
	err  *Error
	list string // the list being decoded, for field names
	idx  int
}

func (d *decoder) name(field string) string {
	switch {
	case d.list == "":
		return field
	case field == "":
		return fmt.Sprintf("%s[%d]", d.list, d.idx)
	}
	return fmt.Sprintf("%s[%d].%s", d.list, d.idx, field)
}

func (d *decoder) fail(field, format string, args ...any) {
	if d.err == nil {
		d.err = &Error{Type: d.t, Field: d.name(field), Offset: d.off, Msg: fmt.Sprintf(format, args...)}
	}
}

func (d *decoder) left() int { return len(d.b) - d.off }

func (d *decoder) need(field string, n int) bool {
	if d.err != nil {
		return false
	}
	if d.left() < n {
		d.fail(field, "truncated: needs %d bytes, %d left", n, d.left())
		return false
	}
	return true
}

// varintLen reads the length of the minimal varint at off, or fails.
func (d *decoder) varintLen(field string) int {
	if d.err != nil {
		return 0
	}
	_, n := binary.Uvarint(d.b[d.off:])
	switch {
	case n == 0:
		d.fail(field, "truncated varint")
	case n < 0:
		d.fail(field, "varint overflows 64 bits")
	case n > 1 && d.b[d.off+n-1] == 0:
		d.fail(field, "non-minimal varint")
	default:
		return n
	}
	return 0
}

func (d *decoder) uvarint(field string) uint64 {
	n := d.varintLen(field)
	if n == 0 {
		return 0
	}
	v, _ := binary.Uvarint(d.b[d.off:])
	d.off += n
	return v
}

// MaxTimeout bounds Hello.Timeout and Welcome.Timeout: a day.
const MaxTimeout = 24 * time.Hour

// duration decodes a timeout: a uvarint of nanoseconds, at most
// MaxTimeout (0: not said).
func (d *decoder) duration(field string) time.Duration {
	at := d.off
	v := d.uvarint(field)
	if d.err == nil && v > uint64(MaxTimeout) {
		d.off = at
		d.fail(field, "%d ns is above the limit of %v", v, MaxTimeout)
		return 0
	}
	return time.Duration(v)
}

// durationProblem says what is wrong with a timeout, or "".
func durationProblem(t time.Duration) string {
	if t < 0 || t > MaxTimeout {
		return fmt.Sprintf("%v is outside [0, %v]", t, MaxTimeout)
	}
	return ""
}

func (d *decoder) varint(field string) int64 {
	n := d.varintLen(field)
	if n == 0 {
		return 0
	}
	v, _ := binary.Varint(d.b[d.off:])
	d.off += n
	return v
}

func (d *decoder) u32(field string) uint32 {
	off := d.off
	v := d.uvarint(field)
	if v > math.MaxUint32 {
		d.off = off
		d.fail(field, "%d does not fit in 32 bits", v)
		return 0
	}
	return uint32(v)
}

func (d *decoder) fixed32(field string) uint32 {
	if !d.need(field, 4) {
		return 0
	}
	v := binary.LittleEndian.Uint32(d.b[d.off:])
	d.off += 4
	return v
}

func (d *decoder) u8(field string) uint8 {
	if !d.need(field, 1) {
		return 0
	}
	v := d.b[d.off]
	d.off++
	return v
}

func (d *decoder) bool(field string) bool {
	v := d.u8(field)
	if v > 1 {
		d.off--
		d.fail(field, "bool byte %d, want 0 or 1", v)
		return false
	}
	return v == 1
}

func (d *decoder) fixed(field string, dst []byte) {
	if d.need(field, len(dst)) {
		d.off += copy(dst, d.b[d.off:])
	}
}

// length reads a length prefix and checks it against what is left.
func (d *decoder) length(field string, limit int) int {
	off := d.off
	n := d.uvarint(field)
	if d.err != nil {
		return 0
	}
	if limit >= 0 && n > uint64(limit) {
		d.off = off
		d.fail(field, "%d bytes, limit %d", n, limit)
		return 0
	}
	if left := d.left(); n > uint64(left) {
		d.off = off
		d.fail(field, "length %d, only %d bytes left", n, left)
		return 0
	}
	return int(n)
}

// bytes reads a length-prefixed byte string, copied; nil when empty.
func (d *decoder) bytes(field string) []byte {
	n := d.length(field, -1)
	if n == 0 {
		return nil
	}
	p := make([]byte, n)
	d.off += copy(p, d.b[d.off:])
	return p
}

func (d *decoder) string(field string, limit int, path bool) string {
	n := d.length(field, limit)
	if n == 0 {
		return ""
	}
	s := string(d.b[d.off : d.off+n])
	if msg := stringProblem(s, limit, path); msg != "" {
		d.fail(field, "%s", msg)
		return ""
	}
	d.off += n
	return s
}

// count reads a list's length and checks that that many elements of at
// least minSize bytes each fit in what is left, before anything is
// allocated for them.
func (d *decoder) count(field string, minSize int) int {
	off := d.off
	n := d.uvarint(field)
	if d.err != nil {
		return 0
	}
	if left := d.left(); n > uint64(left/minSize) {
		d.off = off
		d.fail(field, "count %d cannot fit in the %d bytes left", n, left)
		return 0
	}
	return int(n)
}

func (d *decoder) enter(list string, i int) { d.list, d.idx = list, i }
func (d *decoder) leave()                   { d.list = "" }

// ---- validation ----

type checker struct {
	t   Type
	err *Error
}

func (c *checker) fail(field, msg string) {
	if c.err == nil && msg != "" {
		c.err = &Error{Type: c.t, Field: field, Offset: -1, Msg: msg}
	}
}

func (c *checker) string(field, s string, limit int, path bool) {
	c.fail(field, stringProblem(s, limit, path))
}

// ---- messages ----

func (m *Hello) appendTo(b []byte) []byte {
	b = binary.LittleEndian.AppendUint32(b, m.Version)
	b = appendString(b, m.VM)
	b = binary.AppendUvarint(b, m.Term)
	b = append(b, m.Module[:]...)
	b = appendString(b, m.Name)
	b = appendString(b, m.Host)
	b = binary.AppendUvarint(b, uint64(len(m.Listen)))
	for _, l := range m.Listen {
		b = binary.AppendUvarint(b, uint64(l.Fd))
		b = appendString(b, l.Addr)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Preopens)))
	for _, p := range m.Preopens {
		b = appendString(b, p)
	}
	b = binary.AppendUvarint(b, uint64(m.Timeout))
	b = binary.AppendUvarint(b, m.Run)
	b = binary.AppendUvarint(b, m.Released)
	b = appendBool(b, m.GiveUp)
	return binary.AppendUvarint(b, m.Dial)
}

func (m *Hello) decode(d *decoder) {
	m.Version = d.fixed32("Version")
	if d.err == nil {
		if msg := versionProblem(m.Version); msg != "" {
			d.off -= 4
			d.fail("Version", "%s", msg)
			d.err.Err = ErrVersion
			return
		}
	}
	m.VM = d.string("VM", MaxName, false)
	m.Term = d.uvarint("Term")
	d.fixed("Module", m.Module[:])
	m.Name = d.string("Name", MaxName, false)
	m.Host = d.string("Host", MaxName, false)
	if n := d.count("Listen", 2); n > 0 {
		m.Listen = make([]Listener, n)
		total := 0
		for i := range m.Listen {
			d.enter("Listen", i)
			m.Listen[i].Fd = d.u32("Fd")
			m.Listen[i].Addr = d.string("Addr", MaxName, false)
			if total += len(m.Listen[i].Addr); total > MaxListBytes {
				d.fail("Addr", "the list's addresses exceed %d bytes", MaxListBytes)
			}
		}
		d.leave()
	}
	if n := d.count("Preopens", 1); n > 0 {
		m.Preopens = make([]string, n)
		total := 0
		for i := range m.Preopens {
			d.enter("Preopens", i)
			m.Preopens[i] = d.string("", MaxPath, true)
			if total += len(m.Preopens[i]); total > MaxListBytes {
				d.fail("", "the list's paths exceed %d bytes", MaxListBytes)
			}
		}
		d.leave()
	}
	m.Timeout = d.duration("Timeout")
	m.Run = d.uvarint("Run")
	m.Released = d.uvarint("Released")
	m.GiveUp = d.bool("GiveUp")
	m.Dial = d.uvarint("Dial")
}

func (m *Hello) check(c *checker) {
	c.fail("Version", versionProblem(m.Version))
	c.string("VM", m.VM, MaxName, false)
	c.string("Name", m.Name, MaxName, false)
	c.string("Host", m.Host, MaxName, false)
	total := 0
	for i, l := range m.Listen {
		c.string(fmt.Sprintf("Listen[%d].Addr", i), l.Addr, MaxName, false)
		total += len(l.Addr)
	}
	if total > MaxListBytes {
		c.fail("Listen", fmt.Sprintf("the list's addresses total %d bytes, limit %d", total, MaxListBytes))
	}
	total = 0
	for i, p := range m.Preopens {
		c.string(fmt.Sprintf("Preopens[%d]", i), p, MaxPath, true)
		total += len(p)
	}
	if total > MaxListBytes {
		c.fail("Preopens", fmt.Sprintf("the list's paths total %d bytes, limit %d", total, MaxListBytes))
	}
	c.fail("Timeout", durationProblem(m.Timeout))
}

func (m *Hello) sizeHint() int {
	n := 64 + len(m.VM) + len(m.Name) + len(m.Host)
	for _, l := range m.Listen {
		n += 8 + len(l.Addr)
	}
	for _, p := range m.Preopens {
		n += 4 + len(p)
	}
	return n
}

func (m *Welcome) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Session)
	b = binary.AppendUvarint(b, m.Committed)
	return binary.AppendUvarint(b, uint64(m.Timeout))
}

func (m *Welcome) decode(d *decoder) {
	m.Session = d.uvarint("Session")
	m.Committed = d.uvarint("Committed")
	m.Timeout = d.duration("Timeout")
}

func (m *Welcome) check(c *checker) { c.fail("Timeout", durationProblem(m.Timeout)) }
func (m *Welcome) sizeHint() int    { return 30 }

func (m *Reject) appendTo(b []byte) []byte {
	return append(appendString(b, m.Reason), byte(m.Code))
}

func (m *Reject) decode(d *decoder) {
	m.Reason = d.string("Reason", MaxReason, false)
	m.Code = RejectCode(d.u8("Code"))
	if d.err == nil && m.Code > RejectReleased {
		d.off--
		d.fail("Code", "unknown reject code %d", m.Code)
	}
}

func (m *Reject) check(c *checker) {
	c.string("Reason", m.Reason, MaxReason, false)
	if m.Code > RejectReleased {
		c.fail("Code", fmt.Sprintf("unknown reject code %d", m.Code))
	}
}

func (m *Reject) sizeHint() int { return 5 + len(m.Reason) }

func (m *CheckpointBegin) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Seq)
	b = appendBool(b, m.Full)
	return binary.AppendUvarint(b, m.SnapshotSize)
}

func (m *CheckpointBegin) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	m.Full = d.bool("Full")
	m.SnapshotSize = d.uvarint("SnapshotSize")
}

func (m *CheckpointBegin) check(*checker) {}
func (m *CheckpointBegin) sizeHint() int  { return 21 }

func (m *CheckpointData) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Seq)
	b = binary.AppendUvarint(b, m.Offset)
	return appendBytes(b, m.Data)
}

func (m *CheckpointData) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	m.Offset = d.uvarint("Offset")
	m.Data = d.bytes("Data")
}

func (m *CheckpointData) check(*checker) {}
func (m *CheckpointData) sizeHint() int  { return 30 + len(m.Data) }

// minFsOpSize is the smallest encoding of an FsOp: one byte per field.
const minFsOpSize = 9

func (m *DiskOps) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Seq)
	b = binary.AppendUvarint(b, uint64(len(m.Ops)))
	for i := range m.Ops {
		op := &m.Ops[i]
		b = append(b, op.Op)
		b = binary.AppendUvarint(b, uint64(op.Root))
		b = appendString(b, op.Path)
		b = binary.AppendUvarint(b, uint64(op.Root2))
		b = appendString(b, op.Path2)
		b = binary.AppendVarint(b, op.Offset)
		b = binary.AppendVarint(b, op.Size)
		b = binary.AppendUvarint(b, uint64(op.Flags))
		b = appendBytes(b, op.Data)
	}
	return b
}

func (m *DiskOps) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	n := d.count("Ops", minFsOpSize)
	if n == 0 {
		return
	}
	m.Ops = make([]FsOp, n)
	for i := range m.Ops {
		d.enter("Ops", i)
		op := &m.Ops[i]
		op.Op = d.u8("Op")
		op.Root = d.u32("Root")
		op.Path = d.string("Path", MaxPath, true)
		op.Root2 = d.u32("Root2")
		op.Path2 = d.string("Path2", MaxPath, true)
		op.Offset = d.varint("Offset")
		op.Size = d.varint("Size")
		op.Flags = d.u32("Flags")
		op.Data = d.bytes("Data")
		if d.err != nil {
			break
		}
	}
	d.leave()
}

func (m *DiskOps) check(c *checker) {
	for i := range m.Ops {
		if c.err != nil {
			return
		}
		c.string(fmt.Sprintf("Ops[%d].Path", i), m.Ops[i].Path, MaxPath, true)
		c.string(fmt.Sprintf("Ops[%d].Path2", i), m.Ops[i].Path2, MaxPath, true)
	}
}

func (m *DiskOps) sizeHint() int {
	n := 24
	for i := range m.Ops {
		n += 48 + len(m.Ops[i].Path) + len(m.Ops[i].Path2) + len(m.Ops[i].Data)
	}
	return n
}

func (m *DiskFile) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Seq)
	b = binary.AppendUvarint(b, uint64(m.Root))
	b = appendString(b, m.Path)
	b = append(b, m.Kind)
	b = binary.AppendUvarint(b, uint64(m.Mode))
	b = binary.AppendUvarint(b, m.Offset)
	b = appendBytes(b, m.Data)
	return appendString(b, m.Target)
}

func (m *DiskFile) decode(d *decoder) {
	var at [4]int // where Kind, Offset, Data and Target start, for errors
	m.Seq = d.uvarint("Seq")
	m.Root = d.u32("Root")
	m.Path = d.string("Path", MaxPath, true)
	at[0] = d.off
	m.Kind = d.u8("Kind")
	m.Mode = d.u32("Mode")
	at[1] = d.off
	m.Offset = d.uvarint("Offset")
	at[2] = d.off
	m.Data = d.bytes("Data")
	at[3] = d.off
	m.Target = d.string("Target", MaxPath, true)
	if d.err == nil {
		if field, msg := diskFileProblem(m); msg != "" {
			switch field {
			case "Kind":
				d.off = at[0]
			case "Offset":
				d.off = at[1]
			case "Data":
				d.off = at[2]
			case "Target":
				d.off = at[3]
			}
			d.fail(field, "%s", msg)
		}
	}
}

func (m *DiskFile) check(c *checker) {
	c.string("Path", m.Path, MaxPath, true)
	c.string("Target", m.Target, MaxPath, true)
	c.fail(diskFileProblem(m))
}

func (m *DiskFile) sizeHint() int { return 64 + len(m.Path) + len(m.Data) + len(m.Target) }

func (m *CheckpointEnd) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Seq)
	b = binary.AppendUvarint(b, m.SnapshotSize)
	b = binary.LittleEndian.AppendUint32(b, m.SnapshotCRC)
	b = binary.AppendUvarint(b, uint64(m.DiskOps))
	return binary.AppendUvarint(b, uint64(m.DiskFiles))
}

func (m *CheckpointEnd) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	m.SnapshotSize = d.uvarint("SnapshotSize")
	m.SnapshotCRC = d.fixed32("SnapshotCRC")
	m.DiskOps = d.u32("DiskOps")
	m.DiskFiles = d.u32("DiskFiles")
}

func (m *CheckpointEnd) check(*checker) {}
func (m *CheckpointEnd) sizeHint() int  { return 34 }

func (m *Ack) appendTo(b []byte) []byte { return binary.AppendUvarint(b, m.Seq) }
func (m *Ack) decode(d *decoder)        { m.Seq = d.uvarint("Seq") }
func (m *Ack) check(*checker)           {}
func (m *Ack) sizeHint() int            { return 10 }

func (m *Heartbeat) appendTo(b []byte) []byte { return binary.AppendUvarint(b, m.Seq) }
func (m *Heartbeat) decode(d *decoder)        { m.Seq = d.uvarint("Seq") }
func (m *Heartbeat) check(*checker)           {}
func (m *Heartbeat) sizeHint() int            { return 10 }

func (m *Exit) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(binary.AppendUvarint(b, m.Seq), uint64(m.Code))
	return binary.AppendUvarint(binary.AppendUvarint(b, uint64(m.DiskOps)), m.After)
}
func (m *Exit) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	m.Code = d.u32("Code")
	m.DiskOps = d.u32("DiskOps")
	m.After = d.uvarint("After")
}
func (m *Exit) check(*checker) {}
func (m *Exit) sizeHint() int  { return 30 }

func (m *NeedFull) appendTo(b []byte) []byte {
	return appendString(binary.AppendUvarint(b, m.Seq), m.Reason)
}
func (m *NeedFull) decode(d *decoder) {
	m.Seq = d.uvarint("Seq")
	m.Reason = d.string("Reason", MaxReason, false)
}
func (m *NeedFull) check(c *checker) { c.string("Reason", m.Reason, MaxReason, false) }
func (m *NeedFull) sizeHint() int    { return 14 + len(m.Reason) }
