// fail misbehaves in the way argv[1] names, for tests of how ftvm reports a
// guest that cannot go on: traps of each kind, exhausting the wasm call
// stack, and allocating until memory runs out.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Not static and not inlined, so that the trap's wasm stack trace names it.
__attribute__((noinline)) void crash_here(void) { __builtin_trap(); }

// recurse exhausts the wasm call stack. It calls itself through a volatile
// function pointer so that the compiler cannot turn the recursion into a
// loop, and keeps nothing in linear memory, so that the C shadow stack does
// not run out first.
static int (*volatile again)(int);
__attribute__((noinline)) int recurse(int n) { return again(n + 1) + n; }

void *volatile chain;

int main(int argc, char **argv) {
	const char *mode = argc > 1 ? argv[1] : "";
	volatile int zero = 0;
	if (!strcmp(mode, "trap")) {
		printf("about to trap\n");
		fflush(stdout);
		crash_here();
	} else if (!strcmp(mode, "divzero")) {
		printf("%d\n", 100 / zero);
	} else if (!strcmp(mode, "oob")) {
		volatile int *p = (volatile int *)0xfffffff0u;
		*p = 1;
	} else if (!strcmp(mode, "recurse")) {
		again = recurse;
		printf("%d\n", recurse(0));
	} else if (!strcmp(mode, "malloc")) {
		// Allocate and touch 1 MiB blocks until malloc fails, then report
		// how far it got and exit with an error, as a careful program does.
		// The blocks are chained so that they escape: a block nobody uses
		// lets the compiler drop the malloc and assume it succeeded.
		size_t mib = 0;
		void **head = NULL;
		for (;;) {
			void **b = malloc(1 << 20);
			if (!b)
				break;
			memset(b, 1, 1 << 20);
			*b = head;
			head = b;
			mib++;
		}
		chain = head;
		fprintf(stderr, "malloc failed after %zu MiB\n", mib);
		return 12;
	} else {
		fprintf(stderr, "usage: fail trap|divzero|oob|recurse|malloc\n");
		return 2;
	}
	return 0;
}
