"""Which constant images does log p(x) take for data? A grey level at a time, against the test images.

    python -m tools.probe_constants --ckpt checkpoints/cpu-s2/last.pt --data-root ../shared/data

eval_jem.py's `constant` OOD set draws one U[-1, 1] value per image and channel and reports one
AUROC. This probe sweeps grey images (every pixel and channel at c, for c from -1 to 1) and prints,
for each c, log p(x) = logsumexp_y f(x)[y] (up to log Z) and the share of --n random test images
that score *below* it: 1 means the model ranks that flat image above every test image. Where only
the dataset's background colour scores high, the misses are near-blank images; where every c does,
the model prefers flat images as such (docs/training.md, the OOD readings). Writes --out as JSON.

Each score is also split in two, log p(x) = max_y f(x)[y] + log sum_y exp(f(x)[y] - max_y f(x)[y]):
how strongly the best class claims the image, and how many classes share it (0 for one class alone,
log 10 = 2.30 for ten equal logits). An image that no class claims over the others gets up to log 10
from the second term alone.
"""
import argparse
import json
import os

import torch

import metrics
from cli import UsageError, resolve_device, run
from data import load_split
from eval_jem import Evaluated, random_images


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint (required)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=1000, help="random test images (default: %(default)s)")
    p.add_argument("--levels", type=int, default=21, help="grey levels from -1 to 1 (default: %(default)s)")
    p.add_argument("--out", help="also write the rows to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which test images (default: %(default)s)")
    return p


@torch.no_grad()
def scores(model, x, batch_size=500):
    """eval_jem.py's OOD score itself (metrics.score_log_px) and its two terms, in batches: (log p(x),
    max_y f(x)[y], the classes' share log p(x) - max_y f(x)[y])."""
    logits = torch.cat([model(b) for b in x.split(batch_size)])
    log_px, top = metrics.score_log_px(logits), logits.max(1).values
    return log_px, top, log_px - top


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.levels < 2:
        raise UsageError("--n must be at least 1 and --levels at least 2")
    device = resolve_device(args.device)
    m = Evaluated(args.ckpt, None, device)
    x_np, _, _ = load_split(m.cfg["dataset"], "test", args.data_root or m.cfg["data_root"])
    test, test_top, test_share = scores(m.model, random_images(x_np, args.n, args.seed, device))
    levels = torch.linspace(-1, 1, args.levels, device=device)  # rounded in the rows: 0, not -1e-8
    flat = scores(m.model, levels.view(-1, 1, 1, 1).expand(-1, m.info.channels, m.info.image_size, m.info.image_size))
    rows = [{"c": round(c, 6) + 0.0, "log_px": s, "max_logit": top, "class_share": share, "test_below": (test < s).float().mean().item()}
            for c, s, top, share in zip(levels.tolist(), *(t.tolist() for t in flat))]
    q = torch.quantile(test, torch.tensor([0.05, 0.5, 0.95], device=device)).tolist()
    medians = {"max_logit": test_top.median().item(), "class_share": test_share.median().item()}
    print(f"{args.ckpt} (step {m.ckpt['step']}): log p(x) of {args.n} test images: median {q[1]:.2f}, "
          f"5-95 % {q[0]:.2f} .. {q[2]:.2f}; median max_y f {medians['max_logit']:.2f}, "
          f"classes' share {medians['class_share']:.2f}")
    print(f"{'grey level c':>12s} {'log p(x)':>9s} {'max_y f':>8s} {'share':>6s} {'test images below':>18s}")
    for r in rows:
        print(f"{r['c']:+12.1f} {r['log_px']:9.2f} {r['max_logit']:8.2f} {r['class_share']:6.2f} {r['test_below']:18.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "step": m.ckpt["step"], "n": args.n, "test_quantiles_5_50_95": q,
                       "test_medians": medians, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run(main)
