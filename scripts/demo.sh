#!/usr/bin/env bash
# The ftvm demo: a Go key-value server compiled to WASI runs in an ftvm VM,
# real TCP clients talk to it, the VM's API reports on it, and it idles at ~0% CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# ready waits until the KV server answers a request.
ready() {
	# Every 10 ms for up to two minutes: the time to the backup's first
	# answer after the kill is measured with it.
	for _ in $(seq 12000); do
		if exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
			printf 'COUNT\n' >&3
			if read -r -t 5 reply <&3 && [ -n "$reply" ]; then exec 3<&-; return 0; fi
			exec 3<&-
		fi
		sleep 0.01
	done
	echo "the KV server did not answer" >&2
	return 1
}

# kv sends one request line and prints the reply line.
kv() {
	exec 3<>"/dev/tcp/127.0.0.1/$port"
	printf '%s\n' "$1" >&3
	read -r reply <&3
	exec 3<&-
	printf '  %-22s -> %s\n' "$1" "$reply"
}

say "building the guest: testdata/guests/kvserver (GOOS=wasip1 GOARCH=wasm)"
GOOS=wasip1 GOARCH=wasm go build -o "$work/kvserver.wasm" ./testdata/guests/kvserver
ls -l "$work/kvserver.wasm" | awk '{print $5" bytes"}'

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18080)
say "ftvm run --instrument=false --listen 127.0.0.1:$port --api-sock vm.sock kvserver.wasm"
bin/ftvm run --instrument=false --listen "127.0.0.1:$port" --api-sock "$work/vm.sock" "$work/kvserver.wasm" 2>"$work/guest.err" &
vm=$!
pids+=("$vm")
for _ in $(seq 600); do [ -S "$work/vm.sock" ] && break; sleep 0.05; done
ready

say "a client talks to the guest over real TCP"
kv "SET greeting hello"
kv "SET answer 42"
kv "GET greeting"
kv "GET answer"
kv "GET missing"
kv "COUNT"

say "the VM's API: curl --unix-socket vm.sock http://vm/vm"
curl -s --unix-socket "$work/vm.sock" http://vm/vm | head -40

say "an idle guest really sleeps (poll_oneoff waits in the kernel)"
ticks() { awk '{print $14+$15}' "/proc/$vm/stat"; }
t0=$(ticks); sleep 2; t1=$(ticks)
hz=$(getconf CLK_TCK)
awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN{printf "  CPU used by the idle VM over 2 s: %.1f%% of one core\n", (b-a)/hz/2*100}'

say "SIGTERM stops the VM; ftvm exits 143"
kill -TERM "$vm"
set +e; wait "$vm"; code=$?; set -e
echo "  exit code: $code"

# ---------------------------------------------------------------------------
say "snapshot and restore: the VM moves to a new process and keeps its data"
echo "  (the first run instruments the module with Asyncify: about a minute for a Go"
echo "   module, once; it is cached by content hash)"
bin/ftvm run --listen "127.0.0.1:$port" --api-sock "$work/vm2.sock" "$work/kvserver.wasm" 2>"$work/guest2.err" &
vm=$!
pids+=("$vm")
for _ in $(seq 3000); do [ -S "$work/vm2.sock" ] && break; sleep 0.1; done
ready

# A writer keeps loading the server while the snapshot is taken.
(
	exec 4<>"/dev/tcp/127.0.0.1/$port"
	for i in $(seq 1 100000); do
		printf 'SET load%d %d\n' "$i" "$i" >&4
		read -r _ <&4 || break
		echo "$i" >"$work/acked.tmp" && mv "$work/acked.tmp" "$work/acked"
	done
) 2>/dev/null &
writer=$!
pids+=("$writer")
for _ in $(seq 100); do [ -s "$work/acked" ] && [ "$(cat "$work/acked")" -ge 200 ] && break; sleep 0.1; done
echo "  writes acknowledged so far: $(cat "$work/acked" 2>/dev/null)"
bin/ftvm snapshot --api-sock "$work/vm2.sock" --out "$work/kv.snap" --stop --mappable
set +e; wait "$vm"; echo "  the original VM has stopped (exit $?)"; set -e
sleep 0.2
acked=$(cat "$work/acked")
echo "  writes acknowledged before the stop: $acked"

