"""The metrics eval_jem.py reports, each a small function that states its protocol.

Numbers in, numbers out: classification metrics take logits or probabilities and labels, detection
metrics take two arrays of scores (in-distribution and out-of-distribution, higher = "more
in-distribution"), and the two model-facing pieces (the input-gradient score and PGD) take a model
that maps images in [-1, 1] to logits. tests/test_eval.py checks each against a known answer.

The detection metrics come from torchmetrics (imported when first used, so `import metrics` stays
cheap); calibration stays by hand, as torchmetrics bins differently (see expected_calibration_error).
tests/test_metrics.py holds both against the earlier by-hand code.
"""
import numpy as np
import torch
import torch.nn.functional as F


# ---- classification and calibration -------------------------------------------------------------

def accuracy(logits, y):
    """Fraction of examples whose arg-max logit is the label."""
    return (logits.argmax(1) == y).float().mean().item()


def nll(logits, y):
    """Mean negative log-likelihood -log p(y|x) in nats (the test cross-entropy)."""
    return F.cross_entropy(logits, y).item()


def fit_temperature(logits, y):
    """The T > 0 that minimises the NLL of softmax(logits / T): temperature scaling (Guo et al.
    2017). The NLL is convex in 1 / T, so L-BFGS on log T finds its minimum where one exists: not
    when every arg-max is right (the NLL then falls as T -> 0; train_jem.clean_image_temperature
    refuses such sets). float64 and a fixed start make the fit a pure function of its inputs."""
    logits, y = logits.detach().double().cpu(), y.cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), y)
        loss.backward()
        return loss
    opt.step(closure)
    return log_t.exp().item()


def brier_score(probs, y):
    """Multi-class Brier score (Brier 1950): mean over examples of sum_k (p_k - [y = k])^2.

    In [0, 2]; 0 is a perfect, certain classifier. (Some papers divide by the number of classes.)"""
    onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(1).mean().item()


def calibration_bins(probs, y, n_bins=15):
    """Reliability-diagram statistics over equal-width confidence bins.

    The confidence of a prediction is its max probability; bin b holds confidences in
    (b / n_bins, (b + 1) / n_bins] (the first bin also holds 0). Returns per-bin counts, mean
    confidence and accuracy (NaN for empty bins) as numpy arrays, and the bin edges."""
    conf, pred = probs.max(1)
    conf, correct = conf.double().cpu().numpy(), (pred == y).double().cpu().numpy()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(probs, y, n_bins=15):
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum over equal-width bins of
    (n_b / N) * |accuracy_b - mean confidence_b|, with the bins of `calibration_bins`.

    By hand: torchmetrics' multiclass_calibration_error (norm="l1") closes its bins on the left,
    [b / n_bins, (b + 1) / n_bins), and gives a confidence of exactly 1.0 (common in float32 for a
    confident classifier) a bin of its own, where Guo et al. and the reliability diagram use the
    right-closed bins above. Off the bin edges the two agree."""
    b = calibration_bins(probs, y, n_bins)
    filled = b["count"] > 0
    gaps = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float((b["count"][filled] * gaps).sum() / b["count"].sum())


# ---- out-of-distribution detection --------------------------------------------------------------

def score_log_px(logits):
    """log p(x) + log Z = logsumexp_y f(x)[y] = -E(x): JEM's unnormalised density (paper, table 3)."""
    return torch.logsumexp(logits, 1)


def score_max_prob(logits):
    """max_y p(y|x): the usual classifier baseline (Hendrycks & Gimpel 2017)."""
    return logits.softmax(1).max(1).values


