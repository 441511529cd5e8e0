"""The judge classifier end to end: train it briefly on real MNIST, score real digits written as PNGs
the way sample.py writes them, and check that bad input gives one 'error:' line, not a traceback."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.utils import save_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint import load_checkpoint, load_judge  # noqa: E402
from tools.score_samples import score_directory  # noqa: E402

PER_CLASS = 20


def script(module, *args):
    """Run tools.<module> as the README does (python -m tools.NAME from the repository root)."""
    # one thread: the test box is small and often shared, where extra threads only slow things down
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", f"tools.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def assert_one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


@pytest.fixture(scope="module")
def mnist_root(data_root):
    return data_root


@pytest.fixture(scope="module")
def judge(mnist_root, tmp_path_factory):
    """A judge trained for 2 epochs on the fixture's 1,200 real digits."""
    out = tmp_path_factory.mktemp("judge") / "judge.pt"
    proc = script("train_classifier", "--data-root", mnist_root, "--train-subset", 1200,
                  "--epochs", 2, "--batch-size", 64, "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy:" in proc.stdout
    return out


def write_real_digits(mnist_root, directory, relabel=lambda c: c):
    """PER_CLASS real test digits per class as directory/<relabel(class)>/<i>.png, like sample.py."""
    with np.load(os.path.join(mnist_root, "mnist", "test.npz")) as f:
        x, y = f["x"], f["y"]
    for c in range(10):
        os.makedirs(directory / str(relabel(c)), exist_ok=True)
        for i, img in enumerate(x[y == c][:PER_CLASS]):
            save_image(torch.from_numpy(img).permute(2, 0, 1).float() / 255, directory / str(relabel(c)) / f"{i}.png")
    return directory


def test_checkpoint_loads_and_records_accuracy(judge):
    ckpt = load_checkpoint(str(judge))
    assert ckpt["config"]["arch"] == "judge-cnn" and ckpt["config"]["train_subset"] == 1200
    assert 0.5 < ckpt["test_acc"] <= 1.0  # chance is 0.1


def test_real_digits_score_high_and_mislabelled_ones_low(judge, mnist_root, tmp_path):
    samples = write_real_digits(mnist_root, tmp_path / "real")
    out = tmp_path / "scores.json"
    proc = script("score_samples", "--classifier", judge, "--samples", samples, "--json", out,
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert scores["n"] == 10 * PER_CLASS and sorted(scores["per_class"]) == [str(c) for c in range(10)]
    # chance is 0.1; a judge this brief can still miss a single class, so the minimum is only
    # checked for consistency
    assert scores["mean"] > 0.6 and scores["min"] == min(scores["per_class"].values()), scores
    assert f"{scores['mean']:.3f}" in proc.stdout
    # the same digits filed under the wrong class must score low
    shifted = write_real_digits(mnist_root, tmp_path / "shifted", relabel=lambda c: (c + 1) % 10)
    assert score_directory(load_judge(str(judge), "cpu"), str(shifted), "cpu")["mean"] < 0.2


@pytest.mark.parametrize("case", ["missing dir", "no class folders", "corrupt checkpoint",
                                  "missing checkpoint", "not a judge"])
def test_bad_input_is_one_error_line(judge, tmp_path, case):
    samples = tmp_path / "samples"
    (samples / "0").mkdir(parents=True)
    save_image(torch.rand(1, 28, 28), samples / "0" / "0.png")
    classifier = judge
    if case == "missing dir":
        samples = tmp_path / "nowhere"
    elif case == "no class folders":
        samples = tmp_path / "empty"
        (samples / "not_a_class").mkdir(parents=True)
    elif case == "corrupt checkpoint":
        classifier = tmp_path / "bad.pt"
        classifier.write_bytes(judge.read_bytes()[:1000])
    elif case == "missing checkpoint":
        classifier = tmp_path / "absent.pt"
    elif case == "not a judge":
        classifier = tmp_path / "jem.pt"
        torch.save({"format_version": 1, "config": {"arch": "resnet"}, "model": {}}, classifier)
    assert_one_line_error(script("score_samples", "--classifier", classifier, "--samples", samples))


def test_training_refuses_to_overwrite(mnist_root, tmp_path):
    out = tmp_path / "judge.pt"
    out.write_bytes(b"keep me")
    proc = script("train_classifier", "--data-root", mnist_root, "--out", out)
    assert_one_line_error(proc)
    assert "--force" in proc.stderr and out.read_bytes() == b"keep me"


def test_a_judge_trained_with_noise_reads_noisy_digits_that_a_clean_one_misses(judge, mnist_root, tmp_path):
    """--noise (default 0.3): noisy, grainy samples are judged by the digit in them, not by the
    texture a judge trained on clean digits never saw."""
    clean_judge = tmp_path / "clean.pt"
    proc = script("train_classifier", "--data-root", mnist_root, "--train-subset", 1200, "--epochs", 2,
                  "--batch-size", 64, "--device", "cpu", "--noise", 0, "--out", clean_judge)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(str(judge))["config"]["noise"] == 0.3
    with np.load(os.path.join(mnist_root, "mnist", "test.npz")) as f:
        x = torch.from_numpy(f["x"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.from_numpy(f["y"])
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def acc(path, images):
        with torch.no_grad():
            return (load_judge(str(path), "cpu")(images).argmax(1) == y).float().mean().item()
    assert acc(judge, noisy) > acc(clean_judge, noisy) + 0.1, (acc(judge, noisy), acc(clean_judge, noisy))
    assert acc(judge, x) > 0.8  # and clean digits as well as before