say "ftvm inspect kv.snap"
bin/ftvm inspect "$work/kv.snap" | sed 's/^/  /'

say "ftvm restore kv.snap: a new process continues the guest (its memory mapped from the file, not read)"
bin/ftvm restore "$work/kv.snap" 2>"$work/guest3.err" &
vm=$!
pids+=("$vm")
ready
kv "GET load1"
kv "GET load$acked"
kv "COUNT"
kv "SET after restore"
kv "GET after"

kill -TERM "$vm"; wait "$vm" 2>/dev/null || true

# ---------------------------------------------------------------------------
say "Remus: a protected primary and its backup, as two processes"
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18090)
echo "  ftvm backup --listen 127.0.0.1:$rport --state state --timeout 300ms --api-sock backup.sock"
bin/ftvm backup --listen "127.0.0.1:$rport" --state "$work/state" --timeout 300ms --api-sock "$work/backup.sock" \
	>"$work/backup.out" 2>"$work/backup.err" &
backup=$!
pids+=("$backup")
for _ in $(seq 600); do [ -S "$work/backup.sock" ] && break; sleep 0.05; done
echo "  ftvm run --protect 127.0.0.1:$rport --epoch 25ms --timeout 300ms --listen 127.0.0.1:$port kvserver.wasm"
bin/ftvm run --protect "127.0.0.1:$rport" --epoch 25ms --timeout 300ms --listen "127.0.0.1:$port" \
	--api-sock "$work/primary.sock" "$work/kvserver.wasm" 2>"$work/primary.err" &
primary=$!
pids+=("$primary")
ready
for _ in $(seq 300); do bin/ftvm status --api-sock "$work/primary.sock" 2>/dev/null | grep -q "state: *protected" && break; sleep 0.05; done

rm -f "$work/acked"
(
	exec 4<>"/dev/tcp/127.0.0.1/$port"
	for i in $(seq 1 100000); do
		printf 'SET key%d value%d\n' "$i" "$i" >&4
		read -r _ <&4 || break
		echo "$i" >"$work/acked.tmp" && mv "$work/acked.tmp" "$work/acked"
	done
) 2>/dev/null &
writer=$!
pids+=("$writer")
sleep 1.5
say "ftvm status --api-sock primary.sock (while a client writes)"
bin/ftvm status --api-sock "$work/primary.sock" | sed 's/^/  /'

say "kill -9 the primary"
kill -9 "$primary"
t_kill=$(date +%s%N)
wait "$writer" 2>/dev/null || true
acked=$(cat "$work/acked")
echo "  the client's last acknowledged write: key$acked (its connection was reset by the kill)"
ready
t_up=$(date +%s%N)
echo "  the backup serves on 127.0.0.1:$port $(( (t_up - t_kill) / 1000000 )) ms after the kill (detection timeout 300 ms)"
bad=0
for i in $(seq 1 "$acked"); do
	exec 3<>"/dev/tcp/127.0.0.1/$port"; printf 'GET key%d\n' "$i" >&3; read -r reply <&3; exec 3<&-
	[ "$reply" = "VALUE value$i" ] || { bad=$((bad+1)); echo "  LOST: key$i -> $reply"; }
done
echo "  every acknowledged write checked: $acked present, $bad lost"
kv "COUNT"
kv "SET after failover"
kv "GET after"
say "ftvm status --api-sock backup.sock"
bin/ftvm status --api-sock "$work/backup.sock" | sed 's/^/  /'
[ "$bad" -eq 0 ] || { echo "acknowledged writes were lost" >&2; exit 1; }

echo
echo "guest stderr:"; cat "$work/guest.err" "$work/guest2.err" "$work/guest3.err" | sed 's/^/  /'
