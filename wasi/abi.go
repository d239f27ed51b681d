package wasi

// Constants and struct layouts of the wasi_snapshot_preview1 ABI, as the
// witx definitions of WebAssembly/WASI give them. Sizes and offsets are in bytes.

// Errno is a WASI error number, the result of almost every host call.
type Errno uint16

const (
	ESUCCESS Errno = iota
	E2BIG
	EACCES
	EADDRINUSE
	EADDRNOTAVAIL
	EAFNOSUPPORT
	EAGAIN
	EALREADY
	EBADF
	EBADMSG
	EBUSY
	ECANCELED
	ECHILD
	ECONNABORTED
	ECONNREFUSED
	ECONNRESET
	EDEADLK
	EDESTADDRREQ
	EDOM
	EDQUOT
	EEXIST
	EFAULT
	EFBIG
	EHOSTUNREACH
	EIDRM
	EILSEQ
	EINPROGRESS
	EINTR
	EINVAL
	EIO
	EISCONN
	EISDIR
	ELOOP
	EMFILE
	EMLINK
	EMSGSIZE
	EMULTIHOP
	ENAMETOOLONG
	ENETDOWN
	ENETRESET
	ENETUNREACH
	ENFILE
	ENOBUFS
	ENODEV
	ENOENT
	ENOEXEC
	ENOLCK
	ENOLINK
	ENOMEM
	ENOMSG
	ENOPROTOOPT
	ENOSPC
	ENOSYS
	ENOTCONN
	ENOTDIR
	ENOTEMPTY
	ENOTRECOVERABLE
	ENOTSOCK
	ENOTSUP
	ENOTTY
	ENXIO
	EOVERFLOW
	EOWNERDEAD
	EPERM
	EPIPE
	EPROTO
	EPROTONOSUPPORT
	EPROTOTYPE
	ERANGE
	EROFS
	ESPIPE
	ESRCH
	ESTALE
	ETIMEDOUT
	ETXTBSY
	EXDEV
	ENOTCAPABLE
)

var errnoNames = [...]string{"SUCCESS", "2BIG", "ACCES", "ADDRINUSE", "ADDRNOTAVAIL", "AFNOSUPPORT", "AGAIN",
	"ALREADY", "BADF", "BADMSG", "BUSY", "CANCELED", "CHILD", "CONNABORTED", "CONNREFUSED", "CONNRESET",
	"DEADLK", "DESTADDRREQ", "DOM", "DQUOT", "EXIST", "FAULT", "FBIG", "HOSTUNREACH", "IDRM", "ILSEQ",
	"INPROGRESS", "INTR", "INVAL", "IO", "ISCONN", "ISDIR", "LOOP", "MFILE", "MLINK", "MSGSIZE", "MULTIHOP",
	"NAMETOOLONG", "NETDOWN", "NETRESET", "NETUNREACH", "NFILE", "NOBUFS", "NODEV", "NOENT", "NOEXEC",
	"NOLCK", "NOLINK", "NOMEM", "NOMSG", "NOPROTOOPT", "NOSPC", "NOSYS", "NOTCONN", "NOTDIR", "NOTEMPTY",
	"NOTRECOVERABLE", "NOTSOCK", "NOTSUP", "NOTTY", "NXIO", "OVERFLOW", "OWNERDEAD", "PERM", "PIPE", "PROTO",
	"PROTONOSUPPORT", "PROTOTYPE", "RANGE", "ROFS", "SPIPE", "SRCH", "STALE", "TIMEDOUT", "TXTBSY", "XDEV",
	"NOTCAPABLE"}

// errRestart is never returned to the guest: a handler returns it when it
// abandoned a wait, before any effect, because the machine wants to pause;
// the call starts over at its safe point.
const errRestart Errno = 0xffff

func (e Errno) Error() string {
	if int(e) < len(errnoNames) {
		return "E" + errnoNames[e]
	}
	return "EUNKNOWN"
}

// Rights (preview1 `rights` bitflags).
const (
	RightFdDatasync uint64 = 1 << iota
	RightFdRead
	RightFdSeek
	RightFdFdstatSetFlags
	RightFdSync
	RightFdTell
	RightFdWrite
	RightFdAdvise
	RightFdAllocate
	RightPathCreateDirectory
	RightPathCreateFile
	RightPathLinkSource
	RightPathLinkTarget
	RightPathOpen
	RightFdReaddir
	RightPathReadlink
	RightPathRenameSource
	RightPathRenameTarget
	RightPathFilestatGet
	RightPathFilestatSetSize
	RightPathFilestatSetTimes
	RightFdFilestatGet
	RightFdFilestatSetSize
	RightFdFilestatSetTimes
	RightPathSymlink
	RightPathRemoveDirectory
	RightPathUnlinkFile
	RightPollFdReadwrite
	RightSockShutdown
	RightSockAccept

	RightsAll = RightSockAccept<<1 - 1
)

