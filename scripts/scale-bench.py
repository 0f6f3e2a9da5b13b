#!/usr/bin/env python3
"""Whole-process timings of a large gallery (the store-at-scale table in BENCHMARKS.md).

    scripts/scale-bench.py BIOGATE GALLERY_DIR [GALLERY_DIR ...]

For each gallery (made with `biogate synth` + `biogate gallery import`, any size):
  - `gallery info`: wall time (best of 5) and peak RSS;
  - `identify` of one probe with --no-verify (best of 5) and `bench --gallery` (the
    scan alone, batch 1), and the first `identify` that verifies the rows;
  - `serve`: seconds from start to its "serving" line, RssAnon then and after the
    background verification; `biogate client enroll` of 5,000 new subjects into it
    and into an empty gallery on the same server (templates/s), and RssAnon after.
    This ADDS the 5,000 subjects ("new-<time>-...") to the measured gallery's log.
Standard library only. The page cache should hold the gallery (run it once before);
the numbers are for this machine, printed as one JSON line per gallery.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ENROLL = 5000


def run(cmd, rss=None):
    """Wall seconds and stdout of one process; its peak RSS (MB) appended to `rss`."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed: {err.read()}")
    if rss is not None:
        rss.append(usage.ru_maxrss / 1024.0)
    return took, out


def best_of(n, cmd):
    """Best wall time of n runs."""
    return min(run(cmd)[0] for _ in range(n))


def rss_anon(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    biogate = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="biogate-scale-")
    try:
        for gallery in sys.argv[2:]:
            print(json.dumps(measure(biogate, os.path.abspath(gallery), work)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(biogate, gallery, work):
    _, out = run([biogate, "gallery", "info", gallery])
    field = lambda name: re.search(rf"^{name}\s+(\S+)", out, re.M).group(1)
    dim, dtype = int(field("dim")), field("dtype")
    r = {"gallery": gallery, "templates": int(field("templates")), "dim": dim, "dtype": dtype}
    r["info_s"] = best_of(5, [biogate, "gallery", "info", gallery])
    peaks = []
    run([biogate, "gallery", "info", gallery], peaks)
    r["info_peak_rss_mb"] = peaks[0]
    # One probe, and 5,000 new subjects to enroll.
    synth = os.path.join(work, "synth")
    if not os.path.exists(synth):
        run([biogate, "synth", "--subjects", str(ENROLL), "--dim", str(dim), "--probes", "1", "--out", synth])
        with open(os.path.join(synth, "gallery_ids.txt")) as f:
            run_id = time.strftime("%Y%m%d%H%M%S")
            ids = [f"new-{run_id}-{line.strip()}" for line in f]
        with open(os.path.join(synth, "new_ids.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    probe = os.path.join(synth, "mated.npy")
    identify = [biogate, "identify", "--probes", probe, "--backend", "cpu", "-k", "10", gallery]
    run(identify + ["--no-verify"])  # warm
    r["identify_1_no_verify_s"] = best_of(5, identify + ["--no-verify"])
    r["identify_1_verified_s"], _ = run(identify)
    _, out = run([biogate, "bench", "--gallery", gallery, "--batches", "1", "--backend", "cpu", "--min-seconds", "3", "--json"])
    line = [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]
    r["scan_ms"] = line.get("batch_ms")
    r.update(serve(biogate, gallery, work, synth, dim, dtype))
    return r


def serve(biogate, gallery, work, synth, dim, dtype):
    data = os.path.join(work, "data")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(os.path.join(data, "galleries"))
    os.symlink(gallery, os.path.join(data, "galleries", "big"))
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [biogate, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{port}", "--metrics-listen", "off", "--backend", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    r = {}
    try:
        for line in proc.stderr:
            if "serving" in line and "not_serving" in line:
                r["serving_after_s"] = time.perf_counter() - start
                r["rss_anon_serving_mb"] = rss_anon(proc.pid)
                break
        for line in proc.stderr:
            if "verified every gallery" in line:
                r["verified_after_s"] = time.perf_counter() - start
                r["rss_anon_verified_mb"] = rss_anon(proc.pid)
                break
        addr = f"http://127.0.0.1:{port}"
        templates = os.path.join(synth, "gallery.npy")
        ids = os.path.join(synth, "new_ids.txt")
        client = [biogate, "client", "--addr", addr]
        run(client + ["create-gallery", "empty", "--dim", str(dim), "--dtype", dtype])
        for name in ["empty", "big"]:
            t, _ = run(client + ["enroll", "--gallery", name, "--templates", templates, "--ids", ids])
            r[f"enroll_{name}_per_s"] = ENROLL / t
        r["rss_anon_after_enroll_mb"] = rss_anon(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    return r


if __name__ == "__main__":
    main()
