#!/usr/bin/env bash
# The cluster's three targets on one machine (BENCHMARKS.md, "The cluster"):
#   1. router overhead: p50 of single-probe Identify through the router vs the same
#      request straight to the shard server (1 shard x 1 replica);
#   2. throughput at 256 concurrent clients: 2 shards x 2 replicas vs one server
#      holding the same gallery;
#   3. recovery: a replica of a 1M-template shard killed (-9) and restarted, until the
#      router sees it serving again.
# Needs etcd on PATH (Debian: etcd-server) and a release build (cargo build --release).
# Usage: scripts/cluster-bench.sh [ROWS_FOR_THROUGHPUT] [RECOVERY_TEMPLATES]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BIOGATE_BIN:-$PWD/target/release/biogate}
ROWS=${1:-200000}
RECOVERY=${2:-1000000}
DIM=${DIM:-512}
SECONDS_PER=${SECONDS_PER:-5}
W=$(mktemp -d /tmp/biogate-cluster-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 400); do "$B" client --addr "http://$1" galleries >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "nothing on $1" >&2; exit 1; }

# etcd: three members.
CP=(); PP=()
for i in 0 1 2; do CP+=("$(port)"); PP+=("$(port)"); done
IC="e0=http://127.0.0.1:${PP[0]},e1=http://127.0.0.1:${PP[1]},e2=http://127.0.0.1:${PP[2]}"
for i in 0 1 2; do
  etcd --name "e$i" --data-dir "$W/e$i" \
    --listen-client-urls "http://127.0.0.1:${CP[$i]}" --advertise-client-urls "http://127.0.0.1:${CP[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${PP[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${PP[$i]}" \
    --initial-cluster "$IC" --initial-cluster-state new --initial-cluster-token bench \
    --logger zap --log-level error >/dev/null 2>&1 &
  PIDS+=($!)
done
ETCD="http://127.0.0.1:${CP[0]},http://127.0.0.1:${CP[1]},http://127.0.0.1:${CP[2]}"

declare -A NODE_PORT NODE_PID
node() { # node NAME: start (or restart) a shard server
  local n=$1
  [ -n "${NODE_PORT[$n]:-}" ] || NODE_PORT[$n]=$(port)
  "$B" serve --etcd "$ETCD" --store "file://$W/objects" --node "$n" --listen "127.0.0.1:${NODE_PORT[$n]}" \
    --metrics-listen off --data-dir "$W/$n" 2>>"$W/$n.log" >/dev/null &
  NODE_PID[$n]=$!
  PIDS+=($!)
}
RP=$(port)
"$B" router --etcd "$ETCD" --listen "127.0.0.1:$RP" >/dev/null 2>"$W/router.log" &
PIDS+=($!)
R="http://127.0.0.1:$RP"
for n in n1 n2 n3 n4; do node $n; done
for n in n1 n2 n3 n4; do wait_up "127.0.0.1:${NODE_PORT[$n]}"; done
wait_up "127.0.0.1:$RP"
SP=$(port)
"$B" serve --listen "127.0.0.1:$SP" --metrics-listen off --data-dir "$W/single" >/dev/null 2>&1 &
PIDS+=($!)
wait_up "127.0.0.1:$SP"
S="http://127.0.0.1:$SP"

echo "## machine: $(nproc) cores, $(uname -m); etcd $(etcd --version | head -1 | awk '{print $3}'); $(git rev-parse --short HEAD)"
"$B" synth --subjects "$ROWS" --dim "$DIM" --probes 10 --seed 3 --out "$W/tp" >/dev/null

echo "## 1. router overhead (1 shard x 1 replica, $ROWS x $DIM f32, concurrency 1)"
"$B" client --addr "$R" create-gallery ovh --dim "$DIM" --shards 1 --replicas 1 >/dev/null
"$B" client --addr "$R" enroll --gallery ovh --templates "$W/tp/gallery.npy" --ids "$W/tp/gallery_ids.txt"
HOLDER=$("$B" client --addr "$R" galleries | awk '/shard 0/ {print $7; exit}')
echo "replica on $HOLDER"
for round in 1 2; do
  "$B" bench --target "http://127.0.0.1:${NODE_PORT[$HOLDER]}" --target-gallery ovh.s0 --concurrency 1 --min-seconds "$SECONDS_PER"
  "$B" bench --target "$R" --target-gallery ovh --concurrency 1 --min-seconds "$SECONDS_PER"
done
"$B" client --addr "$R" drop-gallery ovh >/dev/null

echo "## 2. throughput at 256 clients: one server vs 2 shards x 2 replicas ($ROWS x $DIM f32)"
"$B" client --addr "$S" create-gallery tp --dim "$DIM" >/dev/null
"$B" client --addr "$S" enroll --gallery tp --templates "$W/tp/gallery.npy" --ids "$W/tp/gallery_ids.txt"
"$B" client --addr "$R" create-gallery tp --dim "$DIM" --shards 2 --replicas 2 >/dev/null
"$B" client --addr "$R" enroll --gallery tp --templates "$W/tp/gallery.npy" --ids "$W/tp/gallery_ids.txt"
"$B" client --addr "$R" galleries
for round in 1 2; do
  "$B" bench --target "$S" --target-gallery tp --concurrency 256 --min-seconds "$SECONDS_PER"
  "$B" bench --target "$R" --target-gallery tp --concurrency 256 --min-seconds "$SECONDS_PER"
done
"$B" client --addr "$R" drop-gallery tp >/dev/null
"$B" client --addr "$S" drop-gallery tp >/dev/null
rm -rf "$W/tp"

echo "## 3. recovery: a replica of a $RECOVERY-template shard (dim $DIM i8) killed and restarted"
SUBJECTS=$((RECOVERY / 4))
"$B" synth --subjects "$SUBJECTS" --samples 4 --dim "$DIM" --probes 10 --seed 4 --out "$W/rec" >/dev/null
"$B" client --addr "$R" create-gallery rec --dim "$DIM" --dtype i8 --shards 1 --replicas 2 >/dev/null
t0=$(date +%s.%N)
"$B" client --addr "$R" enroll --gallery rec --templates "$W/rec/gallery.npy" --ids "$W/rec/gallery_ids.txt"
echo "enrolled through the router in $(echo "$(date +%s.%N) - $t0" | bc) s"
"$B" client --addr "$R" galleries
VICTIM=$("$B" client --addr "$R" galleries | awk '/shard 0/ {print $7; exit}')
for round in 1 2 3; do
  kill -9 "${NODE_PID[$VICTIM]}"
  wait "${NODE_PID[$VICTIM]}" 2>/dev/null || true
  sleep 4   # its lease (3 s) runs out: the router sees it down
  "$B" client --addr "$R" galleries | grep "shard 0"
  t0=$(date +%s.%N)
  node "$VICTIM"
  until "$B" client --addr "$R" galleries | grep "shard 0" | grep -q "$VICTIM serving"; do sleep 0.02; done
  echo "round $round: $VICTIM serving again $(echo "$(date +%s.%N) - $t0" | bc) s after its restart"
done
"$B" client --addr "$R" galleries