def score_grad_norm(model, x):
    """-|| d log p(x) / dx ||_2 per example (JEM, section 5.2, "approximate mass"): data sit near
    modes of the density, where the input gradient is small, so a smaller norm is more in-distribution.
    log Z does not depend on x, so the gradient of logsumexp f(x) is that of log p(x)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.logsumexp(model(x), 1).sum(), x)
    return -grad.flatten(1).norm(dim=1)


def _ranks_and_labels(scores_in, scores_out):
    """Both sets' scores as torchmetrics' (preds, target), in-distribution as the positive class (1).

    Each score is replaced by its dense rank, scaled into [0, 1): torchmetrics reads predictions outside
    [0, 1] as logits and applies a sigmoid, which in floating point merges large scores into ties
    (sigmoid(40) == sigmoid(50) == 1.0). The detection metrics depend only on the order of the scores,
    ties included, and ranks keep it exactly. Takes arrays, lists or tensors (on any device)."""
    s_in = torch.as_tensor(scores_in, dtype=torch.float64).flatten()
    s_out = torch.as_tensor(scores_out, dtype=torch.float64, device=s_in.device).flatten()
    scores = torch.cat([s_in, s_out])
    rank = torch.unique(scores, sorted=True, return_inverse=True)[1]
    target = torch.cat([torch.ones_like(s_in, dtype=torch.long), torch.zeros_like(s_out, dtype=torch.long)])
    return rank.double() / len(scores), target


def auroc(scores_in, scores_out):
    """Area under the ROC curve (trapezoids, so ties count one half): the probability that a random
    in-distribution input scores higher than a random OOD one. 0.5 is chance, 1 perfect.
    torchmetrics' binary_auroc (exact, every distinct score a threshold)."""
    from torchmetrics.functional.classification import binary_auroc
    return binary_auroc(*_ranks_and_labels(scores_in, scores_out)).item()


def aupr_in(scores_in, scores_out):
    """Area under the precision-recall curve with in-distribution as the positive class ("AUPR-In"),
    as average precision: sum over thresholds of (recall step) * precision, no interpolation
    (torchmetrics' binary_average_precision, as scikit-learn's). Its chance level is the fraction of
    in-distribution inputs, so it depends on the sizes of the two sets."""
    from torchmetrics.functional.classification import binary_average_precision
    return binary_average_precision(*_ranks_and_labels(scores_in, scores_out)).item()


def fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    """The fraction of OOD inputs accepted at the highest threshold that accepts at least `tpr` of
    the in-distribution inputs (FPR at 95% TPR; lower is better): a point of the ROC curve, not
    interpolated between thresholds. From torchmetrics' binary_roc, whose FPR rises with its TPR."""
    from torchmetrics.functional.classification import binary_roc
    fpr, tpr_curve, _ = binary_roc(*_ranks_and_labels(scores_in, scores_out))
    return fpr[tpr_curve >= tpr].min().item()


# ---- adversarial robustness ---------------------------------------------------------------------

def _project(delta, eps, norm):
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return delta * (eps / n).clamp(max=1.0)


def pgd_attack(classify, x, y, eps, norm="linf", n_steps=20, step_size=None, generator=None):
    """Untargeted PGD (Madry et al. 2018) on the cross-entropy of `classify(x) -> logits`.

    eps is in the model's pixel units ([-1, 1] images: 2x the usual [0, 1] figure; eval_jem.py
    converts). Random start in the ball, `n_steps` steps of size step_size (default 2.5 eps /
    n_steps) along the sign of the gradient (L-inf) or the normalised gradient (L2), projection on
    the ball and on [-1, 1] after each step. Returns the adversarial images (detached).
    `classify` may be stochastic or non-differentiable inside (see eval_jem.refine_bpda)."""
    if eps == 0:
        return x.detach().clone()
    step_size = 2.5 * eps / n_steps if step_size is None else step_size
    shape = (-1, *[1] * (x.dim() - 1))
    noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
    if norm == "l2":  # a random direction, at a random radius inside the ball
        noise = noise / noise.flatten(1).norm(dim=1).view(shape)
        noise = noise * torch.rand(len(x), generator=generator, device=x.device).view(shape)
    x_adv = (x + eps * noise).clamp(-1, 1).detach()
    for _ in range(n_steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(classify(x_adv), y, reduction="sum"), x_adv)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            x_adv = x + _project(x_adv + step_size * step - x, eps, norm)
            x_adv = x_adv.clamp(-1, 1).detach()
    return x_adv
