// hostile_fs tries to leave its preopened directory (fd 3) through the raw
// wasi_snapshot_preview1 path calls: "..", absolute paths, symlinks it
// creates (absolute, relative, chains, to directories) and symlinks the host
// planted, hard links and renames across the boundary, and operations that
// follow a link to modify what it points at. It prints "name: ERRNO" per
// attempt; an open that succeeds also prints what it could read, so a leak
// shows on stdout. tests/hostile_test.go holds the expectations and checks
// the host side.
//
// argv[1] is the host's absolute path of the secret file beside the
// preopened directory (an attacker may well know host paths). The host
// prepared inside.txt, sub/, and the symlinks hostlink_abs -> <secret>,
// hostlink_rel -> ../secret and hostdir -> ../outside.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define WASI(name) __attribute__((import_module("wasi_snapshot_preview1"), import_name(#name)))
typedef uint32_t ptr;

int32_t x_fd_close(uint32_t fd) WASI(fd_close);
int32_t x_fd_fdstat_get(uint32_t fd, ptr buf) WASI(fd_fdstat_get);
int32_t x_fd_read(uint32_t fd, ptr iovs, uint32_t n, ptr nread) WASI(fd_read);
int32_t x_fd_readdir(uint32_t fd, ptr buf, uint32_t len, uint64_t cookie, ptr used) WASI(fd_readdir);
int32_t x_fd_write(uint32_t fd, ptr iovs, uint32_t n, ptr nwritten) WASI(fd_write);
int32_t x_path_create_directory(uint32_t fd, ptr path, uint32_t len) WASI(path_create_directory);
int32_t x_path_filestat_get(uint32_t fd, uint32_t flags, ptr path, uint32_t len, ptr buf) WASI(path_filestat_get);
int32_t x_path_filestat_set_times(uint32_t fd, uint32_t flags, ptr path, uint32_t len, uint64_t atim, uint64_t mtim,
                                  uint32_t fst) WASI(path_filestat_set_times);
int32_t x_path_link(uint32_t oldfd, uint32_t flags, ptr old, uint32_t oldlen, uint32_t newfd, ptr new,
                    uint32_t newlen) WASI(path_link);
int32_t x_path_open(uint32_t fd, uint32_t dirflags, ptr path, uint32_t len, uint32_t oflags, uint64_t base,
                    uint64_t inh, uint32_t fdflags, ptr newfd) WASI(path_open);
int32_t x_path_readlink(uint32_t fd, ptr path, uint32_t len, ptr buf, uint32_t buflen, ptr used) WASI(path_readlink);
int32_t x_path_remove_directory(uint32_t fd, ptr path, uint32_t len) WASI(path_remove_directory);
int32_t x_path_rename(uint32_t fd, ptr old, uint32_t oldlen, uint32_t newfd, ptr new, uint32_t newlen) WASI(path_rename);
int32_t x_path_symlink(ptr old, uint32_t oldlen, uint32_t fd, ptr new, uint32_t newlen) WASI(path_symlink);
int32_t x_path_unlink_file(uint32_t fd, ptr path, uint32_t len) WASI(path_unlink_file);

int32_t report(const char *name, int32_t e);

#define P(x) ((ptr)(uintptr_t)(x))
#define FOLLOW 1
#define O_CREAT 1
#define O_DIRECTORY 2
#define O_EXCL 4
#define O_TRUNC 8
#define R_READ 2ull
#define R_WRITE 64ull

static uint64_t file_rights, dir_rights;

typedef struct {
	ptr buf;
	uint32_t len;
} iovec;

