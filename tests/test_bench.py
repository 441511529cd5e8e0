"""bench.py on a tiny configuration: every side runs in its own process, the table and the JSON hold
the figures; the GPU check runs its every step on a CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli import has_fast_bf16
from tools import bench

TINY = ["--", "--dataset", "mnist", "--arch", "resnet", "--width", "4", "--batch-size", "8",
        "--n-steps", "2", "--buffer-size", "100", "--px-weight", "1", "--pxy-weight", "1", "--clamp"]


def test_bench_sides_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--sides", "naive,lean,loop+cl+bf16", "--warmup", "1", "--iters", "2",
                          "--json", str(out)] + TINY)
    assert list(results) == ["naive", "lean", "loop+cl+bf16"]
    pids = {r["pid"] for r in results.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # each side alone, in a process of its own
    for r in results.values():
        assert r["s_per_iter"] > 0 and r["floor_s"] > 0 and r["peak_mib"] > 0
        assert r["overhead"] == pytest.approx(r["s_per_iter"] / r["floor_s"])
        assert len(r["times"]["iter"]) == 2
    assert results["naive"]["speedup_vs_first"] == 1.0
    table = capsys.readouterr().out
    assert "| naive |" in table and "| loop+cl+bf16 |" in table and "overhead" in table and "K=2" in table
    record = json.loads(out.read_text())
    assert record["config"]["n_steps"] == 2 and set(record["results"]) == set(results)


def test_bench_refuses_unknown_sides():
    with pytest.raises(SystemExit, match="unknown side"):
        bench.main(["--sides", "lean+turbo"] + TINY)
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--sides", "lean+graph"] + TINY)


def test_gpu_check_runs_every_step_on_a_cpu():
    from conftest import REPO
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--quick",
                           "--probe-iters", "30"], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fast = "lean+bf16+cl" if has_fast_bf16(torch.device("cpu")) else "lean+cl"  # bf16 only where native
    assert proc.stdout.count(f"| {fast} |") == 2  # the bench at K=20 and K=5
    probe = [l for l in proc.stdout.splitlines() if l.startswith("probe:")]
    assert probe and "s/iter" in probe[0] and "peak memory" in probe[0] and "200 epochs" in probe[0]
