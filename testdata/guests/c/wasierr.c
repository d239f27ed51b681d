// wasierr is linked into the hostile guests: it names raw WASI errno values
// (wasi_snapshot_preview1's numbering, not libc's errno) and prints one
// "name: ERRNO" line per attempt, the format tests/hostile_test.go parses.
#include <stdint.h>
#include <stdio.h>

static const char *const names[] = {
	"SUCCESS", "E2BIG", "EACCES", "EADDRINUSE", "EADDRNOTAVAIL", "EAFNOSUPPORT", "EAGAIN", "EALREADY",
	"EBADF", "EBADMSG", "EBUSY", "ECANCELED", "ECHILD", "ECONNABORTED", "ECONNREFUSED", "ECONNRESET",
	"EDEADLK", "EDESTADDRREQ", "EDOM", "EDQUOT", "EEXIST", "EFAULT", "EFBIG", "EHOSTUNREACH", "EIDRM",
	"EILSEQ", "EINPROGRESS", "EINTR", "EINVAL", "EIO", "EISCONN", "EISDIR", "ELOOP", "EMFILE", "EMLINK",
	"EMSGSIZE", "EMULTIHOP", "ENAMETOOLONG", "ENETDOWN", "ENETRESET", "ENETUNREACH", "ENFILE", "ENOBUFS",
	"ENODEV", "ENOENT", "ENOEXEC", "ENOLCK", "ENOLINK", "ENOMEM", "ENOMSG", "ENOPROTOOPT", "ENOSPC",
	"ENOSYS", "ENOTCONN", "ENOTDIR", "ENOTEMPTY", "ENOTRECOVERABLE", "ENOTSOCK", "ENOTSUP", "ENOTTY",
	"ENXIO", "EOVERFLOW", "EOWNERDEAD", "EPERM", "EPIPE", "EPROTO", "EPROTONOSUPPORT", "EPROTOTYPE",
	"ERANGE", "EROFS", "ESPIPE", "ESRCH", "ESTALE", "ETIMEDOUT", "ETXTBSY", "EXDEV", "ENOTCAPABLE",
};

const char *wasi_errname(int32_t e) {
	static char buf[24];
	if (e >= 0 && e < (int32_t)(sizeof names / sizeof names[0]))
		return names[e];
	snprintf(buf, sizeof buf, "E?%d", (int)e);
	return buf;
}

// report prints the result of one attempt and returns it, so that callers
// can chain on success.
int32_t report(const char *name, int32_t e) {
	printf("%s: %s\n", name, wasi_errname(e));
	fflush(stdout);
	return e;
}