// open_at opens path under dirfd; on success it reads what it can, prints
// it (so a leak is visible) and closes it. It returns the errno.
static int32_t open_at(const char *name, uint32_t dirfd, const char *path, uint32_t len, uint32_t lookup,
                       uint32_t oflags, uint64_t rights) {
	uint32_t fd = 0;
	int32_t e = x_path_open(dirfd, lookup, P(path), len, oflags, rights, file_rights, 0, P(&fd));
	report(name, e);
	if (e == 0) {
		char buf[64] = {0};
		uint32_t n = 0;
		iovec iov = {P(buf), sizeof buf - 1};
		if (!(oflags & O_DIRECTORY) && x_fd_read(fd, P(&iov), 1, P(&n)) == 0) {
			for (uint32_t i = 0; i < n; i++)
				if (buf[i] == '\n')
					buf[i] = '|';
			printf("%s: read %u bytes \"%.*s\"\n", name, n, (int)n, buf);
		}
		x_fd_close(fd);
	}
	return e;
}

static int32_t open_rd(const char *name, const char *path, uint32_t lookup) {
	return open_at(name, 3, path, strlen(path), lookup, 0, R_READ);
}

static int32_t creat(const char *name, const char *path) {
	return open_at(name, 3, path, strlen(path), FOLLOW, O_CREAT, R_READ | R_WRITE);
}

