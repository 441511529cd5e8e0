"""train_jem.py end to end on real MNIST: exact resume, signals, presets, and one-line errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import metrics
import train_jem
from checkpoint import (FORMAT_VERSION, CheckpointError, load_checkpoint, model_from_checkpoint,
                        model_kwargs, recorded_config, save_atomic, save_checkpoint)
from cli import UsageError, resolve_precision
from data import dataset_info, load_jem_data, to_float
from models import build_model
from conftest import REPO, local_mnist_mirror, run_script, tiny_run_args


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
                         "--pretrain-epochs", "0", "--norm", "group", "--optimizer", "sgd", "--sam-rho", "2")
    train_jem.main(args)
    assert load_checkpoint(str(tmp_path / "ck" / "semi" / "last.pt"))["step"] == 3


def test_cifar10_paper_preset_smoke(data_root, tmp_path):
    """The paper's preset (WRN-28-10) for 2 steps on real CIFAR-10, with only what a CPU cannot
    afford cut: the batch (2), the SGLD steps (2, not 20) and the validation set (8 images). At batch
    8 and 20 steps this took 100 s on a 2-core CPU without AVX-512."""
    r = run_script("train_jem.py", "--preset", "cifar10-paper", "--data-root", data_root,
                   "--run-name", "paper", "--ckpt-root", tmp_path / "ck", "--samples-root",
                   tmp_path / "sm", "--max-iters", "2", "--batch-size", "2", "--n-steps", "2", "--n-valid", "8",
                   "--max-eval", "8", "--sample-every", "0", "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load_checkpoint(str(tmp_path / "ck" / "paper" / "last.pt"))
    cfg = ckpt["config"]
    assert (cfg["arch"], cfg["depth"], cfg["widen"], cfg["lr"], cfg["noise_std"]) == ("wrn", 28, 10, 1e-4, 0.01)
    assert ckpt["step"] == 2 and ckpt["buffer"]["x"].shape == (10000, 3, 32, 32)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", "mnist", "--data-root", "/dev/null"], "is not a folder"),
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


# ---- a user's first hour: what the run says, and the edge cases of resuming ------------------------

class Opaque:
    """An object of a program's own class, which a weights_only load refuses to build."""


