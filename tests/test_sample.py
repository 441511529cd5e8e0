"""sample.py from a checkpoint alone: files, shapes, and one-line errors on bad checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_jem
from checkpoint import load_checkpoint, save_atomic
from conftest import REPO, run_script, tiny_run_args


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    train_jem.main(tiny_run_args(data_root, tmp, "s", "--max-iters", "4"))
    return tmp / "ck" / "s" / "last.pt"


@pytest.mark.parametrize("init", ["buffer", "noise"])
def test_sample_writes_grids_and_individual_pngs(trained, tmp_path, init):
    out = tmp_path / "draw"
    r = run_script("sample.py", "--ckpt", trained, "--n-per-class", 3, "--individual", "--out", out,
                   "--init", init, "--n-steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for c in range(10):
        files = sorted((out / str(c)).iterdir())
        assert len(files) == 3
        assert Image.open(files[0]).size == (28, 28)
        assert (out / f"class_{c}.png").exists()
    assert (out / "unconditional.png").exists()
    settings = json.load(open(out / "sampling.json"))
    assert settings["init"] == init and settings["n_steps"] == 2


def test_sample_defaults_follow_the_checkpoint(trained, tmp_path):
    r = run_script("sample.py", "--ckpt", trained, "--n-per-class", 1, "--classes", 4, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    settings = json.load(open(tmp_path / "sampling.json"))
    cfg = load_checkpoint(str(trained))["config"]
    assert settings["n_steps"] == cfg["n_steps"] and settings["step_size"] == cfg["step_size"]
    assert (settings["clamp"], settings["grad_clip"]) == (cfg["clamp"], cfg["grad_clip"])


def test_sample_uses_the_training_gradient_clip(trained, tmp_path):
    """A run trained with JEM++'s clipped step samples with it too."""
    ckpt = load_checkpoint(str(trained))
    ckpt["config"]["grad_clip"] = 0.005
    path = tmp_path / "clipped.pt"
    save_atomic(ckpt, str(path))
    r = run_script("sample.py", "--ckpt", path, "--n-per-class", 1, "--classes", 2, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "d" / "sampling.json"))["grad_clip"] == 0.005


def one_line_error(r, message):
    lines = r.stderr.strip().splitlines()
    return r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_missing_and_corrupt_checkpoints(trained, tmp_path):
    r = run_script("sample.py", "--ckpt", tmp_path / "absent.pt")
    assert one_line_error(r, "does not exist"), r.stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(trained.read_bytes()[:5000])  # a write cut short
    assert one_line_error(run_script("sample.py", "--ckpt", corrupt), "is truncated or damaged"), r.stderr
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    assert one_line_error(run_script("sample.py", "--ckpt", junk), "written by another program, not a checkpoint")


def test_checkpoint_of_another_architecture(trained, tmp_path):
    ckpt = load_checkpoint(str(trained))
    ckpt["config"]["width"] = 8  # the stored weights are for width 4
    wrong = tmp_path / "wrong.pt"
    save_atomic(ckpt, str(wrong))
    r = run_script("sample.py", "--ckpt", wrong, "--out", tmp_path / "x")
    assert one_line_error(r, "another architecture"), r.stderr


def test_sample_refuses_to_overwrite_an_earlier_draw(trained, tmp_path):
    args = ["--ckpt", trained, "--n-per-class", 1, "--classes", 0, "--n-steps", 1, "--out", tmp_path]
    assert run_script("sample.py", *args).returncode == 0
    assert one_line_error(run_script("sample.py", *args), "already holds a draw")
    assert run_script("sample.py", *args, "--force").returncode == 0


def test_a_reader_that_left_ends_the_script_quietly(trained, tmp_path):
    """`python sample.py ... | head`: once the reader is gone, the script stops with status 1 and no
    BrokenPipeError traceback (cli.run). The pipe's read end is closed before the script starts, so
    its first line of output ("wrote ...", printed inside main) meets a broken pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", str(trained),
                            "--n-per-class", "2", "--n-steps", "1", "--out", str(tmp_path / "draw"), "--device", "cpu"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300, cwd=REPO)
    finally:
        os.close(write_end)
    assert r.returncode == 1 and "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
