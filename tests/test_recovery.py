"""Unattended training: divergence detection, rollback with mitigation, fault injection, kill -9."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_jem
from checkpoint import load_checkpoint
from conftest import REPO, run_script, tiny_run_args
from recovery import Guard


def records(run_dir, kind):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == kind]


def all_finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- detection --------------------------------------------------------------------------------

@pytest.mark.parametrize("stats, trigger", [
    ([float("nan"), 1.0, 0.0, 1.0], "non-finite loss"),
    ([1.0, 1.0, 0.0, float("inf")], "non-finite grad_norm"),
    ([1e9, 1.0, 0.0, 1.0], "|loss|"),
    ([1.0, 2e4, 0.0, 1.0], "|energy|"),
    ([1.0, 1.0, -2e4, 1.0], "|energy gap|"),
])
def test_guard_flags_each_kind_of_divergence(stats, trigger):
    guard = Guard()
    assert guard.check([1.0, 1.0, 0.0, 1.0]) is None
    found, values = guard.check(stats)
    assert found.startswith(trigger) and set(values) == {"loss", "max_abs_logit", "gap", "grad_norm"}


def test_loss_spike_detection_uses_running_statistics():
    guard, rng = Guard(spike_factor=10), random.Random(0)
    for _ in range(200):
        assert guard.check([2.0 + 0.1 * rng.gauss(0, 1), 1.0, 0.0, 1.0]) is None
    assert guard.check([2.5, 1.0, 0.0, 1.0]) is None       # 5 std: noise, not a spike
    assert guard.check([5.0, 1.0, 0.0, 1.0])[0].startswith("loss spike")
    assert Guard(spike_factor=0).check([1e6, 1.0, 0.0, 1.0]) is None  # off by default


# ---- recovery in real runs --------------------------------------------------------------------

@pytest.mark.parametrize("seed, faults", [
    (3, ["6:nan", "11:lr-spike"]),
    (4, ["3:lr-spike"]),
    (5, ["9:nan", "10:nan", "14:lr-spike"]),
])
def test_injected_faults_are_recovered_and_the_run_finishes(data_root, tmp_path, seed, faults):
    args = tiny_run_args(data_root, tmp_path, "drill", "--max-iters", "18", "--snapshot-every", "4",
                         "--seed", seed, *[a for f in faults for a in ("--inject-fault", f)])
    r = run_script("train_jem.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "ck" / "drill"
    events = records(run_dir, "recovery")
    assert len(events) >= len(faults)
    summary = records(run_dir, "recovery_summary")[-1]
    assert summary["divergences"] == summary["recovered"] == len(events)
    for e in events:
        assert e["rollback_to"] <= e["step"]
        assert (run_dir / "recovery" / f"step_{e['step']:07d}_attempt_{e['attempt']}" / "event.json").exists()
    last = load_checkpoint(str(run_dir / "last.pt"))
    assert last["step"] == 18 and all_finite(last)
    assert len(records(run_dir, "test")) == 1


def test_mitigations_are_kept_in_checkpoints_and_on_resume(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "mit", "--max-iters", "10", "--recovery-ladder", "lr,steps",
                         "--inject-fault", "5:nan", "--inject-fault", "7:nan")
    train_jem.main(args)
    run_dir = tmp_path / "ck" / "mit"
    cfg = load_checkpoint(str(run_dir / "last.pt"))["config"]
    assert cfg["lr"] == pytest.approx(5e-4) and cfg["n_steps"] == 5  # halved lr, then 3 -> 5 steps
    train_jem.main(["--run-name", "mit", "--resume", "--ckpt-root", str(tmp_path / "ck"), "--max-iters", "14"])
    resumed = load_checkpoint(str(run_dir / "last.pt"))
    assert resumed["step"] == 14 and resumed["config"]["lr"] == pytest.approx(5e-4)
    assert resumed["recovery"]["attempt"] == 2 and resumed["config"]["n_steps"] == 5


def test_a_spent_budget_exits_with_one_line_and_a_loadable_verified_checkpoint(data_root, tmp_path):
    args = tiny_run_args(data_root, tmp_path, "giveup", "--max-iters", "12", "--max-recoveries", "0",
                         "--inject-fault", "7:nan")
    r = run_script("train_jem.py", *args)
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "diverged" in err[0] and "Traceback" not in r.stderr
    last = load_checkpoint(str(tmp_path / "ck" / "giveup" / "last.pt"))
    assert all_finite(last) and last["step"] <= 7


def test_a_run_without_energy_terms_or_faults_records_no_event(data_root, tmp_path):
    train_jem.main(tiny_run_args(data_root, tmp_path, "calm", "--max-iters", "6", "--px-weight", "0",
                                 "--pxy-weight", "0"))
    assert records(tmp_path / "ck" / "calm", "recovery") == []
    assert records(tmp_path / "ck" / "calm", "recovery_summary")[-1]["divergences"] == 0


def test_bad_fault_spec_is_one_line(tmp_path):
    r = run_script("train_jem.py", "--inject-fault", "x:boom", "--ckpt-root", tmp_path / "ck")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "inject-fault" in lines[0], r.stderr


# ---- kill -9 ----------------------------------------------------------------------------------

def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint_that_resumes(data_root, tmp_path):
    """Checkpoint every step, kill -9 at random moments (many land inside a write): last.pt always
    loads and --resume goes on from it."""
    rng = random.Random(0)
    args = tiny_run_args(data_root, tmp_path, "kill", "--ckpt-every", "1", "--buffer-size", "3000",
                         "--max-iters", "100000", "--eval-every", "100000")
    last = tmp_path / "ck" / "kill" / "last.pt"
    steps = []
    for attempt in range(4):
        cmd = args if attempt == 0 else ["--run-name", "kill", "--resume", "--ckpt-root", str(tmp_path / "ck")]
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_jem.py"), *cmd], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mtime = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 120
        while (not last.exists() or last.stat().st_mtime_ns == mtime) and time.time() < deadline:
            time.sleep(0.01)  # wait until this process writes checkpoints
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(str(last))  # never half a file
        steps.append(ckpt["step"])
        assert all_finite(ckpt)
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each resume went on from the last one


def test_a_checkpoint_from_before_the_recovery_flags_resumes(data_root, tmp_path):
    """Flags added after a checkpoint was written take their defaults on --resume."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "old", "--max-iters", "3"))
    path = tmp_path / "ck" / "old" / "last.pt"
    ckpt = load_checkpoint(str(path))
    for key in ("max_recoveries", "recovery_ladder", "snapshot_every", "max_energy", "max_gap",
                "spike_factor", "inject_fault"):
        del ckpt["config"][key]
    del ckpt["recovery"]
    torch.save(ckpt, path)
    train_jem.main(["--run-name", "old", "--resume", "--ckpt-root", str(tmp_path / "ck"), "--max-iters", "5"])
    assert load_checkpoint(str(path))["step"] == 5
