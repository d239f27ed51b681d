package wasi

import "runtime"

// proc_raise: signals are not part of the guest's world; WASI hosts reject them.
func procRaise(d *Devices, m Mem, p []uint64) Errno { return ENOSYS }

func schedYield(d *Devices, m Mem, p []uint64) Errno {
	runtime.Gosched()
	return ESUCCESS
}
