#!/usr/bin/env bash
# The GPU bench table for N = 1M and 10M at d = 512, k = 10 (batch 1, 16, 256, 1024;
# f32, f16, i8 storage), as in BENCHMARKS.md.
#
# On a machine with a Rust toolchain and a GPU:
#   scripts/gpu-bench.sh
# On a headless NVIDIA host without a toolchain or a Vulkan loader (../shared/device/):
#   here:  cargo build --release && ../shared/device/pack.sh target/release/biogate scripts/gpu-bench.sh
#   there: source .device/env.sh && .device/bin/gpu-bench.sh
# BIOGATE=path/to/biogate, ROWS="1000000 10000000", COOP_ROWS=1000000, MIN_SECONDS=1,
# DEDUP_ROWS=1000000 override the defaults; SWEEP="1024 4096 16384" adds the scan block
# sweep (BIOGATE_GPU_BLOCK_ROWS) at COOP_ROWS for f16 and i8, batches 1, 16 and 256.
# Each step prints how long it took (on an H100 at build 563471a: 1M about 40 s, 10M
# over 150 s, the 1M dedup over 227 s: give the call its time, or set DEDUP_ROWS lower).
# Every table is preceded by a check of the GPU's answers against the CPU engine
# (`--check`); then the f16 scan on cooperative matrices (tensor cores, off by default)
# is checked and timed at 1M, and with DEDUP=1 the 1M x 512 i8 N:N dedup is timed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${BIOGATE:-}
if [ -z "$bin" ]; then
  if [ -x "$here/biogate" ]; then bin="$here/biogate"; else
    (cd "$here/.." && cargo build --release -q) && bin="$here/../target/release/biogate"
  fi
fi
rows=${ROWS:-"1000000 10000000"}
min=${MIN_SECONDS:-1}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step_start=$SECONDS
took() { echo "-- took $((SECONDS - step_start)) s"; step_start=$SECONDS; }
for n in $rows; do
  echo "== N = $n, d = 512, k = 10"
  # 10M x 512 f32 is 20 GB: f16 and i8 only there (the anchors are fp16 at 10M).
  dtypes=f32,f16,i8
  [ "$n" -ge 10000000 ] && dtypes=f16,i8
  "$bin" bench --backend gpu --rows "$n" --dim 512 -k 10 --dtypes "$dtypes" \
    --batches 1,16,256,1024 --min-seconds "$min" --check
  took
done
coop_rows=${COOP_ROWS:-1000000}
echo "== cooperative matrices (BIOGATE_GPU_COOPERATIVE=1), N = $coop_rows, f16"
BIOGATE_GPU_COOPERATIVE=1 "$bin" bench --backend gpu --rows "$coop_rows" --dim 512 -k 10 --dtypes f16 \
  --batches 16,256,1024 --min-seconds "$min" --check || echo "cooperative path failed (see above)"
took
for block in ${SWEEP:-}; do
  echo "== scan blocks of at least $block rows (BIOGATE_GPU_BLOCK_ROWS), N = $coop_rows"
  BIOGATE_GPU_BLOCK_ROWS=$block "$bin" bench --backend gpu --rows "$coop_rows" --dim 512 -k 10 --dtypes f16,i8 \
    --batches 1,16,256 --min-seconds "$min"
  took
done
if [ "${DEDUP:-0}" = 1 ]; then
  work=${TMPDIR:-/tmp}/biogate-gpu-dedup
  rm -rf "$work" && mkdir -p "$work"
  dedup_rows=${DEDUP_ROWS:-1000000}
  echo "== dedup, $dedup_rows x 512 i8, --top 10 --backend gpu"
  "$bin" synth --subjects "$dedup_rows" --dim 512 --probes 1 --out "$work/synth" >/dev/null
  "$bin" gallery create "$work/g" --dim 512 --dtype i8 >/dev/null
  "$bin" gallery import "$work/g" --templates "$work/synth/gallery.npy" --ids "$work/synth/gallery_ids.txt" | tail -1
  # bash's own timer: the CUDA images lent for these runs have no /usr/bin/time.
  TIMEFORMAT="dedup wall %R s"
  time "$bin" dedup "$work/g" --top 10 --backend gpu --out "$work/pairs.csv"
  rm -rf "$work"
fi
