"""Measure what JEM claims, on one or more checkpoints, with the protocol written into the results.

    python eval_jem.py --ckpt checkpoints/mnist/last.pt checkpoints/mnist-baseline/last.pt \\
        --mode accuracy calibration ood robustness samples

Give a JEM checkpoint and its plain-classifier baseline (the same script with --px-weight 0
--pxy-weight 0) together: every figure then shows both. Modes:

  accuracy     test accuracy: clean, with the training input noise (sigma of the config), and after
               --refine-steps SGLD steps on E(x) started at the test image
  calibration  ECE over --ece-bins equal-width confidence bins, NLL, Brier score; reliability diagram
  ood          AUROC, AUPR-In and FPR at 95% TPR of three scores (log p(x) = logsumexp f(x),
               max p(y|x), -||d log p(x)/dx||) against OOD sets (--ood); score histograms
  robustness   accuracy under untargeted PGD, L-inf and L2, at several radii, without and with the
               SGLD-refinement defence (attacked through it with BPDA); robust-accuracy curves
  samples      FID and Inception Score of fresh class-conditional SGLD samples and of the saved
               replay buffer (labelled as such), with the penultimate features / predictions of a
               judge classifier (tools/train_classifier.py); standard Inception FID and KID (inception.py)

Writes OUT/<mode>.json (the protocol and one entry per checkpoint) and OUT/<mode>*.png, where OUT
defaults to a `results` folder next to the first checkpoint. Pixels are in [-1, 1] inside the
models; attack radii are given, as in the literature, in [0, 1] pixel units.
"""
import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metrics  # noqa: E402
from checkpoint import load_checkpoint, load_judge, model_from_checkpoint, sgld_step_rule  # noqa: E402
from cli import UsageError, resolve_device, run  # noqa: E402
from data import DATASETS, DataError, dataset_info, load_split, save_grid, to_float  # noqa: E402
from inception import InceptionFeatures, inception_features, inception_scores  # noqa: E402
from sgld import ReplayBuffer, SGLDSampler, class_conditional_samples  # noqa: E402

MODES = ("accuracy", "calibration", "ood", "robustness", "samples")
SYNTHETIC_OOD = ("uniform", "gaussian", "constant", "interp")
SCORES = ("log_px", "max_prob", "grad_norm")
# attack radii in [0, 1] pixel units: the usual grids for digits and for natural images
DEFAULT_EPS = {"linf": {"digits": [0.0, 0.05, 0.1, 0.2, 0.3], "natural": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255]},
               "l2": {"digits": [0.0, 0.5, 1.0, 2.0, 3.0], "natural": [0.0, 0.25, 0.5, 1.0, 2.0]}}
