// hostile_mem calls the raw wasi_snapshot_preview1 imports, bypassing libc,
// with pointers and lengths no libc would pass: buffers that cross or wrap
// the end of linear memory, iovec arrays outside memory, counts whose byte
// size overflows 32 bits, result pointers that cannot be written, descriptor
// numbers the guest never opened. It prints "name: ERRNO" for each attempt
// (tests/hostile_test.go holds the expectations) and a few marker strings
// that must, or must never, reach stdout.
//
// Expects the preopened directory at fd 3 to contain inside.txt.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define WASI(name) __attribute__((import_module("wasi_snapshot_preview1"), import_name(#name)))
typedef uint32_t ptr; // a guest address, passed as an i32

int32_t x_args_get(ptr argv, ptr buf) WASI(args_get);
int32_t x_args_sizes_get(ptr argc, ptr size) WASI(args_sizes_get);
int32_t x_environ_get(ptr env, ptr buf) WASI(environ_get);
int32_t x_environ_sizes_get(ptr count, ptr size) WASI(environ_sizes_get);
int32_t x_clock_res_get(uint32_t id, ptr res) WASI(clock_res_get);
int32_t x_clock_time_get(uint32_t id, uint64_t precision, ptr res) WASI(clock_time_get);
int32_t x_fd_advise(uint32_t fd, uint64_t off, uint64_t len, uint32_t advice) WASI(fd_advise);
int32_t x_fd_allocate(uint32_t fd, uint64_t off, uint64_t len) WASI(fd_allocate);
int32_t x_fd_close(uint32_t fd) WASI(fd_close);
int32_t x_fd_fdstat_get(uint32_t fd, ptr buf) WASI(fd_fdstat_get);
int32_t x_fd_fdstat_set_rights(uint32_t fd, uint64_t base, uint64_t inh) WASI(fd_fdstat_set_rights);
int32_t x_fd_filestat_get(uint32_t fd, ptr buf) WASI(fd_filestat_get);
int32_t x_fd_filestat_set_size(uint32_t fd, uint64_t size) WASI(fd_filestat_set_size);
int32_t x_fd_pread(uint32_t fd, ptr iovs, uint32_t n, uint64_t off, ptr nread) WASI(fd_pread);
int32_t x_fd_prestat_get(uint32_t fd, ptr buf) WASI(fd_prestat_get);
int32_t x_fd_prestat_dir_name(uint32_t fd, ptr buf, uint32_t len) WASI(fd_prestat_dir_name);
int32_t x_fd_pwrite(uint32_t fd, ptr iovs, uint32_t n, uint64_t off, ptr nwritten) WASI(fd_pwrite);
int32_t x_fd_read(uint32_t fd, ptr iovs, uint32_t n, ptr nread) WASI(fd_read);
int32_t x_fd_readdir(uint32_t fd, ptr buf, uint32_t len, uint64_t cookie, ptr used) WASI(fd_readdir);
int32_t x_fd_renumber(uint32_t from, uint32_t to) WASI(fd_renumber);
int32_t x_fd_seek(uint32_t fd, int64_t off, uint32_t whence, ptr res) WASI(fd_seek);
int32_t x_fd_tell(uint32_t fd, ptr res) WASI(fd_tell);
int32_t x_fd_write(uint32_t fd, ptr iovs, uint32_t n, ptr nwritten) WASI(fd_write);
int32_t x_path_create_directory(uint32_t fd, ptr path, uint32_t len) WASI(path_create_directory);
int32_t x_path_filestat_get(uint32_t fd, uint32_t flags, ptr path, uint32_t len, ptr buf) WASI(path_filestat_get);
int32_t x_path_filestat_set_times(uint32_t fd, uint32_t flags, ptr path, uint32_t len, uint64_t atim, uint64_t mtim,
                                  uint32_t fst) WASI(path_filestat_set_times);
int32_t x_path_open(uint32_t fd, uint32_t dirflags, ptr path, uint32_t len, uint32_t oflags, uint64_t base,
                    uint64_t inh, uint32_t fdflags, ptr newfd) WASI(path_open);
