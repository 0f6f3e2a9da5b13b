#!/usr/bin/env bash
# The CPU engine beside faiss-cpu and numpy on the very same data, alternating runs so
# that a noisy machine affects both sides alike; then batch 1 on one thread on both
# sides (faiss searches one probe on one thread), and the machine's read bandwidth.
# Needs a Python with numpy and faiss-cpu (PEERS_PY; default ~/.cache/peers/bin/python,
# made by `python3 -m venv ~/.cache/peers && ~/.cache/peers/bin/pip install numpy faiss-cpu`)
# and gcc for the bandwidth probe.
#
#   scripts/cpu-bench.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200000}
rounds=${2:-2}
py=${PEERS_PY:-$HOME/.cache/peers/bin/python}
data=${TMPDIR:-/tmp}/biogate-peers-$n
threads=$(nproc)
cargo build --release -q
lscpu | grep -E "Model name|^CPU\(s\)|L3" | cut -c1-120
"$py" scripts/cpu_peers.py --make "$data" --n "$n" >/dev/null
bench() { ./target/release/biogate bench --gallery-npy "$data/gallery.npy" --probes-npy "$data/probes.npy" --backend cpu "$@" 2>/dev/null; }
for r in $(seq "$rounds"); do
  echo "== round $r"
  "$py" scripts/cpu_peers.py --data "$data" --batches 1,16,256 --threads "$threads"
  bench --batches 1,16,256 --min-seconds 2
done
echo "== batch 1 on one thread"
"$py" scripts/cpu_peers.py --data "$data" --batches 1 --threads 1
RAYON_NUM_THREADS=1 bench --batches 1 --min-seconds 2
echo "== read bandwidth ($threads threads, then 1)"
gcc -O2 -mavx2 -pthread scripts/memory-bandwidth.c -o "${TMPDIR:-/tmp}/biogate-membw"
for mb in 100 400 2048; do "${TMPDIR:-/tmp}/biogate-membw" "$mb" "$threads"; done
"${TMPDIR:-/tmp}/biogate-membw" 400 1
