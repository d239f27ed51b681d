package remus

import (
	"encoding/json"
	"sync"

	"github.com/ftvm/ftvm/wasi"
)

// warmDeviceJSON has encoding/json build its encoders and decoders for the
// device state's types, once per process, off the paths that wait for
// them. It builds them on first use, by reflection over every nested
// type, and on this project's VM that took 0.5–3 ms of a protected
// guest's first checkpoint (whose output, and the exit of a short run,
// wait for it), and as much of a failover.
var warmDeviceJSON = sync.OnceFunc(func() {
	var st wasi.State
	b, err := json.Marshal(&st)
	if err == nil {
		_ = json.Unmarshal(b, &st)
	}
})