def test_unreadable_checkpoints_say_what_is_wrong(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic({"format_version": FORMAT_VERSION, "config": {}}, str(good))
    assert good.stat().st_mode & 0o044 == 0o044  # readable by the group and others, as files are
    cases = {"text.pt": (b"not a checkpoint\n", "is not a PyTorch checkpoint"),
             "empty.pt": (b"", "is empty"),
             "cut.pt": (good.read_bytes()[:200], "is truncated or damaged")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(tmp_path / name))
    torch.save({"model": Opaque()}, tmp_path / "code.pt")  # a pickled class of another program
    with pytest.raises(CheckpointError, match="written by another program: it holds Python objects"):
        load_checkpoint(str(tmp_path / "code.pt"))


def test_the_run_talks_and_resuming_a_finished_run_does_nothing(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "talk", "--max-iters", "12", "--pretrain-epochs", "0")
    r = run_script("train_jem.py", *args)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()
    assert head[0].startswith("run talk: device cpu") and "160 train, 50 validation, 400 test" in head[1]
    assert "small ResNet width 4" in head[2] and "parameters" in head[2]
    # what --precision auto became here, said before the first step
    assert f"{resolve_precision('auto', torch.device('cpu'))} (auto), channels-last layout" in head[2]
    assert "no --preset" in head[3] and "checkpoints in" in r.stdout
    assert "speed:" in r.stdout and "s/step in the JEM phase" in r.stdout
    assert "step 4: validation accuracy" in r.stdout and "energy gap" in r.stdout
    assert "talk JEM" in r.stderr  # the progress bar names its phase
    metrics = tmp_path / "ck" / "talk" / "metrics.jsonl"
    lines = metrics.read_text()
    again = run_script("train_jem.py", "--run-name", "talk", "--resume", "--ckpt-root", tmp_path / "ck",
                       "--samples-root", tmp_path / "sm")
    assert again.returncode == 0 and "already finished at step 12" in again.stdout, again.stderr
    assert metrics.read_text() == lines  # no second test line


def test_elapsed_time_adds_up_over_resumes(data_root, tmp_path):
    train_jem.main(tiny_run_args(data_root, tmp_path, "time", "--max-iters", "4"))
    first = load_checkpoint(str(tmp_path / "ck" / "time" / "last.pt"))["elapsed_s"]
    train_jem.main(tiny_run_args(data_root, tmp_path, "time", "--max-iters", "8", "--resume"))
    records = [json.loads(l) for l in open(tmp_path / "ck" / "time" / "metrics.jsonl")]
    test_line = [r for r in records if r["kind"] == "test"][-1]
    assert first > 0 and test_line["elapsed_s"] > first


def test_a_run_that_died_before_its_first_checkpoint_can_be_run_again(data_root, tmp_path):
    run_dir = tmp_path / "ck" / "early"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")  # what a run killed in its first steps leaves
    r = run_script("train_jem.py", "--run-name", "early", "--resume", "--ckpt-root", tmp_path / "ck")
    assert r.returncode != 0 and "stopped before its first checkpoint" in r.stderr and "Traceback" not in r.stderr
    train_jem.main(tiny_run_args(data_root, tmp_path, "early", "--max-iters", "2"))
    assert load_checkpoint(str(run_dir / "last.pt"))["step"] == 2


def test_a_second_process_on_a_live_run_is_refused_and_changes_nothing(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "live", "--max-iters", "4")
    train_jem.main(args)
    run_dir = tmp_path / "ck" / "live"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    held = train_jem.hold_run_lock("live", str(run_dir))  # as the run's own process holds it
    try:
        r = run_script("train_jem.py", *args, "--resume", "--max-iters", "8")
    finally:
        held.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and f"in use by another process (pid {os.getpid()})" in lines[0], r.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    train_jem.main(args[:-2] + ["--max-iters", "6", "--resume"])  # once released, the run goes on
    assert load_checkpoint(str(run_dir / "last.pt"))["step"] == 6


def test_preset_help_shows_the_presets_values():
    r = run_script("train_jem.py", "--preset", "mnist-cpu", "--help")
    assert r.returncode == 0
    assert "(default: 5)" in r.stdout and "(default: 0.003)" in r.stdout  # epochs and lr of the preset


def test_training_downloads_from_a_mirror_when_the_arrays_are_absent(data_root, tmp_path, monkeypatch):
    with local_mnist_mirror(monkeypatch, data_root, tmp_path / "mirror"):
        args = tiny_run_args(str(tmp_path / "fresh-data"), tmp_path, "dl", "--max-iters", "3")
        train_jem.main(args)
    assert load_checkpoint(str(tmp_path / "ck" / "dl" / "last.pt"))["step"] == 3


@pytest.mark.parametrize("labels_per_class", [None, 5])
def test_clean_energy_data_sees_the_images_without_augmentation(data_root, labels_per_class):
    """--energy-data clean (SADA-JEM): the energy terms' data side is the raw image in [-1, 1], the
    cross-entropy's input the augmented, noised one; the default feeds both from one tensor."""
    extra = [] if labels_per_class is None else ["--labels-per-class", str(labels_per_class)]
    cfg, _ = train_jem.resolve_config(["--dataset", "mnist", "--data-root", data_root, "--batch-size", "8",
                                    "--energy-data", "clean", *extra])
    data = load_jem_data("mnist", data_root, "cpu", n_valid=100, labels_per_class=labels_per_class)
    info = dataset_info("mnist")
    clean = train_jem.training_batch(data, cfg, info, 3, 10, "cpu")
    cfg.energy_data = "augmented"
    default = train_jem.training_batch(data, cfg, info, 3, 10, "cpu")
    assert torch.equal(clean.x, default.x) and torch.equal(clean.y, default.y)
    on_grid = lambda x: torch.allclose((x + 1) * 127.5, ((x + 1) * 127.5).round(), atol=1e-4)
    assert on_grid(clean.x_px) and on_grid(clean.x_pxy) and not on_grid(clean.x)
    assert clean.x_px.abs().max() <= 1 and clean.x_pxy.abs().max() <= 1
    if labels_per_class is None:
        assert default.x_px is None and default.x_pxy is None  # one forward pass serves all terms
        assert clean.x_px is clean.x_pxy  # and one for both energy terms
        assert (clean.x_px - clean.x).abs().mean() > 0.01
    else:
        assert default.x_pxy is None and default.x_px.shape == clean.x_px.shape
        assert not torch.equal(clean.x_px, clean.x_pxy)  # all images vs. the labelled pool


def test_sam_takes_the_gradient_at_the_ascended_weights_and_puts_them_back(data_root, tmp_path):
    """--sam-rho: the gradient the optimizer gets is the one at w + rho |w|^2 g / || |w| g || on the
    same batch and the same chains; the weights and batch-norm statistics come back bit for bit."""
    rho, _ = 0.5, torch.manual_seed(0)
    cfg, _ = train_jem.resolve_config(tiny_run_args(data_root, tmp_path, "sam", "--sam-rho", rho, "--norm", "batch",
                                                    "--precision", "fp32"))  # bf16 would round the two paths apart
    data, info = load_jem_data("mnist", data_root, "cpu", n_valid=50, train_subset=160), dataset_info("mnist")
    state, net, sampler = train_jem.build_run(cfg, info, data, train_jem.build_guard(cfg), train_jem.Ranks(),
                                              torch.device("cpu"), str(tmp_path))
    batch = train_jem.training_batch(data, cfg, info, 0, 10, "cpu")
    params = list(state.model.parameters())

    def gradients_at(weights, chains=None):
        with torch.no_grad():
            torch._foreach_copy_(params, weights)
        loss, _, chains = train_jem.jem_loss(net, sampler, state.buffer, cfg, batch, True, chains=chains)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in params], chains

    weights = [p.detach().clone() for p in params]
    plain, chains = gradients_at(weights)
    statistics = {k: v.clone() for k, v in state.model.state_dict().items() if "running" in k}
    train_jem.sharpness_aware_gradients(net, state, cfg, batch, True, chains)
    sam = [p.grad.clone() for p in params]
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert all(torch.equal(state.model.state_dict()[k], v) for k, v in statistics.items())
    norm = torch.sqrt(sum(((w.abs() * g) ** 2).sum() for w, g in zip(weights, plain)))
    ascended, _ = gradients_at([w + rho * w.abs() ** 2 * g / norm for w, g in zip(weights, plain)], chains)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(sam, ascended))
    assert not all(torch.allclose(a, b, rtol=1e-2, atol=1e-4) for a, b in zip(sam, plain))


