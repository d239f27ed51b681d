// bigexit: fills MIB mebibytes with pseudo-random words (incompressible)
// without a host call, then prints a checksum of them and exits. Under
// protection the checkpoint taken at that print carries every page, and
// the guest ends right after it: its exit must not wait for that memory.
//
// usage: bigexit [MIB]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
	size_t words = (mib << 20) / 8;
	uint64_t *buf = malloc(words * 8);
	if (!buf) {
		fprintf(stderr, "bigexit: cannot allocate %zu MiB\n", mib);
		return 1;
	}
	uint64_t x = 88172645463325252ull, h = 1469598103934665603ull;
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		buf[i] = x;
	}
	// Read back, so that the compiler keeps the writes.
	for (size_t i = 0; i < words; i++)
		h = (h ^ buf[i]) * 1099511628211ull;
	printf("%016llx\n", (unsigned long long)h);
	return 0;
}
