// deepstack: recurses DEPTH calls deep and, at the bottom, reads the clock
// ROUNDS times: host calls, so safe points, under a wasm call stack of DEPTH
// frames, each holding values live across its call (which Asyncify saves
// when it unwinds the stack at a pause). Prints a checksum that does not
// depend on the clock.
//
// Link it with a C stack to match (-Wl,-z,stack-size=...): wasm-ld's
// default of 64 KiB overflows at a few thousand calls.
//
// usage: deepstack [DEPTH [ROUNDS]]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t rounds;

__attribute__((noinline)) static uint64_t down(uint32_t d, uint64_t a, uint64_t b, uint64_t c) {
	if (d == 0) {
		uint64_t s = 0;
		for (uint64_t i = 0; i < rounds; i++) {
			struct timespec ts;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			s += ts.tv_sec >= 0;
		}
		return s + a;
	}
	uint64_t x = a * 6364136223846793005ull + b, y = b ^ (c << 7), z = c + d;
	uint64_t r = down(d - 1, x, y, z);
	return (r * (x | 1)) ^ (y + z);
}

int main(int argc, char **argv) {
	uint32_t depth = argc > 1 ? strtoul(argv[1], 0, 10) : 100;
	rounds = argc > 2 ? strtoull(argv[2], 0, 10) : 1000;
	printf("%016llx\n", (unsigned long long)down(depth, 1, 2, 3));
	return 0;
}
