package instrument

import (
	"fmt"
	"strconv"
)

// GlobalExportPrefix starts the export names ExportGlobals gives globals
// that had none; the global's index follows.
const GlobalExportPrefix = "ftvm.global."

// Global is one global of a module and the name it is exported under, so
// that a host can read and write every global to capture or restore state.
type Global struct {
	// Index counts imported globals first, as the binary format does.
	Index    uint32
	Type     ValType
	Mutable  bool
	Imported bool
	Export   string
}

// GlobalExportName is the name ExportGlobals gives global i.
func GlobalExportName(i uint32) string {
	return GlobalExportPrefix + strconv.FormatUint(uint64(i), 10)
}

// ExportGlobals returns the module with an export added for every global not
// already exported (named GlobalExportName(index)) and the list of all its
// globals with their export names. Every section but the export section is
// copied byte for byte; when no export is added the module itself is
// returned. Malformed input gives a *FormatError, never a panic.
func ExportGlobals(mod []byte) ([]byte, []Global, error) {
	m, err := parse(mod)
	if err != nil {
		return nil, nil, err
	}
	return m.exportGlobals(mod)
}

func (m *module) exportGlobals(mod []byte) ([]byte, []Global, error) {
	globals := append([]Global(nil), m.globals...)
	taken := m.exportNames()
	var added []byte
	nAdded := 0
	for i := range globals {
		g := &globals[i]
		if g.Export != "" {
			continue
		}
		name := GlobalExportName(g.Index)
		if taken[name] {
			return nil, nil, &FormatError{Offset: m.sectionOffset(secExport), Msg: fmt.Sprintf(
				"export name %q, wanted for global %d, is already used by another export", name, g.Index)}
		}
		g.Export = name
		added = appendName(added, name)
		added = append(added, kindGlobal)
		added = appendU32(added, g.Index)
		nAdded++
	}
	if nAdded == 0 {
		return mod, globals, nil
	}
	if uint64(len(m.exports))+uint64(nAdded) > 1<<32-1 {
		return nil, nil, &FormatError{Offset: m.sectionOffset(secExport), Msg: "too many exports"}
	}

	// The new export section: the old entries verbatim, then the new ones.
	var body []byte
	body = appendU32(body, uint32(len(m.exports)+nAdded))
	out := make([]byte, 0, len(mod)+len(added)+16)
	out = append(out, mod[:8]...)
	after := m.exportInsertAfter()
	if after < 0 && m.sectionOffset(secExport) == 0 {
		out = appendSection(out, secExport, append(body, added...))
	}
	for i, s := range m.sections {
		if s.id == secExport {
			d := &decoder{b: s.body}
			d.u32() // the old count; parse checked it
			body = append(body, s.body[d.off:]...)
			out = appendSection(out, secExport, append(body, added...))
			continue
		}
		out = append(out, s.raw...)
		if i == after {
			out = appendSection(out, secExport, append(body, added...))
		}
	}
	return out, globals, nil
}

// exportInsertAfter is the index of the section a new export section goes
// right after when the module has none: the last non-custom section that
// must precede exports, so that custom sections following it (such as
// "name", which belongs at the end) stay behind. It is -1 when the module
// has an export section or no section that precedes one.
func (m *module) exportInsertAfter() int {
	after := -1
	for i, s := range m.sections {
		switch {
		case s.id == secExport:
			return -1
		case s.id != secCustom && sectionRank[s.id] < sectionRank[secExport]:
			after = i
		}
	}
	return after
}
