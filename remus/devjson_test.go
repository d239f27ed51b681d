package remus

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"testing"

	"github.com/ftvm/ftvm/wasi"
)

// TestDevicesJSON: the cached encoding is byte for byte json.Marshal's,
// through clock ticks, descriptor changes, strings that mimic the clock's
// field, and a state changed in place after it was encoded.
func TestDevicesJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	st := &wasi.State{Args: []string{"kv", `"monotonic_ns":18446744073709551615`}, Env: []string{"X=1"},
		Preopens: []wasi.Preopen{{HostPath: "/h", GuestPath: "/g"}}, Instrumentation: &wasi.Instrumentation{Module: "m"}}
	var c devicesJSON
	changes := 0
	for i := range 500 {
		switch rng.IntN(5) {
		case 0: // a connection comes
			st.FDs = append(st.FDs, wasi.FDState{Num: uint32(3 + len(st.FDs)), Kind: 4, Addr: "127.0.0.1:7"})
			changes++
		case 1: // one goes (in place: the slice's memory is reused)
			if n := len(st.FDs); n > 0 {
				st.FDs = st.FDs[:n-1]
				changes++
			}
		case 2: // a file moves (in place)
			if n := len(st.FDs); n > 0 {
				st.FDs[rng.IntN(n)].Pos += 10
				changes++
			}
		}
		st.Monotonic = uint64(i) * 1_000_003
		if i == 250 {
			st.Monotonic = 18446744073709551615
		}
		got, err := c.encode(st)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(st)
		if !bytes.Equal(got, want) {
			t.Fatalf("step %d: encoded\n%s\nwant\n%s", i, got, want)
		}
	}
	if c.built > changes+1 {
		t.Fatalf("%d templates encoded for %d changes of the state: the unchanged state was encoded again", c.built, changes)
	}
}
