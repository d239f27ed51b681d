// scratchtop writes to the last 256 KiB of its linear memory — the region
// ftvm borrows for Asyncify's stack at every pause — between host calls,
// and checks after each call that what it wrote is still there. Paused
// often, it catches a machine that puts back stale bytes.
//
// Every byte it ever wrote is checked, not only the last round's: it keeps
// a copy of the region's first page, where the machine writes the stack
// and then puts the guest's bytes back, and half of its writes go there.
// A byte written long before the pause that restores a stale copy of that
// page is caught as surely as one written just before it.
//
// Usage: scratchtop ROUNDS
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOP (256 * 1024)
#define FIRST 4096

static uint8_t shadow[FIRST];

int main(int argc, char **argv) {
	int rounds = argc > 1 ? atoi(argv[1]) : 1000;
	// Grow once so that the top of memory is ours and stays put.
	__builtin_wasm_memory_grow(0, 8);
	uintptr_t end = __builtin_wasm_memory_size(0) * 65536;
	volatile uint8_t *top = (volatile uint8_t *)(end - TOP);
	for (int i = 0; i < FIRST; i++)
		shadow[i] = top[i];
	uint32_t seed = 12345;
	for (int r = 0; r < rounds; r++) {
		// Write a few bytes: half in the first page (one of them among
		// its first 64 bytes, where the machine writes the stack), half
		// anywhere. Three rounds in four write nothing and sleep (host
		// calls, so safe points): pauses there find the region unwritten
		// since the guest's last writes, which a tracker that protected
		// them again meanwhile (pages collected ahead of a pause) no longer
		// reports as written; and the first page, written now and then
		// rather than between every two pauses, is not left writable and
		// watched by content instead (a hot page), which would hide that.
		seed = seed * 1103515245 + 12345;
		if ((seed >> 16) % 4 != 0) {
			struct timespec ts = {0, 200000};
			nanosleep(&ts, NULL);
			for (int i = 0; i < FIRST; i++) {
				if (top[i] != shadow[i]) {
					printf("round %d (no writes): byte at top+%d is %u, wrote %u earlier\n", r, i, top[i], shadow[i]);
					return 1;
				}
			}
			continue;
		}
		uint32_t offs[8];
		uint8_t vals[8];
		for (int i = 0; i < 8; i++) {
			seed = seed * 1103515245 + 12345;
			offs[i] = (seed >> 8) % (i == 0 ? 64 : i % 2 ? TOP : FIRST);
			vals[i] = (uint8_t)(r + i + 1);
			top[offs[i]] = vals[i];
			if (offs[i] < FIRST)
				shadow[offs[i]] = vals[i];
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
		for (int i = 0; i < FIRST; i++) {
			if (top[i] != shadow[i]) {
				printf("round %d: byte at top+%d is %u, wrote %u earlier\n", r, i, top[i], shadow[i]);
				return 1;
			}
		}
	}
	printf("ok %d rounds\n", rounds);
	return 0;
}
