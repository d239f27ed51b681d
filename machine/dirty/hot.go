package dirty

import (
	"bytes"
	"cmp"
	"slices"
)

// Hot pages (Options.HotPages). Under write protection every first write
// to a page after a Collect is a fault, and on a VM with shadow paging a
// fault costs 10–18 µs (measured on this project's machines: 15–18 µs per
// page against 1 µs for a plain first store). A guest that writes the same
// pages every epoch — its stack, a connection's buffers, the allocator's
// own metadata — pays that for every one of them every epoch: a KV server
// replicated at 400 checkpoints a second spent a fifth of its CPU in such
// faults. So a page reported by promoteAfter Collects in a row is left
// writable ("hot") and watched by content instead: each Collect compares
// it with a copy of it taken at the last one, and reports it if it
// differs. A hot page unchanged for coolAfter Collects is protected again.
// (A copy rather than a hash, as the hash fallback keeps: comparing 4 KiB
// with its copy takes 0.35 µs here, hashing it 0.55 µs, and the answer is
// exact; the copies of at most maxHot pages take 2 MiB.)
// Pages written at random are not promoted: while pages are reported again
// no more often than chance would have it, none is.
//
// The weaker promise: a hot page is reported when its contents differ
// from what they were at the previous Collect, so the caller must copy the
// pages it is given before anything writes the region again — a paused
// guest, which is how the machine collects. (A write racing with Collect,
// changed back before the next one, would be missed.)
const (
	promoteAfter = 3
	// randomAfter is promoteAfter where writes looked random lately,
	// and randomMemory how many Collects "lately" is.
	randomAfter  = 2 * promoteAfter
	randomMemory = 3
	coolAfter    = 16
	// maxHot bounds the comparing a Collect does (about 0.35 µs a page).
	maxHot = 512
	// maxProtectCalls bounds the ioctls a Collect spends walking the
	// spans between hot pages, or protecting the pages it reported one
	// run at a time; past it, it protects them in one page-table walk
	// and lets any hot pages in that span fault once.
	maxProtectCalls = 16
)

// hotPage is a page left writable, with a copy of its contents at the
// last Collect and for how many Collects it has not changed.
type hotPage struct {
	idx  uint32
	idle uint8
	last []byte // PageSize bytes
}

// streakPage is a page reported by the last Collect as written while
// protected, and by how many Collects in a row.
type streakPage struct {
	idx uint32
	n   uint8
}

// hotState is the uffd tracker's bookkeeping for hot pages. Its slices are
// reused from one Collect to the next.
type hotState struct {
	hot     []hotPage // sorted by idx
	next    []hotPage
	streak  []streakPage // sorted by idx
	nstreak []streakPage
	written []uint32
	protect []uint32
	merged  []uint32 // written and ahead, for classify
	// stopPromoting is set while pages are reported again in the next
	// Collect no more often than chance would have it: writes scattered
	// at random over much of the memory, where a page written three
	// times in a row is luck, not a pattern, and promoting it would only
	// add hashing to every Collect (and walks around it). A guest with a
	// working set repeats far more often than chance.
	stopPromoting bool
	// randomLately counts down the Collects since one looked random
	// (stopPromoting's test, with at least a page expected again by
	// chance); while it is not 0 a page must be reported randomAfter
	// times in a row to be promoted, not promoteAfter. A guest writing
	// runs of pages from random starts (testdata/guests/dirtier)
	// repeats no page in most Collects and hundreds in a few, when two
	// runs happen to overlap: a single Collect's test passed after two
	// such overlaps in a row, and whole runs were promoted at once
	// (2 -> 39 ... 182 hot pages, each compared in every pause until it
	// cooled).
	randomLately uint8
	// keepLo, keepHi are the pages [keepLo, keepHi) the caller writes
	// itself before every Collect (Keeper): promoted the first time they
	// are reported, and never cooled while kept.
	keepLo, keepHi uint32
	// spare are page-sized buffers, faulted in, for the copies of pages
	// promoted: a promotion happens in a pause, and a fresh heap page
	// there faults (10-45 µs each on a VM with shadow paging: a burst of
	// 100 promotions took a pause of a random writer to 1-2 ms). Warm
	// tops them up while the guest runs (refill); cooled pages give
	// theirs back.
	spare [][]byte
}

// spareHot is how many spare copies refill keeps ready.
const spareHot = 128

