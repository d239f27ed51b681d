package dirty

// Fresh memory. Protecting a page that holds no memory yet (no page-table
// entry) leaves a marker in its place (UFFD_FEATURE_WP_UNPOPULATED), so
// that a later write is seen: the first write then faults twice, once to
// allocate the page and once to lift the protection, 4 KiB at a time. A
// guest whose heap grows writes its new memory that way: a Go guest
// computing at scale 40 took 26,000 more faults protected than not (36,000
// against 10,000), 19,000 of them in one instruction of its memory
// clearing, each 16–20 µs on this project's VMs: most of what protection
// cost it. Unprotected, the same writes fault once per 2 MiB, where the
// kernel hands out a transparent huge page.
//
// So a slot of 2 MiB (one huge page, aligned in the address space) that
// holds no memory when it comes into use is left alone: "fresh", neither
// protected nor walked by the scans of the armed part (a kernel may count
// an unpopulated range as written, and a scan that protects would fill it
// with markers). Its contents are zero, as the baseline says. Every Collect
// asks the kernel, without changing anything, whether its fresh slots hold
// memory now; a slot that does was written since (or read: the zero page,
// not reported), and is armed then as memory coming into use is: its pages
// that hold data reported, all of it protected. A slot the guest filled
// in one epoch costs one fault instead of 1,024, and its checkpoint
// carries the whole huge page the kernel gave, zeros included (they
// compress to nothing).
//
// What Collect promises is unchanged: a fresh slot written before a
// Collect is absorbed by it, and one written during it is seen by this
// Collect's question or by the next one's. Written (Peeker) needs nothing
// of this: a written fresh page is present and unprotected, which its
// walk reports. CollectAhead and Warm skip fresh slots; the Collect that
// follows finds what was written there.

// slotSize is a huge page: the unit in which the kernel hands out
// transparent huge pages, and in which page tables are allocated.
const slotSize = 2 << 20

// slotPages is a slot in 4 KiB pages.
const slotPages = slotSize / PageSize

// holdsMask is the return mask of a scan that arms memory coming into use:
// what appendHolding needs to tell memory with data from the zero page.
const holdsMask = pageIsWritten | pageIsPresent | pageIsSwapped | pageIsPFNZero

// page is the index of the 4 KiB page at address a of the region.
func (t *uffdTracker) page(a uintptr) uint32 { return uint32((a - t.base) / PageSize) }

// addr is the address of page p.
func (t *uffdTracker) addr(p uint32) uintptr { return t.base + uintptr(p)*PageSize }

// slotUp is the first slot boundary at or after page p.
func (t *uffdTracker) slotUp(p uint32) uint32 {
	if p <= t.slotOff {
		return t.slotOff
	}
	return t.slotOff + (p-t.slotOff+slotPages-1)/slotPages*slotPages
}

// slotDown is the last slot boundary at or before page p, or slotOff if
// there is none (then no whole slot ends at or before p).
func (t *uffdTracker) slotDown(p uint32) uint32 {
	if p <= t.slotOff {
		return t.slotOff
	}
	return t.slotOff + (p-t.slotOff)/slotPages*slotPages
}

// appendHolding appends the pages of runs that hold memory other than the
// shared zero page, below limit.
func (t *uffdTracker) appendHolding(dst []uint32, runs []pageRegion, limit uint64) []uint32 {
	for _, x := range runs {
		if x.categories&(pageIsPresent|pageIsSwapped) != 0 && x.categories&pageIsPFNZero == 0 {
			dst = t.appendPages(dst, []pageRegion{x}, limit)
		}
	}
	return dst
}

// armedSpans appends the parts of pages [from, to) outside fresh slots.
func (t *uffdTracker) armedSpans(dst [][2]uint32, from, to uint32) [][2]uint32 {
	return minus(dst, [][2]uint32{{from, to}}, t.fresh)
}

// minus appends to dst the parts of the ranges of a outside those of b
// (each sorted, its ranges disjoint).
func minus(dst, a, b [][2]uint32) [][2]uint32 {
	j := 0
	for _, r := range a {
		lo := r[0]
		for ; j < len(b) && b[j][1] <= lo; j++ {
		}
		for k := j; k < len(b) && b[k][0] < r[1]; k++ {
			if b[k][0] > lo {
				dst = append(dst, [2]uint32{lo, b[k][0]})
			}
			lo = max(lo, b[k][1])
		}
		if lo < r[1] {
			dst = append(dst, [2]uint32{lo, r[1]})
		}
	}
	return dst
}

// scanArmed is scanFlags over pages [from, to), fresh slots left out.
func (t *uffdTracker) scanArmed(from, to uint32, flags, returnMask uint64, emit func([]pageRegion)) error {
	if len(t.fresh) == 0 {
		return t.scanFlags(t.addr(from), t.addr(to), flags, returnMask, emit)
	}
	t.armedBuf = t.armedSpans(t.armedBuf[:0], from, to)
	for _, s := range t.armedBuf {
		if err := t.scanFlags(t.addr(s[0]), t.addr(s[1]), flags, returnMask, emit); err != nil {
			return err
		}
	}
	return nil
}

