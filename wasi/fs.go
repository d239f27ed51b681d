package wasi

// Filesystem calls on preopened directories. (Stubs: to be implemented.)

func fileRead(d *Devices, f *FD, iovs [][]byte) (uint32, Errno)             { return 0, ENOSYS }
func fileWrite(d *Devices, fd uint32, f *FD, iovs [][]byte) (uint32, Errno) { return 0, ENOSYS }

func fdAdvise(d *Devices, m Mem, p []uint64) Errno             { return ENOSYS }
func fdAllocate(d *Devices, m Mem, p []uint64) Errno           { return ENOSYS }
func fdDatasync(d *Devices, m Mem, p []uint64) Errno           { return ENOSYS }
func fdFilestatGet(d *Devices, m Mem, p []uint64) Errno        { return ENOSYS }
func fdFilestatSetSize(d *Devices, m Mem, p []uint64) Errno    { return ENOSYS }
func fdFilestatSetTimes(d *Devices, m Mem, p []uint64) Errno   { return ENOSYS }
func fdPread(d *Devices, m Mem, p []uint64) Errno              { return ENOSYS }
func fdPwrite(d *Devices, m Mem, p []uint64) Errno             { return ENOSYS }
func fdReaddir(d *Devices, m Mem, p []uint64) Errno            { return ENOSYS }
func fdSeek(d *Devices, m Mem, p []uint64) Errno               { return ENOSYS }
func fdSync(d *Devices, m Mem, p []uint64) Errno               { return ENOSYS }
func fdTell(d *Devices, m Mem, p []uint64) Errno               { return ENOSYS }
func pathCreateDirectory(d *Devices, m Mem, p []uint64) Errno  { return ENOSYS }
func pathFilestatGet(d *Devices, m Mem, p []uint64) Errno      { return ENOSYS }
func pathFilestatSetTimes(d *Devices, m Mem, p []uint64) Errno { return ENOSYS }
func pathLink(d *Devices, m Mem, p []uint64) Errno             { return ENOSYS }
func pathOpen(d *Devices, m Mem, p []uint64) Errno             { return ENOSYS }
func pathReadlink(d *Devices, m Mem, p []uint64) Errno         { return ENOSYS }
func pathRemoveDirectory(d *Devices, m Mem, p []uint64) Errno  { return ENOSYS }
func pathRename(d *Devices, m Mem, p []uint64) Errno           { return ENOSYS }
func pathSymlink(d *Devices, m Mem, p []uint64) Errno          { return ENOSYS }
func pathUnlinkFile(d *Devices, m Mem, p []uint64) Errno       { return ENOSYS }
