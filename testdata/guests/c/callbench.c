// callbench: the cost of one WASI host call, measured inside the guest.
//
// usage: callbench N [FILE]
//
// Each benchmark makes N (or N/10 for the slow ones) calls of one
// wasi_snapshot_preview1 function straight through its import (wasi/api.h),
// timed with clock_time_get(MONOTONIC) around the loop, and prints on stderr
//
//   callbench NAME NS_PER_CALL CALLS
//
// fd_write goes to stdout (fd 1), which the runner points at a sink. FILE is a
// guest path (e.g. /data/small.bin) under a preopened directory; without it
// the file benchmarks are skipped. The file should be at least 64 bytes.
// With CALLBENCH_ONLY set in the environment, only the benchmarks whose name
// contains it run.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

static uint64_t now(void) {
	__wasi_timestamp_t t = 0;
	if (__wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t) != 0) {
		fprintf(stderr, "callbench: clock_time_get failed\n");
		exit(2);
	}
	return t;
}

static const char *only;

// want reports whether the benchmark name is selected by CALLBENCH_ONLY.
static int want(const char *name) { return only == NULL || strstr(name, only) != NULL; }

static void report(const char *name, uint64_t t0, uint64_t t1, long calls) {
	fprintf(stderr, "callbench %s %.1f %ld\n", name, (double)(t1 - t0) / (double)calls, calls);
}

static void check(__wasi_errno_t e, const char *what) {
	if (e != 0) {
		fprintf(stderr, "callbench: %s: errno %d\n", what, (int)e);
		exit(2);
	}
}

// sink keeps results observable so the loops are not optimized away.
static volatile uint64_t sink;

// preopen finds the preopened directory whose guest path is a prefix of path
// and returns its fd, with *rel set to the rest of the path.
static int preopen(const char *path, const char **rel) {
	for (__wasi_fd_t fd = 3; fd < 64; fd++) {
		__wasi_prestat_t ps;
		if (__wasi_fd_prestat_get(fd, &ps) != 0) {
			continue;
		}
		size_t n = ps.u.dir.pr_name_len;
		char name[256];
		if (n >= sizeof name || __wasi_fd_prestat_dir_name(fd, (uint8_t *)name, n) != 0) {
			continue;
		}
		name[n] = 0;
		while (n > 1 && name[n - 1] == '/') {
			name[--n] = 0;
		}
		if (strncmp(path, name, n) == 0 && (path[n] == '/' || (n == 1 && name[0] == '/'))) {
			const char *r = path + n;
			while (*r == '/') {
				r++;
			}
			*rel = r;
			return (int)fd;
		}
	}
	return -1;
}

int main(int argc, char **argv) {
	if (argc < 2) {
		fprintf(stderr, "usage: callbench N [FILE]\n");
		return 2;
	}
	only = getenv("CALLBENCH_ONLY");
	if (only != NULL && only[0] == 0) {
		only = NULL;
	}
	long n = atol(argv[1]);
	if (n < 10) {
		n = 10;
	}
	long m = n / 10; // for the slow calls
	uint64_t t0, t1;

	if (want("clock_time_get(monotonic)")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_timestamp_t t;
			check(__wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t), "clock_time_get");
			sink += t;
		}
		t1 = now();
		report("clock_time_get(monotonic)", t0, t1, n);
	}

	if (want("clock_time_get(realtime)")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_timestamp_t t;
			check(__wasi_clock_time_get(__WASI_CLOCKID_REALTIME, 1, &t), "clock_time_get");
			sink += t;
		}
		t1 = now();
		report("clock_time_get(realtime)", t0, t1, n);
	}

	if (want("random_get(8B)")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			uint64_t r;
			check(__wasi_random_get((uint8_t *)&r, sizeof r), "random_get");
			sink += r;
		}
		t1 = now();
		report("random_get(8B)", t0, t1, n);
	}

	if (want("args_sizes_get")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_size_t argc2, size;
			check(__wasi_args_sizes_get(&argc2, &size), "args_sizes_get");
			sink += argc2 + size;
		}
		t1 = now();
		report("args_sizes_get", t0, t1, n);
	}

	if (want("sched_yield")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			check(__wasi_sched_yield(), "sched_yield");
		}
		t1 = now();
		report("sched_yield", t0, t1, n);
	}

	if (want("fd_write(1B,stdout)")) {
		char byte = 'x';
		__wasi_ciovec_t ciov = {.buf = (const uint8_t *)&byte, .buf_len = 1};
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_size_t w;
			check(__wasi_fd_write(1, &ciov, 1, &w), "fd_write");
			sink += w;
		}
		t1 = now();
		report("fd_write(1B,stdout)", t0, t1, n);
	}

	// poll_oneoff on one relative clock of 0 ns: the poll machinery with
	// nothing to wait for.
	if (want("poll_oneoff(clock,0)")) {
		__wasi_subscription_t sub;
		memset(&sub, 0, sizeof sub);
		sub.userdata = 1;
		sub.u.tag = __WASI_EVENTTYPE_CLOCK;
		sub.u.u.clock.id = __WASI_CLOCKID_MONOTONIC;
		sub.u.u.clock.timeout = 0;
		t0 = now();
		for (long i = 0; i < m; i++) {
			__wasi_event_t ev;
			__wasi_size_t ne;
			check(__wasi_poll_oneoff(&sub, &ev, 1, &ne), "poll_oneoff");
			sink += ne;
		}
		t1 = now();
		report("poll_oneoff(clock,0)", t0, t1, m);
	}

	if (argc < 3) {
		return 0;
	}
	const char *rel;
	int dir = preopen(argv[2], &rel);
	if (dir < 0) {
		fprintf(stderr, "callbench: no preopened directory holds %s\n", argv[2]);
		return 2;
	}
	__wasi_fd_t fd;
	check(__wasi_path_open((__wasi_fd_t)dir, 0, rel, 0, __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_SEEK, 0, 0, &fd),
	      "path_open");
	uint8_t buf[64];
	__wasi_iovec_t iov = {.buf = buf, .buf_len = sizeof buf};

	if (want("fd_pread(64B,file)")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_size_t r;
			check(__wasi_fd_pread(fd, &iov, 1, 0, &r), "fd_pread");
			sink += r;
		}
		t1 = now();
		report("fd_pread(64B,file)", t0, t1, n);
	}

	// Sequential 64-byte reads; at end of file, one fd_seek back to the start
	// (amortized over the file's size / 64 reads).
	if (want("fd_read(64B,file)")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			__wasi_size_t r;
			check(__wasi_fd_read(fd, &iov, 1, &r), "fd_read");
			if (r == 0) {
				__wasi_filesize_t pos;
				check(__wasi_fd_seek(fd, 0, __WASI_WHENCE_SET, &pos), "fd_seek");
			}
			sink += r;
		}
		t1 = now();
		report("fd_read(64B,file)", t0, t1, n);
	}
	check(__wasi_fd_close(fd), "fd_close");

	if (want("path_open+fd_close")) {
		t0 = now();
		for (long i = 0; i < m; i++) {
			__wasi_fd_t f2;
			check(__wasi_path_open((__wasi_fd_t)dir, 0, rel, 0, __WASI_RIGHTS_FD_READ, 0, 0, &f2), "path_open");
			check(__wasi_fd_close(f2), "fd_close");
		}
		t1 = now();
		report("path_open+fd_close", t0, t1, m);
	}
	return 0;
}