NOISE_START_STEPS = 200  # as sample.py: fresh chains from noise need far more steps than from the buffer


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", nargs="+", required=True, help="one or more checkpoints of train_jem.py, all of one dataset "
                                              "(e.g. a JEM run and its baseline) (required)")
    a("--labels", nargs="+", help="a name per checkpoint for tables and figures (default: <run>/<file>)")
    a("--mode", nargs="+", default=["accuracy", "calibration"], metavar="MODE",
      help=f"one or more of {', '.join(MODES)} (default: accuracy calibration)")
    a("--out", help="results folder (default: 'results' next to the first checkpoint)")
    a("--data-root", help="folder holding <dataset>/<split>.npz (default: the checkpoint's own)")
    a("--n-test", type=int, help="test images for accuracy and calibration (default: the whole test set)")
    a("--batch-size", type=int, default=250, help="images per forward pass (default: %(default)s)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    a("--seed", type=int, default=0, help="seeds subsets, noise, chains and attacks (default: %(default)s)")
    g = p.add_argument_group("SGLD refinement (accuracy, robustness)")
    g.add_argument("--refine-steps", type=int, default=10, help="SGLD steps on E(x) from the input before "
                                                             "classifying (default: %(default)s)")
    g.add_argument("--refine-chains", type=int, default=1, help="chains per input; their logits are averaged "
                                                             "(default: %(default)s)")
    g.add_argument("--n-refine", type=int, default=1000, help="test images for refined accuracy (default: %(default)s)")
    g = p.add_argument_group("calibration")
    g.add_argument("--ece-bins", type=int, default=15, help="equal-width confidence bins (default: %(default)s)")
    g = p.add_argument_group("ood")
    g.add_argument("--ood", nargs="+", metavar="SET",
                   help="OOD sets: dataset names (" + ", ".join(DATASETS) + "), paths to .npz files with "
                        "an 'x' array (uint8 N x H x W x C), or " + ", ".join(SYNTHETIC_OOD) +
                        " (default: every other dataset found under --data-root, plus all synthetic sets)")
    g.add_argument("--n-ood", type=int, default=2000, help="images per set, in-distribution included "
                                                        "(default: %(default)s)")
    g = p.add_argument_group("robustness")
    g.add_argument("--norms", nargs="+", default=["linf", "l2"], choices=["linf", "l2"],
                   help="threat models (default: %(default)s)")
    g.add_argument("--eps-linf", type=float, nargs="+", help="L-inf radii in [0, 1] pixel units (default: "
                   "0 .05 .1 .2 .3 for 1-channel sets, 0 2/255 4/255 8/255 16/255 for RGB)")
    g.add_argument("--eps-l2", type=float, nargs="+", help="L2 radii in [0, 1] pixel units (default: "
                   "0 .5 1 2 3 for 1-channel sets, 0 .25 .5 1 2 for RGB)")
    g.add_argument("--pgd-steps", type=int, default=20, help="PGD iterations, step 2.5 eps / steps (default: %(default)s)")
    g.add_argument("--n-robust", type=int, default=500, help="test images attacked (default: %(default)s)")
    g.add_argument("--no-defence", action="store_true", help="skip the SGLD-refinement defence (default: run it)")
    g = p.add_argument_group("samples")
    g.add_argument("--judge", help="judge checkpoint of tools/train_classifier.py on the same dataset, for FID "
                                   "features, IS and sample accuracy (default: checkpoints/judge-<dataset>.pt)")
    g.add_argument("--n-samples", type=int, default=1000, help="fresh samples, as many real test images and "
                                                              "buffer images (default: %(default)s)")
    g.add_argument("--sample-init", choices=["noise", "buffer"], default="noise",
                   help="start fresh chains from uniform noise or from the saved replay buffer (default: %(default)s)")
    g.add_argument("--sample-steps", type=int, help=f"SGLD steps of fresh chains (default: {NOISE_START_STEPS} "
                                                    "from noise, the training value from the buffer)")
    g.add_argument("--no-inception", action="store_true", help="skip the standard Inception FID and KID (default: "
                                                               "compute them; weights from `python inception.py --fetch`)")
    return p


# ---- loading -------------------------------------------------------------------------------------

class Evaluated:
    """One checkpoint under evaluation: the model in eval mode, its training config and a label."""

    def __init__(self, path, label, device):
        self.path, self.ckpt = path, load_checkpoint(path)
        self.cfg = self.ckpt["config"]
        self.info = dataset_info(self.cfg["dataset"])
        self.model = model_from_checkpoint(self.ckpt, self.info, device, path).eval()
        for param in self.model.parameters():  # nothing here trains; input gradients only
            param.requires_grad_(False)
        self.label = label or f"{self.cfg['run_name']}/{os.path.splitext(os.path.basename(path))[0]}"
        self.kind = "JEM" if self.cfg["px_weight"] > 0 or self.cfg["pxy_weight"] > 0 else "classifier"
        # the training's SGLD settings: refinement and sampling use them unless told otherwise
        self.sampler = SGLDSampler(self.cfg["n_steps"], **sgld_step_rule(self.cfg))

    def describe(self):
        described = {"ckpt": self.path, "step": self.ckpt["step"], "kind": self.kind,
                     "px_weight": self.cfg["px_weight"], "pxy_weight": self.cfg["pxy_weight"]}
        if self.model.log_temperature is not None:
            described["temperature"] = self.model.log_temperature.exp().item()
        return described


def images_to_float(x_uint8_nhwc, device):
    """uint8 N x H x W x C numpy -> float N x C x H x W in [-1, 1] on device."""
    return to_float(torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc.transpose(0, 3, 1, 2))).to(device))


