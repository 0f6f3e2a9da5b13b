"""Python-side timing of identify on a 200K x 512 f32 gallery (compare with
`biogate bench --gallery DIR --backend cpu --batches 1,256`, see BENCHMARKS.md).

    python python/bench.py /tmp/pyg
"""
import sys, time, numpy as np, biogate
path = sys.argv[1]
rng = np.random.default_rng(5)
dim, rows = 512, 200_000
g = biogate.Gallery.create(path, dim, "f32")
for start in range(0, rows, 50_000):
    g.enroll([f"s{i}" for i in range(start, start + 50_000)], rng.standard_normal((50_000, dim)).astype(np.float32))
g.compact()
for batch in (1, 256):
    probes = rng.standard_normal((batch, dim)).astype(np.float32)
    g.identify(probes, k=10, backend="cpu")
    times = []
    t0 = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - t0 < 3:
        t = time.perf_counter(); g.identify(probes, k=10, backend="cpu"); times.append(time.perf_counter() - t)
    times.sort()
    print(f"python batch {batch}: {times[len(times)//2]*1e3:.2f} ms median ({len(times)} runs)")
