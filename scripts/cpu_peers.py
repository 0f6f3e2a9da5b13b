#!/usr/bin/env python3
"""What a user would run instead of biogate on a CPU, timed on the same data.

    scripts/cpu_peers.py --make DIR [--n 200000] [--dim 512] [--probes 256]
    scripts/cpu_peers.py --data DIR [--batches 1,16,256] [--k 10] [--threads 2]

--make writes DIR/gallery.npy and DIR/probes.npy (seeded random unit vectors, float32)
for both sides to read. --data times two peers on them, in probes/s per batch size:

  faiss   IndexFlatIP.search (exact inner product, faiss-cpu). faiss splits a batch
          across threads by probe, so a batch of one probe runs on one thread; the
          batch-1 column is also given for one thread of biogate's (`--threads 1`
          here and RAYON_NUM_THREADS=1 there) to separate threads from kernels.
  numpy   probes @ gallery.T, then argpartition + sort of the k best per probe.

Each batch is timed as the median of repeated runs after one warm-up run. Needs numpy
and faiss-cpu (`pip install numpy faiss-cpu`).
"""

import argparse
import os
import time

import numpy as np


def unit_rows(rng, n, dim):
    m = rng.standard_normal((n, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m


def median_seconds(fn, min_seconds=2.0, min_runs=3):
    fn()
    runs = []
    start = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    runs.sort()
    return runs[len(runs) // 2]


def numpy_topk(probes, gallery, k):
    scores = probes @ gallery.T
    best = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, best, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(best, order, axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", help="write gallery.npy and probes.npy here")
    ap.add_argument("--data", help="time the peers on gallery.npy and probes.npy here")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--probes", type=int, default=256)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if a.make:
        rng = np.random.default_rng(2026)
        os.makedirs(a.make, exist_ok=True)
        np.save(os.path.join(a.make, "gallery.npy"), unit_rows(rng, a.n, a.dim))
        np.save(os.path.join(a.make, "probes.npy"), unit_rows(rng, a.probes, a.dim))
        print(f"wrote {a.n} x {a.dim} gallery and {a.probes} probes to {a.make}")
        return
    if not a.data:
        ap.error("give --make DIR or --data DIR")
    import faiss

    gallery = np.load(os.path.join(a.data, "gallery.npy"))
    probes = np.load(os.path.join(a.data, "probes.npy"))
    faiss.omp_set_num_threads(a.threads)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    print(
        f"peers: faiss {faiss.__version__} ({a.threads} threads), numpy {np.__version__}; "
        f"N={gallery.shape[0]} d={gallery.shape[1]} k={a.k}"
    )
    for b in [int(x) for x in a.batches.split(",")]:
        q = np.ascontiguousarray(probes[:b])
        tf = median_seconds(lambda: index.search(q, a.k))
        tn = median_seconds(lambda: numpy_topk(q, gallery, a.k))
        print(f"batch {b:5d}: faiss {b / tf:9.1f} probes/s   numpy {b / tn:9.1f} probes/s")


if __name__ == "__main__":
    main()
