#!/usr/bin/env bash
# What verifying the rows costs a one-shot `identify` (checked as they are first scored):
# the same command with and without --no-verify, page cache warm and cold (dropping the
# cache needs root; skipped otherwise). Results go into BENCHMARKS.md ("Verification").
#
#   scripts/verify-cost.sh [ROWS] [DIM] [WORKDIR]     (default 500000 512 /tmp/verify-cost)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-500000}"; DIM="${2:-512}"; W="${3:-/tmp/verify-cost}"
B=target/release/biogate
cargo build --release --quiet
rm -rf "$W"; mkdir -p "$W"
$B synth --subjects "$ROWS" --dim "$DIM" --probes 10 --out "$W/data" >/dev/null 2>&1
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || return 1; }
now() { date +%s.%N; }
for dtype in f32 i8; do
  G="$W/g-$dtype"
  $B gallery create "$G" --dim "$DIM" --dtype "$dtype" >/dev/null 2>&1
  $B gallery import "$G" --templates "$W/data/gallery.npy" --ids "$W/data/gallery_ids.txt" >/dev/null 2>&1
  size=$(du -sm "$G" | cut -f1)
  for cache in warm cold; do
    for flag in "" "--no-verify"; do
      times=()
      for run in 1 2 3; do
        if [ "$cache" = cold ]; then drop || { echo "cold: needs root"; continue 3; }; else
          $B identify "$G" --probes "$W/data/mated.npy" --backend cpu $flag >/dev/null 2>&1; fi
        t0=$(now); $B identify "$G" --probes "$W/data/mated.npy" --backend cpu $flag >/dev/null 2>&1; t1=$(now)
        times+=("$(echo "$t1 - $t0" | bc)")
      done
      echo "$dtype ${size}MB $cache identify(10 probes) ${flag:-verify}: ${times[*]} s"
    done
  done
done
