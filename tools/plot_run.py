"""Plot test accuracy, FID and Inception Score over a run's saved checkpoints (one line per run).

    python -m tools.plot_run --ckpt checkpoints/mnist-baseline/history/*.pt checkpoints/mnist/best.pt \\
        checkpoints/mnist/last.pt --out results/run-curves

train_jem.py keeps only last.pt and best.pt; for a curve, copy last.pt aside every few steps (or train
in stages with --max-iters and --resume, which is bit-exact). Checkpoints are grouped by the run name in
their config and ordered by step. Each point: accuracy on --n-test test images, and FID / IS (judge
features, as eval_jem.py's samples mode) of --n-samples fresh class-conditional samples from uniform
noise after --sample-steps SGLD steps. Writes OUT/run_curves.json and OUT/run_curves.png.
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metrics  # noqa: E402
from cli import UsageError, resolve_device, run  # noqa: E402
from data import load_split  # noqa: E402
from eval_jem import (NOISE_START_STEPS, Evaluated, images_to_float, judge_path_for, judge_scores,  # noqa: E402
                      load_judge_for, predict, subset)
from sgld import class_conditional_samples  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints of one dataset, any runs (required)")
    p.add_argument("--out", default="results/run-curves", help="output folder (default: %(default)s)")
    p.add_argument("--judge", help="judge checkpoint (default: checkpoints/judge-<dataset>.pt)")
    p.add_argument("--data-root", help="dataset folder (default: the first checkpoint's)")
    p.add_argument("--n-test", type=int, default=2000, help="test images for accuracy (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=500, help="fresh samples per checkpoint (default: %(default)s)")
    p.add_argument("--sample-steps", type=int, default=NOISE_START_STEPS,
                   help="SGLD steps from uniform noise (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=250, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    models = [Evaluated(p, p, device) for p in args.ckpt]
    dataset = models[0].cfg["dataset"]
    if any(m.cfg["dataset"] != dataset for m in models):
        raise UsageError("all checkpoints must be trained on one dataset")
    judge = load_judge_for(judge_path_for(args, dataset), dataset, device)
    data_root = args.data_root or models[0].cfg["data_root"]
    x_np, y_np, _ = load_split(dataset, "test", data_root)
    keep = subset(len(x_np), max(args.n_test, args.n_samples), args.seed).numpy()
    x_test, y_test = images_to_float(x_np[keep], device), torch.from_numpy(y_np[keep]).to(device)
    real = x_test[:args.n_samples]
    info = models[0].info
    shape = (info.channels, info.image_size, info.image_size)

    runs = defaultdict(list)
    for m in tqdm(sorted(models, key=lambda m: m.ckpt["step"]), desc="checkpoints"):
        torch.manual_seed(args.seed)  # the same chain starts for every checkpoint
        y = torch.arange(args.n_samples, device=device) % info.n_classes
        fake = class_conditional_samples(m.model, m.sampler, y, shape, None, args.batch_size,
                                         n_steps=args.sample_steps, device=device)
        point = {"ckpt": m.path, "step": m.ckpt["step"], "kind": m.kind,
                 "acc": metrics.accuracy(predict(m.model, x_test[:args.n_test], args.batch_size), y_test[:args.n_test]),
                 **judge_scores(judge, real, fake, y, args.batch_size)}
        runs[f"{m.cfg['run_name']} ({m.kind})"].append(point)

    os.makedirs(args.out, exist_ok=True)
    protocol = {"n_test": args.n_test, "n_samples": args.n_samples, "init": "uniform noise",
                "sample_steps": args.sample_steps, "features": "judge penultimate (FID), judge softmax (IS)"}
    with open(os.path.join(args.out, "run_curves.json"), "w") as f:
        json.dump({"protocol": protocol, "runs": runs}, f, indent=2)
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for name, points in runs.items():
        steps = [p["step"] for p in points]
        for ax, key in zip(axes, ("acc", "fid_judge", "is_judge", "judge_acc")):
            ax.plot(steps, [p[key] for p in points], "-o", label=name)
    titles = ("test accuracy", "FID (judge features; lower is better)", "IS (judge; higher is better)",
              "judge accuracy on samples")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="training step", title=title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.n_samples} fresh class-conditional samples per checkpoint, {args.sample_steps} "
                 f"SGLD steps from uniform noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "run_curves.png"), dpi=110)
    print(f"wrote {os.path.join(args.out, 'run_curves.png')}")


if __name__ == "__main__":
    run(main)