int32_t x_path_readlink(uint32_t fd, ptr path, uint32_t len, ptr buf, uint32_t buflen, ptr used) WASI(path_readlink);
int32_t x_path_rename(uint32_t fd, ptr old, uint32_t oldlen, uint32_t newfd, ptr new, uint32_t newlen) WASI(path_rename);
int32_t x_path_symlink(ptr old, uint32_t oldlen, uint32_t fd, ptr new, uint32_t newlen) WASI(path_symlink);
int32_t x_path_unlink_file(uint32_t fd, ptr path, uint32_t len) WASI(path_unlink_file);
int32_t x_poll_oneoff(ptr in, ptr out, uint32_t n, ptr nevents) WASI(poll_oneoff);
int32_t x_proc_raise(uint32_t sig) WASI(proc_raise);
int32_t x_random_get(ptr buf, uint32_t len) WASI(random_get);
int32_t x_sock_accept(uint32_t fd, uint32_t flags, ptr newfd) WASI(sock_accept);
int32_t x_sock_recv(uint32_t fd, ptr iovs, uint32_t n, uint32_t flags, ptr len, ptr oflags) WASI(sock_recv);
int32_t x_sock_send(uint32_t fd, ptr iovs, uint32_t n, uint32_t flags, ptr len) WASI(sock_send);
int32_t x_sock_shutdown(uint32_t fd, uint32_t how) WASI(sock_shutdown);

int32_t report(const char *name, int32_t e);

#define P(x) ((ptr)(uintptr_t)(x))

// memend is the current size of linear memory: the first address past it.
static ptr memend(void) { return (ptr)(__builtin_wasm_memory_size(0) * 65536u); }

typedef struct {
	ptr buf;
	uint32_t len;
} iovec;

static uint32_t result; // a valid place for results
static uint8_t scratch[4096];
static iovec iov[1100];

static void write_tests(void) {
	static const char leak[] = "LEAK-MARKER\n";

	// The iovec array itself crosses the end of memory.
	report("write_iovs_cross_end", x_fd_write(1, memend() - 4, 1, P(&result)));
	// The iovec array starts near 4 GiB: ptr+len wraps in 32 bits.
	report("write_iovs_wrap", x_fd_write(1, 0xfffffff8u, 2, P(&result)));
	// A count whose byte size (n*8) wraps to 0 in 32-bit arithmetic.
	iov[0] = (iovec){P(leak), sizeof leak - 1};
	report("write_iovs_len_wraps", x_fd_write(1, P(iov), 0x20000000u, P(&result)));
	report("write_iovs_len_max", x_fd_write(1, P(iov), 0xffffffffu, P(&result)));
	// One more iovec than IOV_MAX.
	for (int i = 0; i < 1025; i++)
		iov[i] = (iovec){P(scratch), 0};
	report("write_iovs_1025", x_fd_write(1, P(iov), 1025, P(&result)));
	report("write_iovs_1024_empty", x_fd_write(1, P(iov), 1024, P(&result)));

	// Buffers that wrap, are huge, or cross the end.
	iov[0] = (iovec){0xfffffff0u, 0x20};
	report("write_buf_wrap", x_fd_write(1, P(iov), 1, P(&result)));
	iov[0] = (iovec){P(leak), 0xffffffffu};
	report("write_buf_len_max", x_fd_write(1, P(iov), 1, P(&result)));
	iov[0] = (iovec){memend() - 2, 4};
	report("write_buf_cross_end", x_fd_write(1, P(iov), 1, P(&result)));
	iov[0] = (iovec){memend() + 1, 0};
	report("write_empty_buf_past_end", x_fd_write(1, P(iov), 1, P(&result)));
	// A good buffer followed by a bad one: nothing may be written.
	iov[0] = (iovec){P(leak), sizeof leak - 1};
	iov[1] = (iovec){0xffffff00u, 0x1000};
	report("write_second_iov_bad", x_fd_write(1, P(iov), 2, P(&result)));
	// A good buffer but an unwritable result pointer: the write must not
	// happen, since the guest could not learn that it did.
	iov[0] = (iovec){P(leak), sizeof leak - 1};
	report("write_result_ptr_bad", x_fd_write(1, P(iov), 1, 0xffffffffu));
	report("write_result_ptr_cross_end", x_fd_write(1, P(iov), 1, memend() - 2));

	// The last bytes of memory are usable: a buffer that ends exactly at
	// the end, with the result just below it.
	ptr top = memend() - 8;
	memcpy((void *)(uintptr_t)top, "@EOM-OK\n", 8);
	iov[0] = (iovec){top, 8};
	report("write_buf_at_end", x_fd_write(1, P(iov), 1, top - 4));

	iov[0] = (iovec){P(scratch), 16};
	report("read_iovs_bad", x_fd_read(0, 0xfffffff0u, 2, P(&result)));
	iov[0] = (iovec){memend() - 8, 64};
	report("read_buf_cross_end", x_fd_read(0, P(iov), 1, P(&result)));
}