def subset(n_total, n, seed):
    """A fixed random subset of indices (all of them, in order, when n is None or too large)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def random_images(x_np, n, seed, device, y_np=None):
    """n random images of a uint8 N x H x W x C split as floats on device (all of them when n is None),
    with their labels when y_np is given. Random, never the first n: a split may be sorted by class
    (this CIFAR-10 copy's test split is), and its first n are then a few classes only."""
    keep = subset(len(x_np), n, seed).numpy()
    x = images_to_float(x_np[keep], device)
    return x if y_np is None else (x, torch.from_numpy(y_np[keep]).long().to(device))


@torch.no_grad()
def predict(model, x, batch_size):
    return torch.cat([model(b) for b in x.split(batch_size)])


def refine(model, sampler, x, n_steps, n_chains=1):
    """JEM's test-time defence (paper, section 6): n_steps of SGLD on E(x) from the input itself,
    then classify; the logits of n_chains independent chains are averaged."""
    chains = [sampler(model, x, None, n_steps=n_steps) for _ in range(n_chains)]
    with torch.no_grad():
        return torch.stack([model(c) for c in chains]).mean(0)


def refined_classifier(model, sampler, n_steps, n_chains):
    """logits of the refined input, differentiable by BPDA (Athalye et al. 2018): the forward pass
    runs the SGLD refinement, the backward pass treats it as the identity, so PGD attacks the
    defence itself and not merely the classifier behind it (a far weaker, transfer-only test)."""
    def classify(x):
        logits = 0
        for _ in range(n_chains):
            x_ref = sampler(model, x.detach(), None, n_steps=n_steps)
            logits = logits + model(x + (x_ref - x).detach()) / n_chains
        return logits
    return classify


def save_json(out, name, obj):
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path


def reseed(args, device="cpu"):
    """Restart the RNGs before each checkpoint: every model gets the same input noise, chain starts,
    attack starts and buffer picks, and its figures do not depend on the other checkpoints or modes
    of the call. Returns a generator seeded likewise, for draws that take one."""
    torch.manual_seed(args.seed)
    return torch.Generator(device=device).manual_seed(args.seed)


# ---- accuracy and calibration --------------------------------------------------------------------

def eval_accuracy(models, x, y, args):
    """Clean test accuracy, with the training's input noise N(0, sigma^2), and after SGLD refinement."""
    result = {"protocol": {"n_test": len(y), "noise": "x + sigma * N(0, I), sigma from the training config",
                           "refine": f"{args.refine_steps} SGLD steps on E(x) from the test image, training "
                                     f"step size / noise / clamp, {args.refine_chains} chain(s), logits "
                                     f"averaged, on {min(args.n_refine, len(y))} random test images (--seed)"},
              "models": {}}
    # a random subset, not the first n: a test split may be sorted by class (this CIFAR-10 copy is:
    # its first 1,000 images are all planes)
    pick = subset(len(y), args.n_refine, args.seed)
    for m in models:
        reseed(args)
        sigma = m.cfg["sigma"]
        clean = predict(m.model, x, args.batch_size)
        noisy = predict(m.model, x + sigma * torch.randn_like(x), args.batch_size)
        refined = torch.cat([refine(m.model, m.sampler, b, args.refine_steps, args.refine_chains)
                             for b in tqdm(x[pick].split(args.batch_size), desc=f"refine {m.label}")])
        result["models"][m.label] = {**m.describe(), "acc": metrics.accuracy(clean, y),
                                     "acc_noise": metrics.accuracy(noisy, y), "sigma": sigma,
                                     "acc_refined": metrics.accuracy(refined, y[pick]),
                                     "acc_clean_same_images": metrics.accuracy(clean[pick], y[pick])}
    return result


def eval_calibration(models, x, y, args, out):
    """ECE, NLL and Brier score on the test set; reliability diagrams side by side."""
    result = {"protocol": {"n_test": len(y), "ece_bins": args.ece_bins,
                           "ece": "equal-width bins of max p(y|x) in (b/B, (b+1)/B]; sum_b n_b/N |acc_b - conf_b|",
                           "brier": "mean_x sum_k (p_k - [y=k])^2"}, "models": {}}
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for m, ax in zip(models, axes[0]):
        logits = m.model.class_logits(predict(m.model, x, args.batch_size))  # p(y|x): a learned T applied
        probs = logits.softmax(1)
        bins = metrics.calibration_bins(probs, y, args.ece_bins)
        ece = metrics.expected_calibration_error(probs, y, args.ece_bins)
        result["models"][m.label] = {**m.describe(), "acc": metrics.accuracy(logits, y), "ece": ece,
                                     "nll": metrics.nll(logits, y), "brier": metrics.brier_score(probs, y),
                                     "bins": {k: [None if np.isnan(v) else float(v) for v in bins[k]]
                                              for k in ("count", "confidence", "accuracy")}}
        width = 1 / args.ece_bins
        centres = bins["edges"][:-1] + width / 2
        acc = np.nan_to_num(bins["accuracy"])
        ax.bar(centres, acc, width=width, edgecolor="k", label="accuracy")
        ax.bar(centres, np.nan_to_num(bins["confidence"]) - acc, bottom=acc, width=width,
               color="tab:red", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max p(y|x))", ylabel="accuracy",
               title=f"{m.label} ({m.kind})\nECE {100 * ece:.2f}%, n={len(y)}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "calibration.png"), dpi=120)
    plt.close(fig)
    return result


# ---- out-of-distribution detection ---------------------------------------------------------------

def match_shape(x, info):
    """Float N x C x H x W in [-1, 1] -> the in-distribution channels and size: grey to RGB by
    repetition, RGB to grey by luminance (0.299, 0.587, 0.114), size by antialiased bilinear resizing."""
    if x.shape[1] == 1 and info.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 3 and info.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-1] != info.image_size or x.shape[-2] != info.image_size:
        x = F.interpolate(x, size=(info.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def check_ood_names(names, dataset):
    """Refuse a bad --ood before any compute."""
    for name in names:
        if name == dataset:
            raise UsageError(f"--ood {name} is the in-distribution dataset")
        if name.endswith(".npz"):
            if not os.path.isfile(name):
                raise UsageError(f"--ood file '{name}' does not exist")
        elif name not in DATASETS and name not in SYNTHETIC_OOD:
            raise UsageError(f"unknown OOD set '{name}'; choose dataset names ({', '.join(DATASETS)}), "
                             f".npz paths or {', '.join(SYNTHETIC_OOD)}")


def default_ood_names(dataset, data_root):
    """Every other dataset whose test arrays are present offline, then the synthetic sets."""
    found = [d for d in DATASETS if d != dataset and os.path.exists(os.path.join(data_root, d, "test.npz"))]
    return found + list(SYNTHETIC_OOD)


def ood_images(name, n, info, x_in, data_root, device, g):
    """n OOD images in the in-distribution shape; how each set is made is stated in the protocol."""
    shape = (n, info.channels, info.image_size, info.image_size)
    if name == "uniform":  # each pixel U[-1, 1]
        return torch.rand(shape, generator=g).to(device) * 2 - 1
    if name == "gaussian":  # each pixel N(0, 0.5^2) around mid-grey, clipped to the pixel range
        return (0.5 * torch.randn(shape, generator=g)).clamp(-1, 1).to(device)
    if name == "constant":  # one random colour per image
        return (torch.rand((n, info.channels, 1, 1), generator=g) * 2 - 1).expand(shape).contiguous().to(device)
    if name == "interp":  # the paper's "Interp": midpoints of random pairs of test images
        i, j = torch.randint(len(x_in), (2, n), generator=g)
        return 0.5 * (x_in[i] + x_in[j])
    if name.endswith(".npz"):
        try:
            with np.load(name, allow_pickle=False) as f:
                arr = f["x"]
        except Exception as e:
            raise DataError(f"cannot read OOD set '{name}': {e}") from None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise DataError(f"'{name}': 'x' must be uint8 N x H x W x C")
    else:
        arr, _, _ = load_split(name, "test", data_root)
    return match_shape(random_images(arr, n, g.initial_seed(), device), info)


def ood_scores(model, x, batch_size):
    """The three scores of each image (higher = more in-distribution)."""
    out = {s: [] for s in SCORES}
    for b in x.split(batch_size):
        with torch.no_grad():
            logits = model(b)
        out["log_px"].append(metrics.score_log_px(logits))
        out["max_prob"].append(metrics.score_max_prob(model.class_logits(logits)))
        out["grad_norm"].append(metrics.score_grad_norm(model, b))
    return {s: torch.cat(v).cpu().numpy() for s, v in out.items()}


def score_hist(ax, scores, **style):
    """A 60-bin density histogram. In float64: float32 scores that differ by a few ulps (max p(y|x)
    saturating at 1 on constant images) leave numpy no room for 60 distinct bin edges."""
    ax.hist(np.asarray(scores, dtype=np.float64), bins=60, density=True, **style)


def eval_ood(models, x_test, args, data_root, device, out):
    info = models[0].info
    names = args.ood or default_ood_names(models[0].cfg["dataset"], data_root)
    keep = subset(len(x_test), args.n_ood, args.seed)
    x_in = x_test[keep]
    g = torch.Generator().manual_seed(args.seed + 1)
    sets = {name: ood_images(name, args.n_ood, info, x_test, data_root, device, g)
            for name in tqdm(names, desc="OOD sets")}
    result = {"protocol": {
        "in_distribution": f"{len(x_in)} random {models[0].cfg['dataset']} test images",
        "n_per_set": {k: len(v) for k, v in sets.items()},
        "positive": "in-distribution (higher score = more in-distribution)",
        "scores": {"log_px": "logsumexp_y f(x)[y]", "max_prob": "max_y p(y|x)",
                   "grad_norm": "-||d logsumexp f(x) / dx||_2"},
        "sets": {"datasets": "test split, random subset, converted to the in-distribution channels and size",
                 "uniform": "pixels U[-1, 1]", "gaussian": "pixels N(0, 0.5^2) clipped to [-1, 1]",
                 "constant": "one U[-1, 1] value per image and channel",
                 "interp": "0.5 * (x_i + x_j), random pairs of in-distribution test images"}},
        "models": {}}
    fig, axes = plt.subplots(len(models), len(SCORES), figsize=(4.2 * len(SCORES), 3.2 * len(models)), squeeze=False)
    for m, row in zip(models, axes):
        s_in = ood_scores(m.model, x_in, args.batch_size)
        per_set = {}
        for name, x in tqdm(sets.items(), desc=f"scores {m.label}"):
            s_out = ood_scores(m.model, x, args.batch_size)
            per_set[name] = {s: {"auroc": metrics.auroc(s_in[s], s_out[s]),
                                 "aupr_in": metrics.aupr_in(s_in[s], s_out[s]),
                                 "fpr_at_95_tpr": metrics.fpr_at_tpr(s_in[s], s_out[s], 0.95),
                                 "mean_score": float(s_out[s].mean())} for s in SCORES}
            for ax, s in zip(row, SCORES):
                score_hist(ax, s_out[s], histtype="step", lw=1.2,
                           label=f"{name} ({per_set[name][s]['auroc']:.2f})")
        result["models"][m.label] = {**m.describe(), "in_mean_score": {s: float(s_in[s].mean()) for s in SCORES},
                                     "sets": per_set}
        for ax, s in zip(row, SCORES):
            score_hist(ax, s_in[s], color="k", alpha=0.3, label=f"{m.cfg['dataset']} (in)")
            ax.set(title=f"{m.label} ({m.kind}): {s}", xlabel="score (higher = more in-distribution)")
            ax.legend(fontsize=7, title="set (AUROC)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ood_hist.png"), dpi=110)
    plt.close(fig)
    return result


# ---- robustness ----------------------------------------------------------------------------------

def eval_robustness(models, x_test, y_test, args, out):
    digits = models[0].info.channels == 1
    eps = {"linf": args.eps_linf, "l2": args.eps_l2}
    eps = {n: eps[n] or DEFAULT_EPS[n]["digits" if digits else "natural"] for n in args.norms}
    keep = subset(len(y_test), args.n_robust, args.seed)
    x, y = x_test[keep], y_test[keep]
    defences = ["none"] + ([] if args.no_defence else [f"sgld-{args.refine_steps}"])
    result = {"protocol": {
        "n_images": len(y), "attack": f"untargeted PGD on cross-entropy, {args.pgd_steps} steps of 2.5 eps / "
                                      "steps, random start, projection on the ball and on the pixel range",
        "eps_units": "[0, 1] pixels (doubled for the model's [-1, 1] inputs)", "eps": eps,
        "defence": f"sgld-K: {args.refine_steps} SGLD steps on E(x) from the (attacked) input with the "
                   f"training's step / noise / clamp, {args.refine_chains} chain(s); attacked with BPDA "
                   "(identity gradient through the refinement), no EOT"}, "models": {}}
    for m in models:
        g = reseed(args, x.device)  # g: PGD's random starts
        curves = {}
        for norm in args.norms:
            for defence in defences:
                classify = m.model if defence == "none" else refined_classifier(
                    m.model, m.sampler, args.refine_steps, args.refine_chains)
                accs = []
                for e in tqdm(eps[norm], desc=f"{m.label} {norm} {defence}"):
                    correct = 0
                    for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)):
                        x_adv = metrics.pgd_attack(classify, xb, yb, 2 * e, norm, args.pgd_steps, generator=g)
                        with torch.enable_grad():  # the refinement needs input gradients
                            correct += (classify(x_adv).argmax(1) == yb).sum().item()
                    accs.append(correct / len(y))
                curves[f"{norm}/{defence}"] = accs
        result["models"][m.label] = {**m.describe(), "robust_acc": curves}
    fig, axes = plt.subplots(1, len(args.norms), figsize=(5 * len(args.norms), 4), squeeze=False)
    for ax, norm in zip(axes[0], args.norms):
        for i, m in enumerate(models):
            for defence, style in zip(defences, ["-o", "--s"]):
                ax.plot(eps[norm], result["models"][m.label]["robust_acc"][f"{norm}/{defence}"], style,
                        color=f"C{i}", label=f"{m.label} ({m.kind}), {defence}")
        ax.set(xlabel=f"{norm} radius eps ([0, 1] pixels)", ylabel="accuracy under PGD", ylim=(0, 1),
               title=f"PGD-{args.pgd_steps}, {norm}, n={len(y)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robustness.png"), dpi=120)
    plt.close(fig)
    return result


