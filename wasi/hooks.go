package wasi

// The two hooks through which fault-tolerance modes see the guest's interaction
// with the world (see ARCHITECTURE.md): every nondeterministic value a host call
// hands to the guest flows through the InputTap, and every externally visible
// effect flows through the OutputGate.

// InputKind says what kind of nondeterministic input a host call produced.
type InputKind uint8

const (
	InputClock  InputKind = iota + 1 // a clock reading (Value)
	InputRandom                      // random bytes (Data)
	InputRead                        // bytes read from a file, socket or stdin (Data), or an error
	InputAccept                      // a connection accepted on a listener (Value = new guest fd)
	InputPoll                        // poll_oneoff results (Data = the event records written)
	InputStat                        // host metadata: filestat, fdstat of a host object, readdir, readlink (Data)
	InputResult                      // the result of an effect the host performed (Value = count), e.g. a short write
)

var inputKindNames = [...]string{"", "clock", "random", "read", "accept", "poll", "stat", "result"}

func (k InputKind) String() string {
	if int(k) < len(inputKindNames) {
		return inputKindNames[k]
	}
	return "unknown"
}

// Input is one nondeterministic input. Data aliases guest or host buffers and
// is valid only during the InputTap call: a tap that keeps it must copy it.
type Input struct {
	Kind  InputKind
	Call  Call
	Fd    int32
	Errno Errno
	Value uint64
	Data  []byte
}

// InputTap observes every nondeterministic input in the order the guest
// receives it. A recording mode logs them; the plain run has no tap.
type InputTap interface {
	Input(in Input)
}

// EffectKind says what kind of external effect a host call wants to have.
type EffectKind uint8

const (
	EffectWrite    EffectKind = iota + 1 // bytes to a socket, stdout or stderr (Fd, Data)
	EffectShutdown                       // sock_shutdown (Fd, Size = sdflags)
	EffectClose                          // closing a socket or stdio descriptor (Fd)
	EffectFs                             // a filesystem mutation (Op, Root, Path, ...)
)

var effectKindNames = [...]string{"", "write", "shutdown", "close", "fs"}

func (k EffectKind) String() string {
	if int(k) < len(effectKindNames) {
		return effectKindNames[k]
	}
	return "unknown"
}

// FsOp is the filesystem mutation an EffectFs carries, with enough detail to
// apply the same mutation to a replica of the preopened directories.
type FsOp uint8

const (
	FsWrite    FsOp = iota + 1 // Data written at Offset of Path (Offset -1: append)
	FsTruncate                 // Path truncated or extended to Size
	FsAllocate                 // Path allocated to at least Offset+Size
	FsSetTimes                 // Path's times set (Offset = atim, Size = mtim, Flags = fstflags)
	FsCreate                   // Path created or truncated by path_open (Flags = oflags)
	FsMkdir                    // directory Path created
	FsRmdir                    // directory Path removed
	FsUnlink                   // file Path removed
	FsRename                   // Path renamed to Path2 (Root2)
	FsSymlink                  // symlink Path created with target Path2
	FsLink                     // hard link Path2 (Root2) created to Path
	FsSync                     // Path synced to stable storage
)

var fsOpNames = [...]string{"", "write", "truncate", "allocate", "settimes", "create", "mkdir", "rmdir",
	"unlink", "rename", "symlink", "link", "sync"}

func (o FsOp) String() string {
	if int(o) < len(fsOpNames) {
		return fsOpNames[o]
	}
	return "unknown"
}

// Effect is one externally visible effect. Data aliases guest memory and is
// valid only during the OutputGate call.
type Effect struct {
	Kind   EffectKind
	Call   Call
	Fd     int32
	Data   []byte
	Op     FsOp
	Root   int    // preopen index of Path
	Path   string // path relative to the preopen's host directory
	Root2  int
	Path2  string
	Offset int64
	Size   int64
	Flags  uint32
	// Later, if not nil, is how the effect is performed when a gate holds
	// it and performs it after the guest's call, from another goroutine:
	// a socket write then sends all of it, waiting as long as it takes,
	// where perform, within the call, sends what the socket takes now
	// and tells the guest. nil: perform serves both.
	Later Perform
}

// Perform carries out an effect with the given data and returns what the
// guest is told: a byte count and an errno.
type Perform func(data []byte) (uint32, Errno)

// OutputGate decides when each effect happens. The plain gate performs it at
// once. A gate that holds outputs (Remus's output commit) copies e.Data,
// returns the result the guest should see now, and calls e.Later (or
// perform, if nil) with the copy, later and possibly from another goroutine,
// when the effect may leave; one at a time, in the order the guest made
// them.
//
// Filesystem effects (EffectFs) are different: the guest must see its own
// writes, and perform uses descriptors that live only for the call, so a gate
// must perform them before it returns. A mode that defers disk mutations
// (Remus applies them on the backup only at checkpoint commit) records the
// effect's description (Op, Root, Path, Offset, Size, Data) and replays it on
// the replica.
type OutputGate interface {
	Output(e Effect, perform Perform) (uint32, Errno)
}

// PassGate performs every effect immediately.
type PassGate struct{}

// Output implements OutputGate.
func (PassGate) Output(e Effect, perform Perform) (uint32, Errno) { return perform(e.Data) }

func (d *Devices) input(in Input) {
	if d.tap != nil {
		d.tap.Input(in)
	}
}

func (d *Devices) output(e Effect, perform Perform) (uint32, Errno) {
	d.counters.Effects.Add(1)
	if d.gate == nil {
		return perform(e.Data)
	}
	return d.gate.Output(e, perform)
}
