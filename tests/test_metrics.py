"""metrics.py's detection metrics, now torchmetrics', against the by-hand code they replaced (copied
below from metrics.py as of commit bab7460), and where torchmetrics' calibration error differs from
the ECE that stays by hand."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

import metrics
from conftest import REPO

# torchmetrics builds its curves in float32 (the old code used float64); the README quotes 3 decimals
TOL = 1e-6


# ---- the reference: metrics.py's by-hand detection metrics before torchmetrics --------------------

def ref_roc_points(scores_in, scores_out):
    scores = np.concatenate([scores_in, scores_out]).astype(np.float64)
    is_in = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_in = scores[order], is_in[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tp = np.cumsum(is_in)[last_of_tie]
    fp = last_of_tie + 1 - tp
    return tp, fp


def ref_auroc(scores_in, scores_out):
    tp, fp = ref_roc_points(scores_in, scores_out)
    tpr = np.r_[0.0, tp / len(scores_in)]
    fpr = np.r_[0.0, fp / len(scores_out)]
    return float(np.trapezoid(tpr, fpr))


def ref_aupr_in(scores_in, scores_out):
    tp, fp = ref_roc_points(scores_in, scores_out)
    precision, recall = tp / (tp + fp), tp / len(scores_in)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ref_fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    tp, fp = ref_roc_points(scores_in, scores_out)
    first = np.searchsorted(tp / len(scores_in), tpr - 1e-12)
    return float(fp[first] / len(scores_out))


def assert_same_as_reference(s_in, s_out, tprs=(0.95,)):
    assert metrics.auroc(s_in, s_out) == pytest.approx(ref_auroc(s_in, s_out), abs=TOL)
    assert metrics.aupr_in(s_in, s_out) == pytest.approx(ref_aupr_in(s_in, s_out), abs=TOL)
    for tpr in tprs:
        assert metrics.fpr_at_tpr(s_in, s_out, tpr) == pytest.approx(ref_fpr_at_tpr(s_in, s_out, tpr), abs=TOL)


# ---- detection ------------------------------------------------------------------------------------

def test_detection_metrics_on_a_hand_computed_case():
    s_in, s_out = [3.0, 2.0, 2.0, 1.0], [2.0, 1.0, 0.0]
    # pairs (in, out) ranked right, ties one half: 3 beats all 3; each 2 beats 1 and 0 and ties 2;
    # 1 beats 0 and ties 1: (3 + 2 * 2.5 + 1.5) / 12
    assert metrics.auroc(s_in, s_out) == pytest.approx(9.5 / 12, abs=TOL)
    # thresholds 3, 2, 1, 0: (TP, FP) = (1, 0), (3, 1), (4, 2), (4, 3);
    # AP = 1/4 * 1 + 2/4 * 3/4 + 1/4 * 4/6 + 0 * 4/7
    assert metrics.aupr_in(s_in, s_out) == pytest.approx(0.25 + 0.375 + 1 / 6, abs=TOL)
    assert metrics.fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(2 / 3, abs=TOL)  # threshold 1
    assert metrics.fpr_at_tpr(s_in, s_out, 0.75) == pytest.approx(1 / 3, abs=TOL)  # 2 reaches 3/4 exactly
    assert metrics.fpr_at_tpr(s_in, s_out, 0.5) == pytest.approx(1 / 3, abs=TOL)
    assert_same_as_reference(s_in, s_out, tprs=(0.5, 0.75, 0.95))


def test_detection_metrics_match_the_reference_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    for n_in, n_out in [(1, 1), (2, 3), (20, 7), (100, 40), (137, 91), (1000, 300)]:
        # TPR steps of 1/20, 1/100, ... hit 0.95 exactly: the threshold that reaches it counts
        tprs = (0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
        assert_same_as_reference(rng.integers(0, 12, n_in).astype(float),  # many ties
                                 rng.integers(-3, 9, n_out).astype(float), tprs)
        assert_same_as_reference(rng.normal(1, 1, n_in).astype(np.float32),
                                 rng.normal(0, 1, n_out).astype(np.float32), tprs)
        assert_same_as_reference(np.full(n_in, 2.0), np.full(n_out, 2.0), tprs)  # one big tie


def test_detection_metrics_match_the_reference_at_the_readme_scale():
    """10,000 test images of 10 classes against 10,000 OOD images, the scores eval_jem.py computes:
    log p(x) of order 20-60 (a sigmoid would make them all 1.0), max p(y|x) with many float32 ties at
    1.0, and an input-gradient score in the hundreds below zero."""
    g = torch.Generator().manual_seed(0)
    logits_in = 4 * torch.randn(10_000, 10, generator=g) + 3 * torch.randn(10_000, 1, generator=g) + 30
    logits_in[:3000, 0] += 25  # confident predictions: max p(y|x) == 1.0 in float32
    logits_out = 3.5 * torch.randn(10_000, 10, generator=g) + 28
    logits_out[:1000, 0] += 25
    grad_in, grad_out = -300 * torch.rand(10_000, generator=g), -50 - 300 * torch.rand(10_000, generator=g)
    for s_in, s_out in [(metrics.score_log_px(logits_in), metrics.score_log_px(logits_out)),
                        (metrics.score_max_prob(logits_in), metrics.score_max_prob(logits_out)),
                        (grad_in, grad_out)]:
        assert_same_as_reference(s_in.numpy(), s_out.numpy(), tprs=(0.95,))
    assert (metrics.score_max_prob(logits_in) == 1).sum() > 2000  # the ties were there


def test_scores_outside_0_1_are_ranked_not_squashed():
    """torchmetrics takes predictions outside [0, 1] for logits and applies a sigmoid: in float32,
    sigmoid(30) == sigmoid(60) == 1.0, and the AUROC of raw scores would be wrong. Ranks are not."""
    s_in, s_out = torch.tensor([40.0, 50.0, 60.0]), torch.tensor([30.0, 45.0, 55.0])
    target = torch.tensor([1, 1, 1, 0, 0, 0])
    assert binary_auroc(torch.cat([s_in, s_out]), target).item() == 0.5  # what a raw call gives
    assert metrics.auroc(s_in, s_out) == pytest.approx(6 / 9, abs=TOL)   # 1 + 2 + 3 of 9 pairs
    assert metrics.auroc(-1000 * s_out, -1000 * s_in) == pytest.approx(6 / 9, abs=TOL)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_detection_metrics_take_tensors_on_any_device(device):
    g = torch.Generator().manual_seed(1)
    s_in, s_out = torch.randn(500, generator=g).round(decimals=1) + 1, torch.randn(300, generator=g).round(decimals=1)
    for f in (metrics.auroc, metrics.aupr_in, metrics.fpr_at_tpr):
        assert f(s_in.to(device), s_out.to(device)) == pytest.approx(f(s_in.numpy(), s_out.numpy()), abs=TOL)
    assert metrics.auroc([1.0, 2.0], [0.0]) == 1.0  # and plain lists


def test_import_metrics_does_not_import_torchmetrics():
    code = "import sys, metrics; assert 'torchmetrics' not in sys.modules, 'torchmetrics imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- calibration: ECE stays by hand ---------------------------------------------------------------

def torchmetrics_ece(probs, y, n_bins=15):
    return multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=n_bins, norm="l1").item()


def test_ece_agrees_with_torchmetrics_off_the_bin_edges():
    g = torch.Generator().manual_seed(2)
    for scale in (0.5, 2.0, 6.0):  # from under- to over-confident; no confidence reaches 1.0
        logits = scale * torch.randn(10_000, 10, generator=g, dtype=torch.float64)
        right = torch.rand(10_000, generator=g) < 0.7
        y = torch.where(right, logits.argmax(1), torch.randint(0, 10, (10_000,), generator=g))
        probs = logits.softmax(1)
        conf = probs.max(1).values
        assert not torch.isin(conf * 15, torch.arange(16.0, dtype=torch.float64)).any() and conf.max() < 1
        assert metrics.expected_calibration_error(probs, y) == pytest.approx(torchmetrics_ece(probs, y), abs=TOL)


def test_ece_differs_from_torchmetrics_on_the_bin_edges():
    """Why ECE stays by hand: torchmetrics' bins are [b/B, (b+1)/B) plus one for confidence exactly
    1.0; ours (Guo et al. 2017, and eval_jem.py's reliability diagram) are (b/B, (b+1)/B]."""
    # 9000 predictions at confidence 1.0 (2 wrong) and 500 at 0.95 (all right) share our last bin,
    # (14/15, 1]: |9498 - 9475| / 9500. torchmetrics splits them: (2 + 500 * 0.05) / 9500.
    probs = torch.tensor([[1.0, 0.0]] * 9000 + [[0.95, 0.05]] * 500)
    y = torch.tensor([1, 1] + [0] * 9498)
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(23 / 9500, abs=TOL)
    assert torchmetrics_ece(probs, y) == pytest.approx(27 / 9500, abs=TOL)
    # confidence 0.5 on an edge of 10 bins: ours in (0.4, 0.5], torchmetrics' in [0.5, 0.6) with 0.55
    probs, y = torch.tensor([[0.5, 0.3, 0.2], [0.55, 0.45, 0.0]]), torch.tensor([0, 1])
    assert metrics.expected_calibration_error(probs, y, n_bins=10) == pytest.approx((0.5 + 0.55) / 2, abs=TOL)
    assert torchmetrics_ece(probs, y, n_bins=10) == pytest.approx(abs(0.5 - 0.525), abs=TOL)


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at():
    """Labels drawn from softmax(f / 0.5): the fitted T is 0.5 within sampling error, and it is the
    NLL's minimum (1 % either way costs NLL)."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 10, generator=g)
    y = torch.multinomial((logits / 0.5).softmax(1), 1, generator=g).squeeze(1)
    t = metrics.fit_temperature(logits, y)
    assert t == pytest.approx(0.5, rel=0.03)
    best = metrics.nll(logits / t, y)
    assert metrics.nll(logits / (0.99 * t), y) > best and metrics.nll(logits / (1.01 * t), y) > best
    assert metrics.fit_temperature(logits, y) == t  # a pure function of its inputs
