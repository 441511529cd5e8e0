"""metrics.py against known answers, and eval_jem.py as a user runs it on a tiny checkpoint."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_jem
import metrics
import train_jem
from checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic, save_checkpoint
from cli import run
from conftest import REPO, run_script, tiny_run_args
from data import dataset_info, load_split
from models.energy import energy_from_logits
from models.judge import JUDGE_ARCH, JudgeCNN


# ---- calibration ----------------------------------------------------------------------------------

def two_class_probs(conf, correct):
    """Predictions of class 0 with confidence `conf`; the label is 0 where `correct`, else 1."""
    conf = torch.tensor(conf, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], 1)
    return probs, torch.tensor([0 if c else 1 for c in correct])


def test_ece_on_hand_built_predictions():
    # 4 at confidence 0.9 with 3 right (gap 0.15), 6 at 0.6 all right (gap 0.4): 0.4*0.15 + 0.6*0.4
    probs, y = two_class_probs([0.9] * 4 + [0.6] * 6, [1, 1, 1, 0] + [1] * 6)
    assert metrics.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.30)
    # one bin: |overall accuracy - mean confidence| = |0.9 - 0.72|
    assert metrics.expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.18)
    # perfectly calibrated: confidence 0.75, three in four right
    probs, y = two_class_probs([0.75] * 4, [1, 0, 1, 1])
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(0.0)


def test_calibration_bins_are_right_closed():
    probs, y = two_class_probs([0.5, 0.5000001, 0.95, 1.0], [1, 1, 0, 1])
    b = metrics.calibration_bins(probs, y, n_bins=10)
    assert b["count"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 2]  # 0.5 in (0.4, 0.5], 1.0 in (0.9, 1]
    assert b["accuracy"][9] == pytest.approx(0.5) and np.isnan(b["accuracy"][0])


def test_nll_and_brier_known_values():
    y = torch.tensor([0, 1])
    assert metrics.nll(torch.zeros(2, 2), y) == pytest.approx(np.log(2))
    assert metrics.brier_score(torch.full((2, 2), 0.5), y) == pytest.approx(0.5)
    assert metrics.brier_score(F.one_hot(y, 3).float(), y) == 0.0
    assert metrics.brier_score(F.one_hot(1 - y, 2).float(), y) == pytest.approx(2.0)


# ---- OOD detection --------------------------------------------------------------------------------

def rank_auroc(s_in, s_out):
    """Mann-Whitney: (rank sum of the in-distribution scores - its minimum) / (n_in n_out), ties averaged."""
    s = np.concatenate([s_in, s_out])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average the ranks of tied values
        ranks[s == v] = ranks[s == v].mean()
    n_in, n_out = len(s_in), len(s_out)
    return (ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)


def test_auroc_matches_the_rank_reference_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s_in = rng.integers(0, 12, size=137).astype(float)   # integer scores: many ties
        s_out = rng.integers(-3, 9, size=91).astype(float)
        # torchmetrics builds its ROC curve in float32
        assert metrics.auroc(s_in, s_out) == pytest.approx(rank_auroc(s_in, s_out), abs=1e-6)
    assert metrics.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert metrics.auroc([1.0, 1.0], [1.0]) == 0.5


def test_aupr_and_fpr_at_95_tpr():
    s_in, s_out = np.arange(100.0), np.arange(-10, 10) + 0.5
    # 95% of the in scores are >= 5; the OOD scores 5.5 ... 9.5 (5 of 20) pass that threshold
    assert metrics.fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(0.25)
    assert metrics.aupr_in([2.0, 3.0], [0.0, 1.0]) == 1.0
    # ranking out, in, out, in: precision 1/2 at recall 1/2, 2/4 at recall 1 -> AP 0.5
    assert metrics.aupr_in([3.0, 1.0], [4.0, 2.0]) == pytest.approx(0.5)


class Quadratic(nn.Module):
    """One logit, -||x||^2 / 2: d logsumexp / dx = -x, so the gradient-norm score is -||x||."""

    def forward(self, x):
        return -0.5 * x.flatten(1).square().sum(1, keepdim=True)


class Linear(nn.Module):
    def __init__(self, d=12, k=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, d, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1) @ self.w.T

    def energy(self, x, y=None):  # the interface the SGLD sampler uses
        return energy_from_logits(self(x), y)


def test_gradient_norm_score_on_models_with_known_gradients():
    x = torch.randn(5, 1, 2, 3)
    assert torch.allclose(metrics.score_grad_norm(Quadratic(), x), -x.flatten(1).norm(dim=1))
    lin = Linear(d=6)
    # d/dx logsumexp(W x) = W^T softmax(W x)
    expected = (lin(x).softmax(1) @ lin.w).norm(dim=1)
    assert torch.allclose(metrics.score_grad_norm(lin, x), -expected, atol=1e-6)
    assert torch.allclose(metrics.score_log_px(torch.zeros(2, 4)), torch.full((2,), np.log(4.0)))


# ---- robustness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_increases_the_loss_and_stays_in_the_ball(norm, eps):
    model = Linear(d=12, k=3)
    x = torch.rand(64, 1, 3, 4) * 1.6 - 0.8
    y = model(x).argmax(1)  # labels the model gets right
    x_adv = metrics.pgd_attack(model, x, y, eps, norm, n_steps=10, generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= -1 and x_adv.max() <= 1
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.05
    assert metrics.accuracy(model(x_adv), y) < 1.0
    assert torch.equal(metrics.pgd_attack(model, x, y, 0.0, norm), x)


def test_bpda_refinement_attacks_through_the_defence():
    """Forward: classify the SGLD-refined input. Backward: the refinement counts as the identity, so
    the gradient w.r.t. the input is the classifier's gradient at the refined point."""
    model = Linear(d=12, k=3)
    sampler = eval_jem.SGLDSampler(n_steps=3, step_size=0.05, noise_std=0.0, clamp=True)  # deterministic
    classify = eval_jem.refined_classifier(model, sampler, n_steps=3, n_chains=1)
    x = (torch.rand(8, 1, 3, 4) * 1.6 - 0.8).requires_grad_(True)
    y = torch.zeros(8, dtype=torch.long)
    (grad,) = torch.autograd.grad(F.cross_entropy(classify(x), y), x)
    x_ref = sampler(model, x, None).requires_grad_(True)
    assert not torch.allclose(x_ref, x)  # the refinement did move the input
    assert torch.allclose(classify(x), model(x_ref))
    (grad_at_ref,) = torch.autograd.grad(F.cross_entropy(model(x_ref), y), x_ref)
    assert torch.allclose(grad, grad_at_ref, atol=1e-6)


