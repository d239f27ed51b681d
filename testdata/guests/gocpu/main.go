// Command gocpu is the Go twin of testdata/guests/c/cpu.c: the same
// deterministic CPU-bound workloads (SHA-256 hash chaining, integer matrix
// multiplication, a prime sieve, n-body), scaled by os.Args[1], printing the
// same lines. It builds for wasip1 and natively with plain `go build`, so
// wasm and native runs of both languages check each other.
//
// SHA-256 is written out rather than taken from crypto/sha256, whose assembly
// would give native code an advantage wasm cannot have. Floating-point steps
// are separate statements (Go does not fuse across them), so every build
// rounds identically.
package main

import (
	"fmt"
	"math"
	"os"
	"strconv"
)

const defaultScale = 20

var k = [64]uint32{
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

func ror(x uint32, n uint) uint32 { return x>>n | x<<(32-n) }

func block(h *[8]uint32, p []byte) {
	var w [64]uint32
	for i := 0; i < 16; i++ {
		w[i] = uint32(p[4*i])<<24 | uint32(p[4*i+1])<<16 | uint32(p[4*i+2])<<8 | uint32(p[4*i+3])
	}
	for i := 16; i < 64; i++ {
		s0 := ror(w[i-15], 7) ^ ror(w[i-15], 18) ^ w[i-15]>>3
		s1 := ror(w[i-2], 17) ^ ror(w[i-2], 19) ^ w[i-2]>>10
		w[i] = w[i-16] + s0 + w[i-7] + s1
	}
	a, b, c, d, e, f, g, hh := h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
	for i := 0; i < 64; i++ {
		t1 := hh + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + (e&f ^ ^e&g) + k[i] + w[i]
		t2 := (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + (a&b ^ a&c ^ b&c)
		hh, g, f, e, d, c, b, a = g, f, e, d+t1, c, b, a, t1+t2
	}
	h[0] += a
	h[1] += b
	h[2] += c
	h[3] += d
	h[4] += e
	h[5] += f
	h[6] += g
	h[7] += hh
}

func sha256(msg []byte) (out [32]byte) {
	h := [8]uint32{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
	i := 0
	for ; i+64 <= len(msg); i += 64 {
		block(&h, msg[i:])
	}
	var tail [128]byte
	rest := copy(tail[:], msg[i:])
	tail[rest] = 0x80
	tlen := 128
	if rest+9 <= 64 {
		tlen = 64
	}
	bits := uint64(len(msg)) * 8
	for j := 0; j < 8; j++ {
		tail[tlen-1-j] = byte(bits >> (8 * j))
	}
	block(&h, tail[:])
	if tlen == 128 {
		block(&h, tail[64:])
	}
	for j := 0; j < 8; j++ {
		out[4*j], out[4*j+1], out[4*j+2], out[4*j+3] = byte(h[j]>>24), byte(h[j]>>16), byte(h[j]>>8), byte(h[j])
	}
	return out
}

func hashchain(rounds int) [32]byte {
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = byte(i*7 + 3)
	}
	var digest [32]byte
	for r := 0; r < rounds; r++ {
		copy(buf, digest[:])
		digest = sha256(buf)
	}
	return digest
}

const mn = 96

func matmul(reps int) uint32 {
	var a, b, c [mn][mn]uint32
	x := uint32(1)
	for i := 0; i < mn; i++ {
		for j := 0; j < mn; j++ {
			x = x*1664525 + 1013904223
			a[i][j] = x >> 8
			x = x*1664525 + 1013904223
			b[i][j] = x >> 8
		}
	}
	for r := 0; r < reps; r++ {
		for i := 0; i < mn; i++ {
			for j := 0; j < mn; j++ {
				var s uint32
				for kk := 0; kk < mn; kk++ {
					s += a[i][kk] * b[kk][j]
				}
				c[i][j] = s
			}
		}
		for i := 0; i < mn; i++ {
			for j := 0; j < mn; j++ {
				a[i][j] = c[i][j] ^ uint32(r)
			}
		}
	}
	var sum uint32
	for i := 0; i < mn; i++ {
		for j := 0; j < mn; j++ {
			sum = sum*31 + c[i][j]
		}
	}
	return sum
}

func sieve(limit int) (count uint32, sum uint64) {
	composite := make([]bool, limit+1)
	for i := 2; i <= limit; i++ {
		if composite[i] {
			continue
		}
		count++
		sum += uint64(i)
		for j := i * i; j <= limit; j += i {
			composite[j] = true
		}
	}
	return count, sum
}

type body struct{ x, y, z, vx, vy, vz, m float64 }

// sqrtNewton is cpu.c's sqrt_newton, step for step.
func sqrtNewton(v float64) float64 {
	if v <= 0 {
		return 0
	}
	r := 1.0
	if v > 1 {
		r = v / 2
	}
	for i := 0; i < 60; i++ {
		n := (r + v/r) / 2
		if n == r {
			break
		}
		r = n
	}
	return r
}

func nbody(steps int) float64 {
	// Computed at run time in float64 steps, as C does, not folded as exact
	// constants by the Go compiler (which would round differently).
	pi, d := 3.141592653589793, 365.24
	sol := 4 * pi
	sol = sol * pi
	b := [5]body{
		{0, 0, 0, 0, 0, 0, sol},
		{4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01, 1.66007664274403694e-03 * d,
			7.69901118419740425e-03 * d, -6.90460016972063023e-05 * d, 9.54791938424326609e-04 * sol},
		{8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01, -2.76742510726862411e-03 * d,
			4.99852801234917238e-03 * d, 2.30417297573763929e-05 * d, 2.85885980666130812e-04 * sol},
		{1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01, 2.96460137564761618e-03 * d,
			2.37847173959480950e-03 * d, -2.96589568540237556e-05 * d, 4.36624404335156298e-05 * sol},
		{1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01, 2.68067772490389322e-03 * d,
			1.62824170038242295e-03 * d, -9.51592254519715870e-05 * d, 5.15138902046611451e-05 * sol},
	}
	var px, py, pz float64
	for i := range b {
		px += float64(b[i].vx * b[i].m)
		py += float64(b[i].vy * b[i].m)
		pz += float64(b[i].vz * b[i].m)
	}
	b[0].vx, b[0].vy, b[0].vz = -px/sol, -py/sol, -pz/sol
	dt := 0.01
	for s := 0; s < steps; s++ {
		for i := 0; i < 5; i++ {
			for j := i + 1; j < 5; j++ {
				dx, dy, dz := b[i].x-b[j].x, b[i].y-b[j].y, b[i].z-b[j].z
				dx2, dy2, dz2 := float64(dx*dx), float64(dy*dy), float64(dz*dz)
				d2 := dx2 + dy2
				d2 = d2 + dz2
				dist := sqrtNewton(d2)
				d3 := float64(d2 * dist)
				mag := dt / d3
				mj, mi := float64(b[j].m*mag), float64(b[i].m*mag)
				var t float64
				t = float64(dx * mj)
				b[i].vx = b[i].vx - t
				t = float64(dy * mj)
				b[i].vy = b[i].vy - t
				t = float64(dz * mj)
				b[i].vz = b[i].vz - t
				t = float64(dx * mi)
				b[j].vx = b[j].vx + t
				t = float64(dy * mi)
				b[j].vy = b[j].vy + t
				t = float64(dz * mi)
				b[j].vz = b[j].vz + t
			}
		}
		for i := 0; i < 5; i++ {
			var t float64
			t = float64(dt * b[i].vx)
			b[i].x = b[i].x + t
			t = float64(dt * b[i].vy)
			b[i].y = b[i].y + t
			t = float64(dt * b[i].vz)
			b[i].z = b[i].z + t
		}
	}
	e := 0.0
	for i := 0; i < 5; i++ {
		v2 := float64(b[i].vx * b[i].vx)
		t := float64(b[i].vy * b[i].vy)
		v2 = v2 + t
		t = float64(b[i].vz * b[i].vz)
		v2 = v2 + t
		t = float64(0.5 * b[i].m)
		t = float64(t * v2)
		e = e + t
		for j := i + 1; j < 5; j++ {
			dx, dy, dz := b[i].x-b[j].x, b[i].y-b[j].y, b[i].z-b[j].z
			d2 := float64(dx * dx)
			t = float64(dy * dy)
			d2 = d2 + t
			t = float64(dz * dz)
			d2 = d2 + t
			t = float64(b[i].m * b[j].m)
			t = t / sqrtNewton(d2)
			e = e - t
		}
	}
	return e
}

func main() {
	scale := defaultScale
	if len(os.Args) > 1 {
		n, err := strconv.Atoi(os.Args[1])
		if err != nil || n <= 0 {
			fmt.Fprintln(os.Stderr, "usage: gocpu [scale>0]")
			os.Exit(2)
		}
		scale = n
	}
	digest := hashchain(250 * scale)
	fmt.Printf("sha256: %x\n", digest)
	mm := matmul(4 * scale)
	fmt.Printf("matmul: %08x\n", mm)
	count, sum := sieve(1000000 * scale)
	fmt.Printf("sieve: %d primes, sum %d\n", count, sum)
	e := nbody(20000 * scale)
	bits := math.Float64bits(e)
	fmt.Printf("nbody: %.9f (%016x)\n", e, bits)

	check := mm
	for _, c := range digest {
		check = check*16777619 ^ uint32(c)
	}
	check = check*16777619 ^ count
	check = check*16777619 ^ uint32(sum)
	check = check*16777619 ^ uint32(bits)
	check = check*16777619 ^ uint32(bits>>32)
	fmt.Printf("checksum: %08x\n", check)
}
