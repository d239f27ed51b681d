package wasi

import "github.com/tetratelabs/wazero/api"

// ModuleName is the import module every function here is exported under.
const ModuleName = "wasi_snapshot_preview1"

// The loop poll the instrumentation inserts into guests (package
// machine/instrument): ftvm.safepoint, () -> (), a safe point that is not a
// WASI call. It does nothing unless a pause is pending or the VM is
// stopping.
const (
	PollModule = "ftvm"
	PollName   = "safepoint"
	// YieldName, () -> (), is what the instrumentation's leaf loops call
	// now and then: not a safe point, only a visit to the host (see
	// machine/instrument/polls.go).
	YieldName = "yield"
	// CallPoll is what the SafePoint hook is given for a poll.
	CallPoll Call = 255
)

// Call identifies a wasi_snapshot_preview1 function. Every host call is a safe
// point and is counted per Call.
type Call uint8

const (
	CallArgsGet Call = iota
	CallArgsSizesGet
	CallEnvironGet
	CallEnvironSizesGet
	CallClockResGet
	CallClockTimeGet
	CallFdAdvise
	CallFdAllocate
	CallFdClose
	CallFdDatasync
	CallFdFdstatGet
	CallFdFdstatSetFlags
	CallFdFdstatSetRights
	CallFdFilestatGet
	CallFdFilestatSetSize
	CallFdFilestatSetTimes
	CallFdPread
	CallFdPrestatGet
	CallFdPrestatDirName
	CallFdPwrite
	CallFdRead
	CallFdReaddir
	CallFdRenumber
	CallFdSeek
	CallFdSync
	CallFdTell
	CallFdWrite
	CallPathCreateDirectory
	CallPathFilestatGet
	CallPathFilestatSetTimes
	CallPathLink
	CallPathOpen
	CallPathReadlink
	CallPathRemoveDirectory
	CallPathRename
	CallPathSymlink
	CallPathUnlinkFile
	CallPollOneoff
	CallProcExit
	CallProcRaise
	CallSchedYield
	CallRandomGet
	CallSockAccept
	CallSockRecv
	CallSockSend
	CallSockShutdown
	NumCalls
)

const (
	i32 = api.ValueTypeI32
	i64 = api.ValueTypeI64
)

// signature of each call: its export name and parameter types. Every call but
// proc_exit returns one i32 errno.
var signatures = [NumCalls]struct {
	name   string
	params []api.ValueType
}{
	CallArgsGet:              {"args_get", []api.ValueType{i32, i32}},
	CallArgsSizesGet:         {"args_sizes_get", []api.ValueType{i32, i32}},
	CallEnvironGet:           {"environ_get", []api.ValueType{i32, i32}},
	CallEnvironSizesGet:      {"environ_sizes_get", []api.ValueType{i32, i32}},
	CallClockResGet:          {"clock_res_get", []api.ValueType{i32, i32}},
	CallClockTimeGet:         {"clock_time_get", []api.ValueType{i32, i64, i32}},
	CallFdAdvise:             {"fd_advise", []api.ValueType{i32, i64, i64, i32}},
	CallFdAllocate:           {"fd_allocate", []api.ValueType{i32, i64, i64}},
	CallFdClose:              {"fd_close", []api.ValueType{i32}},
	CallFdDatasync:           {"fd_datasync", []api.ValueType{i32}},
	CallFdFdstatGet:          {"fd_fdstat_get", []api.ValueType{i32, i32}},
	CallFdFdstatSetFlags:     {"fd_fdstat_set_flags", []api.ValueType{i32, i32}},
	CallFdFdstatSetRights:    {"fd_fdstat_set_rights", []api.ValueType{i32, i64, i64}},
	CallFdFilestatGet:        {"fd_filestat_get", []api.ValueType{i32, i32}},
	CallFdFilestatSetSize:    {"fd_filestat_set_size", []api.ValueType{i32, i64}},
	CallFdFilestatSetTimes:   {"fd_filestat_set_times", []api.ValueType{i32, i64, i64, i32}},
	CallFdPread:              {"fd_pread", []api.ValueType{i32, i32, i32, i64, i32}},
	CallFdPrestatGet:         {"fd_prestat_get", []api.ValueType{i32, i32}},
	CallFdPrestatDirName:     {"fd_prestat_dir_name", []api.ValueType{i32, i32, i32}},
	CallFdPwrite:             {"fd_pwrite", []api.ValueType{i32, i32, i32, i64, i32}},
	CallFdRead:               {"fd_read", []api.ValueType{i32, i32, i32, i32}},
	CallFdReaddir:            {"fd_readdir", []api.ValueType{i32, i32, i32, i64, i32}},
	CallFdRenumber:           {"fd_renumber", []api.ValueType{i32, i32}},
	CallFdSeek:               {"fd_seek", []api.ValueType{i32, i64, i32, i32}},
	CallFdSync:               {"fd_sync", []api.ValueType{i32}},
	CallFdTell:               {"fd_tell", []api.ValueType{i32, i32}},
	CallFdWrite:              {"fd_write", []api.ValueType{i32, i32, i32, i32}},
	CallPathCreateDirectory:  {"path_create_directory", []api.ValueType{i32, i32, i32}},
	CallPathFilestatGet:      {"path_filestat_get", []api.ValueType{i32, i32, i32, i32, i32}},
	CallPathFilestatSetTimes: {"path_filestat_set_times", []api.ValueType{i32, i32, i32, i32, i64, i64, i32}},
	CallPathLink:             {"path_link", []api.ValueType{i32, i32, i32, i32, i32, i32, i32}},
	CallPathOpen:             {"path_open", []api.ValueType{i32, i32, i32, i32, i32, i64, i64, i32, i32}},
	CallPathReadlink:         {"path_readlink", []api.ValueType{i32, i32, i32, i32, i32, i32}},
	CallPathRemoveDirectory:  {"path_remove_directory", []api.ValueType{i32, i32, i32}},
	CallPathRename:           {"path_rename", []api.ValueType{i32, i32, i32, i32, i32, i32}},
	CallPathSymlink:          {"path_symlink", []api.ValueType{i32, i32, i32, i32, i32}},
	CallPathUnlinkFile:       {"path_unlink_file", []api.ValueType{i32, i32, i32}},
	CallPollOneoff:           {"poll_oneoff", []api.ValueType{i32, i32, i32, i32}},
	CallProcExit:             {"proc_exit", []api.ValueType{i32}},
	CallProcRaise:            {"proc_raise", []api.ValueType{i32}},
	CallSchedYield:           {"sched_yield", nil},
	CallRandomGet:            {"random_get", []api.ValueType{i32, i32}},
	CallSockAccept:           {"sock_accept", []api.ValueType{i32, i32, i32}},
	CallSockRecv:             {"sock_recv", []api.ValueType{i32, i32, i32, i32, i32, i32}},
	CallSockSend:             {"sock_send", []api.ValueType{i32, i32, i32, i32, i32}},
	CallSockShutdown:         {"sock_shutdown", []api.ValueType{i32, i32}},
}

