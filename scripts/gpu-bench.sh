#!/usr/bin/env bash
# The GPU bench table for N = 1M and 10M at d = 512, k = 10 (batch 1, 16, 256, 1024;
# f32, f16, i8 storage), as in BENCHMARKS.md.
#
# On a machine with a Rust toolchain and a GPU:
#   scripts/gpu-bench.sh
# On a headless NVIDIA host without a toolchain or a Vulkan loader (../shared/device/):
#   here:  cargo build --release && ../shared/device/pack.sh target/release/biogate scripts/gpu-bench.sh
#   there: source .device/env.sh && .device/bin/gpu-bench.sh
# BIOGATE=path/to/biogate, ROWS="1000000 10000000", MIN_SECONDS=1 override the defaults.
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
for n in $rows; do
  echo "== N = $n, d = 512, k = 10"
  # 10M x 512 f32 is 20 GB: f16 and i8 only there (the anchors are fp16 at 10M).
  dtypes=f32,f16,i8
  [ "$n" -ge 10000000 ] && dtypes=f16,i8
  "$bin" bench --backend gpu --rows "$n" --dim 512 -k 10 --dtypes "$dtypes" \
    --batches 1,16,256,1024 --min-seconds "$min"
done
