#!/usr/bin/env bash
# N:N self-search on the CPU: biogate dedup (f32 and i8 storage, top-10 per template)
# beside faiss-cpu IndexFlatIP searching the same gallery against itself (k = 11: itself
# plus 10). Needs a Python with numpy and faiss-cpu (PEERS_PY).
#
#   scripts/dedup-bench.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
py=${PEERS_PY:-$HOME/.cache/peers/bin/python}
work=${TMPDIR:-/tmp}/biogate-dedup-bench-$n
rm -rf "$work" && mkdir -p "$work"
cargo build --release -q
bin=target/release/biogate
"$py" scripts/cpu_peers.py --make "$work" --n "$n" >/dev/null
seq 0 $((n - 1)) | sed 's/^/s/' > "$work/ids.txt"
"$py" - "$work/gallery.npy" <<'PY'
import sys, time, numpy as np, faiss
g = np.load(sys.argv[1]).astype(np.float32)
index = faiss.IndexFlatIP(g.shape[1]); index.add(g)
t = time.perf_counter(); index.search(g, 11); dt = time.perf_counter() - t
print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads) self-search N={g.shape[0]} d={g.shape[1]} k=11: {dt:.1f} s ({g.shape[0]/dt:.0f} probes/s)")
PY
for dtype in f32 i8; do
  $bin gallery create "$work/g-$dtype" --dim 512 --dtype $dtype >/dev/null 2>&1
  $bin gallery import "$work/g-$dtype" --templates "$work/gallery.npy" --ids "$work/ids.txt" 2>/dev/null | tail -1
  echo "biogate dedup $dtype --top 10:"
  $bin dedup "$work/g-$dtype" --top 10 --out "$work/pairs-$dtype.csv" 2>/dev/null
done
rm -rf "$work"
