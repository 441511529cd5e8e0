"""bench.py on a tiny configuration: every side runs, the table and the JSON hold the figures."""
import json

import pytest

from tools import bench

TINY = ["--", "--dataset", "mnist", "--arch", "resnet", "--width", "4", "--batch-size", "8",
        "--n-steps", "2", "--buffer-size", "100", "--px-weight", "1", "--pxy-weight", "1", "--clamp"]


def test_bench_sides_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--sides", "naive,lean,lean+cl+bf16", "--warmup", "1", "--iters", "2",
                          "--json", str(out)] + TINY)
    assert list(results) == ["naive", "lean", "lean+cl+bf16"]
    for r in results.values():
        assert r["s_per_iter"] > 0 and r["floor_s"] > 0 and r["peak_mib"] > 0
        assert r["overhead"] == pytest.approx(r["s_per_iter"] / r["floor_s"])
        assert len(r["times"]["iter"]) == 2
    assert results["naive"]["speedup_vs_first"] == 1.0
    table = capsys.readouterr().out
    assert "| naive |" in table and "overhead" in table and "K=2" in table
    record = json.loads(out.read_text())
    assert record["config"]["n_steps"] == 2 and set(record["results"]) == set(results)


def test_bench_refuses_unknown_sides():
    with pytest.raises(SystemExit, match="unknown side"):
        bench.main(["--sides", "lean+turbo"] + TINY)
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--sides", "lean+graph"] + TINY)
