#!/usr/bin/env python3
"""Score error of biogate's i8 storage against the exact cosine, on random unit vectors.

    python3 scripts/i8-error.py [--dim 512] [--rows 20000] [--probes 50]

Quantisation as in src/template.rs: s = max|x| / 127, q = round(x / s); the score is
(q_p . q_g) * s_p * s_g. Prints the mean / p99 / max absolute error and the worst-case
bound that template::i8_score_error_bound computes. Needs numpy.
"""
import argparse
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--dim", type=int, default=512)
ap.add_argument("--rows", type=int, default=20000)
ap.add_argument("--probes", type=int, default=50)
a = ap.parse_args()
rng = np.random.default_rng(1)
unit = lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
g, p = unit(rng.standard_normal((a.rows, a.dim))), unit(rng.standard_normal((a.probes, a.dim)))

def quantise(x):
    s = np.abs(x).max(axis=1, keepdims=True) / 127
    return np.clip(np.round(x / s), -127, 127), s

(qg, sg), (qp, sp) = quantise(g), quantise(p)
err = np.abs((qp @ qg.T) * (sp * sg.T) - p.astype(np.float64) @ g.T.astype(np.float64))
l1, mx = (lambda v: np.abs(v).sum(axis=1)), (lambda v: np.abs(v).max(axis=1))
bound = (l1(p)[:, None] * mx(g)[None, :] + l1(g)[None, :] * mx(p)[:, None]) / 254 \
    + a.dim * mx(p)[:, None] * mx(g)[None, :] / 254**2
print(f"d={a.dim}, {err.size} pairs: |error| mean {err.mean():.2e}, p99 {np.percentile(err, 99):.2e}, "
      f"max {err.max():.2e}; worst-case bound {bound.min():.3f}..{bound.max():.3f}")