# ---- sample quality ------------------------------------------------------------------------------

class JudgeFeatures(nn.Module):
    """The judge's penultimate activations (the 256-d ReLU layer before its last linear map): the
    offline stand-in for Inception's pool features in FID."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.head[-1].in_features  # read by torchmetrics: no dummy forward pass

    def forward(self, x):
        return self.judge.head[:-2](self.judge.features(x))  # head[-2:] = dropout, final linear

    def train(self, mode=True):  # torchmetrics may toggle modes; batch norm and dropout must stay off
        return super().train(False)


def judge_path_for(args, dataset):
    path = args.judge or os.path.join("checkpoints", f"judge-{dataset}.pt")
    if not os.path.isfile(path):
        raise UsageError(f"samples mode needs a judge classifier; '{path}' does not exist (train it: "
                         f"python -m tools.train_classifier --dataset {dataset} --out {path})")
    return path


def load_judge_for(path, dataset, device):
    judge = load_judge(path, device)
    judge_dataset = load_checkpoint(path)["config"]["dataset"]
    if judge_dataset != dataset:
        raise UsageError(f"judge '{path}' was trained on {judge_dataset}, the models on {dataset}")
    for param in judge.parameters():
        param.requires_grad_(False)
    return judge


@torch.no_grad()
def judge_scores(judge, real, fake, y_fake, batch_size):
    """FID between judge features of real and generated images (Heusel et al. 2017, through
    torchmetrics), IS of the judge's predictions (Salimans et al. 2016; 10 splits, mean and std), and
    the fraction of samples the judge assigns to the class they were drawn for."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=False).to(real.device)
    inception = InceptionScore(feature=judge, normalize=False, splits=10).to(real.device)
    for b in real.split(batch_size):
        fid.update(b, real=True)
    for b in fake.split(batch_size):
        fid.update(b, real=False)
        inception.update(b)
    is_mean, is_std = inception.compute()
    out = {"fid_judge": fid.compute().item(), "is_judge": is_mean.item(), "is_judge_std": is_std.item()}
    if y_fake is not None:
        logits = predict(judge, fake, batch_size)
        right = (logits.argmax(1) == y_fake).float()
        out["judge_acc"] = right.mean().item()
        # per class too: a class whose chains stay textures hides in the mean
        out["judge_acc_per_class"] = [right[y_fake == c].mean().item() if (y_fake == c).any() else None
                                      for c in range(logits.shape[1])]
    return out


