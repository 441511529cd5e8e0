"""Why did a run's energy gap collapse? Energies, input gradients and pixels of its data and chains.

    python -m tools.probe_energy --ckpt checkpoints/fashion-s2/last.pt --data-root ../shared/data

One row per kind of image: test images as they are and with the training noise (clamped as training
clamps it), the chains of the saved replay buffer, those chains after more SGLD steps, and test
images after SGLD steps (the run's step rule; each --steps continues the chains of the one before). Columns: the energy E(x, y) = -f(x)[y] (E(x) for a
buffer without classes), the per-pixel input gradient |dE/dx| and pixel statistics. In a healthy
run data and chains sit at similar energies and SGLD from a test image keeps it low; after a
collapse SGLD runs uphill from the test images to the chains' level, and a statistic where data and
chains differ is a candidate tell (docs/training.md: clamping, Fashion-MNIST). Writes --out as JSON.
"""
import argparse
import json
import os

import torch

from cli import UsageError, resolve_device, run
from data import augment, load_split
from eval_jem import Evaluated, buffer_images, random_images
from models.energy import energy_from_logits


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a JEM checkpoint with its replay buffer (required)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=300, help="test images and chains (default: %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100],
                   help="SGLD steps to continue the chains and to run from the test images (default: %(default)s)")
    p.add_argument("--out", help="also write the rows to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p


def probe(model, x, y):
    """Energy and input-gradient statistics of one batch of images, and their pixels'."""
    x = x.detach().clone().requires_grad_(True)
    energy = energy_from_logits(model(x), y)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    g = grad.abs().flatten()
    # torch.quantile takes at most 16M values: a fixed subsample, off the global RNG the chains use
    pick = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:100_000]
    q = torch.quantile(g[pick.to(g.device)], torch.tensor([0.5, 0.99], device=g.device))
    x = x.detach()
    return {"energy_mean": energy.mean().item(), "energy_std": energy.std().item(),
            "grad_p50": q[0].item(), "grad_p99": q[1].item(), "grad_max": g.max().item(),
            "pixel_mean": x.mean().item(), "at_minus_1": (x <= -0.999).float().mean().item(),
            "at_plus_1": (x >= 0.999).float().mean().item(),
            "total_variation": (x[..., 1:] - x[..., :-1]).abs().mean().item()}


def after_sgld(m, x, y, steps):
    """{k: x after k SGLD steps} for the ascending steps, one chain continued from each k to the next."""
    out, done = {}, 0
    for k in steps:
        x = m.sampler(m.model, x, y, n_steps=k - done)
        out[k], done = x, k
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.n < 2 or any(k < 1 for k in args.steps):
        raise UsageError("--n must be at least 2 and every --steps at least 1")
    device = resolve_device(args.device)
    m = Evaluated(args.ckpt, None, device)
    if "buffer" not in m.ckpt:
        raise UsageError(f"'{args.ckpt}' has no replay buffer: probe a JEM checkpoint")
    torch.manual_seed(args.seed)
    x_np, y_np, _ = load_split(m.cfg["dataset"], "test", args.data_root or m.cfg["data_root"])
    x_test, y_test = random_images(x_np, args.n, args.seed, device, y_np)
    chains, y_chains = buffer_images(m, args.n, torch.Generator().manual_seed(args.seed))
    chains = chains.to(device)
    conditional = y_chains is not None  # class-conditional chains are scored by E(x, y), else E(x)
    y_chains = y_chains.to(device) if conditional else None
    y_data = y_test if conditional else None

    noised = augment(x_test, pad=0, flip=False, sigma=m.cfg["sigma"], clamp=m.cfg["clamp"])
    rows = {"test images": probe(m.model, x_test, y_data),
            f"test images + training noise ({m.cfg['sigma']})": probe(m.model, noised, y_data),
            "saved chains": probe(m.model, chains, y_chains)}
    steps = sorted(set(args.steps))
    for k, x in after_sgld(m, chains, y_chains, steps).items():
        rows[f"saved chains + {k} SGLD steps"] = probe(m.model, x, y_chains)
    for k, x in after_sgld(m, x_test, y_data, steps).items():
        rows[f"test images + {k} SGLD steps"] = probe(m.model, x, y_data)

    print(f"{args.ckpt} (step {m.ckpt['step']}), {args.n} images each, "
          f"energy {'E(x, y)' if conditional else 'E(x)'}, SGLD step {m.cfg['step_size']}:")
    print(f"{'':44s} {'energy':>14s} {'|dE/dx| p50':>11s} {'p99':>7s} {'max':>6s} "
          f"{'pixel mean':>10s} {'at -1':>6s} {'at +1':>6s} {'TV':>6s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['energy_mean']:7.2f} ± {r['energy_std']:4.2f} {r['grad_p50']:11.4f} "
              f"{r['grad_p99']:7.4f} {r['grad_max']:6.3f} {r['pixel_mean']:10.3f} {r['at_minus_1']:6.3f} "
              f"{r['at_plus_1']:6.3f} {r['total_variation']:6.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "step": m.ckpt["step"], "n": args.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run(main)