static int32_t symlink_(const char *name, const char *target, const char *link) {
	return report(name, x_path_symlink(P(target), strlen(target), 3, P(link), strlen(link)));
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	const char *secret = argc > 1 ? argv[1] : "/tmp/secret";
	uint8_t st[64];
	x_fd_fdstat_get(3, P(st));
	memcpy(&dir_rights, st + 8, 8);
	memcpy(&file_rights, st + 16, 8);

	// Positive controls: the sandbox works for honest paths.
	open_rd("ok_inside", "inside.txt", FOLLOW);
	open_rd("ok_dot_slash", "./inside.txt", FOLLOW);
	open_rd("ok_sub_dotdot", "sub/../inside.txt", FOLLOW);
	open_at("ok_dot_dir", 3, ".", 1, FOLLOW, O_DIRECTORY, 0);

	// Plain "..".
	open_rd("dotdot_secret", "../secret", FOLLOW);
	open_rd("dot_dotdot_secret", "./../secret", FOLLOW);
	open_rd("sub_dotdot_dotdot_secret", "sub/../../secret", FOLLOW);
	open_at("open_dotdot_dir", 3, "..", 2, FOLLOW, O_DIRECTORY, 0);
	open_at("open_sub_dotdot_dotdot_dir", 3, "sub/../..", 9, FOLLOW, O_DIRECTORY, 0);
	static char deep[8192];
	deep[0] = 0;
	for (int i = 0; i < 200; i++)
		strcat(deep, "sub/../");
	strcat(deep, "../secret");
	open_rd("deep_dotdot_secret", deep, FOLLOW);
	open_rd("dotdot_box_inside", "../box/inside.txt", FOLLOW);

	// Absolute paths.
	open_rd("abs_etc_passwd", "/etc/passwd", FOLLOW);
	open_rd("abs_secret", secret, FOLLOW);
	open_rd("abs_root_dotdot", "/../../../../etc/passwd", FOLLOW);

	// Paths with NUL bytes: a host that stops at the NUL would open
	// something else than the guest named.
	static const char nul[] = "inside.txt\0../secret";
	open_at("nul_in_path", 3, nul, sizeof nul - 1, FOLLOW, 0, R_READ);

	// Creating outside.
	creat("creat_dotdot", "../created_outside");
	creat("creat_sub_dotdot", "sub/../../created_outside2");
	creat("creat_abs", "/tmp/created_outside3");
	report("mkdir_dotdot", x_path_create_directory(3, P("../mkdir_outside"), 16));
	report("mkdir_abs", x_path_create_directory(3, P("/tmp/mkdir_outside2"), 19));

	// Symlinks the guest makes. Creating one may be allowed (it is just a
	// name with text); following it out of the sandbox may not.
	symlink_("symlink_rel_create", "../secret", "lnk_rel");
	open_rd("symlink_rel_follow", "lnk_rel", FOLLOW);
	open_rd("symlink_rel_nofollow", "lnk_rel", 0);
	symlink_("symlink_abs_create", "/etc/passwd", "lnk_abs");
	open_rd("symlink_abs_follow", "lnk_abs", FOLLOW);
	symlink_("symlink_abs_secret_create", secret, "lnk_abs_secret");
	open_rd("symlink_abs_secret_follow", "lnk_abs_secret", FOLLOW);
	symlink_("symlink_chain_create1", "c2", "c1");
	symlink_("symlink_chain_create2", "../secret", "c2");
	open_rd("symlink_chain_follow", "c1", FOLLOW);
	symlink_("symlink_dir_create", "..", "dlnk");
	open_rd("symlink_dir_secret", "dlnk/secret", FOLLOW);
	open_rd("symlink_dir_secret_nofollow", "dlnk/secret", 0);
	creat("symlink_dir_creat", "dlnk/created_via_dlnk");
	report("symlink_dir_mkdir", x_path_create_directory(3, P("dlnk/mkdir_via_dlnk"), 19));
	symlink_("symlink_in_sub_create", "../../secret", "sub/lnk_up2");
	open_rd("symlink_in_sub_follow", "sub/lnk_up2", FOLLOW);
	// A symlink made through ".." (the link itself outside) must not exist.
	symlink_("symlink_create_outside", "box/inside.txt", "../lnk_outside");
	// A symlink to a path that does not exist yet, then created through it.
	symlink_("symlink_dangling_create", "../planted", "dangling");
	creat("symlink_dangling_creat", "dangling");

	// Symlinks the host planted.
	open_rd("hostlink_abs_follow", "hostlink_abs", FOLLOW);
	open_rd("hostlink_rel_follow", "hostlink_rel", FOLLOW);
	open_rd("hostdir_file", "hostdir/o.txt", FOLLOW);
	creat("hostdir_creat", "hostdir/new.txt");
	static char target[256];
	uint32_t used = 0;
	int32_t e = x_path_readlink(3, P("hostlink_rel"), 12, P(target), sizeof target, P(&used));
	report("readlink_hostlink_rel", e);
	if (e == 0)
		printf("readlink_hostlink_rel: \"%.*s\"\n", (int)used, target);

	// Metadata through links: stat and utimes must not reach the target.
	report("stat_follow_lnk_rel", x_path_filestat_get(3, FOLLOW, P("lnk_rel"), 7, P(st)));
	report("stat_nofollow_lnk_rel", x_path_filestat_get(3, 0, P("lnk_rel"), 7, P(st)));
	report("stat_dotdot_secret", x_path_filestat_get(3, 0, P("../secret"), 9, P(st)));
	report("stat_hostdir_file", x_path_filestat_get(3, FOLLOW, P("hostdir/o.txt"), 13, P(st)));
	// atim = mtim = 1 s after the epoch, set explicitly (ATIM|MTIM).
	report("utimes_follow_lnk_rel",
	       x_path_filestat_set_times(3, FOLLOW, P("lnk_rel"), 7, 1000000000ull, 1000000000ull, 1 | 4));
	report("utimes_dotdot_secret",
	       x_path_filestat_set_times(3, 0, P("../secret"), 9, 1000000000ull, 1000000000ull, 1 | 4));
	report("utimes_hostlink_abs",
	       x_path_filestat_set_times(3, FOLLOW, P("hostlink_abs"), 12, 1000000000ull, 1000000000ull, 1 | 4));

	// Truncating or writing through links.
	open_at("trunc_follow_lnk_rel", 3, "lnk_rel", 7, FOLLOW, O_TRUNC, R_READ | R_WRITE);
	open_at("trunc_hostlink_abs", 3, "hostlink_abs", 12, FOLLOW, O_TRUNC, R_READ | R_WRITE);
	open_at("write_open_hostlink_rel", 3, "hostlink_rel", 12, FOLLOW, 0, R_READ | R_WRITE);

	// Hard links across the boundary, including linkat(AT_SYMLINK_FOLLOW)
	// of a symlink that points outside, which would hard-link the target.
	report("link_follow_lnk_rel", x_path_link(3, FOLLOW, P("lnk_rel"), 7, 3, P("hard_secret"), 11));
	open_rd("link_follow_lnk_rel_open", "hard_secret", 0);
	report("link_follow_hostlink_abs", x_path_link(3, FOLLOW, P("hostlink_abs"), 12, 3, P("hard_secret2"), 12));
	open_rd("link_follow_hostlink_abs_open", "hard_secret2", 0);
	report("link_dotdot_secret", x_path_link(3, 0, P("../secret"), 9, 3, P("hard_secret3"), 12));
	report("link_to_outside", x_path_link(3, 0, P("inside.txt"), 10, 3, P("../hard_outside"), 15));

	// Renames across the boundary.
	creat("rename_prep", "movable.txt");
	report("rename_to_outside", x_path_rename(3, P("movable.txt"), 11, 3, P("../renamed_out"), 14));
	report("rename_from_outside", x_path_rename(3, P("../secret"), 9, 3, P("stolen"), 6));
	report("rename_via_dlnk", x_path_rename(3, P("dlnk/secret"), 11, 3, P("stolen2"), 7));
	report("rename_into_hostdir", x_path_rename(3, P("movable.txt"), 11, 3, P("hostdir/moved.txt"), 17));
	report("rename_over_preopen", x_path_rename(3, P("sub"), 3, 3, P("."), 1));
	report("rename_dir_into_itself", x_path_rename(3, P("sub"), 3, 3, P("sub/inner"), 9));

	// Removal across the boundary and of the preopen itself.
	report("unlink_dotdot_secret", x_path_unlink_file(3, P("../secret"), 9));
	report("unlink_via_dlnk", x_path_unlink_file(3, P("dlnk/secret"), 11));
	report("unlink_hostdir_file", x_path_unlink_file(3, P("hostdir/o.txt"), 13));
	report("rmdir_dotdot_outside", x_path_remove_directory(3, P("../outside"), 10));
	report("rmdir_dot", x_path_remove_directory(3, P("."), 1));
	report("rmdir_hostdir_symlink", x_path_remove_directory(3, P("hostdir"), 7));

	// A directory opened beneath the preopen is no way out either.
	uint32_t sub = 0;
	e = x_path_open(3, FOLLOW, P("sub"), 3, O_DIRECTORY, dir_rights, file_rights, 0, P(&sub));
	report("open_sub_dir", e);
	if (e == 0) {
		open_at("subfd_dotdot_dotdot_secret", sub, "../../secret", 12, FOLLOW, 0, R_READ);
		open_at("subfd_abs_secret", sub, secret, strlen(secret), FOLLOW, 0, R_READ);
		open_at("subfd_dotdot_inside", sub, "../inside.txt", 13, FOLLOW, 0, R_READ);
		x_fd_close(sub);
	}

	// Opening a non-directory as a directory descriptor for lookups.
	report("open_on_stdout", x_path_open(1, FOLLOW, P("x"), 1, 0, R_READ, 0, 0, P(&sub)));
	report("readdir_stdout", x_fd_readdir(1, P(target), sizeof target, 0, P(&used)));

	// Huge names.
	static char longname[5000];
	memset(longname, 'a', sizeof longname - 1);
	report("open_long_name", x_path_open(3, FOLLOW, P(longname), sizeof longname - 1, O_CREAT, R_READ, 0, 0, P(&sub)));
	static char longpath[20000];
	for (size_t i = 0; i + 2 < sizeof longpath; i += 2)
		memcpy(longpath + i, "a/", 2);
	report("mkdir_long_path", x_path_create_directory(3, P(longpath), sizeof longpath - 2));

	printf("done\n");
	return 0;
}
