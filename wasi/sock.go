package wasi

// Sockets: accept on preopened listeners, send/recv on connections. (Stubs.)

// connState is per-connection state kept beside the descriptor.
type connState struct{}

func connRead(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno)  { return 0, ENOSYS }
func connWrite(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno) { return 0, ENOSYS }

func sockAccept(d *Devices, m Mem, p []uint64) Errno   { return ENOSYS }
func sockRecv(d *Devices, m Mem, p []uint64) Errno     { return ENOSYS }
func sockSend(d *Devices, m Mem, p []uint64) Errno     { return ENOSYS }
func sockShutdown(d *Devices, m Mem, p []uint64) Errno { return ENOSYS }
