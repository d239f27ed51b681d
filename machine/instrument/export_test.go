package instrument

// ForgetToolVersion makes the next instrumentation look for wasm-opt's
// version as a fresh process would.
func ForgetToolVersion() {
	tool.mu.Lock()
	defer tool.mu.Unlock()
	tool.path, tool.id, tool.version = "", "", ""
}