class AlwaysClassZero(nn.Module):
    def forward(self, x):
        return torch.tensor([1.0, 0.0]) + 0 * x.flatten(1)[:, :1]

    def energy(self, x, y=None):
        return energy_from_logits(self(x), y)


class SignOfMean(AlwaysClassZero):
    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([-m, m], 1)  # class 1 where the image is bright; SGLD on logsumexp keeps the sign


def test_refined_accuracy_is_measured_on_a_random_subset_of_a_class_sorted_split():
    """This CIFAR-10 copy's test split is sorted by class: the first 1,000 images are all planes.
    On a sorted two-class split a model that always answers class 0 is right on every one of the
    first images and on about half of a random subset."""
    x = torch.cat([torch.full((100, 1, 2, 2), -0.5), torch.full((100, 1, 2, 2), 0.5)])
    y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    m = SimpleNamespace(model=AlwaysClassZero(), sampler=eval_jem.SGLDSampler(n_steps=2, noise_std=0.0),
                        cfg={"sigma": 0.0}, label="zero", describe=dict)
    args = SimpleNamespace(seed=0, batch_size=32, n_refine=50, refine_steps=2, refine_chains=1)
    r = eval_jem.eval_accuracy([m], x, y, args)["models"]["zero"]
    assert r["acc"] == 0.5 and 0.3 < r["acc_clean_same_images"] < 0.7  # the first 50: 1.0
    assert r["acc_refined"] == r["acc_clean_same_images"]  # no gradient, no noise: the chains stay put
    # a model right on every image, refined: the refined images are scored against their own labels
    m.model = SignOfMean()
    assert eval_jem.eval_accuracy([m], x, y, args)["models"]["zero"]["acc_refined"] == 1.0