// String is the export name of the call.
func (c Call) String() string {
	if c < NumCalls {
		return signatures[c].name
	}
	if c == CallPoll {
		return PollModule + "." + PollName
	}
	return "unknown"
}

// Names lists every function this device layer exports, for validation of a
// module's imports.
func Names() map[string]bool {
	m := make(map[string]bool, NumCalls)
	for _, s := range signatures {
		m[s.name] = true
	}
	return m
}

// Signature returns the parameter and result types of the call exported
// as name, for checking a module's imports before it is instantiated.
func Signature(name string) (params, results []api.ValueType, ok bool) {
	for c, s := range signatures {
		if s.name == name {
			if Call(c) != CallProcExit {
				results = []api.ValueType{i32}
			}
			return s.params, results, true
		}
	}
	return nil, nil, false
}

// handler implements one call: p holds its parameters; it returns the errno.
type handler func(d *Devices, m Mem, p []uint64) Errno

// handlers maps each call to its implementation; proc_exit is special-cased.
var handlers = [NumCalls]handler{
	CallArgsGet:              argsGet,
	CallArgsSizesGet:         argsSizesGet,
	CallEnvironGet:           environGet,
	CallEnvironSizesGet:      environSizesGet,
	CallClockResGet:          clockResGet,
	CallClockTimeGet:         clockTimeGet,
	CallFdAdvise:             fdAdvise,
	CallFdAllocate:           fdAllocate,
	CallFdClose:              fdClose,
	CallFdDatasync:           fdDatasync,
	CallFdFdstatGet:          fdFdstatGet,
	CallFdFdstatSetFlags:     fdFdstatSetFlags,
	CallFdFdstatSetRights:    fdFdstatSetRights,
	CallFdFilestatGet:        fdFilestatGet,
	CallFdFilestatSetSize:    fdFilestatSetSize,
	CallFdFilestatSetTimes:   fdFilestatSetTimes,
	CallFdPread:              fdPread,
	CallFdPrestatGet:         fdPrestatGet,
	CallFdPrestatDirName:     fdPrestatDirName,
	CallFdPwrite:             fdPwrite,
	CallFdRead:               fdRead,
	CallFdReaddir:            fdReaddir,
	CallFdRenumber:           fdRenumber,
	CallFdSeek:               fdSeek,
	CallFdSync:               fdSync,
	CallFdTell:               fdTell,
	CallFdWrite:              fdWrite,
	CallPathCreateDirectory:  pathCreateDirectory,
	CallPathFilestatGet:      pathFilestatGet,
	CallPathFilestatSetTimes: pathFilestatSetTimes,
	CallPathLink:             pathLink,
	CallPathOpen:             pathOpen,
	CallPathReadlink:         pathReadlink,
	CallPathRemoveDirectory:  pathRemoveDirectory,
	CallPathRename:           pathRename,
	CallPathSymlink:          pathSymlink,
	CallPathUnlinkFile:       pathUnlinkFile,
	CallPollOneoff:           pollOneoff,
	CallProcRaise:            procRaise,
	CallSchedYield:           schedYield,
	CallRandomGet:            randomGet,
	CallSockAccept:           sockAccept,
	CallSockRecv:             sockRecv,
	CallSockSend:             sockSend,
	CallSockShutdown:         sockShutdown,
}
