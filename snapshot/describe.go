package snapshot

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"
)

// Summary is what `ftvm inspect` shows of a snapshot; it marshals to JSON
// as is.
type Summary struct {
	ID         string `json:"id"`
	Kind       string `json:"kind"`
	Seq        uint64 `json:"seq"`
	Parent     string `json:"parent,omitempty"`
	Module     string `json:"module"`
	ModuleName string `json:"module_name,omitempty"`
	ModuleSize int    `json:"module_bytes,omitempty"` // the embedded module copy
	MemorySize uint64 `json:"memory_size"`
	Pages      int    `json:"pages"`
	Batches    int    `json:"batches"`
	PageRaw    int64  `json:"page_raw_bytes"`    // page sections, decompressed
	PageStored int64  `json:"page_stored_bytes"` // page sections, as stored
	// MemoryOffset and MemoryData locate a memory section's page-aligned
	// data (Options.Mappable), which a restore maps instead of reading.
	MemoryOffset int64     `json:"memory_data_offset,omitempty"`
	MemoryData   int64     `json:"memory_data_bytes,omitempty"`
	Globals      int       `json:"globals"`
	StackAddr    uint64    `json:"stack_addr"`
	StackBytes   int       `json:"stack_bytes"`
	DevBytes     int       `json:"device_bytes"`
	Created      time.Time `json:"created,omitzero"`
	Host         string    `json:"host,omitempty"`
	Version      string    `json:"ftvm_version,omitempty"`
	Reason       string    `json:"reason,omitempty"`
	FileBytes    int64     `json:"file_bytes"`
	// Sections lists the file's sections, consecutive page sections
	// folded into one entry (Count says how many).
	Sections []SectionSummary `json:"sections"`
}

// SectionSummary is one section, or a run of page sections.
type SectionSummary struct {
	Type   string `json:"type"`
	Count  int    `json:"count"`
	Codecs string `json:"codecs"` // e.g. "s2" or "s2+none"
	Offset int64  `json:"offset"`
	Stored int64  `json:"stored_bytes"`
	Raw    int64  `json:"raw_bytes"`
	Pages  int    `json:"pages,omitempty"`
}

// Describe summarizes s. Section figures need s to have been encoded or
// decoded (s.Sections); the rest comes from s itself.
func Describe(s *Snapshot) Summary {
	sum := Summary{ID: s.ID.String(), Kind: s.Kind.String(), Seq: s.Seq, Module: s.Module.String(),
		MemorySize: s.MemorySize, Pages: len(s.Pages), Globals: len(s.Globals),
		StackAddr: s.StackAddr, StackBytes: len(s.Stack), DevBytes: len(s.Devices),
		ModuleName: s.ModuleName, ModuleSize: len(s.ModuleCode),
		Created: s.Meta.Created, Host: s.Meta.Host, Version: s.Meta.Version, Reason: s.Meta.Reason}
	if !s.Parent.IsZero() {
		sum.Parent = s.Parent.String()
	}
	for _, sec := range s.Sections {
		last := len(sum.Sections) - 1
		if sec.Type == SecPages {
			sum.Batches++
			sum.PageRaw += int64(sec.Raw)
			sum.PageStored += int64(sec.Stored)
		}
		sum.FileBytes = sec.Offset + frameSize + int64(sec.Stored)
		stored := int64(sec.Stored)
		if sec.Type == SecMemory {
			sum.MemoryOffset, sum.MemoryData = sec.DataOffset, sec.DataLength
			stored = sec.DataOffset + sec.DataLength - sec.Offset - frameSize
			sum.PageRaw += int64(sec.Pages) * PageSize
		}
		if sec.Type == SecPages && last >= 0 && sum.Sections[last].Type == SecPages.String() {
			ss := &sum.Sections[last]
			ss.Count++
			ss.Stored += int64(sec.Stored)
			ss.Raw += int64(sec.Raw)
			ss.Pages += sec.Pages
			if !strings.Contains("+"+ss.Codecs+"+", "+"+sec.Codec.String()+"+") {
				ss.Codecs += "+" + sec.Codec.String()
			}
			continue
		}
		sum.Sections = append(sum.Sections, SectionSummary{Type: sec.Type.String(), Count: 1,
			Codecs: sec.Codec.String(), Offset: sec.Offset, Stored: stored, Raw: int64(sec.Raw), Pages: sec.Pages})
	}
	return sum
}

// String is the text `ftvm inspect` prints.
func (m Summary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "snapshot %s\n", m.ID)
	fmt.Fprintf(&b, "kind     %s, seq %d\n", m.Kind, m.Seq)
	if m.Parent != "" {
		fmt.Fprintf(&b, "parent   %s\n", m.Parent)
	}
	fmt.Fprintf(&b, "module   %s", m.Module)
	if m.ModuleSize > 0 {
		fmt.Fprintf(&b, " (embedded: %s, %q)", size(int64(m.ModuleSize)), m.ModuleName)
	}
	b.WriteByte('\n')
	fmt.Fprintf(&b, "memory   %s (%d pages of 4 KiB)\n", size(int64(m.MemorySize)), m.MemorySize/PageSize)
	if m.MemoryData > 0 {
		fmt.Fprintf(&b, "pages    %d (%s) in a mappable memory section: %s of memory at byte %d, zero pages as holes\n",
			m.Pages, size(m.PageRaw), size(m.MemoryData), m.MemoryOffset)
	} else {
		fmt.Fprintf(&b, "pages    %d in %d batches: %s raw, %s stored", m.Pages, m.Batches, size(m.PageRaw), size(m.PageStored))
		if m.PageStored > 0 {
			fmt.Fprintf(&b, " (%.2fx)", float64(m.PageRaw)/float64(m.PageStored))
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "globals  %d\n", m.Globals)
	fmt.Fprintf(&b, "stack    %s at %#x\n", size(int64(m.StackBytes)), m.StackAddr)
	fmt.Fprintf(&b, "devices  %s\n", size(int64(m.DevBytes)))
	created := "-"
	if !m.Created.IsZero() {
		created = m.Created.UTC().Format(time.RFC3339Nano)
	}
	fmt.Fprintf(&b, "created  %s host %q ftvm %q reason %q\n", created, m.Host, m.Version, m.Reason)
	fmt.Fprintf(&b, "file     %s in %d sections\n\n", size(m.FileBytes), len(m.Sections))
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "section\tcount\toffset\tstored\traw\tpages\tcodec\t")
	for _, s := range m.Sections {
		pages := ""
		if s.Type == SecPages.String() || s.Type == SecMemory.String() {
			pages = fmt.Sprint(s.Pages)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t\n", s.Type, s.Count, s.Offset, s.Stored, s.Raw, pages, s.Codecs)
	}
	tw.Flush()
	return b.String()
}

func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// Inspect reads and verifies the snapshot in path, of any module, and
// summarizes it: `ftvm inspect FILE`.
func Inspect(path string) (Summary, error) {
	s, err := ReadFile(path, nil)
	if err != nil {
		return Summary{}, err
	}
	return Describe(s), nil
}