static void static_data_tests(void) {
	report("args_sizes_bad", x_args_sizes_get(0xfffffffcu, P(&result)));
	report("args_sizes_bad2", x_args_sizes_get(P(&result), memend() - 2));
	report("args_get_argv_bad", x_args_get(memend() - 2, P(scratch)));
	report("args_get_buf_bad", x_args_get(P(scratch), 0xffffffffu));
	report("args_get_buf_cross_end", x_args_get(P(scratch), memend() - 3));
	report("environ_sizes_bad", x_environ_sizes_get(0xfffffffcu, P(&result)));
	report("environ_get_argv_bad", x_environ_get(0xfffffffcu, P(scratch)));
	report("environ_get_buf_bad", x_environ_get(P(scratch), memend() - 3));

	report("clock_time_bad_ptr", x_clock_time_get(0, 0, 0xfffffffcu));
	report("clock_time_cross_end", x_clock_time_get(1, 0, memend() - 4));
	report("clock_time_bad_id", x_clock_time_get(99, 0, P(scratch)));
	report("clock_res_bad_ptr", x_clock_res_get(0, memend() - 4));
	report("clock_res_bad_id", x_clock_res_get(0xffffffffu, P(scratch)));

	report("random_cross_end", x_random_get(memend() - 8, 16));
	report("random_len_max", x_random_get(P(scratch), 0xffffffffu));
	report("random_wrap", x_random_get(0xffffff00u, 0x200));
	report("random_empty_ok", x_random_get(P(scratch), 0));

	report("prestat_get_bad", x_fd_prestat_get(3, memend() - 4));
	report("prestat_get_not_preopen", x_fd_prestat_get(1, P(scratch)));
	report("prestat_dir_name_bad", x_fd_prestat_dir_name(3, memend() - 2, 8));
	report("prestat_dir_name_len_max", x_fd_prestat_dir_name(3, P(scratch), 0xffffffffu));
	report("fdstat_get_bad", x_fd_fdstat_get(1, 0xfffffff0u));
}

// Descriptor numbers the guest never opened: the host's own descriptors
// (its eventfd, the compilation cache, listeners of other VMs) must not be
// reachable by guessing their numbers.
static void fd_tests(void) {
	int usable = 0;
	for (uint32_t fd = 4; fd < 1024; fd++) {
		if (x_fd_fdstat_get(fd, P(scratch)) != 8 /* EBADF */)
			usable++;
		iov[0] = (iovec){P(scratch), 1};
		if (x_fd_write(fd, P(iov), 1, P(&result)) != 8)
			usable++;
		if (x_fd_read(fd, P(iov), 1, P(&result)) != 8)
			usable++;
	}
	report("host_fds_4_to_1023", usable ? 1000 + usable : 8 /* EBADF */);
	report("write_fd_max", x_fd_write(0xffffffffu, P(iov), 1, P(&result)));
	report("write_fd_int_max", x_fd_write(0x7fffffffu, P(iov), 1, P(&result)));
	report("close_fd_max", x_fd_close(0xffffffffu));
	report("close_fd_65536", x_fd_close(65536));
	report("renumber_to_unopened", x_fd_renumber(3, 1000));
	report("renumber_from_unopened", x_fd_renumber(1000, 3));
	report("fdstat_set_rights_gain", x_fd_fdstat_set_rights(1, ~0ull, ~0ull));
	report("sock_accept_on_dir", x_sock_accept(3, 0, P(&result)));
	iov[0] = (iovec){P(scratch), 8};
	report("sock_recv_on_stdout", x_sock_recv(1, P(iov), 1, 0, P(&result), P(scratch + 64)));
	report("sock_send_on_stdout", x_sock_send(1, P(iov), 1, 0, P(&result)));
	report("sock_shutdown_on_stdout", x_sock_shutdown(1, 3));
	report("proc_raise_kill", x_proc_raise(9));
}

