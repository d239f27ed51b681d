package machine

import (
	"fmt"
	"strings"
)

// ModuleError says why a module cannot be run at all.
type ModuleError struct {
	Module string
	Reason string
}

func (e *ModuleError) Error() string {
	if e.Module == "" {
		return "module " + e.Reason
	}
	return fmt.Sprintf("module %s %s", e.Module, e.Reason)
}

// TrapError is a guest that trapped (unreachable, out-of-bounds access,
// division by zero, stack overflow, ...). Stack is the wasm call stack.
type TrapError struct {
	Message string
	Stack   string
	// MemoryRefused is non-zero when the guest had been refused memory growth
	// beyond the memory limit before it trapped: the likely cause.
	MemoryRefused uint64
	// Instrumented says the module ran instrumented: the optimizer that
	// follows Asyncify inlines functions, so frames may be missing.
	Instrumented bool
	// PausedAt is set when the trap came from ftvm pausing the guest, not
	// from the guest: Asyncify, unwinding the guest's wasm call stack at
	// that host call, ran past the Borrowed bytes at the top of the
	// memory it saves the stack in (a stack deeper than ftvm can pause).
	PausedAt string
	Borrowed uint32
}

func (e *TrapError) Error() string {
	var b strings.Builder
	if e.PausedAt != "" {
		fmt.Fprintf(&b, "the VM was lost pausing it at %s: its wasm call stack there is deeper than the %s "+
			"at the top of its memory that ftvm saves a paused stack in (a limit of ftvm, not a fault of the guest), "+
			"and saving it ran out of the memory (%s)", e.PausedAt, FormatSize(uint64(e.Borrowed)), e.Message)
		return b.String()
	}
	b.WriteString("guest trapped: ")
	b.WriteString(e.Message)
	if e.MemoryRefused > 0 {
		fmt.Fprintf(&b, " (after memory growth to %s was refused by the memory limit)", FormatSize(e.MemoryRefused))
	}
	if e.Stack != "" {
		b.WriteString("\nwasm stack trace:\n")
		b.WriteString(e.Stack)
	}
	if e.Instrumented {
		b.WriteString("\n(the module ran instrumented for safe points, which inlines functions: " +
			"run it with --instrument=false for every frame)")
	}
	return b.String()
}

// newTrapError splits wazero's error text into message and stack.
func newTrapError(err error) *TrapError {
	msg := err.Error()
	te := &TrapError{Message: msg}
	if i := strings.Index(msg, "\nwasm stack trace:\n"); i >= 0 {
		te.Message = msg[:i]
		te.Stack = strings.TrimRight(msg[i+len("\nwasm stack trace:\n"):], "\n")
	}
	te.Message = strings.TrimPrefix(te.Message, "wasm error: ")
	return te
}

// FormatSize prints a byte count in binary units (exact where it can be).
func FormatSize(n uint64) string {
	for _, u := range []struct {
		name string
		size uint64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.size {
			if n%u.size == 0 {
				return fmt.Sprintf("%d%s", n/u.size, u.name)
			}
			return fmt.Sprintf("%.1f%s", float64(n)/float64(u.size), u.name)
		}
	}
	return fmt.Sprintf("%dB", n)
}

// ParseSize parses sizes such as 64MiB, 64M, 1G, 4096 (bytes).
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	mult := uint64(1)
	for _, u := range []struct {
		suffix string
		mult   uint64
	}{{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"GIB", 1 << 30}, {"KB", 1 << 10}, {"MB", 1 << 20}, {"GB", 1 << 30},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	var n uint64
	if _, err := fmt.Sscanf(t, "%d", &n); err != nil || fmt.Sprint(n) != t {
		return 0, fmt.Errorf("invalid size %q (want e.g. 64MiB, 1G or a byte count)", s)
	}
	if n > (1<<63)/mult {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return n * mult, nil
}
