package snapshot

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

const (
	// PageSize is the snapshot page: the dirty-tracking unit of the machine
	// (the host page), smaller than the 64 KiB wasm page so that an
	// incremental carries only what was written.
	PageSize = 4096
	// WasmPageSize is the unit wasm memories grow by; memory sizes are
	// multiples of it.
	WasmPageSize = 65536
	// MaxMemorySize is the largest wasm32 memory: 65536 wasm pages.
	MaxMemorySize = 1 << 32
	// MaxBatchPages bounds the pages of one page section, so that the
	// decoder never holds more than 4 MiB of one batch and a decompressor
	// never writes more than that.
	MaxBatchPages = 1024
	// DefaultBatchPages is the batch the encoder uses: the largest, which
	// compressed a Go heap best (COMPRESSION.md).
	DefaultBatchPages = MaxBatchPages
)

// Caps on sections whose length a file states: a stated length is checked
// against these before anything is allocated for it.
const (
	maxGlobals     = 1 << 20
	maxStackBytes  = 256 << 20
	maxDeviceBytes = 256 << 20
	maxMetaString  = 1<<16 - 1
	maxModuleBytes = 256 << 20
	maxModuleName  = 4096
)

// Kind says whether a snapshot stands alone or builds on a parent.
type Kind uint8

const (
	// Full holds every non-zero page: restoring it needs nothing else.
	Full Kind = 1
	// Incremental holds the pages dirtied since its parent; it applies only
	// on top of the image its parent left.
	Incremental Kind = 2
)

