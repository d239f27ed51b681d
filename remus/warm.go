package remus

import (
	"encoding/json"
	"sync"

	"github.com/ftvm/ftvm/wasi"
)

// warmDeviceJSON has encoding/json build its encoders and decoders for the
// device state's types, once per process, off the paths that wait for
// them. It builds them on first use, by reflection over the types it
// meets, and on this project's VM that took 0.5–3 ms of a protected
// guest's first checkpoint on the primary (whose output, and the exit of
// a short run, wait for it), and of its check on the backup before the
// ack (deviceCheck), and as much of a failover. Every list holds an
// element, so that decoding meets the element types too.
var warmDeviceJSON = sync.OnceFunc(func() {
	st := wasi.State{Args: []string{""}, Env: []string{""}, Preopens: []wasi.Preopen{{}}, FDs: []wasi.FDState{{}},
		Instrumentation: &wasi.Instrumentation{}}
	b, err := json.Marshal(&st)
	if err == nil {
		_ = json.Unmarshal(b, new(wasi.State))
	}
})
