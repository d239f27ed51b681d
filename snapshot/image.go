package snapshot

import (
	"cmp"
	"fmt"
	"math"
	"os"
	"slices"
)

// Image is a VM's state assembled from snapshots: what a restore builds
// and what a Remus backup keeps up to date, epoch by epoch.
type Image struct {
	Module    Hash
	ID        Hash // the last snapshot applied; zero for an empty image
	Seq       uint64
	Memory    []byte
	Globals   []Global
	StackAddr uint64
	Stack     []byte
	Devices   []byte
	Meta      Meta // of the last snapshot applied
	// ModuleCode and ModuleName are the module copy the chain carried
	// (see Snapshot.ModuleCode), if any.
	ModuleCode []byte
	ModuleName string
	// Resize, if set, provides the memory: Apply asks it for n bytes,
	// all zero when fresh (a full snapshot), else keeping the current
	// contents and zero-extended. It returns nil if it cannot. Without it
	// memory is an ordinary slice. (A Remus backup keeps memory in a
	// mapping a restored VM can take over without copying.)
	Resize func(n int, fresh bool) []byte
	// Map, if set, lets RestoreInto map the memory section of the chain's
	// first file (a snapshot written with Options.Mappable) instead of
	// reading it: it maps n bytes of f at off (page aligned) copy-on-write
	// as the image's memory, replacing what was there, and returns them.
	// The checksums are verified by reading the file (pread) before it is
	// mapped, so the file must stay as it is from then on, for as long as
	// the memory is in use: a private mapping shows later writes to the
	// file in every page the guest has not written itself, unchecked, and
	// a truncation makes the guest's next touch a SIGBUS. (It may be
	// renamed, or replaced by a new file.) If the restore fails, the image
	// must be discarded.
	Map func(f *os.File, off int64, n int) ([]byte, error)
}

// Apply brings img to the state s describes. A full snapshot replaces the
// image; an incremental one must name img's current snapshot as its parent
// and have the next sequence number. Everything is checked before img is
// touched, and nothing after that can fail: on error img is exactly as it
// was, never half-applied. img keeps no reference to s's buffers.
func Apply(img *Image, s *Snapshot) error {
	finish, err := Prepare(img, s)
	if err != nil {
		return err
	}
	finish()
	return nil
}

// Prepare is Apply in two steps: it makes every check, takes the memory
// the image will need and moves the image on (its sequence, ID, CPU and
// device state: the next snapshot of the chain may be prepared at once),
// and returns finish, which cannot fail and copies the pages in. What may
// fail has happened by the time Prepare returns, so a Remus backup can
// acknowledge a checkpoint between the two steps and copy while the
// primary releases its output. If Prepare fails, img is as it was.
//
// Until finish runs, img's memory must not be read. With Resize, the
// incremental snapshots that follow may be prepared before it runs, as
// long as the finishes run in order (growing such an image moves no
// byte); a full snapshot discards the memory, so every earlier finish
// must have run before it is prepared. Without Resize, each finish must
// run before the next Prepare, which may copy the memory to grow it.
func Prepare(img *Image, s *Snapshot) (finish func(), err error) {
	if s.ID.IsZero() {
		return nil, newError(ErrInvalid, "the snapshot has no ID: it was neither encoded nor decoded")
	}
	if msg := s.checkContent(); msg != "" {
		return nil, newError(ErrInvalid, "%s", msg)
	}
	if !img.Module.IsZero() && img.Module != s.Module {
		return nil, newError(ErrModuleMismatch, "snapshot %s is of module %s, the image of module %s",
			s.ID.Short(), s.Module.Short(), img.Module.Short())
	}
	if s.Kind == Incremental {
		switch {
		case img.ID.IsZero():
			return nil, newError(ErrChain, "incremental snapshot %s (seq %d) on an empty image: a chain starts with a full snapshot",
				s.ID.Short(), s.Seq)
		case s.Parent != img.ID:
			return nil, newError(ErrChain, "snapshot %s (seq %d) follows %s, but the image is at %s (seq %d)",
				s.ID.Short(), s.Seq, s.Parent.Short(), img.ID.Short(), img.Seq)
		case s.Seq != img.Seq+1:
			return nil, newError(ErrChain, "snapshot %s has seq %d, the image is at seq %d", s.ID.Short(), s.Seq, img.Seq)
		case s.MemorySize < uint64(len(img.Memory)):
			return nil, newError(ErrChain, "snapshot %s has %d bytes of memory, fewer than the image's %d (wasm memory never shrinks)",
				s.ID.Short(), s.MemorySize, len(img.Memory))
		}
	}

	size := int(s.MemorySize)
	fresh := len(img.Memory) // pages from here on the image never held
	if s.Kind == Full {
		fresh = 0
	}
	var mem []byte
	inPlace := s.mapped != nil && s.Kind == Full && len(s.mapped) == size
	switch {
	case inPlace:
		// A mapped memory section: the image's memory already is the
		// snapshot's (RestoreInto, the first file).
		mem = s.mapped
	case img.Resize != nil:
		// Checked before anything changes: an image that cannot hold
		// the memory is left as it was.
		if size > len(img.Memory) || s.Kind == Full {
			if mem = img.Resize(size, s.Kind == Full); mem == nil {
				return nil, newError(ErrInvalid, "no room for %d bytes of memory", size)
			}
		} else {
			mem = img.Memory
		}
	case s.Kind == Full:
		// Fresh memory, also because s's pages may alias img.Memory
		// (img.Snapshot()).
		mem = make([]byte, size)
	case cap(img.Memory) >= size:
		old := len(img.Memory)
		mem = img.Memory[:size]
		clear(mem[old:])
	default:
		mem = make([]byte, size)
		copy(mem, img.Memory)
	}
	// From here on nothing fails.
	code, name := img.ModuleCode, img.ModuleName
	if len(s.ModuleCode) > 0 {
		code, name = slices.Clone(s.ModuleCode), s.ModuleName
	} else if img.Module != s.Module {
		code, name = nil, ""
	}
	*img = Image{
		Module:     s.Module,
		ID:         s.ID,
		Seq:        s.Seq,
		Memory:     mem,
		Globals:    slices.Clone(s.Globals),
		StackAddr:  s.StackAddr,
		Stack:      slices.Clone(s.Stack),
		Devices:    slices.Clone(s.Devices),
		Meta:       s.Meta,
		ModuleCode: code,
		ModuleName: name,
		Resize:     img.Resize,
		Map:        img.Map,
	}
	if inPlace {
		return func() {}, nil
	}
	return func() {
		populateRuns(mem, s.Pages, fresh)
		for _, p := range s.Pages {
			copy(mem[int(p.Index)*PageSize:], p.Data)
		}
	}, nil
}