def test_score_histogram_survives_scores_a_few_ulps_apart():
    # max p(y|x) of a confident model on constant images: float32 values 1 and 1 - 1 ulp, on which
    # a 60-bin histogram in float32 raises (it crashed the ood mode of a real MNIST evaluation)
    import matplotlib.pyplot as plt
    scores = np.array([1.0, 1.0, np.nextafter(np.float32(1), np.float32(0))], dtype=np.float32)
    fig, ax = plt.subplots()
    eval_jem.score_hist(ax, scores)
    assert sum(p.get_height() for p in ax.patches) > 0
    plt.close(fig)


def test_ood_sets_are_converted_to_the_in_distribution_shape():
    rgb = torch.rand(4, 3, 32, 32) * 2 - 1
    grey = eval_jem.match_shape(rgb, dataset_info("mnist"))
    assert grey.shape == (4, 1, 28, 28) and grey.min() >= -1 and grey.max() <= 1
    assert eval_jem.match_shape(grey, dataset_info("cifar10")).shape == (4, 3, 32, 32)


# ---- the command ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(data_root, tmp_path_factory):
    """A 3-step JEM checkpoint and a randomly initialised (untrained) judge of MNIST."""
    tmp = tmp_path_factory.mktemp("eval")
    train_jem.main(tiny_run_args(data_root, tmp, "e", "--max-iters", "3", "--pxy-weight", "1"))
    judge = tmp / "judge.pt"
    config = {"arch": JUDGE_ARCH, "dataset": "mnist", "width": 4}
    save_atomic({"format_version": FORMAT_VERSION, "config": config,
                 "model": JudgeCNN(1, 10, 28, width=4).state_dict()}, str(judge))
    return tmp / "ck" / "e" / "last.pt", judge


def test_eval_all_modes_on_a_tiny_checkpoint(tiny, data_root, tmp_path):
    ckpt, judge = tiny
    out = tmp_path / "res"
    r = run_script("eval_jem.py", "--ckpt", ckpt, ckpt, "--labels", "a", "b", "--mode", *eval_jem.MODES,
                   "--data-root", data_root, "--out", out, "--device", "cpu", "--n-test", 60,
                   "--n-refine", 20, "--refine-steps", 2, "--n-ood", 30, "--ood", "fashion_mnist", "uniform",
                   "interp", "--n-robust", 20, "--pgd-steps", 2, "--eps-linf", 0, 0.3, "--norms", "linf",
                   "--judge", judge, "--n-samples", 40, "--sample-steps", 2, "--batch-size", 32,
                   "--no-inception")  # Inception has its own test: 0.2 s an image on a CPU
    assert r.returncode == 0, r.stderr
    acc = json.load(open(out / "accuracy.json"))["models"]
    assert set(acc) == {"a", "b"} and 0 <= acc["a"]["acc"] <= 1 and acc["a"]["acc"] == acc["b"]["acc"]
    cal = json.load(open(out / "calibration.json"))
    assert cal["protocol"]["n_test"] == 60 and sum(cal["models"]["a"]["bins"]["count"]) == 60
    ood = json.load(open(out / "ood.json"))["models"]["a"]["sets"]
    assert set(ood) == {"fashion_mnist", "uniform", "interp"}
    assert set(ood["uniform"]) == set(eval_jem.SCORES) and 0 <= ood["uniform"]["log_px"]["auroc"] <= 1
    rob = json.load(open(out / "robustness.json"))["models"]["a"]["robust_acc"]
    assert set(rob) == {"linf/none", "linf/sgld-2"} and rob["linf/none"][1] <= rob["linf/none"][0]
    samples = json.load(open(out / "samples.json"))["models"]["a"]
    fresh = samples["fresh"]
    assert (fresh["n"], fresh["init"], fresh["steps"]) == (40, "noise", 2) and np.isfinite(fresh["fid_judge"])
    assert "replay buffer" in samples["replay_buffer"]["what"]
    for png in ("calibration", "ood_hist", "robustness", "samples_fresh_a", "samples_buffer_b"):
        assert (out / f"{png}.png").stat().st_size > 1000
    # one checkpoint given twice: the same noise, chains and attack starts, so the same figures
    b = {m: json.load(open(out / f"{m}.json"))["models"]["b"] for m in ("accuracy", "robustness", "samples")}
    assert acc["a"]["acc_noise"] == b["accuracy"]["acc_noise"]
    assert acc["a"]["acc_refined"] == b["accuracy"]["acc_refined"]
    assert rob == b["robustness"]["robust_acc"]
    assert fresh["fid_judge"] == b["samples"]["fresh"]["fid_judge"]


