#!/usr/bin/env bash
# CPU speed against faiss-cpu and numpy on the very same data, alternating runs so
# that a noisy machine affects both sides alike. Needs a Python with numpy and
# faiss-cpu (PEERS_PY, default ~/.cache/peers/bin/python) and ../shared/bench/.
#
#   scripts/cpu-bench.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200000}
rounds=${2:-2}
py=${PEERS_PY:-$HOME/.cache/peers/bin/python}
peers=../shared/bench/cpu_peers.py
data=${TMPDIR:-/tmp}/biogate-peers-$n
cargo build --release -q
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-120
"$py" "$peers" --n "$n" --batches 1,16,256 --save "$data" >/dev/null
for r in $(seq "$rounds"); do
  echo "== round $r"
  "$py" "$peers" --batches 1,16,256 --gallery "$data/gallery.npy" --probes "$data/probes.npy"
  ./target/release/biogate bench --gallery-npy "$data/gallery.npy" --probes-npy "$data/probes.npy" \
    --batches 1,16,256 --min-seconds 2
done
