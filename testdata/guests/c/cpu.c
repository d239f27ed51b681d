// cpu is a deterministic CPU-bound workload for benchmarks against native
// code: SHA-256 hash chaining, integer matrix multiplication, a prime sieve
// and an n-body simulation, each scaled by the iteration count in argv[1].
// testdata/guests/gocpu implements the same algorithms in Go and prints the
// same lines, so the four builds (C and Go, wasm and native) check each
// other. It builds natively with plain `cc -O2 cpu.c` and needs no libm.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SCALE 20

// --- SHA-256 (FIPS 180-4), written out so that native code gets no
// assembly advantage over wasm.

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(uint32_t h[8], const uint8_t *p) {
	uint32_t w[64];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
	for (int i = 0; i < 64; i++) {
		uint32_t t1 = hh + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
	}
	h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

// sha256 hashes n bytes (any length) into out.
static void sha256(const uint8_t *msg, size_t n, uint8_t out[32]) {
	uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	size_t i = 0;
	for (; i + 64 <= n; i += 64)
		sha256_block(h, msg + i);
	uint8_t tail[128] = {0};
	size_t rest = n - i;
	memcpy(tail, msg + i, rest);
	tail[rest] = 0x80;
	size_t tlen = rest + 9 <= 64 ? 64 : 128;
	uint64_t bits = (uint64_t)n * 8;
	for (int k = 0; k < 8; k++)
		tail[tlen - 1 - k] = (uint8_t)(bits >> (8 * k));
	sha256_block(h, tail);
	if (tlen == 128)
		sha256_block(h, tail + 64);
	for (int k = 0; k < 8; k++) {
		out[4 * k] = h[k] >> 24, out[4 * k + 1] = h[k] >> 16, out[4 * k + 2] = h[k] >> 8, out[4 * k + 3] = h[k];
	}
}

// hashchain hashes a 4 KiB buffer whose first 32 bytes are replaced by the
// previous digest, rounds times.
static void hashchain(int rounds, uint8_t digest[32]) {
	static uint8_t buf[4096];
	for (int i = 0; i < 4096; i++)
		buf[i] = (uint8_t)(i * 7 + 3);
	memset(digest, 0, 32);
	for (int r = 0; r < rounds; r++) {
		memcpy(buf, digest, 32);
		sha256(buf, sizeof buf, digest);
	}
}

// --- Integer matrix multiplication modulo 2^32.

enum { MN = 96 };

static uint32_t matmul(int reps) {
	static uint32_t a[MN][MN], b[MN][MN], c[MN][MN];
	uint32_t x = 1;
	for (int i = 0; i < MN; i++)
		for (int j = 0; j < MN; j++) {
			x = x * 1664525u + 1013904223u;
			a[i][j] = x >> 8;
			x = x * 1664525u + 1013904223u;
			b[i][j] = x >> 8;
		}
	for (int r = 0; r < reps; r++) {
		for (int i = 0; i < MN; i++)
			for (int j = 0; j < MN; j++) {
				uint32_t s = 0;
				for (int k = 0; k < MN; k++)
					s += a[i][k] * b[k][j];
				c[i][j] = s;
			}
		// Feed the product back so that no repetition can be skipped.
		for (int i = 0; i < MN; i++)
			for (int j = 0; j < MN; j++)
				a[i][j] = c[i][j] ^ (uint32_t)r;
	}
	uint32_t sum = 0;
	for (int i = 0; i < MN; i++)
		for (int j = 0; j < MN; j++)
			sum = sum * 31 + c[i][j];
	return sum;
}

// --- Sieve of Eratosthenes.

static void sieve(int limit, uint32_t *count, uint64_t *sum) {
	uint8_t *composite = calloc(limit + 1, 1);
	*count = 0, *sum = 0;
	for (int i = 2; i <= limit; i++) {
		if (composite[i])
			continue;
		(*count)++;
		*sum += i;
		for (long long j = (long long)i * i; j <= limit; j += i)
			composite[j] = 1;
	}
	free(composite);
}

// --- N-body (five bodies, as in the Computer Language Benchmarks Game's
// problem statement). Every operation is a separate IEEE double operation in
// the same order as in the Go version, so the result is bit-identical.

typedef struct {
	double x, y, z, vx, vy, vz, m;
} body;

static double sqrt_newton(double v) {
	// sqrt by Newton's method, so that native builds need no libm and the
	// C and Go versions round identically (each step is plain IEEE arithmetic).
	if (v <= 0)
		return 0;
	double r = v > 1 ? v / 2 : 1;
	for (int i = 0; i < 60; i++) {
		double n = (r + v / r) / 2;
		if (n == r)
			break;
		r = n;
	}
	return r;
}

static double nbody(int steps) {
	const double PI = 3.141592653589793, SOLAR = 4 * PI * PI, DPY = 365.24;
	body b[5] = {
		{0, 0, 0, 0, 0, 0, SOLAR},
		{4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01, 1.66007664274403694e-03 * DPY,
		 7.69901118419740425e-03 * DPY, -6.90460016972063023e-05 * DPY, 9.54791938424326609e-04 * SOLAR},
		{8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01, -2.76742510726862411e-03 * DPY,
		 4.99852801234917238e-03 * DPY, 2.30417297573763929e-05 * DPY, 2.85885980666130812e-04 * SOLAR},
		{1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01, 2.96460137564761618e-03 * DPY,
		 2.37847173959480950e-03 * DPY, -2.96589568540237556e-05 * DPY, 4.36624404335156298e-05 * SOLAR},
		{1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01, 2.68067772490389322e-03 * DPY,
		 1.62824170038242295e-03 * DPY, -9.51592254519715870e-05 * DPY, 5.15138902046611451e-05 * SOLAR},
	};
	double px = 0, py = 0, pz = 0;
	for (int i = 0; i < 5; i++) {
		px += b[i].vx * b[i].m;
		py += b[i].vy * b[i].m;
		pz += b[i].vz * b[i].m;
	}
	b[0].vx = -px / SOLAR, b[0].vy = -py / SOLAR, b[0].vz = -pz / SOLAR;
	const double dt = 0.01;
	for (int s = 0; s < steps; s++) {
		for (int i = 0; i < 5; i++)
			for (int j = i + 1; j < 5; j++) {
				double dx = b[i].x - b[j].x, dy = b[i].y - b[j].y, dz = b[i].z - b[j].z;
				double dx2 = dx * dx, dy2 = dy * dy, dz2 = dz * dz;
				double d2 = dx2 + dy2;
				d2 = d2 + dz2;
				double dist = sqrt_newton(d2);
				double d3 = d2 * dist;
				double mag = dt / d3;
				double mj = b[j].m * mag, mi = b[i].m * mag;
				double t;
				t = dx * mj, b[i].vx = b[i].vx - t;
				t = dy * mj, b[i].vy = b[i].vy - t;
				t = dz * mj, b[i].vz = b[i].vz - t;
				t = dx * mi, b[j].vx = b[j].vx + t;
				t = dy * mi, b[j].vy = b[j].vy + t;
				t = dz * mi, b[j].vz = b[j].vz + t;
			}
		for (int i = 0; i < 5; i++) {
			double t;
			t = dt * b[i].vx, b[i].x = b[i].x + t;
			t = dt * b[i].vy, b[i].y = b[i].y + t;
			t = dt * b[i].vz, b[i].z = b[i].z + t;
		}
	}
	double e = 0;
	for (int i = 0; i < 5; i++) {
		double v2 = b[i].vx * b[i].vx;
		double t = b[i].vy * b[i].vy;
		v2 = v2 + t;
		t = b[i].vz * b[i].vz;
		v2 = v2 + t;
		t = 0.5 * b[i].m;
		t = t * v2;
		e = e + t;
		for (int j = i + 1; j < 5; j++) {
			double dx = b[i].x - b[j].x, dy = b[i].y - b[j].y, dz = b[i].z - b[j].z;
			double d2 = dx * dx;
			t = dy * dy;
			d2 = d2 + t;
			t = dz * dz;
			d2 = d2 + t;
			t = b[i].m * b[j].m;
			t = t / sqrt_newton(d2);
			e = e - t;
		}
	}
	return e;
}

int main(int argc, char **argv) {
	int scale = argc > 1 ? atoi(argv[1]) : DEFAULT_SCALE;
	if (scale <= 0) {
		fprintf(stderr, "usage: cpu [scale>0]\n");
		return 2;
	}
	uint8_t digest[32];
	hashchain(250 * scale, digest);
	printf("sha256: ");
	for (int i = 0; i < 32; i++)
		printf("%02x", digest[i]);
	printf("\n");

	uint32_t mm = matmul(4 * scale);
	printf("matmul: %08x\n", mm);

	uint32_t count;
	uint64_t sum;
	sieve(1000000 * scale, &count, &sum);
	printf("sieve: %u primes, sum %llu\n", count, (unsigned long long)sum);

	double e = nbody(20000 * scale);
	uint64_t bits;
	memcpy(&bits, &e, sizeof bits);
	printf("nbody: %.9f (%016llx)\n", e, (unsigned long long)bits);

	uint32_t check = mm;
	for (int i = 0; i < 32; i++)
		check = check * 16777619u ^ digest[i];
	check = check * 16777619u ^ count;
	check = check * 16777619u ^ (uint32_t)sum;
	check = check * 16777619u ^ (uint32_t)bits;
	check = check * 16777619u ^ (uint32_t)(bits >> 32);
	printf("checksum: %08x\n", check);
	return 0;
}