// Restore reads a chain of snapshot files, a full snapshot followed by
// incrementals in order, and returns the image at its end. Each file is
// verified entirely before it is applied. With module non-nil, every file
// must be of that module; with nil, of the first file's module.
func Restore(module *Hash, paths ...string) (*Image, error) {
	img := &Image{}
	if err := RestoreInto(img, module, paths...); err != nil {
		return nil, err
	}
	return img, nil
}

// RestoreInto is Restore into an empty image the caller made, e.g. one whose
// Resize puts memory in a mapping a VM can take over without a copy.
func RestoreInto(img *Image, module *Hash, paths ...string) error {
	if len(paths) == 0 {
		return newError(ErrChain, "no snapshot to restore")
	}
	for i, p := range paths {
		want := module
		if want == nil && i > 0 {
			want = &img.Module
		}
		var mapMem func(*os.File, int64, int) ([]byte, error)
		if i == 0 && img.ID.IsZero() {
			mapMem = img.Map
		}
		s, err := readFile(p, want, mapMem)
		if err != nil {
			return err
		}
		if i == 0 && s.Kind != Full {
			return &Error{Kind: ErrChain, Path: p, Offset: -1,
				Msg: fmt.Sprintf("the chain starts with an incremental snapshot (seq %d): restore needs its full snapshot first", s.Seq)}
		}
		if i > 0 && s.Kind == Full {
			return &Error{Kind: ErrChain, Path: p, Offset: -1,
				Msg: fmt.Sprintf("a full snapshot (seq %d) after the chain's first: a chain is one full snapshot, then its incrementals", s.Seq)}
		}
		if err := Apply(img, s); err != nil {
			return withPath(err, p)
		}
	}
	return nil
}

// Snapshot returns a full snapshot of the image (its non-zero pages, which
// alias img.Memory, and its state), for compacting a chain into one file.
// Encode sets its ID.
func (img *Image) Snapshot(meta Meta) *Snapshot {
	s := &Snapshot{Kind: Full, Module: img.Module, Seq: img.Seq, MemorySize: uint64(len(img.Memory)),
		Globals: img.Globals, StackAddr: img.StackAddr, Stack: img.Stack, Devices: img.Devices, Meta: meta,
		ModuleCode: img.ModuleCode, ModuleName: img.ModuleName}
	for _, i := range NonZeroPages(img.Memory) {
		s.Pages = append(s.Pages, Page{Index: i, Data: img.Memory[int(i)*PageSize : (int(i)+1)*PageSize]})
	}
	return s
}

// NonZeroPages lists the pages of mem that a full snapshot must hold.
func NonZeroPages(mem []byte) []uint32 { return NonZeroPagesBut(mem, nil) }

// NonZeroPagesBut is NonZeroPages taking the pages of the ranges in skip
// ([lo, hi), sorted by lo) as zeros, without reading them: memory that
// holds nothing yet, which reading would make the kernel allocate.
func NonZeroPagesBut(mem []byte, skip [][2]uint32) []uint32 {
	var out []uint32
	n := uint32(len(mem) / PageSize)
	for p := uint32(0); p < n; {
		if len(skip) > 0 && p >= skip[0][0] {
			p = max(p, skip[0][1])
			skip = skip[1:]
			continue
		}
		if !isZero(mem[int(p)*PageSize:][:PageSize]) {
			out = append(out, p)
		}
		p++
	}
	return out
}

// PageData is the data of page index among pages (sorted by index, as a
// Stager or a decoded snapshot has them), or nil if it is not there.
func PageData(pages []Page, index uint32) []byte {
	i, ok := slices.BinarySearchFunc(pages, index, func(p Page, x uint32) int { return cmp.Compare(p.Index, x) })
	if !ok {
		return nil
	}
	return pages[i].Data
}

// populateRuns faults in, a run of consecutive pages at a time, the pages
// past from that pages will write into mem: memory the image never held,
// which a copy would fault in page by page at almost twice the cost (a
// guest heap's growth arrives as thousands of such pages).
func populateRuns(mem []byte, pages []Page, from int) {
	for i := pagesBelow(pages, uint32(min(from/PageSize, math.MaxUint32))); i < len(pages); {
		j := i + 1
		for j < len(pages) && pages[j].Index == pages[j-1].Index+1 {
			j++
		}
		start := int(pages[i].Index) * PageSize
		populate(mem[start : start+(j-i)*PageSize])
		i = j
	}
}

// pagesBelow is how many of pages, sorted, have an index below limit.
func pagesBelow(pages []Page, limit uint32) int {
	n, _ := slices.BinarySearchFunc(pages, limit, func(p Page, l uint32) int { return cmp.Compare(p.Index, l) })
	return n
}
