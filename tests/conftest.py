import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.join(os.path.dirname(REPO), "shared", "data")
sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def data_root():
    if not os.path.isdir(os.path.join(DATA_ROOT, "mnist")):
        pytest.skip(f"real datasets not found at {DATA_ROOT}")
    return DATA_ROOT


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
