"""biogate's Python package against a numpy float64 reference, on real files."""

import threading
import time

import numpy as np
import pytest

import biogate


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference(gallery, ids, probes, k):
    """Best k distinct subjects per probe: a subject's score is its best template's."""
    scores = unit(probes.astype(np.float64)) @ unit(gallery.astype(np.float64)).T
    out = []
    for row in scores:
        best = {}
        for s, sid in zip(row, ids):
            best[sid] = max(best.get(sid, -2.0), s)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        out.append(ranked)
    return out


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(7)
    dim, rows = 37, 600
    templates = rng.standard_normal((rows, dim)).astype(np.float32)
    ids = [f"s{rng.integers(0, 250):04}" for _ in range(rows)]
    g = biogate.Gallery.create(str(tmp_path / "g"), dim, "f32")
    assert g.enroll(ids, templates) == rows
    return g, templates, ids, rng


def test_answers_equal_a_float64_reference(gallery):
    g, templates, ids, rng = gallery
    probes = rng.standard_normal((13, templates.shape[1])).astype(np.float32)
    subjects, scores, matched = g.identify(probes, k=5, backend="cpu")
    assert matched is None
    assert scores.shape == (13, 5) and scores.dtype == np.float32
    for q, want in enumerate(reference(templates, ids, probes, 5)):
        assert subjects[q] == [s for s, _ in want]
        np.testing.assert_allclose(scores[q], [v for _, v in want], atol=1e-5)


def test_thresholds_deletion_verify_info_and_compaction(gallery):
    g, templates, ids, rng = gallery
    probe = templates[:1]
    subjects, scores, matched = g.identify(probe, k=3, threshold=0.99, backend="cpu")
    assert matched.tolist() == [True] and subjects[0][0] == ids[0]
    assert np.isnan(scores[0, 1:]).all(), "no candidate: NaN"
    g.delete(ids[0])
    assert ids[0] not in g.identify(probe, k=3, backend="cpu")[0][0]
    with pytest.raises(biogate.NotFoundError):
        g.delete(ids[0])
    assert g.verify(templates[1], ids[1]) == pytest.approx(1.0, abs=1e-5)
    assert g.verify(templates[1], "nobody") is None
    before = g.info()
    g.compact()
    after = g.info()
    assert after["subjects"] == before["subjects"] and after["dim"] == 37


def test_arrays_are_read_in_place_or_converted_once(gallery):
    g, templates, ids, rng = gallery
    c_f32 = np.ascontiguousarray(templates[:5])
    assert biogate.reads_in_place(c_f32)
    assert not biogate.reads_in_place(np.asfortranarray(c_f32))
    assert not biogate.reads_in_place(c_f32.astype(np.float64))
    a = g.identify(c_f32, k=3, backend="cpu")[0]
    assert g.identify(np.asfortranarray(c_f32), k=3, backend="cpu")[0] == a
    assert g.identify(c_f32.astype(np.float64), k=3, backend="cpu")[0] == a


def test_bad_input_is_a_value_error_naming_what_is_wrong(gallery):
    g, templates, ids, rng = gallery
    with pytest.raises(ValueError, match="shape"):
        g.identify(templates[0], k=3)
    with pytest.raises(ValueError, match="dtype"):
        g.identify(np.array([["a", "b"]]), k=3)
    with pytest.raises(ValueError, match="37"):
        g.identify(np.ones((2, 5), np.float32), k=3, backend="cpu")
    bad = templates[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError):
        g.identify(bad, k=3, backend="cpu")
    with pytest.raises(ValueError):
        g.enroll(["only-one"], templates[:2])
    with pytest.raises(ValueError):
        biogate.Gallery.create(str(g.path) + "-x", 8, "f64")
    with pytest.raises(biogate.Error):
        biogate.Gallery.open(str(g.path) + "-missing")
    with pytest.raises(biogate.StorageError, match="locked"):
        biogate.Gallery.open(str(g.path))


def test_a_closed_gallery_opens_again_with_its_data(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((20, 16)).astype(np.float32)
    g = biogate.Gallery.create(str(tmp_path / "g"), 16, "i8")
    g.enroll([f"p{i}" for i in range(20)], t)
    del g
    again = biogate.Gallery.open(str(tmp_path / "g"))
    assert again.info()["subjects"] == 20
    assert again.identify(t[:3], k=1, backend="cpu")[0] == [["p0"], ["p1"], ["p2"]]


def test_searches_hold_no_gil(tmp_path):
    rng = np.random.default_rng(1)
    dim, rows = 64, 100_000
    g = biogate.Gallery.create(str(tmp_path / "big"), dim, "f32")
    g.enroll([f"s{i}" for i in range(rows)], rng.standard_normal((rows, dim)).astype(np.float32))
    probes = rng.standard_normal((256, dim)).astype(np.float32)
    done = threading.Event()
    spins = []

    def search():
        for _ in range(3):
            g.identify(probes, k=10, backend="cpu")
        done.set()

    t = threading.Thread(target=search)
    start = time.perf_counter()
    t.start()
    n = 0
    while not done.is_set():
        n += 1
    t.join()
    spins.append(n)
    elapsed = time.perf_counter() - start
    # Python ran this loop the whole time the searches ran: with the GIL held by them,
    # it would only get the interpreter's switch interval now and then.
    assert elapsed > 0.05
    assert n > 100_000, f"{n} spins in {elapsed:.3f} s"


def test_eval_and_dedup_return_what_the_command_line_writes(tmp_path):
    rng = np.random.default_rng(21)
    dim = 32
    centres = unit(rng.standard_normal((100, dim)))
    gallery = (centres + 0.1 * rng.standard_normal((100, dim))).astype(np.float32)
    ids = [f"p{i:03}" for i in range(100)]
    # p099 enrolled a second time as "alias" (a duplicate identity for dedup to find).
    g = biogate.Gallery.create(str(tmp_path / "g"), dim, "f32")
    g.enroll(ids + ["alias"], np.vstack([gallery, gallery[99:100]]))
    mated = (centres[:20] + 0.1 * rng.standard_normal((20, dim))).astype(np.float32)
    nonmated = rng.standard_normal((20, dim)).astype(np.float32)
    report = g.eval(mated, ids[:20], nonmated, k=5, backend="cpu")
    assert report["rank1"] == 1.0 and report["mated_searches"] == 20
    assert [p["target_fpir"] for p in report["operating_points"]] == [0.001, 0.003, 0.01]
    a, b, scores = g.dedup(str(tmp_path / "pairs.csv"), threshold=0.99, backend="cpu")
    assert sorted([a[0], b[0]]) == ["alias", "p099"] and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "pairs.csv").exists()
    with pytest.raises(ValueError):
        g.dedup(str(tmp_path / "x.csv"))
    # The module-level forms read the gallery at a path (here still open above).
    assert biogate.eval(str(g.path), mated, ids[:20], nonmated, k=5, backend="cpu")["rank1"] == 1.0
    a2, b2, s2 = biogate.dedup(str(g.path), str(tmp_path / "pairs2.csv"), threshold=0.99, backend="cpu")
    assert (a2, b2) == (a, b) and np.array_equal(s2, scores)
