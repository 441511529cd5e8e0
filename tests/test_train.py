"""train_jem.py end to end on real MNIST: exact resume, signals, presets, and one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_jem
from checkpoint import load_checkpoint
from conftest import REPO, run_script, tiny_run_args


def assert_same_state(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in s_a:
            assert torch.equal(s_a[key], s_b[key]), key
    assert torch.equal(a["buffer"]["x"], b["buffer"]["x"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["step"] == b["step"]


def test_resume_is_bit_exact(data_root, tmp_path):
    """N steps, stop, resume, N more == 2N uninterrupted: weights, Adam state, buffer, RNG.
    10 steps per epoch, so the resumed half crosses an epoch boundary and an lr decay."""
    n = 7
    train_jem.main(tiny_run_args(data_root, tmp_path, "straight", "--max-iters", 2 * n))
    train_jem.main(tiny_run_args(data_root, tmp_path, "split", "--max-iters", n))
    first_half = load_checkpoint(str(tmp_path / "ck" / "split" / "last.pt"))
    assert first_half["step"] == n
    train_jem.main(["--run-name", "split", "--resume", "--ckpt-root", str(tmp_path / "ck"),
                    "--max-iters", str(2 * n)])
    straight = load_checkpoint(str(tmp_path / "ck" / "straight" / "last.pt"))
    resumed = load_checkpoint(str(tmp_path / "ck" / "split" / "last.pt"))
    assert_same_state(straight, resumed)
    assert not torch.equal(first_half["buffer"]["x"], resumed["buffer"]["x"])  # training went on
    steps = [json.loads(l)["step"] for l in open(tmp_path / "ck" / "split" / "metrics.jsonl")]
    assert steps == sorted(steps)


def test_interface_files_and_refusal_to_overwrite(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "iface", "--max-iters", "6", "--sample-every", "3")
    r = run_script("train_jem.py", *args)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "ck" / "iface"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (run_dir / name).exists(), name
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    test = [r for r in records if r["kind"] == "test"]
    assert len(test) == 1 and 0 <= test[0]["test_acc"] <= 1
    assert sorted(os.listdir(tmp_path / "sm" / "iface")) == ["step_0000003.png", "step_0000006.png"]
    again = run_script("train_jem.py", *args)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_sigterm_saves_a_resumable_checkpoint(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "term", "--ckpt-every", "100000", "--eval-every", "100000")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_jem.py"), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "ck" / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ckpt = load_checkpoint(str(tmp_path / "ck" / "term" / "last.pt"))
    assert ckpt["step"] >= 2  # saved at the step it stopped, though --ckpt-every is far away
    r = run_script("train_jem.py", "--run-name", "term", "--resume", "--ckpt-root", tmp_path / "ck",
                   "--max-iters", ckpt["step"] + 2)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(tmp_path / "ck" / "term" / "last.pt"))["step"] == ckpt["step"] + 2


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "boom", "--max-iters", "12", "--explode-threshold", "1e-6")
    r = run_script("train_jem.py", *args)
    assert r.returncode != 0
    assert "diverged" in r.stderr and "Traceback" not in r.stderr


def test_semi_supervised_and_subset_flags_run(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "semi", "--max-iters", "3", "--labels-per-class", "2",
                         "--pretrain-epochs", "0", "--norm", "group", "--optimizer", "sgd")
    train_jem.main(args)
    assert load_checkpoint(str(tmp_path / "ck" / "semi" / "last.pt"))["step"] == 3


def test_cifar10_paper_preset_smoke(data_root, tmp_path):
    """The paper's preset (WRN-28-10, 20 SGLD steps) for 2 steps on real CIFAR-10; only the batch
    is cut, to 8, so this stays well under a minute on a laptop CPU."""
    if not os.path.exists(os.path.join(data_root, "cifar10", "train.npz")):
        pytest.skip("CIFAR-10 arrays not present")
    r = run_script("train_jem.py", "--preset", "cifar10-paper", "--data-root", data_root,
                   "--run-name", "paper", "--ckpt-root", tmp_path / "ck", "--samples-root",
                   tmp_path / "sm", "--max-iters", "2", "--batch-size", "8", "--n-valid", "64",
                   "--max-eval", "64", "--sample-every", "0", "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load_checkpoint(str(tmp_path / "ck" / "paper" / "last.pt"))
    cfg = ckpt["config"]
    assert (cfg["arch"], cfg["depth"], cfg["widen"], cfg["n_steps"], cfg["lr"]) == ("wrn", 28, 10, 20, 1e-4)
    assert ckpt["step"] == 2 and ckpt["buffer"]["x"].shape == (10000, 3, 32, 32)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", "mnist", "--data-root", "/nonexistent/data"], "does not exist"),
    (["--run-name", "nothing-here", "--resume"], "does not exist"),
])
def test_bad_training_input_is_one_line(tmp_path, args, message):
    r = run_script("train_jem.py", *args, "--ckpt-root", tmp_path / "ck", "--samples-root", tmp_path / "sm")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_resume_as_another_architecture_is_refused(data_root, tmp_path):
    train_jem.main(tiny_run_args(data_root, tmp_path, "arch", "--max-iters", "2"))
    r = run_script("train_jem.py", "--run-name", "arch", "--resume", "--ckpt-root", tmp_path / "ck",
                   "--arch", "wrn")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "another architecture" in lines[0], r.stderr


def test_a_buffer_too_small_for_class_slices_is_one_line(data_root, tmp_path):
    r = run_script("train_jem.py", *tiny_run_args(data_root, tmp_path, "small", "--buffer-size", "50"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "--buffer-size 160 or more" in lines[0], r.stderr