// Rights sets by kind of descriptor, as granted when it is created.
const (
	// RightsRegularFile is what makes sense on a regular file.
	RightsRegularFile = RightFdDatasync | RightFdRead | RightFdSeek | RightFdFdstatSetFlags | RightFdSync |
		RightFdTell | RightFdWrite | RightFdAdvise | RightFdAllocate | RightFdFilestatGet |
		RightFdFilestatSetSize | RightFdFilestatSetTimes | RightPollFdReadwrite
	// RightsDirectory is what makes sense on a directory itself.
	RightsDirectory = RightFdFdstatSetFlags | RightFdSync | RightFdAdvise | RightPathCreateDirectory |
		RightPathCreateFile | RightPathLinkSource | RightPathLinkTarget | RightPathOpen | RightFdReaddir |
		RightPathReadlink | RightPathRenameSource | RightPathRenameTarget | RightPathFilestatGet |
		RightPathFilestatSetSize | RightPathFilestatSetTimes | RightFdFilestatGet |
		RightFdFilestatSetTimes | RightPathSymlink | RightPathRemoveDirectory | RightPathUnlinkFile
	// RightsDirectoryInheriting is what a directory passes on to what is opened beneath it.
	RightsDirectoryInheriting = RightsDirectory | RightsRegularFile
	// RightsTTY is what makes sense on a terminal or a pipe.
	RightsTTY = RightFdRead | RightFdFdstatSetFlags | RightFdWrite | RightFdFilestatGet | RightPollFdReadwrite
	// RightsSocket is what makes sense on a connected stream socket.
	RightsSocket = RightFdRead | RightFdFdstatSetFlags | RightFdWrite | RightFdFilestatGet |
		RightPollFdReadwrite | RightSockShutdown
	// RightsListener is what makes sense on a listening socket.
	RightsListener = RightFdFdstatSetFlags | RightFdFilestatGet | RightPollFdReadwrite | RightSockAccept | RightFdRead
)

// Filetype of a descriptor or directory entry.
type Filetype uint8

const (
	FiletypeUnknown Filetype = iota
	FiletypeBlockDevice
	FiletypeCharacterDevice
	FiletypeDirectory
	FiletypeRegularFile
	FiletypeSocketDgram
	FiletypeSocketStream
	FiletypeSymbolicLink
)

// fdflags.
const (
	FdflagAppend   uint16 = 1 << 0
	FdflagDsync    uint16 = 1 << 1
	FdflagNonblock uint16 = 1 << 2
	FdflagRsync    uint16 = 1 << 3
	FdflagSync     uint16 = 1 << 4
)

// oflags of path_open.
const (
	OflagCreat     uint16 = 1 << 0
	OflagDirectory uint16 = 1 << 1
	OflagExcl      uint16 = 1 << 2
	OflagTrunc     uint16 = 1 << 3
)

// lookupflags.
const LookupSymlinkFollow uint32 = 1

// fstflags of the *_set_times calls.
const (
	FstflagAtim    uint16 = 1 << 0
	FstflagAtimNow uint16 = 1 << 1
	FstflagMtim    uint16 = 1 << 2
	FstflagMtimNow uint16 = 1 << 3
)

// whence of fd_seek.
const (
	WhenceSet uint8 = 0
	WhenceCur uint8 = 1
	WhenceEnd uint8 = 2
)

// Clock ids.
const (
	ClockRealtime         uint32 = 0
	ClockMonotonic        uint32 = 1
	ClockProcessCputimeID uint32 = 2
	ClockThreadCputimeID  uint32 = 3
)

// Event types of poll_oneoff subscriptions and events.
const (
	EventtypeClock   uint8 = 0
	EventtypeFdRead  uint8 = 1
	EventtypeFdWrite uint8 = 2
)

// subclockflags.
const SubclockAbstime uint16 = 1

// eventrwflags.
const EventFdReadwriteHangup uint16 = 1

// riflags, roflags, sdflags of the socket calls.
const (
	RiflagRecvPeek          uint16 = 1 << 0
	RiflagRecvWaitall       uint16 = 1 << 1
	RoflagRecvDataTruncated uint16 = 1 << 0
	SdflagRd                uint8  = 1 << 0
	SdflagWr                uint8  = 1 << 1
)

// Advice of fd_advise.
const (
	AdviceNormal uint8 = iota
	AdviceSequential
	AdviceRandom
	AdviceWillNeed
	AdviceDontNeed
	AdviceNoReuse
)

// Struct sizes.
const (
	sizeIovec        = 8
	sizeFdstat       = 24
	sizeFilestat     = 64
	sizeDirent       = 24
	sizePrestat      = 8
	sizeSubscription = 48
	sizeEvent        = 32
)

// maxIovecs bounds the number of iovecs one call may pass (Linux's IOV_MAX), so
// that a hostile length cannot make the host allocate without bound.
const maxIovecs = 1024

// maxIOBytes bounds the bytes one read or write moves, its iovecs cut there
// (a partial read or write, as POSIX allows; Linux cuts at 2 GiB). Iovecs
// may overlap: 1,024 of them each naming the whole memory asked a write to
// gather 1,024 times the guest's memory into one host buffer (and the
// count returned wrapped at 4 GiB).
const maxIOBytes = 16 << 20
