# ftvm — see README.md. `make demo` and `make test` take a fresh Debian machine
# to a working system: both install what they need first (scripts/deps.sh).
export PATH := $(PATH):/usr/local/go/bin
export GOTOOLCHAIN ?= auto
GO ?= go
BIN := bin/ftvm

.PHONY: all deps build test demo bench fuzz vet clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(GO) build -o $(BIN) ./cmd/ftvm

# go vet, then staticcheck (pinned in go.mod as a tool).
vet: deps
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Every test: unit, device-level, WASI testsuite, end-to-end with real guests,
# sockets and processes, fuzz seeds. FTVM_CHECK_SCRATCH=1 makes every pause of
# every VM, in the tests' own ftvm processes too, check that the dirty tracker
# reported each page the guest changed in the region Asyncify borrows. Then the
# race detector over the packages whose goroutines share state (the replication
# driver and its protocol, the transport, the device layer): it found a race in
# a test of the replication driver that nothing else saw.
# The machine package whole takes 5 minutes under it: its tests of pauses
# and snapshots from other goroutines only (RACE_MACHINE).
RACE_PKGS := ./remus ./remus/engine ./remus/wire ./transport ./wasi
RACE_MACHINE := TestAutoSnapshotBesideAPISnapshots|TestPause|TestWithPaused|TestCollectAheadKeepsEveryViewExact
test: deps
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	FTVM_CHECK_SCRATCH=1 $(GO) test -count=1 -timeout 30m ./...
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 10m $(RACE_PKGS)
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 10m -run '$(RACE_MACHINE)' ./machine

demo: build
	@scripts/demo.sh

# Benchmarks: ftvm vs wazero's own WASI vs native, one run, written to BENCHMARKS.md.
bench: build
	$(GO) run ./bench -out BENCHMARKS.md

# Short fuzzing runs of every fuzz target (FUZZTIME=30s by default).
FUZZTIME ?= 30s
FUZZFLAGS = -run '^$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
fuzz: deps
	$(GO) test ./machine $(FUZZFLAGS) -fuzz FuzzScanModule
	$(GO) test ./machine/instrument $(FUZZFLAGS) -fuzz FuzzExportGlobals
	$(GO) test ./machine/instrument $(FUZZFLAGS) -fuzz FuzzInsertPolls
	$(GO) test ./snapshot $(FUZZFLAGS) -fuzz 'FuzzDecode$$'
	$(GO) test ./snapshot $(FUZZFLAGS) -fuzz FuzzDecodeResigned
	$(GO) test ./wasi $(FUZZFLAGS) -fuzz FuzzDevices
	$(GO) test ./wasi $(FUZZFLAGS) -fuzz FuzzRestore
	$(GO) test ./transport $(FUZZFLAGS) -fuzz FuzzRecv
	$(GO) test ./remus/wire $(FUZZFLAGS) -fuzz FuzzUnmarshal
	$(GO) test ./remus/engine $(FUZZFLAGS) -fuzz FuzzPrimary
	$(GO) test ./remus/engine $(FUZZFLAGS) -fuzz FuzzBackup
	$(GO) test ./remus/store $(FUZZFLAGS) -fuzz FuzzDecodeJournal
	$(GO) test ./remus $(FUZZFLAGS) -fuzz FuzzBackupStream
	$(GO) test ./remus $(FUZZFLAGS) -fuzz FuzzDeviceCheck

clean:
	rm -rf bin