// poll_oneoff with subscription counts whose byte size overflows, buffers
// outside memory, and no subscriptions at all. None of these may block.
static void poll_tests(void) {
	static uint8_t subs[48 * 2], events[32 * 2];
	memset(subs, 0, sizeof subs);
	report("poll_nsubs_max", x_poll_oneoff(P(subs), P(events), 0xffffffffu, P(&result)));
	// 0x05555556 * 48 = 0x100000020: wraps to 32 bytes in 32-bit arithmetic.
	report("poll_nsubs_wraps", x_poll_oneoff(P(subs), P(events), 0x05555556u, P(&result)));
	report("poll_nsubs_zero", x_poll_oneoff(P(subs), P(events), 0, P(&result)));
	report("poll_in_bad", x_poll_oneoff(0xfffffff0u, P(events), 1, P(&result)));
	report("poll_out_bad", x_poll_oneoff(P(subs), memend() - 16, 1, P(&result)));
	report("poll_nevents_bad", x_poll_oneoff(P(subs), P(events), 1, 0xfffffffdu));
	// A relative clock timeout of 1 ms: a positive control.
	memset(subs, 0, sizeof subs);
	subs[8] = 0;                           // eventtype clock
	*(uint32_t *)(subs + 16) = 1;          // monotonic
	*(uint64_t *)(subs + 24) = 1000000;    // 1 ms
	report("poll_clock_1ms", x_poll_oneoff(P(subs), P(events), 1, P(&result)));
	subs[8] = 7; // no such event type
	report("poll_bad_eventtype", x_poll_oneoff(P(subs), P(events), 1, P(&result)));
}

