// scratchtop writes to the last 256 KiB of its linear memory — the region
// ftvm borrows for Asyncify's stack at every pause — between host calls,
// and checks after each call that what it wrote is still there. Paused
// often, it catches a machine that puts back stale bytes.
//
// Usage: scratchtop ROUNDS
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define TOP (256 * 1024)

int main(int argc, char **argv) {
	int rounds = argc > 1 ? atoi(argv[1]) : 1000;
	// Grow once so that the top of memory is ours and stays put.
	__builtin_wasm_memory_grow(0, 8);
	uintptr_t end = __builtin_wasm_memory_size(0) * 65536;
	volatile uint8_t *top = (volatile uint8_t *)(end - TOP);
	uint32_t seed = 12345;
	for (int r = 0; r < rounds; r++) {
		// Write a few words in random pages of the region.
		uint32_t offs[8];
		uint8_t vals[8];
		for (int i = 0; i < 8; i++) {
			seed = seed * 1103515245 + 12345;
			offs[i] = (seed >> 8) % TOP;
			vals[i] = (uint8_t)(r + i + 1);
			top[offs[i]] = vals[i];
		}
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts); // a host call: a safe point
		for (int i = 7; i >= 0; i--) {
			// Later writes win where offsets repeat.
			int later = 0;
			for (int j = i + 1; j < 8; j++)
				later |= offs[j] == offs[i];
			if (!later && top[offs[i]] != vals[i]) {
				printf("round %d: byte at top+%u is %u, wrote %u\n", r, offs[i], top[offs[i]], vals[i]);
				return 1;
			}
		}
	}
	printf("ok %d rounds\n", rounds);
	return 0;
}