def buffer_images(m, n, g):
    """n random chains of the saved replay buffer, as they are, with their slot's class if it has one."""
    state = m.ckpt["buffer"]
    x = state["x"]
    idx = torch.randperm(len(x), generator=g)[:n]
    y = idx // (len(x) // state["n_classes"]) if state["n_classes"] else None
    return x[idx], y


def sample_scorer(judge, real, extractor, batch_size):
    """score(fake, y=None): the judge's FID of fake against the real images, its IS of fake (and its
    accuracy when y gives the intended classes), with the Inception FID / KID beside them when an extractor
    (an InceptionFeatures) is given. The real images' features are computed once."""
    real_feats = None if extractor is None else inception_features(extractor, real)

    def score(fake, y=None):
        scores = judge_scores(judge, real, fake, y, batch_size)
        if extractor is not None:
            scores.update(inception_scores(real_feats, inception_features(extractor, fake)))
        return scores
    return score


def real_floor(score, dataset, data_root, n, seed, device):
    """score's figures for n real training images: the floor that samples of the same n can reach."""
    x_train, _, _ = load_split(dataset, "train", data_root)
    return score(random_images(x_train, n, seed, device))


def eval_samples(models, x_test, args, data_root, device, out, extractor=None):
    """extractor: an InceptionFeatures for the standard FID / KID beside the judge's, or None."""
    cfg, info = models[0].cfg, models[0].info
    judge_path = judge_path_for(args, cfg["dataset"])
    judge = load_judge_for(judge_path, cfg["dataset"], device)
    n = min(args.n_samples, len(x_test))
    score = sample_scorer(judge, x_test[subset(len(x_test), n, args.seed)], extractor, args.batch_size)
    floor = real_floor(score, cfg["dataset"], data_root, n, args.seed, device)
    shape = (info.channels, info.image_size, info.image_size)
    result = {"protocol": {
        "judge": judge_path, "n_real": n, "real": f"{n} random {cfg['dataset']} test images",
        "features": "fid_judge / is_judge: the judge's 256-d penultimate activations and softmax (10 "
                    "splits); fid_inception / kid_inception: TF-Inception v3 pool3 (2048-d, inception.py), "
                    "the literature's features; no Inception Score: those weights have no classifier",
        "judge_acc": "fraction of class-conditional samples the judge assigns to their class",
        "real_train_vs_test": {"what": f"{n} real training images scored like samples: the floor for this n",
                               **floor}},
        "models": {}}
    for m in models:
        g = reseed(args)  # g: which buffer slots are scored
        steps = args.sample_steps or (NOISE_START_STEPS if args.sample_init == "noise" else m.cfg["n_steps"])
        buffer = None
        if args.sample_init == "buffer":
            state = m.ckpt["buffer"]
            buffer = ReplayBuffer(len(state["x"]), shape, state["n_classes"], device=device)
            buffer.load_state_dict(state)
        y = torch.arange(n, device=device) % info.n_classes
        chunks = []
        for yb in tqdm(y.split(args.batch_size), desc=f"sampling {m.label}"):
            chunks.append(class_conditional_samples(m.model, m.sampler, yb, shape, buffer, args.batch_size,
                                                    n_steps=steps, device=device))
        fresh = torch.cat(chunks)
        entry = {**m.describe(), "fresh": {
            "what": f"{n} fresh class-conditional samples (SGLD on E(x, y), classes in turn), from "
                    f"{'uniform noise' if buffer is None else 'the saved replay buffer'}, {steps} steps of "
                    f"size {m.sampler.step_size}, noise {m.sampler.noise_std}, clamp {m.sampler.clamp}, "
                    f"gradient clip {m.sampler.grad_clip}",
            "n": n, "init": args.sample_init, "steps": steps,
            **score(fresh, y)}}
        save_grid(fresh[:100], os.path.join(out, f"samples_fresh_{_slug(m.label)}.png"), nrow=10)
        xb, yb = buffer_images(m, n, g)
        xb = xb.to(device)
        what = (f"{len(xb)} random chains of the replay buffer saved in the checkpoint, as they are (the "
                "literature's usual, flattering figure: chains that ran for the whole training)")
        if m.kind == "classifier":
            what = (f"{len(xb)} random slots of the checkpoint's replay buffer: a classifier run never samples, "
                    f"so these are its initial images ({m.cfg['buffer_init']}), not samples of the model")
        entry["replay_buffer"] = {
            "what": what,
            "n": len(xb), **score(xb, None if yb is None else yb.to(device))}
        save_grid(xb[:100], os.path.join(out, f"samples_buffer_{_slug(m.label)}.png"), nrow=10)
        result["models"][m.label] = entry
    return result


