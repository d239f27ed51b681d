#!/usr/bin/env bash
# Installs what building and testing ftvm needs on a Debian machine, idempotently:
# Debian packages (only when one is missing) and the Go modules.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang/lld/wasi-libc/libclang-rt-dev-wasm32 build the C test guests; binaryen
# provides wasm-opt (Asyncify instrumentation); gcc and libc6-dev are cgo's,
# which the race detector in make test needs.
pkgs=(clang lld wasi-libc libclang-rt-dev-wasm32 binaryen make gcc libc6-dev)
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || pkgs+=(golang-go)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$PATH:/usr/local/go/bin"
# An older Go fetches the toolchain go.mod asks for through the module proxy.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
go mod download