def test_a_checkpoints_figures_do_not_depend_on_the_rest_of_the_call(tiny, data_root, tmp_path):
    ckpt, judge = tiny
    common = ["--data-root", data_root, "--device", "cpu", "--n-test", 40, "--n-refine", 20,
              "--refine-steps", 2, "--judge", judge, "--n-samples", 30, "--sample-steps", 3, "--batch-size", 16,
              "--no-inception"]
    cli = lambda *argv: run(lambda: eval_jem.main([str(a) for a in argv + tuple(common)]))  # noqa: E731
    cli("--ckpt", ckpt, ckpt, "--labels", "a", "b", "--mode", "accuracy", "samples", "--out", tmp_path / "both")
    cli("--ckpt", ckpt, "--labels", "b", "--mode", "samples", "--out", tmp_path / "alone")
    both = json.load(open(tmp_path / "both" / "samples.json"))["models"]["b"]["fresh"]
    alone = json.load(open(tmp_path / "alone" / "samples.json"))["models"]["b"]["fresh"]
    assert both["fid_judge"] == alone["fid_judge"] and both["judge_acc"] == alone["judge_acc"]
    per_class = both["judge_acc_per_class"]  # 30 samples, classes in turn: 3 of each
    assert len(per_class) == 10 and abs(sum(per_class) / 10 - both["judge_acc"]) < 1e-6
    assert all(abs(3 * a - round(3 * a)) < 1e-6 for a in per_class)  # k of 3 right


def test_kept_history_gives_curves_of_accuracy_samples_and_gap(data_root, tmp_path):
    """--keep-every keeps the run at those steps; plot_run reads them back as one curve, with the
    saved-buffer scores and the gap the run logged at each of them."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "h", "--max-iters", "6", "--keep-every", "2"))
    run_dir = tmp_path / "ck" / "h"
    kept = sorted((run_dir / "history").glob("*.pt"))
    assert [p.name for p in kept] == ["step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    at_6 = torch.load(kept[-1], weights_only=True)
    assert at_6["step"] == 6 and all(torch.equal(at_6["model"][k], v) for k, v in last["model"].items())
    assert torch.equal(at_6["buffer"]["x"], last["buffer"]["x"])
    judge = tmp_path / "judge.pt"
    save_atomic({"format_version": FORMAT_VERSION, "config": {"arch": JUDGE_ARCH, "dataset": "mnist", "width": 4},
                 "model": JudgeCNN(1, 10, 28, width=4).state_dict()}, str(judge))
    args = ["--ckpt", *kept, "--judge", judge, "--data-root", data_root, "--n-test", 50, "--n-samples", 40,
            "--sample-steps", 2, "--device", "cpu", "--out", tmp_path / "c"]
    r = subprocess.run([sys.executable, "-m", "tools.plot_run", *map(str, args)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    curves = json.load(open(tmp_path / "c" / "run_curves.json"))["runs"]
    (points,) = curves.values()
    logged = {m["step"]: m["gap"] for m in map(json.loads, open(run_dir / "metrics.jsonl")) if m.get("kind") == "train"}
    assert [p["step"] for p in points] == [2, 4, 6]
    assert [p["gap"] for p in points] == [logged[2], logged[4], logged[6]]
    for p in points:
        assert np.isfinite(p["buffer_fid_judge"]) and 0 <= p["buffer_judge_acc"] <= 1 and 0 <= p["acc"] <= 1
        assert p["fid_inception"] is None  # only with --inception
    assert (tmp_path / "c" / "run_curves.png").stat().st_size > 1000


def test_curves_with_the_standard_inception_fid_sit_above_its_real_floor(tiny, weights, data_root, tmp_path):
    """plot_run --inception adds the Inception FID of fresh and buffer samples per checkpoint, and
    the real-vs-real floor at the same n: a 3-step model's samples are far above it."""
    ckpt, judge = tiny
    args = ["--ckpt", ckpt, "--judge", judge, "--data-root", data_root, "--n-test", 20, "--n-samples", 20,
            "--sample-steps", 2, "--device", "cpu", "--inception", "--out", tmp_path / "c"]
    r = subprocess.run([sys.executable, "-m", "tools.plot_run", *map(str, args)], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env={**os.environ, "JEM_INCEPTION": str(weights)})
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "c" / "run_curves.json"))
    floor = result["protocol"]["real_train_vs_test"]
    ((point,),) = result["runs"].values()
    assert 0 < floor["fid_inception"] < point["fid_inception"] and floor["fid_inception"] < point["buffer_fid_inception"]
    assert 0 < floor["fid_judge"] < point["fid_judge"]


