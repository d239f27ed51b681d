// fileio exercises ordinary POSIX file I/O through libc on the directory named
// by argv[1] (default /data), printing one line per step. It builds both for
// wasm32-wasi and natively with plain `cc`, and prints the same text in both,
// so the test can compare ftvm against the host kernel line by line. Nothing
// it prints depends on inode numbers, times it did not set, or directory
// order.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static const char *dir;
static int failures;

// errname prints errno symbolically: strerror's text differs between musl
// (wasi-libc) and glibc.
static const char *errname(int e) {
	switch (e) {
	case 0: return "OK";
	case ENOENT: return "ENOENT";
	case EEXIST: return "EEXIST";
	case ENOTDIR: return "ENOTDIR";
	case EISDIR: return "EISDIR";
	case ENOTEMPTY: return "ENOTEMPTY";
	case EBADF: return "EBADF";
	case EINVAL: return "EINVAL";
	case EACCES: return "EACCES";
	case EPERM: return "EPERM";
	case ELOOP: return "ELOOP";
	case ESPIPE: return "ESPIPE";
	}
	static char buf[32];
	snprintf(buf, sizeof buf, "errno%d", e);
	return buf;
}

static char *path(const char *name) {
	static char bufs[4][512];
	static int next;
	char *b = bufs[next++ % 4];
	snprintf(b, sizeof bufs[0], "%s/%s", dir, name);
	return b;
}

// check reports a step that must succeed; a failure is counted so that the
// exit code shows it too.
static void check(const char *what, long r) {
	if (r < 0) {
		printf("%s: FAILED %s\n", what, errname(errno));
		failures++;
	} else {
		printf("%s: ok %ld\n", what, r);
	}
}

// expect_err reports a step that must fail, with its errno.
static void expect_err(const char *what, long r) {
	if (r >= 0) {
		printf("%s: UNEXPECTED success %ld\n", what, r);
		failures++;
	} else {
		printf("%s: %s\n", what, errname(errno));
	}
}

static const char *ftype(mode_t m) {
	if (S_ISREG(m)) return "file";
	if (S_ISDIR(m)) return "dir";
	if (S_ISLNK(m)) return "symlink";
	return "other";
}

static void show_stat(const char *name) {
	struct stat st;
	if (stat(path(name), &st) < 0) {
		printf("stat %s: %s\n", name, errname(errno));
		return;
	}
	printf("stat %s: %s size=%lld nlink=%lld\n", name, ftype(st.st_mode), (long long)st.st_size,
	       (long long)st.st_nlink);
}

static void read_range(int fd, const char *what, off_t off, size_t n) {
	char buf[128] = {0};
	ssize_t r = pread(fd, buf, n < sizeof buf ? n : sizeof buf - 1, off);
	if (r < 0) {
		printf("%s: FAILED %s\n", what, errname(errno));
		failures++;
		return;
	}
	// Make zero bytes visible.
	for (ssize_t i = 0; i < r; i++)
		if (buf[i] == 0)
			buf[i] = '.';
	printf("%s: %zd \"%.*s\"\n", what, r, (int)r, buf);
}

static int cmpstr(const void *a, const void *b) {
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void list(const char *name) {
	DIR *d = opendir(path(name));
	if (!d) {
		printf("opendir %s: FAILED %s\n", name, errname(errno));
		failures++;
		return;
	}
	char *names[64];
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL && n < 64) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		const char *t = e->d_type == DT_DIR ? "/" : e->d_type == DT_LNK ? "@" : e->d_type == DT_REG ? "" : "?";
		char *s = malloc(strlen(e->d_name) + 2);
		sprintf(s, "%s%s", e->d_name, t);
		names[n++] = s;
	}
	closedir(d);
	qsort(names, n, sizeof names[0], cmpstr);
	printf("list %s:", name);
	for (int i = 0; i < n; i++) {
		printf(" %s", names[i]);
		free(names[i]);
	}
	printf("\n");
}

