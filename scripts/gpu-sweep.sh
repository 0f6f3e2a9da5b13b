#!/usr/bin/env bash
# Issue 22's card run, in priority order, each row written as soon as it is measured
# (a timeout keeps what finished). d = 512, k = 10, random unit vectors.
#
#   1. the two-stage path (SIMT GEMM + separate selection) at 1M, f32 / f16 / i8,
#      batches 256, 1024 and 256 again, each dtype checked against the CPU engine first (--check);
#   2. the two-stage path on the tensor cores (BIOGATE_GPU_COOPERATIVE=1) at 1M, f16 and
#      i8, batches 256, 1024 and 256 again (a second look after the card is busy);
#   3. SIMT two-stage at 10M, f16 and i8, batches 256 and 1024 (--check);
#   4. tensor cores at 10M, f16 and i8, batches 256 and 1024 (--check);
#   5. the fused scan at 1M, f16 and i8, batch 256, for the ratio between the paths;
#   6. chunk and segment variants of the two-stage path at 1M f16 batch 1024;
#   7. batch 1 at 10M i8 (the fused scan) over a sweep of its block length;
#   8. the GPU test binary (GPU_TESTS=path), with the tensor cores on where the card has
#      them;
#   9. the 1M x 512 i8 N:N dedup, --top 10, on the tensor cores.
#
# STEPS="2 4 8" runs only those steps (default: all, about 8 minutes on an H200).
# On a machine with a Rust toolchain and a GPU: scripts/gpu-sweep.sh
# On a headless NVIDIA host without a toolchain or a Vulkan loader, pack biogate with
# this script (BENCHMARKS.md, "GPU") and run: .device/bin/gpu-sweep.sh
# OUT=dir writes sweep.log there; BIOGATE=path/to/biogate; MIN_SECONDS=0.5.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${BIOGATE:-}
if [ -z "$bin" ]; then
  if [ -x "$here/biogate" ]; then bin="$here/biogate"; else
    (cd "$here/.." && cargo build --release -q) && bin="$here/../target/release/biogate"
  fi
fi
out=${OUT:-.}
log="$out/sweep.log"
min=${MIN_SECONDS:-0.5}
steps=${STEPS:-1 2 3 4 5 6 7 8 9}
t0=$SECONDS
want() { [[ " $steps " == *" $1 "* ]]; }
step() { echo "== [$((SECONDS - t0)) s] $*" | tee -a "$log"; }
bench() { "$bin" bench --backend gpu --dim 512 -k 10 --min-seconds "$min" "$@" 2>&1 | tee -a "$log"; }
last_row() { "$bin" bench --backend gpu --dim 512 -k 10 --min-seconds "$min" "$@" 2>&1 | tail -1 | tee -a "$log"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"

if want 1; then
  step "1. two-stage SIMT, 1M, f32 f16 i8, batches 256 1024 256, checked"
  BIOGATE_GPU_PIPELINE=twostage bench --rows 1000000 --dtypes f32,f16,i8 --batches 256,1024,256 --check
fi
if want 2; then
  step "2. two-stage tensor cores, 1M, f16 i8, batches 256 1024 256, checked"
  BIOGATE_GPU_PIPELINE=twostage BIOGATE_GPU_COOPERATIVE=1 bench --rows 1000000 --dtypes f16,i8 --batches 256,1024,256 --check
fi
if want 3; then
  step "3. two-stage SIMT, 10M, f16 i8, batches 256 1024, checked"
  BIOGATE_GPU_PIPELINE=twostage bench --rows 10000000 --dtypes f16,i8 --batches 256,1024 --check
fi
if want 4; then
  step "4. two-stage tensor cores, 10M, f16 i8, batches 256 1024, checked"
  BIOGATE_GPU_PIPELINE=twostage BIOGATE_GPU_COOPERATIVE=1 bench --rows 10000000 --dtypes f16,i8 --batches 256,1024 --check
fi
if want 5; then
  step "5. fused, 1M, f16 i8, batch 256"
  BIOGATE_GPU_PIPELINE=fused bench --rows 1000000 --dtypes f16,i8 --batches 256
fi
if want 6; then
  step "6. two-stage variants, 1M f16 batch 1024"
  for v in "BIOGATE_GPU_CHUNK_MB=32" "BIOGATE_GPU_CHUNK_MB=512" "BIOGATE_GPU_SELECT_ROWS=4096" "BIOGATE_GPU_SELECT_ROWS=32768"; do
    step "   $v"
    env BIOGATE_GPU_PIPELINE=twostage "$v" "$bin" bench --backend gpu --dim 512 -k 10 --min-seconds "$min" \
      --rows 1000000 --dtypes f16 --batches 1024 2>&1 | tail -1 | tee -a "$log"
  done
fi
if want 7; then
  step "7. batch 1, 10M i8, fused scan, block length sweep (BIOGATE_GPU_BLOCK_ROWS)"
  for rows in 256 2048 16384; do
    step "   BIOGATE_GPU_BLOCK_ROWS=$rows"
    BIOGATE_GPU_BLOCK_ROWS=$rows last_row --rows 10000000 --dtypes i8 --batches 1
  done
fi
if want 8 && [ -n "${GPU_TESTS:-}" ]; then
  step "8. the GPU tests on this card, tensor cores on"
  BIOGATE_REQUIRE_GPU=1 BIOGATE_GPU_COOPERATIVE=1 "$GPU_TESTS" --test-threads 2 2>&1 | tail -25 | tee -a "$log"
fi
if want 9; then
  work=${TMPDIR:-/tmp}/biogate-gpu-dedup
  rm -rf "$work" && mkdir -p "$work"
  step "9. dedup, 1000000 x 512 i8, --top 10 --backend gpu, tensor cores on"
  "$bin" synth --subjects 1000000 --dim 512 --probes 1 --out "$work/synth" >/dev/null
  "$bin" gallery create "$work/g" --dim 512 --dtype i8 >/dev/null
  "$bin" gallery import "$work/g" --templates "$work/synth/gallery.npy" --ids "$work/synth/gallery_ids.txt" | tail -1
  # bash's own timer: the CUDA images lent for these runs have no /usr/bin/time.
  TIMEFORMAT="dedup wall %R s"
  { time BIOGATE_GPU_COOPERATIVE=1 timeout "${DEDUP_LIMIT:-120}" "$bin" dedup "$work/g" --top 10 --backend gpu --out "$work/pairs.csv"; } 2>&1 | tee -a "$log"
  wc -l < "$work/pairs.csv" | tee -a "$log"
  rm -rf "$work"
fi
step "done"