def test_probe_energy_scores_the_test_images_and_the_saved_chains(tiny, data_root, tmp_path):
    """tools.probe_energy as a user runs it: its rows are the energies and pixels of the very test
    images and buffer chains it names, each continued chain row follows on from the one before, and
    bad input is one line."""
    ckpt, _ = tiny
    args = ["--ckpt", ckpt, "--data-root", data_root, "--n", 20, "--device", "cpu", "--out", tmp_path / "p.json"]
    r = subprocess.run([sys.executable, "-m", "tools.probe_energy", *map(str, args), "--steps", "2", "5"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "p.json"))["rows"]
    assert [name.split(" (")[0] for name in rows] == [
        "test images", "test images + training noise", "saved chains", "saved chains + 2 SGLD steps",
        "saved chains + 5 SGLD steps", "test images + 2 SGLD steps", "test images + 5 SGLD steps"]
    m = eval_jem.Evaluated(str(ckpt), None, "cpu")
    x_np, y_np, _ = load_split("mnist", "test", data_root)
    keep = eval_jem.subset(len(x_np), 20, 0).numpy()
    y = torch.from_numpy(y_np[keep]).long() if m.ckpt["buffer"]["n_classes"] else None
    with torch.no_grad():
        e = energy_from_logits(m.model(eval_jem.images_to_float(x_np[keep], "cpu")), y)
    assert abs(rows["test images"]["energy_mean"] - e.mean().item()) < 1e-4
    chains, _ = eval_jem.buffer_images(m, 20, torch.Generator().manual_seed(0))
    assert abs(rows["saved chains"]["pixel_mean"] - chains.mean().item()) < 1e-6
    assert rows["saved chains + 2 SGLD steps"] != rows["saved chains + 5 SGLD steps"]
    bad = subprocess.run([sys.executable, "-m", "tools.probe_energy", *map(str, args), "--steps", "0"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert one_line_error(bad, "--steps"), bad.stderr


def test_probe_constants_ranks_grey_images_among_the_test_images(tiny, data_root, tmp_path):
    """tools.probe_constants as a user runs it: each row's log p(x) is that of the grey image it names,
    split into its largest logit and the classes' share, and its share of test images is that of the
    same random test images that score below it."""
    ckpt, _ = tiny
    args = ["--ckpt", ckpt, "--data-root", data_root, "--n", 30, "--levels", 5, "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "tools.probe_constants", *map(str, args), "--out", tmp_path / "c.json"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "c.json"))["rows"]
    assert [row["c"] for row in rows] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    m = eval_jem.Evaluated(str(ckpt), None, "cpu")
    x_np, _, _ = load_split("mnist", "test", data_root)
    with torch.no_grad():
        test = torch.logsumexp(m.model(eval_jem.random_images(x_np, 30, 0, "cpu")), 1)
        grey_logits = m.model(torch.full((1, 1, 28, 28), 0.5))
    grey = torch.logsumexp(grey_logits, 1).item()
    assert abs(rows[3]["log_px"] - grey) < 1e-4 and abs(rows[3]["max_logit"] - grey_logits.max().item()) < 1e-4
    assert 0 <= rows[3]["class_share"] <= math.log(10) + 1e-6
    assert rows[3]["test_below"] == pytest.approx((test < rows[3]["log_px"]).float().mean().item())
    bad = subprocess.run([sys.executable, "-m", "tools.probe_constants", *map(str, args[:-2]), "--levels", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert one_line_error(bad, "--levels"), bad.stderr


def one_line_error(r, message):
    lines = r.stderr.strip().splitlines()
    return r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_bad_input_gives_one_line_errors(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    r = run_script("eval_jem.py", "--ckpt", tmp_path / "absent.pt")  # as a user sees it
    assert one_line_error(r, "does not exist"), r.stderr

    def error_of(*argv):  # the rest in-process: the same cli.run path, without a torch import each
        with pytest.raises(SystemExit) as exit_info:
            run(lambda: eval_jem.main([str(a) for a in argv]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:")
        return lines[0]
    assert "unknown mode 'fid'" in error_of("--ckpt", ckpt, "--mode", "accuracy", "fid")
    assert "unknown OOD set 'celeba'" in error_of("--ckpt", ckpt, "--mode", "ood", "--ood", "svhn", "celeba")
    assert "in-distribution" in error_of("--ckpt", ckpt, "--mode", "ood", "--ood", "mnist")
    assert "needs a judge" in error_of("--ckpt", ckpt, "--mode", "samples", "--judge", tmp_path / "no.pt")


def test_compare_runs_gives_the_time_per_step_without_start_up_and_evaluations(tmp_path):
    """0.3 s a step, logged every 5 steps with elapsed_s rounded as train_jem writes it; 4 s of
    start-up before the first line and a 10 s evaluation after step 50 must not count."""
    run_dir = tmp_path / "fast"
    run_dir.mkdir()
    lines, t = [], 4.0
    for step in range(5, 205, 5):
        t += 5 * 0.3 + (10.0 if step == 55 else 0.0)
        lines.append({"step": step, "kind": "train", "elapsed_s": round(t, 1), "loss": 1.0, "acc": 0.5})
        if step == 50:
            lines.append({"step": step, "kind": "valid", "valid_acc": 0.9, "elapsed_s": round(t, 1)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    from tools.compare_runs import seconds_per_step
    assert seconds_per_step(lines) == pytest.approx(0.3, rel=0.01)
    r = subprocess.run([sys.executable, "-m", "tools.compare_runs", str(run_dir)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "| fast | 0.300 |" in r.stdout


def test_calibration_and_max_prob_read_the_learned_temperature(data_root, tmp_path):
    """A --learn-temperature checkpoint: ECE and NLL are those of softmax(f / T), T is reported."""
    train_jem.main(tiny_run_args(data_root, tmp_path, "t", "--max-iters", "3", "--learn-temperature"))
    ckpt = tmp_path / "ck" / "t" / "last.pt"
    state = load_checkpoint(str(ckpt))  # three steps barely move T: set one that shows
    state["model"]["log_temperature"] = torch.tensor(-2.0)
    save_checkpoint(state, str(ckpt))
    r = run_script("eval_jem.py", "--ckpt", ckpt, "--mode", "calibration", "ood", "--data-root", data_root,
                   "--out", tmp_path / "res", "--device", "cpu", "--n-ood", 30, "--ood", "uniform", "--no-inception")
    assert r.returncode == 0, r.stderr
    cal = json.load(open(tmp_path / "res" / "calibration.json"))["models"]["t/last"]
    model = eval_jem.model_from_checkpoint(load_checkpoint(str(ckpt)), dataset_info("mnist"), "cpu")
    assert cal["temperature"] == pytest.approx(np.exp(-2.0))
    x, y, _ = load_split("mnist", "test", data_root)  # the whole test set, in order
    with torch.no_grad():
        logits = model(eval_jem.images_to_float(x, "cpu"))
    y = torch.from_numpy(y).long()
    assert cal["nll"] == pytest.approx(metrics.nll(model.class_logits(logits).detach(), y), rel=1e-4)
    assert cal["nll"] != pytest.approx(metrics.nll(logits, y), rel=1e-4)


def test_random_images_are_random_on_a_class_sorted_split_and_keep_their_labels():
    """On a split sorted by class (this CIFAR-10 copy's test split is) the first 50 of 1,000 images
    are one class; random_images draws from most classes, and each image keeps its own label."""
    y_np = np.repeat(np.arange(10), 100)
    x_np = np.broadcast_to(y_np[:, None, None, None] * 20, (1000, 4, 4, 1)).astype(np.uint8)
    x, y = eval_jem.random_images(x_np, 50, 0, "cpu", y_np)
    assert len(set(y.tolist())) >= 8
    assert torch.allclose((x[:, 0, 0, 0] + 1) * 127.5, y.float() * 20)
    assert torch.equal(eval_jem.random_images(x_np, 50, 0, "cpu"), x)  # without labels: the same draw