def test_silu_model_trains_and_replays_from_its_checkpoint(data_root, tmp_path):
    train_jem.main(tiny_run_args(data_root, tmp_path, "silu", "--activation", "silu", "--max-iters", 3,
                                 "--energy-data", "clean"))
    ckpt = load_checkpoint(str(tmp_path / "ck" / "silu" / "last.pt"))
    model = model_from_checkpoint(ckpt, dataset_info("mnist"), "cpu")
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    old_config = {k: v for k, v in ckpt["config"].items() if k != "activation"}  # before the flag
    assert model_kwargs(old_config, dataset_info("mnist"))["activation"] == "leaky_relu"


def test_sigterm_inside_a_slow_step_stops_at_once_and_resumes_exactly(data_root, tmp_path):
    """A step of thousands of SGLD steps (as WRN-28-10 on a CPU: minutes) is stopped half way: the
    run saves the state before that step, and resuming it gives the uninterrupted run bit for bit."""
    # 600 steps: several seconds a step even on a fast CPU, far above the ~1 s a process takes to save
    # and exit (200 steps took 0.8 s on one CI machine, where stopping at once then took 0.9 s)
    slow = ["--n-steps", 600, "--ckpt-every", 1, "--eval-every", 100000, "--log-every", 1]
    args = tiny_run_args(data_root, tmp_path, "slow", *slow)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_jem.py"), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "ck" / "slow" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:  # step 1 done, step 2 under way
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    waited = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "half way" in err
    step_time = json.loads(open(tmp_path / "ck" / "slow" / "metrics.jsonl").readline())["elapsed_s"]
    assert load_checkpoint(str(last))["step"] == 1
    assert waited < step_time, (waited, step_time)  # not the end of the step
    r = run_script("train_jem.py", "--run-name", "slow", "--resume", "--ckpt-root", tmp_path / "ck",
                   "--max-iters", 2)
    assert r.returncode == 0, r.stderr
    train_jem.main(tiny_run_args(data_root, tmp_path, "straight", *slow, "--max-iters", 2))
    assert_same_state(load_checkpoint(str(tmp_path / "ck" / "straight" / "last.pt")), load_checkpoint(str(last)))


