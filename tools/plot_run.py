"""Plot test accuracy, sample quality and the energy gap over a run's saved checkpoints (one line per run).

    python train_jem.py --preset mnist-cpu --data-root ../shared/data --run-name mnist --keep-every 500
    python -m tools.plot_run --ckpt checkpoints/mnist/history/*.pt --out results/mnist-curves

`--keep-every N` makes train_jem.py keep the run every N steps as history/step_NNNNNNN.pt.
Checkpoints are grouped by the run name in their config and ordered by step. Each point: accuracy on
--n-test test images; judge FID and judge accuracy (judge features, as eval_jem.py's samples mode)
of --n-samples fresh class-conditional samples from uniform noise after --sample-steps SGLD steps,
and of as many chains of the replay buffer saved in the checkpoint; and the energy gap
E(data) - E(samples) that the run logged nearest that step (its metrics.jsonl, when beside the
checkpoint or its history/ folder). With --inception, also the standard Inception FID of both
(inception.py; about 0.25 s an image on a CPU, negligible on a GPU). The JSON's protocol gives the
floors: real training against real test images at the same n. Writes OUT/run_curves.json and
OUT/run_curves.png.
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
from eval_jem import (NOISE_START_STEPS, Evaluated, buffer_images, judge_path_for, load_judge_for,  # noqa: E402
                      predict, random_images, real_floor, sample_scorer)
from inception import InceptionFeatures  # noqa: E402
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
    p.add_argument("--inception", action="store_true",
                   help="also the standard Inception FID of fresh and buffer samples (weights from "
                        "`python inception.py --fetch`; slow on a CPU)")
    p.add_argument("--batch-size", type=int, default=250, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p


def logged_gaps(ckpt_path):
    """{step: energy gap} of the train lines in the run's metrics.jsonl, or {} where there is none."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(folder) == "history":
        folder = os.path.dirname(folder)
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["gap"] for r in records if r.get("kind") == "train" and "gap" in r}


def gap_at(gaps, step):
    """The gap logged at the last logged step not after `step` (None before the first)."""
    before = [s for s in gaps if s <= step]
    return gaps[max(before)] if before else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    models = [Evaluated(p, p, device) for p in args.ckpt]
    dataset = models[0].cfg["dataset"]
    if any(m.cfg["dataset"] != dataset for m in models):
        raise UsageError("all checkpoints must be trained on one dataset")
    judge = load_judge_for(judge_path_for(args, dataset), dataset, device)
    extractor = InceptionFeatures().to(device) if args.inception else None
    data_root = args.data_root or models[0].cfg["data_root"]
    x_np, y_np, _ = load_split(dataset, "test", data_root)
    # two random draws, never a prefix of one (random_images says why)
    x_test, y_test = random_images(x_np, args.n_test, args.seed, device, y_np)
    x_real = random_images(x_np, args.n_samples, args.seed, device)
    score = sample_scorer(judge, x_real, extractor, args.batch_size)
    floor = real_floor(score, dataset, data_root, args.n_samples, args.seed, device)  # what a perfect sampler scores
    info = models[0].info
    shape = (info.channels, info.image_size, info.image_size)

    runs = defaultdict(list)
    for m in tqdm(sorted(models, key=lambda m: m.ckpt["step"]), desc="checkpoints"):
        torch.manual_seed(args.seed)  # the same chain starts for every checkpoint
        y = torch.arange(args.n_samples, device=device) % info.n_classes
        fake = class_conditional_samples(m.model, m.sampler, y, shape, None, args.batch_size,
                                         n_steps=args.sample_steps, device=device)
        xb, yb = buffer_images(m, args.n_samples, torch.Generator().manual_seed(args.seed))
        buffer = score(xb.to(device), None if yb is None else yb.to(device))
        point = {"ckpt": m.path, "step": m.ckpt["step"], "kind": m.kind,
                 "acc": metrics.accuracy(predict(m.model, x_test, args.batch_size), y_test),
                 "fid_inception": None, **score(fake, y),
                 "buffer_fid_judge": buffer["fid_judge"], "buffer_judge_acc": buffer.get("judge_acc"),
                 "buffer_fid_inception": buffer.get("fid_inception"),
                 "gap": gap_at(logged_gaps(m.path), m.ckpt["step"])}
        runs[f"{m.cfg['run_name']} ({m.kind})"].append(point)

    os.makedirs(args.out, exist_ok=True)
    protocol = {"n_test": args.n_test, "n_samples": args.n_samples, "init": "uniform noise",
                "sample_steps": args.sample_steps, "features": "judge penultimate (FID), judge softmax (IS)",
                "buffer": f"{args.n_samples} random chains of the checkpoint's saved replay buffer, as they are",
                "gap": "E(data) - E(samples) of the last train line logged at or before the checkpoint's step",
                "real_train_vs_test": {"what": f"{args.n_samples} real training images scored like samples: "
                                               "the floor for this n", **floor}}
    with open(os.path.join(args.out, "run_curves.json"), "w") as f:
        json.dump({"protocol": protocol, "runs": runs}, f, indent=2)
    panels = [("fid_judge", "FID (judge features; lower is better)"), ("judge_acc", "judge accuracy on samples")]
    if extractor is not None:
        panels.insert(1, ("fid_inception", "standard Inception FID (lower is better)"))
    fig, axes = plt.subplots(1, 2 + len(panels), figsize=(4.5 * (2 + len(panels)), 3.8))
    nan = float("nan")  # a point without a value (no class slices, no log) is a gap in its line
    for i, (name, points) in enumerate(runs.items()):
        points = [{k: nan if v is None else v for k, v in p.items()} for p in points]
        steps, color = [p["step"] for p in points], f"C{i}"
        axes[0].plot(steps, [p["acc"] for p in points], "-o", color=color, label=name)
        for ax, (key, _) in zip(axes[1:], panels):  # fresh solid, buffer dashed
            ax.plot(steps, [p[key] for p in points], "-o", color=color, label=f"{name}, fresh from noise")
            ax.plot(steps, [p[f"buffer_{key}"] for p in points], "--s", color=color, label=f"{name}, saved buffer")
        axes[-1].plot(steps, [p["gap"] for p in points], "-o", color=color, label=name)
    titles = ["test accuracy", *(title for _, title in panels), "energy gap E(data) - E(samples) (logged)"]
    for ax, title in zip(axes, titles):
        ax.set(xlabel="training step", title=title)
        ax.grid(alpha=0.3)
    for ax, (key, _) in zip(axes[1:], panels):
        if key.startswith("fid"):
            ax.set_yscale("log")
            ax.axhline(floor[key], color="grey", ls=":", label=f"real vs real ({floor[key]:.1f})")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{args.n_samples} fresh class-conditional samples per checkpoint ({args.sample_steps} "
                 f"SGLD steps from uniform noise, solid) and {args.n_samples} saved buffer chains (dashed)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "run_curves.png"), dpi=110)
    print(f"wrote {os.path.join(args.out, 'run_curves.png')}")


if __name__ == "__main__":
    run(main)