// refill tops the spare copies up to spareHot, in one allocation, each
// page of it written so that it is faulted in now rather than in a pause.
func (h *hotState) refill() {
	n := spareHot - len(h.spare)
	if n <= 0 {
		return
	}
	slab := make([]byte, n*PageSize)
	for i := 0; i < n; i++ {
		b := slab[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]
		b[0] = 1 // fault it in (make's zeroing may not have touched it)
		h.spare = append(h.spare, b)
	}
}

// copyOf returns a copy of page, in a spare buffer if there is one.
func (h *hotState) copyOf(page []byte) []byte {
	n := len(h.spare)
	if n == 0 {
		return bytes.Clone(page)
	}
	b := h.spare[n-1]
	h.spare[n-1] = nil
	h.spare = h.spare[:n-1]
	copy(b, page)
	return b
}

// giveBack keeps a dropped hot page's copy for the next promotion.
func (h *hotState) giveBack(b []byte) {
	if len(h.spare) < maxHot {
		h.spare = append(h.spare, b)
	}
}

// kept reports whether page p is in the range the caller keeps hot.
func (h *hotState) kept(p uint32) bool { return p >= h.keepLo && p < h.keepHi }

func (h *hotState) reset() {
	for _, p := range h.hot {
		h.giveBack(p.last)
	}
	clear(h.hot)
	h.hot, h.streak = h.hot[:0], h.streak[:0]
}

// classify merges the pages the kernel reports as written (sorted, below
// limit) with the hot set. It appends to dst, in order, the pages to
// report, collects in h.protect the pages to write-protect now, and builds
// the next hot set and streaks. Hot pages whose idle count reached
// coolAfter must already have been protected again (cooled) before the
// kernel was asked. page returns a page's contents. ahead are the pages a
// CollectAhead reported since the last Collect (sorted): written this
// round too, so they count for streaks, but the caller has them already
// and they are protected, so they are neither reported nor protected
// again unless the kernel reports them as well.
func (h *hotState) classify(dst []uint32, limit uint64, page func(uint32) []byte, ahead []uint32) []uint32 {
	h.next, h.nstreak, h.protect = h.next[:0], h.nstreak[:0], h.protect[:0]
	hot, written, streak := h.hot, h.written, h.streak
	if len(ahead) > 0 {
		h.merged = mergeAhead(h.merged[:0], written, ahead, limit)
		written = h.merged
	}
	// Room for promotions: the hot pages that stay hot (unless they
	// change, which only keeps them) come first.
	staying := 0
	for _, p := range hot {
		if p.idle < coolAfter {
			staying++
		}
	}
	room := maxHot - staying
	if h.stopPromoting {
		room = 0
	}
	need := uint8(promoteAfter)
	if h.randomLately > 0 {
		need = randomAfter
	}
	i, j, k := 0, 0, 0
	cold, again := 0, 0 // pages reported outside the hot set; of them, reported last time too
	for i < len(hot) || j < len(written) {
		var p uint32
		var onlyAhead bool
		if j < len(written) {
			p, onlyAhead = written[j]&^aheadOnly, written[j]&aheadOnly != 0
		}
		switch {
		case j == len(written) || (i < len(hot) && hot[i].idx < p):
			dst = h.checkHot(dst, hot[i], false, limit, page)
			i++
		case i == len(hot) || p < hot[i].idx:
			j++
			if !onlyAhead {
				dst = append(dst, p)
			}
			for k < len(streak) && streak[k].idx < p {
				k++
			}
			n := uint8(1)
			if k < len(streak) && streak[k].idx == p {
				n = streak[k].n + 1
				again++
			}
			cold++
			if n >= need && room > 0 || h.kept(p) {
				room--
				h.next = append(h.next, hotPage{idx: p, last: h.copyOf(page(p))})
				if onlyAhead {
					// Reported after all: from now on the page is
					// compared with this copy, so the caller's must
					// be as new (a write since CollectAhead's copy
					// that its protection did not see, racing with
					// this Collect, would otherwise never be
					// reported).
					dst = append(dst, p)
				}
				continue
			}
			if !onlyAhead {
				h.protect = append(h.protect, p)
			}
			h.nstreak = append(h.nstreak, streakPage{idx: p, n: min(n, randomAfter)})
		default:
			dst = h.checkHot(dst, hot[i], !onlyAhead, limit, page)
			i++
			j++
		}
	}
	// Chance: of cold pages now, the share of the pages in use that
	// were reported last time. A pattern: four times that, or more.
	chance := float64(cold) * float64(len(streak)) / float64(max(limit, 1))
	likeChance := float64(again) < 4*chance
	h.stopPromoting = again > 0 && likeChance
	switch {
	case chance >= 1 && likeChance:
		h.randomLately = randomMemory
	case h.randomLately > 0:
		h.randomLately--
	}
	h.hot, h.next = h.next, h.hot
	h.streak, h.nstreak = h.nstreak, h.streak
	return dst
}