// bigfile writes a 256 KiB pattern in odd-sized chunks and reads it back in
// other odd-sized chunks, so that no single call moves the whole file.
static void bigfile(void) {
	enum { SIZE = 256 * 1024 };
	unsigned char *buf = malloc(SIZE), *back = malloc(SIZE);
	uint32_t x = 12345;
	for (int i = 0; i < SIZE; i++) {
		x = x * 1103515245u + 12345u;
		buf[i] = (unsigned char)(x >> 16);
	}
	int fd = open(path("big.bin"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
	check("big open", fd >= 0 ? 0 : -1);
	for (size_t off = 0; off < SIZE;) {
		size_t n = SIZE - off < 7777 ? SIZE - off : 7777;
		ssize_t w = write(fd, buf + off, n);
		if (w <= 0) {
			check("big write", -1);
			break;
		}
		off += w;
	}
	close(fd);
	fd = open(path("big.bin"), O_RDONLY);
	size_t got = 0;
	for (;;) {
		ssize_t r = read(fd, back + got, SIZE - got < 5003 ? SIZE - got : 5003);
		if (r <= 0)
			break;
		got += r;
	}
	close(fd);
	printf("big: wrote %d read %zu equal=%d\n", SIZE, got, got == SIZE && memcmp(buf, back, SIZE) == 0);
	uint32_t sum = 0;
	for (int i = 0; i < SIZE; i++)
		sum = sum * 31 + back[i];
	printf("big: checksum %08x\n", sum);
	free(buf);
	free(back);
}

int main(int argc, char **argv) {
	dir = argc > 1 ? argv[1] : "/data";
	setvbuf(stdout, NULL, _IOLBF, 0);

	// Create, write, read back.
	int fd = open(path("a.txt"), O_CREAT | O_EXCL | O_WRONLY, 0644);
	check("create a.txt", fd >= 0 ? 0 : -1);
	check("write a.txt", write(fd, "hello world\n", 12));
	check("close", close(fd));
	expect_err("create a.txt again with O_EXCL", open(path("a.txt"), O_CREAT | O_EXCL | O_WRONLY, 0644));
	expect_err("open missing", open(path("missing.txt"), O_RDONLY));

	fd = open(path("a.txt"), O_RDWR);
	check("open a.txt rw", fd >= 0 ? 0 : -1);
	char buf[64] = {0};
	ssize_t r = read(fd, buf, sizeof buf - 1);
	printf("read: %zd \"%.*s\"\n", r, (int)(r > 0 ? r - 1 : 0), buf);
	printf("tell after read: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
	r = read(fd, buf, sizeof buf);
	printf("read at eof: %zd\n", r);

	// Seek and tell.
	printf("seek set 6: %lld\n", (long long)lseek(fd, 6, SEEK_SET));
	memset(buf, 0, sizeof buf);
	r = read(fd, buf, 5);
	printf("read 5: %zd \"%s\"\n", r, buf);
	printf("seek cur -3: %lld\n", (long long)lseek(fd, -3, SEEK_CUR));
	printf("seek end 0: %lld\n", (long long)lseek(fd, 0, SEEK_END));
	expect_err("seek before start", lseek(fd, -100, SEEK_SET));
	printf("tell after failed seek: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
	// A seek past the end followed by a write leaves a hole of zeros.
	printf("seek end +4: %lld\n", (long long)lseek(fd, 4, SEEK_END));
	check("write after hole", write(fd, "Z", 1));

	// pread/pwrite do not move the offset.
	check("seek set 2", lseek(fd, 2, SEEK_SET));
	check("pwrite HELLO at 0", pwrite(fd, "HELLO", 5, 0));
	read_range(fd, "pread 0..11", 0, 11);
	read_range(fd, "pread past eof", 100, 10);
	printf("tell after pread/pwrite: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
	check("pwrite extends at 20", pwrite(fd, "END", 3, 20));
	read_range(fd, "pread whole", 0, 64);
	check("close", close(fd));
	show_stat("a.txt");

	// Append mode: every write goes to the end whatever the offset.
	fd = open(path("log.txt"), O_CREAT | O_WRONLY | O_APPEND, 0600);
	check("open log.txt append", fd >= 0 ? 0 : -1);
	check("append 1", write(fd, "one\n", 4));
	check("seek 0 in append file", lseek(fd, 0, SEEK_SET));
	check("append 2", write(fd, "two\n", 4));
	printf("tell in append file: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
	check("close", close(fd));
	FILE *fp = fopen(path("log.txt"), "a");
	fprintf(fp, "three %d\n", 3);
	fclose(fp);
	fp = fopen(path("log.txt"), "r");
	while (fgets(buf, sizeof buf, fp))
		printf("log line: %s", buf);
	fclose(fp);

	// Truncate: shrink, then extend with zeros.
	fd = open(path("a.txt"), O_RDWR);
	check("ftruncate 5", ftruncate(fd, 5));
	read_range(fd, "after shrink", 0, 64);
	check("ftruncate 8", ftruncate(fd, 8));
	read_range(fd, "after extend", 0, 64);
	struct stat st;
	check("fstat", fstat(fd, &st));
	printf("fstat: %s size=%lld\n", ftype(st.st_mode), (long long)st.st_size);
	check("close", close(fd));
	check("truncate by path to 3", truncate(path("a.txt"), 3));
	show_stat("a.txt");
	fd = open(path("a.txt"), O_WRONLY | O_TRUNC);
	check("open O_TRUNC", fd >= 0 ? 0 : -1);
	check("write after O_TRUNC", write(fd, "fresh\n", 6));
	close(fd);
	show_stat("a.txt");

	// Directories.
	check("mkdir sub", mkdir(path("sub"), 0755));
	expect_err("mkdir sub again", mkdir(path("sub"), 0755));
	check("mkdir sub/deeper", mkdir(path("sub/deeper"), 0755));
	fd = open(path("sub/deeper/n.txt"), O_CREAT | O_WRONLY, 0644);
	check("write sub/deeper/n.txt", write(fd, "nested\n", 7));
	close(fd);
	expect_err("open file as directory", open(path("a.txt/x"), O_RDONLY));
	expect_err("open dir for writing", open(path("sub"), O_WRONLY));
	expect_err("rmdir non-empty", rmdir(path("sub")));
	expect_err("unlink a directory", unlink(path("sub")));
	expect_err("rmdir a file", rmdir(path("a.txt")));
	list(".");
	list("sub");

	// Rename: a file into a subdirectory, over an existing file, and a directory.
	check("rename a.txt -> sub/b.txt", rename(path("a.txt"), path("sub/b.txt")));
	show_stat("a.txt");
	show_stat("sub/b.txt");
	fd = open(path("c.txt"), O_CREAT | O_WRONLY, 0644);
	check("write c.txt", write(fd, "c content\n", 10));
	close(fd);
	check("rename c.txt over sub/b.txt", rename(path("c.txt"), path("sub/b.txt")));
	show_stat("sub/b.txt");
	check("rename sub/deeper -> moved", rename(path("sub/deeper"), path("moved")));
	list("moved");
	expect_err("rename missing", rename(path("nope"), path("nope2")));

	// Hard and symbolic links inside the directory.
	check("link sub/b.txt -> hard.txt", link(path("sub/b.txt"), path("hard.txt")));
	show_stat("hard.txt");
	check("symlink sym -> sub/b.txt", symlink("sub/b.txt", path("sym")));
	char target[64] = {0};
	r = readlink(path("sym"), target, sizeof target - 1);
	printf("readlink sym: %zd \"%s\"\n", r, r > 0 ? target : "");
	check("lstat sym", lstat(path("sym"), &st));
	printf("lstat sym: %s\n", ftype(st.st_mode));
	fd = open(path("sym"), O_RDONLY);
	memset(buf, 0, sizeof buf);
	r = read(fd, buf, sizeof buf - 1);
	printf("read through sym: %zd \"%.*s\"\n", r, (int)(r > 0 ? r - 1 : 0), buf);
	close(fd);

	// Set times to fixed values and read them back.
	struct timeval tv[2] = {{1000000000, 0}, {1234567890, 0}};
	check("utimes hard.txt", utimes(path("hard.txt"), tv));
	check("stat hard.txt", stat(path("hard.txt"), &st));
	printf("times: atime=%lld mtime=%lld\n", (long long)st.st_atime, (long long)st.st_mtime);

	// Unlink and rmdir.
	check("unlink hard.txt", unlink(path("hard.txt")));
	show_stat("sub/b.txt");
	expect_err("unlink hard.txt again", unlink(path("hard.txt")));
	check("unlink sym", unlink(path("sym")));
	check("unlink moved/n.txt", unlink(path("moved/n.txt")));
	check("rmdir moved", rmdir(path("moved")));
	show_stat("moved");

	bigfile();
	check("unlink big.bin", unlink(path("big.bin")));

	// Files held open while one is unlinked and another renamed over:
	// the descriptors keep their own files (a snapshot taken meanwhile
	// must too).
	int keep = open(path("keep.txt"), O_CREAT | O_RDWR | O_TRUNC, 0644);
	check("write keep.txt", write(keep, "kept data\n", 10));
	int over = open(path("over.txt"), O_CREAT | O_RDWR | O_TRUNC, 0644);
	check("write over.txt", write(over, "old over\n", 9));
	fd = open(path("new.txt"), O_CREAT | O_WRONLY | O_TRUNC, 0644);
	check("write new.txt", write(fd, "new over\n", 9));
	close(fd);
	check("unlink keep.txt while open", unlink(path("keep.txt")));
	check("rename new.txt over over.txt while open", rename(path("new.txt"), path("over.txt")));
	check("write keep.txt after its unlink", write(keep, "more\n", 5));
	show_stat("keep.txt");
	memset(buf, 0, sizeof buf);
	r = pread(keep, buf, sizeof buf - 1, 0);
	printf("read the unlinked keep.txt: %zd \"%.*s\"\n", r, (int)(r > 1 ? r - 1 : 0), buf);
	memset(buf, 0, sizeof buf);
	r = pread(over, buf, sizeof buf - 1, 0);
	printf("read the replaced over.txt: %zd \"%.*s\"\n", r, (int)(r > 1 ? r - 1 : 0), buf);
	fd = open(path("over.txt"), O_RDONLY);
	memset(buf, 0, sizeof buf);
	r = read(fd, buf, sizeof buf - 1);
	printf("read over.txt by name: %zd \"%.*s\"\n", r, (int)(r > 1 ? r - 1 : 0), buf);
	close(fd);
	close(keep);
	close(over);
	check("unlink over.txt", unlink(path("over.txt")));

	// What is left for the test to inspect from the host.
	fd = open(path("final.txt"), O_CREAT | O_WRONLY | O_TRUNC, 0644);
	check("write final.txt", write(fd, "the end\n", 8));
	close(fd);
	list(".");
	printf("failures: %d\n", failures);
	return failures ? 1 : 0;
}
