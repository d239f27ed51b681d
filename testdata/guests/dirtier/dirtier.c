// dirtier: a guest for checkpoint benchmarks. It owns a buffer of MIB
// mebibytes and, in every round, writes one byte into each of PAGES pages
// (a different set each round), then makes a host call: the safe point
// where a pause can land; with SLEEP_US it then sleeps that long (a
// poll_oneoff wait). It runs ROUNDS rounds (0: forever), then prints a
// checksum of the whole buffer: a replica that lost a write prints
// another.
//
// usage: dirtier MIB PAGES ROUNDS [SLEEP_US]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
	size_t pages = argc > 2 ? strtoul(argv[2], 0, 10) : 100;
	unsigned long rounds = argc > 3 ? strtoul(argv[3], 0, 10) : 0;
	unsigned long sleep_us = argc > 4 ? strtoul(argv[4], 0, 10) : 0;
	size_t npages = mib * 1024 * 1024 / 4096;
	if (pages > npages)
		pages = npages;
	uint8_t *buf = malloc(npages * 4096);
	if (!buf) {
		fprintf(stderr, "dirtier: cannot allocate %zu MiB\n", mib);
		return 1;
	}
	for (size_t i = 0; i < npages; i++)
		buf[i * 4096] = 1; // touch every page once
	uint64_t x = 88172645463325252ull;
	struct timespec ts;
	for (unsigned long r = 0; rounds == 0 || r < rounds; r++) {
		size_t start = (size_t)(x % npages);
		for (size_t i = 0; i < pages; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			buf[((start + i) % npages) * 4096 + (x & 4095)] = (uint8_t)x;
		}
		clock_gettime(CLOCK_MONOTONIC, &ts); // the safe point
		if (sleep_us) {
			struct timespec d = {0, (long)sleep_us * 1000};
			nanosleep(&d, 0);
		}
	}
	uint64_t h = 1469598103934665603ull; // FNV-1a over the words
	const uint64_t *w = (const uint64_t *)buf;
	for (size_t i = 0; i < npages * 4096 / 8; i++)
		h = (h ^ w[i]) * 1099511628211ull;
	printf("%u %016llx\n", buf[x % (npages * 4096)], (unsigned long long)h);
	return 0;
}