// occupied appends the runs of pages of [from, to) that hold memory,
// present or swapped out, from a walk that changes nothing.
func (t *uffdTracker) occupied(dst [][2]uint32, from, to uint32) ([][2]uint32, error) {
	err := t.scanCat(t.addr(from), t.addr(to), 0, 0, pageIsPresent|pageIsSwapped, pageIsPresent|pageIsSwapped, func(r []pageRegion) {
		for _, x := range r {
			dst = append(dst, [2]uint32{t.page(uintptr(x.start)), t.page(uintptr(x.end))})
		}
	})
	return dst, err
}

// arm protects pages [from, to), coming into use, at or past every fresh
// slot, reporting to emit what the walk finds (returnMask); the whole
// slots among them that hold no memory are left out and become fresh.
func (t *uffdTracker) arm(from, to uint32, returnMask uint64, emit func([]pageRegion)) error {
	if lo, hi := t.slotUp(max(from, t.anonFrom)), t.slotDown(to); t.hasFresh && lo < hi {
		var err error
		if t.runBuf, err = t.occupied(t.runBuf[:0], lo, hi); err != nil {
			return err
		}
		add := func(a, b uint32) {
			if n := len(t.fresh); n > 0 && t.fresh[n-1][1] == a {
				t.fresh[n-1][1] = b
			} else {
				t.fresh = append(t.fresh, [2]uint32{a, b})
			}
		}
		at := lo
		for _, r := range t.runBuf {
			if s := t.slotDown(r[0]); s > at {
				add(at, s)
			}
			at = max(at, t.slotUp(r[1]))
		}
		if at < hi {
			add(at, hi)
		}
	}
	return t.scanArmed(from, to, pmScanWPMatching|pmScanCheckWPAsync, returnMask, emit)
}

// absorb arms the fresh slots below limit pages that hold memory now,
// appending their pages that hold data (unsorted with what dst holds).
// Slots that straddle limit wait: pages written past usedBytes are
// reported once it covers them.
func (t *uffdTracker) absorb(dst []uint32, limit uint32) ([]uint32, error) {
	if len(t.fresh) == 0 || limit < t.slotOff {
		return dst, nil
	}
	if err := t.freshRuns(t.slotDown(limit)); err != nil {
		return dst, err
	}
	if len(t.runBuf) == 0 {
		return dst, nil
	}
	// The slots the runs touch, merged where they meet: armed each in
	// one walk.
	touched := t.armedBuf[:0]
	for _, r := range t.runBuf {
		a, b := t.slotDown(r[0]), t.slotUp(r[1])
		if n := len(touched); n > 0 && touched[n-1][1] >= a {
			touched[n-1][1] = max(touched[n-1][1], b)
		} else {
			touched = append(touched, [2]uint32{a, b})
		}
	}
	t.armedBuf = touched
	for _, s := range touched {
		if err := t.scanFlags(t.addr(s[0]), t.addr(s[1]), pmScanWPMatching|pmScanCheckWPAsync, holdsMask, func(r []pageRegion) {
			dst = t.appendHolding(dst, r, uint64(limit))
		}); err != nil {
			// Left fresh: what this walk protected and did not report
			// holds no data, and the next Collect asks again.
			return dst, err
		}
	}
	// The fresh ranges less the slots armed.
	t.fresh, t.freshNext = minus(t.freshNext[:0], t.fresh, touched), t.fresh[:0]
	return dst, nil
}

// freshRuns sets runBuf to the runs of pages that hold memory in the
// fresh ranges, up to page limit.
func (t *uffdTracker) freshRuns(limit uint32) error {
	t.runBuf = t.runBuf[:0]
	for _, f := range t.fresh {
		if f[0] >= limit {
			break
		}
		var err error
		if t.runBuf, err = t.occupied(t.runBuf, f[0], min(f[1], limit)); err != nil {
			return err
		}
	}
	return nil
}

// Holes implements Holer: the fresh slots below usedBytes, less any part
// that holds memory now.
func (t *uffdTracker) Holes(dst [][2]uint32, usedBytes uint64) ([][2]uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return dst, ErrClosed
	}
	pages, err := checkUsed(usedBytes, len(t.region))
	if err != nil {
		return dst, err
	}
	limit := uint32(pages)
	if err := t.freshRuns(limit); err != nil {
		return dst, err
	}
	n := len(dst)
	dst = minus(dst, t.fresh, t.runBuf)
	k := n
	for _, h := range dst[n:] {
		if h[0] >= limit {
			break
		}
		dst[k] = [2]uint32{h[0], min(h[1], limit)}
		k++
	}
	return dst[:k], nil
}