// File calls with bad pointers and values; each names a valid descriptor so
// that the pointer or value is the only fault.
static void file_tests(void) {
	static const char name[] = "inside.txt";
	static const char created[] = "created-by-bad-result-ptr";
	uint64_t rights = 0x1fffffffull; // every right; the host masks or refuses
	uint32_t fd = 0;
	int32_t e = x_path_open(3, 1, P(name), sizeof name - 1, 0, rights, rights, 0, P(&fd));
	if (e == 76 /* ENOTCAPABLE */) {
		// A host that refuses rights beyond the directory's: ask for
		// what the directory passes on.
		uint8_t st[24];
		x_fd_fdstat_get(3, P(st));
		uint64_t inh;
		memcpy(&inh, st + 16, 8);
		e = x_path_open(3, 1, P(name), sizeof name - 1, 0, inh, inh, 0, P(&fd));
	}
	report("open_inside_ok", e);

	report("open_path_wrap", x_path_open(3, 1, 0xfffffff0u, 0x20, 0, rights, rights, 0, P(&result)));
	report("open_path_len_max", x_path_open(3, 1, P(name), 0xffffffffu, 0, rights, rights, 0, P(&result)));
	report("open_path_cross_end", x_path_open(3, 1, memend() - 4, 8, 0, rights, rights, 0, P(&result)));
	// O_CREAT with an unwritable result pointer: the file must not be
	// created (the guest could never close it).
	report("open_creat_result_bad",
	       x_path_open(3, 1, P(created), sizeof created - 1, 1 /* CREAT */, rights, rights, 0, 0xfffffffeu));
	report("mkdir_path_cross_end", x_path_create_directory(3, memend() - 3, 10));
	report("filestat_path_bad", x_path_filestat_get(3, 1, 0xffffff00u, 0x200, P(scratch)));
	report("filestat_buf_bad", x_path_filestat_get(3, 1, P(name), sizeof name - 1, memend() - 32));
	report("readlink_buf_bad", x_path_readlink(3, P("link"), 4, memend() - 1, 100, P(&result)));
	report("symlink_old_bad", x_path_symlink(0xfffffff0u, 100, 3, P(created), sizeof created - 1));
	report("rename_new_bad", x_path_rename(3, P(name), sizeof name - 1, 3, memend() - 2, 50));
	report("unlink_path_bad", x_path_unlink_file(3, 0xffffffffu, 2));
	report("set_times_both_now_and_value",
	       x_path_filestat_set_times(3, 1, P(name), sizeof name - 1, 0, 0, 1 | 2 /* ATIM|ATIM_NOW */));

	report("readdir_buf_cross_end", x_fd_readdir(3, memend() - 10, 100, 0, P(&result)));
	report("readdir_len_max", x_fd_readdir(3, P(scratch), 0xffffffffu, 0, P(&result)));
	report("readdir_used_bad", x_fd_readdir(3, P(scratch), 256, 0, 0xffffffffu));
	// Cookies past the end: either an empty listing or EINVAL, never a
	// read outside the listing.
	result = 12345;
	e = x_fd_readdir(3, P(scratch), sizeof scratch, 0xffffffffffffffffull, P(&result));
	report("readdir_cookie_max", e == 0 && result == 0 ? 0 : e == 0 ? 1000 : e);
	result = 12345;
	e = x_fd_readdir(3, P(scratch), sizeof scratch, 1ull << 32, P(&result));
	report("readdir_cookie_2p32", e == 0 && result == 0 ? 0 : e == 0 ? 1000 : e);
	result = 12345;
	e = x_fd_readdir(3, P(scratch), sizeof scratch, 0x8000000000000000ull, P(&result));
	report("readdir_cookie_negative", e == 0 && result == 0 ? 0 : e == 0 ? 1000 : e);

	if (fd == 0)
		return;
	iov[0] = (iovec){P(scratch), 16};
	report("pread_iovs_bad", x_fd_pread(fd, 0xfffffff8u, 2, 0, P(&result)));
	report("pread_buf_bad", (iov[0] = (iovec){memend() - 4, 16}, x_fd_pread(fd, P(iov), 1, 0, P(&result))));
	iov[0] = (iovec){P(scratch), 16};
	report("pread_offset_negative", x_fd_pread(fd, P(iov), 1, 0x8000000000000000ull, P(&result)));
	report("pread_result_bad", x_fd_pread(fd, P(iov), 1, 0, memend() - 1));
	report("pwrite_offset_negative", x_fd_pwrite(fd, P(iov), 1, 0xffffffffffffffffull, P(&result)));
	report("pwrite_buf_bad", (iov[0] = (iovec){0xfffffff0u, 0x100}, x_fd_pwrite(fd, P(iov), 1, 0, P(&result))));
	report("seek_negative", x_fd_seek(fd, -1, 0, P(&result)));
	report("seek_bad_whence", x_fd_seek(fd, 0, 3, P(&result)));
	report("seek_result_bad", x_fd_seek(fd, 0, 0, memend() - 4));
	report("seek_cur_overflow", (x_fd_seek(fd, 10, 0, P(scratch)), x_fd_seek(fd, 0x7fffffffffffffffll, 1, P(scratch))));
	report("tell_result_bad", x_fd_tell(fd, 0xfffffffcu));
	report("filestat_get_bad", x_fd_filestat_get(fd, memend() - 63));
	report("set_size_negative", x_fd_filestat_set_size(fd, 0xffffffffffffffffull));
	report("allocate_negative_len", x_fd_allocate(fd, 0, 0xffffffffffffffffull));
	report("advise_bad_advice", x_fd_advise(fd, 0, 0, 99));
	report("fdstat_set_rights_regain", (x_fd_fdstat_set_rights(fd, 2 /* FD_READ */, 0),
	                                    x_fd_fdstat_set_rights(fd, 2 | 64 /* + FD_WRITE */, 0)));
	iov[0] = (iovec){P(scratch), 1};
	report("write_without_right", x_fd_write(fd, P(iov), 1, P(&result)));
	report("close_file", x_fd_close(fd));
	report("close_file_twice", x_fd_close(fd));
}

int main(void) {
	setvbuf(stdout, NULL, _IONBF, 0);
	write_tests();
	printf("\n");
	static_data_tests();
	fd_tests();
	poll_tests();
	file_tests();
	// Last: lose the preopen and stdin; later use is EBADF, not a crash.
	report("close_preopen", x_fd_close(3));
	uint32_t fd;
	report("open_after_close_preopen", x_path_open(3, 0, P("x"), 1, 0, 0, 0, 0, P(&fd)));
	report("close_stdin", x_fd_close(0));
	iov[0] = (iovec){P(scratch), 1};
	report("read_closed_stdin", x_fd_read(0, P(iov), 1, P(&result)));
	printf("done\n");
	return 0;
}
