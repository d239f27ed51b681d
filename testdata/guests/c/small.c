// small is a C program that never allocates: its memory stays the 128 KiB
// the linker gives it (64 KiB of stack, a little data), less than the
// 256 KiB a pause otherwise borrows for the Asyncify stack. It prints N
// numbered lines with a running hash, sleeping MS milliseconds after each
// (argv[1], argv[2]; 30 and 0 by default), so its host calls are writes
// and, with MS, waits.
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
	int n = argc > 1 ? atoi(argv[1]) : 30;
	int ms = argc > 2 ? atoi(argv[2]) : 0;
	unsigned h = 2166136261u;
	for (int i = 0; i < n; i++) {
		h = (h ^ (unsigned)i) * 16777619u;
		printf("line %d %08x\n", i, h);
		fflush(stdout);
		if (ms > 0) {
			usleep(ms * 1000);
		}
	}
	return 0;
}