func (k Kind) String() string {
	switch k {
	case Full:
		return "full"
	case Incremental:
		return "incremental"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Hash is a SHA-256: a module's hash or a snapshot's ID.
type Hash [32]byte

// ModuleHash is the hash a snapshot records for the module it belongs to
// (the same SHA-256 of the wasm binary that the machine computes).
func ModuleHash(wasm []byte) Hash { return sha256.Sum256(wasm) }

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// IsZero reports whether h is unset (a full snapshot's parent).
func (h Hash) IsZero() bool { return h == Hash{} }

// Short is the first 12 hex digits, for messages.
func (h Hash) Short() string { return h.String()[:12] }

// ParseHash reads 64 hex digits.
func ParseHash(s string) (Hash, error) {
	var h Hash
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(h) {
		return h, fmt.Errorf("snapshot: %q is not a SHA-256 (64 hex digits)", s)
	}
	copy(h[:], b)
	return h, nil
}

// Page is one 4 KiB page of linear memory.
type Page struct {
	Index uint32 // byte offset / PageSize
	Data  []byte // exactly PageSize bytes
	// Base, when encoding an incremental snapshot, is the receiver's
	// current copy of the page (PageSize bytes; nil: none): the page is
	// then sent as Data XOR Base (a delta codec). It is not state: the
	// snapshot's ID is the same either way.
	Base []byte
	// Delta is set by the decoder on a page that arrived as a delta: Data
	// is still XORed with the receiver's copy, and Sum is the checksum of
	// the page once resolved (Snapshot.Resolve).
	Delta bool
	Sum   uint32
	// runs, for a sparse delta decoded into recycled memory
	// (DecodeBytesInto), are its runs: Data holds anything until Resolve
	// writes the page.
	runs []byte
}

// ValType is a wasm value type, coded as in the wasm binary format.
type ValType uint8

const (
	I32 ValType = 0x7f
	I64 ValType = 0x7e
	F32 ValType = 0x7d
	F64 ValType = 0x7c
)

func (t ValType) String() string {
	switch t {
	case I32:
		return "i32"
	case I64:
		return "i64"
	case F32:
		return "f32"
	case F64:
		return "f64"
	}
	return fmt.Sprintf("valtype(%#x)", uint8(t))
}

// Global is one wasm global's value, as raw bits (f32/f64 too, so that NaN
// payloads survive).
type Global struct {
	Index uint32
	Type  ValType
	Value uint64
}

// Meta says where a snapshot came from. It is informative only: nothing in
// restore depends on it.
type Meta struct {
	Created time.Time
	Host    string
	Version string // ftvm version
	Reason  string // e.g. "checkpoint", "remus epoch 42", "migrate"
}

// Snapshot is the state of one VM at a safe point, or (Incremental) the
// change since its parent. Globals, stack and device state are always
// complete; only pages are incremental.
type Snapshot struct {
	Kind       Kind
	Module     Hash
	Seq        uint64 // an incremental's Seq is its parent's + 1
	Parent     Hash   // the parent's ID; zero for a full snapshot
	MemorySize uint64 // bytes, a multiple of WasmPageSize
	// Pages are sorted by Index, without duplicates, each within
	// MemorySize. A full snapshot needs only the non-zero pages.
	Pages     []Page
	Globals   []Global // sorted by Index
	StackAddr uint64   // where the Asyncify stack blob lives in memory
	Stack     []byte
	Devices   []byte // the device layer's state (JSON), opaque here
	Meta      Meta
	// ModuleCode optionally carries the wasm binary itself, so that a
	// snapshot restores without the original file. It must hash to
	// Module. It is a convenience copy, not state: it is not part of the
	// ID. ModuleName (argv[0]) goes with it.
	ModuleCode []byte
	ModuleName string

	// Nonce makes the ID unique even for identical states; Encode draws
	// one when it is zero.
	Nonce [16]byte
	// ID is set by Encode and Decode: a hash of the snapshot's content
	// (see doc.go), which an incremental child names as its Parent.
	ID Hash
	// Sections is the layout of the encoding, set by Encode and Decode,
	// for Describe.
	Sections []SectionInfo

	// mapped is the memory an image's Map gave for a memory section: the
	// pages are already in place there, and Apply adopts it as is.
	mapped []byte
}

// checkContent validates everything in s that the format constrains, and
// says what is wrong. Encode refuses such a snapshot (ErrInvalid) so that
// nothing is written that Decode would refuse (ErrCorrupt).
func (s *Snapshot) checkContent() string {
	switch s.Kind {
	case Full:
		if !s.Parent.IsZero() {
			return "a full snapshot has a parent"
		}
	case Incremental:
		if s.Parent.IsZero() {
			return "an incremental snapshot has no parent"
		}
	default:
		return fmt.Sprintf("unknown kind %d", s.Kind)
	}
	if msg := checkMemorySize(s.MemorySize); msg != "" {
		return msg
	}
	limit := uint32(s.MemorySize / PageSize)
	for i, p := range s.Pages {
		if len(p.Data) != PageSize {
			return fmt.Sprintf("page %d has %d bytes, not %d", p.Index, len(p.Data), PageSize)
		}
		if p.Index >= limit {
			return fmt.Sprintf("page %d is beyond the memory size %d", p.Index, s.MemorySize)
		}
		if p.Base != nil && (len(p.Base) != PageSize || s.Kind != Incremental) {
			return fmt.Sprintf("page %d has a base of %d bytes in a %s snapshot: only an incremental one may send a page as a delta against a whole page", p.Index, len(p.Base), s.Kind)
		}
		if p.Delta {
			return fmt.Sprintf("page %d is an unresolved delta (Resolve it against the receiver's memory first)", p.Index)
		}
		if i > 0 && p.Index <= s.Pages[i-1].Index {
			return fmt.Sprintf("page %d follows page %d: pages must be sorted, without duplicates", p.Index, s.Pages[i-1].Index)
		}
	}
	if msg := checkGlobals(s.Globals); msg != "" {
		return msg
	}
	if msg := checkStack(s.StackAddr, len(s.Stack), s.MemorySize); msg != "" {
		return msg
	}
	if len(s.Devices) > maxDeviceBytes {
		return fmt.Sprintf("device state of %d bytes exceeds %d", len(s.Devices), maxDeviceBytes)
	}
	if msg := checkModuleCode(s); msg != "" {
		return msg
	}
	for _, f := range []struct{ name, v string }{{"host", s.Meta.Host}, {"version", s.Meta.Version}, {"reason", s.Meta.Reason}} {
		if len(f.v) > maxMetaString {
			return fmt.Sprintf("meta %s is longer than %d bytes", f.name, maxMetaString)
		}
		if !utf8.ValidString(f.v) {
			return fmt.Sprintf("meta %s is not UTF-8", f.name)
		}
	}
	return ""
}

func checkModuleCode(s *Snapshot) string {
	switch {
	case len(s.ModuleCode) == 0 && s.ModuleName != "":
		return "a module name without the module's code"
	case len(s.ModuleCode) == 0:
		return ""
	case len(s.ModuleCode) > maxModuleBytes:
		return fmt.Sprintf("module code of %d bytes exceeds %d", len(s.ModuleCode), maxModuleBytes)
	case len(s.ModuleName) > maxModuleName || !utf8.ValidString(s.ModuleName):
		return fmt.Sprintf("module name is not UTF-8 of at most %d bytes", maxModuleName)
	case ModuleHash(s.ModuleCode) != s.Module:
		return fmt.Sprintf("the module code hashes to %s, not to the module hash %s", ModuleHash(s.ModuleCode).Short(), s.Module.Short())
	}
	return ""
}

func checkMemorySize(n uint64) string {
	if n%WasmPageSize != 0 {
		return fmt.Sprintf("memory size %d is not a multiple of the 64 KiB wasm page", n)
	}
	if n > MaxMemorySize {
		return fmt.Sprintf("memory size %d exceeds 4 GiB", n)
	}
	return ""
}

func checkGlobals(gs []Global) string {
	if len(gs) > maxGlobals {
		return fmt.Sprintf("%d globals exceed %d", len(gs), maxGlobals)
	}
	for i, g := range gs {
		switch g.Type {
		case I32, F32:
			if g.Value>>32 != 0 {
				return fmt.Sprintf("global %d (%s) has a value wider than 32 bits", g.Index, g.Type)
			}
		case I64, F64:
		default:
			return fmt.Sprintf("global %d has unknown type %#x", g.Index, uint8(g.Type))
		}
		if i > 0 && g.Index <= gs[i-1].Index {
			return fmt.Sprintf("global %d follows global %d: globals must be sorted, without duplicates", g.Index, gs[i-1].Index)
		}
	}
	return ""
}

func checkStack(addr uint64, n int, memSize uint64) string {
	if n > maxStackBytes {
		return fmt.Sprintf("stack blob of %d bytes exceeds %d", n, maxStackBytes)
	}
	if addr > memSize || uint64(n) > memSize-addr {
		return fmt.Sprintf("stack blob [%d, +%d) lies outside the memory size %d", addr, n, memSize)
	}
	return ""
}

// SortPages sorts pages by index, for callers whose dirty set came from a
// map or an unordered bitmap walk.
func SortPages(pages []Page) {
	slices.SortFunc(pages, func(a, b Page) int {
		switch {
		case a.Index < b.Index:
			return -1
		case a.Index > b.Index:
			return 1
		}
		return 0
	})
}

// Error is every error this package returns about a snapshot: Kind is one
// of the Err* values below (test with errors.Is), the rest locates it.
type Error struct {
	Kind    error
	Path    string // file, when known
	Offset  int64  // byte offset in the encoding; -1 when not about bytes
	Section SectionType
	Msg     string
	Cause   error // underlying error (I/O, decompressor), may be nil
}

var (
	// ErrCorrupt: the bytes are not a valid snapshot (bad magic, checksum
	// mismatch, impossible value). Nothing was applied.
	ErrCorrupt = errors.New("corrupt snapshot")
	// ErrTruncated: the snapshot ends early (the trailer never came).
	ErrTruncated = errors.New("truncated snapshot")
	// ErrVersion: a well-formed snapshot of a format version this build
	// does not read.
	ErrVersion = errors.New("unsupported snapshot format version")
	// ErrModuleMismatch: the snapshot belongs to another module.
	ErrModuleMismatch = errors.New("snapshot is of another module")
	// ErrChain: the snapshot does not follow the image it is applied to
	// (missing link, wrong order, chain starting with an incremental).
	ErrChain = errors.New("broken snapshot chain")
	// ErrInvalid: Encode was given a snapshot that breaks the format's
	// rules (a caller bug); nothing was written.
	ErrInvalid = errors.New("invalid snapshot")
)

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("snapshot")
	if e.Path != "" {
		b.WriteString(" " + e.Path)
	}
	b.WriteString(": " + e.Kind.Error())
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " at byte %d", e.Offset)
	}
	if e.Section != 0 {
		fmt.Fprintf(&b, " (%s section)", e.Section)
	}
	if e.Msg != "" {
		b.WriteString(": " + e.Msg)
	}
	if e.Cause != nil {
		b.WriteString(": " + e.Cause.Error())
	}
	return b.String()
}

// Unwrap gives both the kind and the cause, so errors.Is(err, ErrTruncated)
// and errors.Is(err, io.EOF) both work for an empty stream.
func (e *Error) Unwrap() []error {
	if e.Cause != nil {
		return []error{e.Kind, e.Cause}
	}
	return []error{e.Kind}
}

func newError(kind error, msg string, args ...any) *Error {
	return &Error{Kind: kind, Offset: -1, Msg: fmt.Sprintf(msg, args...)}
}

// withPath adds the file name to one of our errors.
func withPath(err error, path string) error {
	var e *Error
	if errors.As(err, &e) && e.Path == "" {
		e.Path = path
	}
	return err
}