// aheadOnly marks, in classify's merged list, a page only CollectAhead
// reported (page indices stay below 1<<20).
const aheadOnly = 1 << 31

// mergeAhead appends to dst the union of written and ahead (both sorted,
// ahead's pages below limit only), marking with aheadOnly the pages in
// ahead alone.
func mergeAhead(dst, written, ahead []uint32, limit uint64) []uint32 {
	i, j := 0, 0
	for i < len(written) || j < len(ahead) {
		switch {
		case j == len(ahead) || (i < len(written) && written[i] < ahead[j]):
			dst = append(dst, written[i])
			i++
		case i == len(written) || ahead[j] < written[i]:
			if uint64(ahead[j]) < limit {
				dst = append(dst, ahead[j]|aheadOnly)
			}
			j++
		default:
			dst = append(dst, written[i])
			i++
			j++
		}
	}
	return dst
}

// checkHot decides a hot page's fate: reported if its contents changed;
// dropped from the hot set if it had cooled (it is protected again, so a
// write since shows as written, and then it is protected once more).
func (h *hotState) checkHot(dst []uint32, p hotPage, written bool, limit uint64, page func(uint32) []byte) []uint32 {
	if uint64(p.idx) >= limit {
		h.next = append(h.next, p) // not in use now: keep watching it
		return dst
	}
	now := page(p.idx)
	changed := !bytes.Equal(now, p.last)
	if p.idle >= coolAfter {
		if changed || written {
			dst = append(dst, p.idx)
		}
		if written {
			h.protect = append(h.protect, p.idx)
		}
		h.giveBack(p.last)
		return dst
	}
	if changed {
		dst = append(dst, p.idx)
		copy(p.last, now)
		p.idle = 0
	} else if !h.kept(p.idx) {
		p.idle++
	}
	h.next = append(h.next, p)
	return dst
}

// cooled appends the hot pages due to be protected again.
func (h *hotState) cooled(dst []uint32) []uint32 {
	for _, p := range h.hot {
		if p.idle >= coolAfter {
			dst = append(dst, p.idx)
		}
	}
	return dst
}

// spansWithout appends to dst the [lo, hi) page spans of [from, to) that
// hold no hot page, and reports whether there are at most max of them.
// Cooled pages count only if cooledToo: a Collect has protected them
// again before it walks, a CollectAhead has not (they are still
// writable, so would read as written, though unchanged since the Collect
// compared them: they are the next Collect's to protect).
func (h *hotState) spansWithout(dst [][2]uint32, from, to uint32, max int, cooledToo bool) ([][2]uint32, bool) {
	i, _ := h.find(from)
	lo := from
	for ; i < len(h.hot) && h.hot[i].idx < to; i++ {
		if h.hot[i].idle >= coolAfter && !cooledToo {
			continue
		}
		if x := h.hot[i].idx; x > lo {
			if len(dst) == max {
				return dst, false
			}
			dst = append(dst, [2]uint32{lo, x})
		}
		lo = h.hot[i].idx + 1
	}
	if lo < to {
		if len(dst) == max {
			return dst, false
		}
		dst = append(dst, [2]uint32{lo, to})
	}
	return dst, true
}

// isHot reports whether page p is in the hot set.
func (h *hotState) isHot(p uint32) bool {
	_, ok := h.find(p)
	return ok
}

// find is where page p is, or would be, in the hot set.
func (h *hotState) find(p uint32) (int, bool) {
	return slices.BinarySearchFunc(h.hot, p, func(x hotPage, p uint32) int { return cmp.Compare(x.idx, p) })
}

// runs counts the runs of consecutive indices in a sorted list.
func runs(pages []uint32) int {
	n := 0
	for i, p := range pages {
		if i == 0 || p != pages[i-1]+1 {
			n++
		}
	}
	return n
}
