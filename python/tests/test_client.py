"""biogate.Client against a real `biogate serve` on loopback (the binary from
BIOGATE_BIN, else target/release/biogate of this checkout)."""

import os
import socket
import subprocess
import tempfile

import numpy as np
import pytest

import biogate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BIOGATE_BIN", os.path.join(ROOT, "target", "release", "biogate"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not os.path.exists(BIN):
        pytest.fail(f"no biogate binary at {BIN} (cargo build --release, or set BIOGATE_BIN)")
    data = tempfile.mkdtemp(prefix="biogate-pyclient-")
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN, "serve", "--data-dir", data, "--listen", addr, "--metrics-listen", "off", "--backend", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = None
    for _ in range(100):
        try:
            client = biogate.Client(f"http://{addr}")
            break
        except biogate.Error:
            import time

            time.sleep(0.1)
    assert client is not None, "the server did not start"
    yield client, addr
    proc.terminate()
    proc.wait(timeout=30)


def test_enroll_identify_delete_through_the_server(server):
    client, _ = server
    assert "default" in client.galleries()
    rng = np.random.default_rng(11)
    templates = rng.standard_normal((30, 512)).astype(np.float32)
    subjects = [f"gate-{i:02}" for i in range(30)]
    assert client.enroll("default", subjects, templates) == 30
    found, scores, matched = client.identify("default", templates, k=3, threshold=0.9)
    assert [f[0] for f in found] == subjects
    assert matched.all() and scores.shape == (30, 3)
    assert client.verify("default", templates[5], "gate-05") == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(biogate.NotFoundError):
        client.verify("default", templates[5], "nobody")
    client.delete("default", "gate-00")
    found, _, _ = client.identify("default", templates[:1], k=3)
    assert "gate-00" not in found[0]


def test_the_server_s_refusals_are_python_exceptions(server):
    client, addr = server
    with pytest.raises(ValueError):
        client.identify("default", np.ones((1, 7), np.float32), k=3)
    with pytest.raises(biogate.NotFoundError):
        client.identify("no-such-gallery", np.ones((1, 512), np.float32), k=3)
    with pytest.raises(biogate.Error, match="cannot connect"):
        biogate.Client(f"http://127.0.0.1:{free_port()}")