def flip_bytes(path, n=64, seed=0):
    """A bad sector: n random bytes of the file's second half overwritten."""
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(len(data) // 2, len(data) - 1024, (n,), generator=g).tolist():
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bytes", "truncate"])
def test_a_damaged_last_pt_costs_one_interval_not_the_run(data_root, tmp_path, damage, capsys):
    train_jem.main(tiny_run_args(data_root, tmp_path, "straight", "--max-iters", 14))
    train_jem.main(tiny_run_args(data_root, tmp_path, "hurt", "--max-iters", 12))  # last.pt 12, prev.pt 10
    run_dir = tmp_path / "ck" / "hurt"
    assert load_checkpoint(str(run_dir / "prev.pt"))["step"] == 10
    last = run_dir / "last.pt"
    if damage == "bytes":
        flip_bytes(last)
    else:
        last.write_bytes(last.read_bytes()[:last.stat().st_size // 3])
    capsys.readouterr()
    train_jem.main(["--run-name", "hurt", "--resume", "--ckpt-root", str(tmp_path / "ck"), "--max-iters", "14"])
    err = capsys.readouterr().err
    assert "resuming from prev.pt at step 10, 2 steps before the last one logged" in err, err
    assert "damaged" in err and (run_dir / "last.pt.damaged").exists()
    assert_same_state(load_checkpoint(str(tmp_path / "ck" / "straight" / "last.pt")), load_checkpoint(str(last)))


def test_the_checksum_catches_a_checkpoint_that_loads_but_holds_other_numbers(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"format_version": FORMAT_VERSION, "config": {}, "step": 3,
                     "model": {"w": torch.arange(6.0)}}, str(path))
    assert load_checkpoint(str(path))["step"] == 3
    raw = torch.load(path, weights_only=True)
    raw["model"]["w"][2] = 2.5  # one number changed, the stored checksum kept
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(str(path))


def test_resume_refuses_in_one_line_when_no_checkpoint_verifies(data_root, tmp_path):
    train_jem.main(tiny_run_args(data_root, tmp_path, "gone", "--max-iters", 6))
    for name in ("last.pt", "prev.pt", "best.pt"):
        path = tmp_path / "ck" / "gone" / name
        if path.exists():
            path.write_bytes(path.read_bytes()[:100])
    r = run_script("train_jem.py", "--run-name", "gone", "--resume", "--ckpt-root", tmp_path / "ck")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: nothing to resume"), r.stderr


def test_a_full_disk_keeps_the_last_checkpoint_and_training_goes_on(data_root, tmp_path, monkeypatch, capsys):
    """The write at step 10 hits ENOSPC half way: no temp file is left, last.pt still holds step 5,
    the run trains on, and the write at step 15 succeeds; when the final write fails, the run ends
    with status != 0 and says where to go on from."""
    import errno
    import checkpoint
    real_save = torch.save

    class FullDisk:  # a file on a disk with 1,000 bytes left
        def __init__(self, f):
            self.f, self.left = f, 1000

        def write(self, b):
            if len(b) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def save(obj, f, *a, **k):  # torch's own writer meets the full disk
        return real_save(obj, FullDisk(f) if obj.get("step") == 10 else f, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    train_jem.main(tiny_run_args(data_root, tmp_path, "full", "--max-iters", 15, "--eval-every", 100))
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "still holds step 5" in err, err
    run_dir = tmp_path / "ck" / "full"
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp")]
    assert load_checkpoint(str(run_dir / "last.pt"))["step"] == 15
    with pytest.raises(SystemExit, match="could not be written"):
        train_jem.main(tiny_run_args(data_root, tmp_path, "fullend", "--max-iters", 10, "--eval-every", 100))
    assert load_checkpoint(str(tmp_path / "ck" / "fullend" / "last.pt"))["step"] == 5


def test_config_records_only_the_settings_that_apply(data_root, tmp_path):
    """A small-ResNet run under Adam records neither WideResNet sizes nor SGD's momentum, in
    config.json and in the checkpoint; a checkpoint that holds them (older ones) still loads, and
    resuming with a size the run never recorded is no architecture clash."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "cfg", "--max-iters", 2))
    with open(tmp_path / "ck" / "cfg" / "config.json") as f:
        recorded = json.load(f)
    ckpt = load_checkpoint(str(tmp_path / "ck" / "cfg" / "last.pt"))
    for config in (recorded, ckpt["config"]):
        assert config["arch"] == "resnet" and config["width"] == 4
        assert not {"depth", "widen", "momentum", "steps_ramp"} & set(config)
    info = dataset_info("mnist")
    model_from_checkpoint(ckpt, info, "cpu")
    old = {**ckpt, "config": {**ckpt["config"], "depth": 28, "widen": 10, "momentum": 0.9}}
    model_from_checkpoint(old, info, "cpu")
    assert recorded_config({**old["config"], "optimizer": "sgd"})["momentum"] == 0.9
    train_jem.main(["--run-name", "cfg", "--resume", "--ckpt-root", str(tmp_path / "ck"),
                    "--max-iters", "3", "--depth", "16"])
    assert load_checkpoint(str(tmp_path / "ck" / "cfg" / "last.pt"))["step"] == 3


def test_rotation_never_leaves_a_moment_without_last_pt(tmp_path, monkeypatch):
    """A kill between keeping the old last.pt as prev.pt and putting the new one in place must
    leave last.pt holding the old checkpoint (it was once renamed away, and a kill -9 there left
    the run without last.pt)."""
    last, prev = str(tmp_path / "last.pt"), str(tmp_path / "prev.pt")
    def ckpt(step):
        return {"format_version": FORMAT_VERSION, "config": {}, "step": step}

    save_checkpoint(ckpt(1), last)
    real_replace = os.replace

    def killed_before_the_new_file_lands(src, dst):
        if dst == last:
            raise KeyboardInterrupt  # as a SIGKILL at that moment: nothing after it runs
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_file_lands)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt(2), last, rotate_to=prev)
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_checkpoint(last)["step"] == 1 and load_checkpoint(prev)["step"] == 1
    save_checkpoint(ckpt(2), last, rotate_to=prev)
    assert load_checkpoint(last)["step"] == 2 and load_checkpoint(prev)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "prev.pt"]  # no temp file left


def test_refit_temperature_fits_clean_training_images_and_the_tool_gives_the_same_t(data_root, tmp_path):
    """--refit-temperature: after the last step T is the NLL's minimiser on the clean training
    images, the weights untouched; tools.refit_temperature on the same run trained without the flag
    writes bit for bit the same T and weights, and refuses to overwrite."""
    args = ("--learn-temperature", "--max-iters", 3, "--precision", "bf16")  # trains in bf16, refits in fp32
    train_jem.main(tiny_run_args(data_root, tmp_path, "plain", *args))
    train_jem.main(tiny_run_args(data_root, tmp_path, "refit", *args, "--refit-temperature"))
    plain = load_checkpoint(str(tmp_path / "ck" / "plain" / "last.pt"))
    refit = load_checkpoint(str(tmp_path / "ck" / "refit" / "last.pt"))
    info = dataset_info("mnist")
    data = load_jem_data("mnist", data_root, "cpu", 50, 160)
    model = model_from_checkpoint(plain, info, "cpu").eval()
    with torch.no_grad():
        logits = model(to_float(data.train_x))
    expected = metrics.fit_temperature(logits, data.train_y)
    assert train_jem.clean_image_temperature(model, data.train_x, data.train_y)[0] == expected
    assert refit["model"]["log_temperature"].exp().item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected / plain["model"]["log_temperature"].exp().item() - 1) > 0.01  # it moved
    for key in plain["model"]:
        assert key == "log_temperature" or torch.equal(plain["model"][key], refit["model"][key]), key
    lines = [json.loads(l) for l in open(tmp_path / "ck" / "refit" / "metrics.jsonl")]
    assert [l["refit"] for l in lines if l["kind"] == "temperature"] == [pytest.approx(expected, rel=1e-5)]

    out = tmp_path / "plain-refit.pt"
    tool = [sys.executable, "-m", "tools.refit_temperature", "--ckpt", tmp_path / "ck" / "plain" / "last.pt",
            "--out", out, "--device", "cpu"]
    r = subprocess.run(list(map(str, tool)), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    by_tool = load_checkpoint(str(out))
    for key in refit["model"]:
        assert torch.equal(by_tool["model"][key], refit["model"][key]), key
    assert_same_state({**by_tool, "model": plain["model"]}, plain)  # the rest is the original's
    assert by_tool["config"] == {**plain["config"], "refit_temperature": True}
    again = subprocess.run(list(map(str, tool)), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_refit_temperature_without_a_learned_one_is_a_one_line_error(data_root, tmp_path):
    r = run_script("train_jem.py", *tiny_run_args(data_root, tmp_path, "r", "--refit-temperature", "--max-iters", 1))
    assert r.returncode == 2 and "needs --learn-temperature" in r.stderr and "Traceback" not in r.stderr
    cfg, _ = train_jem.resolve_config(["--preset", "cifar10-cpu", "--labels-per-class", "10", "--run-name", "r"])
    with pytest.raises(UsageError, match="learns by heart"):  # a T fitted on 100 memorised images
        train_jem.check_flags(cfg)


class RightOnEveryImage(torch.nn.Module):
    """Images whose pixels all equal 20 * label: logits peaked at the label read from the pixels,
    except for images listed in `wrong`, whose logits point at the next class."""

    def __init__(self, wrong=()):
        super().__init__()
        self.wrong = set(wrong)

    def forward(self, x):
        label = ((x.flatten(1)[:, 0] + 1) * 127.5 / 20).round().long()
        label = torch.tensor([(c + 1) % 10 if i in self.wrong else c for i, c in enumerate(label.tolist())])
        return 5 * torch.nn.functional.one_hot(label, 10).float() + 0.1 * torch.arange(10.0)


def test_clean_image_temperature_keeps_out_of_separable_images():
    """Where the classifier is right on (nearly) every image the NLL has no useful minimum (it falls
    as T -> 0): no T is fitted. With 10 % wrong the fit is an ordinary one."""
    y = torch.arange(200) % 10
    x = (20 * y).to(torch.uint8)[:, None, None, None].expand(200, 1, 4, 4)
    t, acc = train_jem.clean_image_temperature(RightOnEveryImage(), x, y)
    assert t is None and acc == 1.0
    t, acc = train_jem.clean_image_temperature(RightOnEveryImage(wrong=range(0, 200, 10)), x, y)
    assert acc == pytest.approx(0.9) and 0.5 < t < 5  # confidence 0.9: exp(5 / T) = 81, T about 1.1


def test_min_temperature_is_a_floor_under_the_learned_one(data_root, tmp_path):
    """--min-temperature: T is never under its floor after a step. A floor above where three steps
    take a free T (T starts at 1 and moves about 0.001 a step) must bind."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "free", "--learn-temperature", "--max-iters", 3))
    train_jem.main(tiny_run_args(data_root, tmp_path, "floor", "--learn-temperature", "--min-temperature",
                                 "1.01", "--max-iters", 3))
    log_t = {run: load_checkpoint(str(tmp_path / "ck" / run / "last.pt"))["model"]["log_temperature"].item()
             for run in ("free", "floor")}
    assert log_t["free"] < math.log(1.01)
    assert log_t["floor"] >= math.log(1.01) - 1e-7
    cfg, _ = train_jem.resolve_config(["--preset", "mnist", "--no-learn-temperature", "--min-temperature", "0.3",
                                       "--run-name", "r"])
    with pytest.raises(UsageError, match="floor under the learned T"):
        train_jem.check_flags(cfg)


def test_a_learned_temperature_is_the_cross_entropys_alone_and_replays(data_root, tmp_path):
    """--learn-temperature: p(y|x) = softmax(f / T). The energy terms never move T (with the
    cross-entropy weighted 0 it stays exactly 1); the cross-entropy does; the checkpoint replays it."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "energy-only", "--learn-temperature",
                                 "--pyx-weight", "0", "--max-iters", 3))
    assert load_checkpoint(str(tmp_path / "ck" / "energy-only" / "last.pt"))["model"]["log_temperature"] == 0
    train_jem.main(tiny_run_args(data_root, tmp_path, "joint", "--learn-temperature", "--max-iters", 3))
    ckpt = load_checkpoint(str(tmp_path / "ck" / "joint" / "last.pt"))
    log_t = ckpt["model"]["log_temperature"]
    assert log_t != 0
    model = model_from_checkpoint(ckpt, dataset_info("mnist"), "cpu")
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(model.class_logits(logits), logits / log_t.exp())
        assert torch.equal(model.energy(x), -torch.logsumexp(logits, 1))  # E(x) is f's, not f / T's
    without = build_model(**{**model_kwargs(ckpt["config"], dataset_info("mnist")), "learn_temperature": False})
    assert "log_temperature" not in without.state_dict()  # checkpoints from before the flag still load
    assert without.class_logits(logits) is logits