def _slug(label):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


# ---- the command ---------------------------------------------------------------------------------

def print_summary(mode, result):
    """A few lines per mode on stdout; the JSON has everything."""
    for label, r in result["models"].items():
        if mode == "accuracy":
            line = f"acc {r['acc']:.4f}  with noise {r['acc_noise']:.4f}  refined {r['acc_refined']:.4f}"
        elif mode == "calibration":
            line = f"acc {r['acc']:.4f}  ECE {r['ece']:.4f}  NLL {r['nll']:.4f}  Brier {r['brier']:.4f}"
        elif mode == "ood":
            line = "AUROC " + "  ".join(f"{name}: " + "/".join(f"{v[s]['auroc']:.3f}" for s in SCORES)
                                        for name, v in r["sets"].items()) + f"  ({'/'.join(SCORES)})"
        elif mode == "robustness":
            line = "  ".join(f"{k}: " + " ".join(f"{a:.3f}" for a in v) for k, v in r["robust_acc"].items())
        else:
            f, b = r["fresh"], r["replay_buffer"]
            line = (f"fresh: judge FID {f['fid_judge']:.2f} IS {f['is_judge']:.2f} acc {f['judge_acc']:.3f}; "
                    f"buffer: judge FID {b['fid_judge']:.2f} IS {b['is_judge']:.2f}")
            if "fid_inception" in f:
                line += (f"; Inception FID / KID fresh {f['fid_inception']:.2f} / {f['kid_inception']:.4f}, "
                         f"buffer {b['fid_inception']:.2f} / {b['kid_inception']:.4f}")
        print(f"[{mode}] {label}: {line}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    for mode in args.mode:  # checked here, not by argparse, for a one-line error
        if mode not in MODES:
            raise UsageError(f"unknown mode '{mode}'; choose from: {', '.join(MODES)}")
    if args.labels and len(args.labels) != len(args.ckpt):
        raise UsageError(f"--labels gives {len(args.labels)} names for {len(args.ckpt)} checkpoints")
    for flag in ("batch_size", "n_ood", "n_robust", "n_samples", "ece_bins", "refine_chains"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    device = resolve_device(args.device)
    models = [Evaluated(p, (args.labels or [None] * len(args.ckpt))[i], device) for i, p in enumerate(args.ckpt)]
    dataset = models[0].cfg["dataset"]
    if any(m.cfg["dataset"] != dataset for m in models):
        raise UsageError("all checkpoints must be trained on one dataset")
    if len({m.label for m in models}) < len(models):
        raise UsageError("two checkpoints share a label; give --labels")
    if "ood" in args.mode and args.ood:
        check_ood_names(args.ood, dataset)
    extractor = None
    if "samples" in args.mode:  # both checked before minutes of other modes
        judge_path_for(args, dataset)
        extractor = None if args.no_inception else InceptionFeatures().to(device)
    data_root = args.data_root or models[0].cfg["data_root"]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0])), "results")
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(args.seed)
    x_np, y_np, _ = load_split(dataset, "test", data_root)
    x_test, y_test = random_images(x_np, args.n_test, args.seed, device, y_np)

    for mode in dict.fromkeys(args.mode):  # in the order given, once each
        t0 = time.time()
        if mode == "accuracy":
            result = eval_accuracy(models, x_test, y_test, args)
        elif mode == "calibration":
            result = eval_calibration(models, x_test, y_test, args, out)
        elif mode == "ood":
            result = eval_ood(models, x_test, args, data_root, device, out)
        elif mode == "robustness":
            result = eval_robustness(models, x_test, y_test, args, out)
        else:
            result = eval_samples(models, x_test, args, data_root, device, out, extractor)
        result.update(mode=mode, dataset=dataset, seed=args.seed, seconds=round(time.time() - t0, 1))
        path = save_json(out, mode, result)
        print_summary(mode, result)
        print(f"wrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    run(main)
