"""Draw class-conditional samples from a JEM checkpoint: SGLD on p(x | y), i.e. on E(x, y) = -f(x)[y].

    python sample.py --ckpt checkpoints/mnist/last.pt --n-per-class 100 --individual --out samples/mnist-draw

(Much JEM code calls unconditional samples sorted by predicted label "conditional"; these are not.)
Writes OUT/class_<k>.png (one grid per class), OUT/unconditional.png (SGLD on p(x)),
OUT/<k>/<i>.png with --individual, and OUT/sampling.json with the settings used.
The model is rebuilt from the config stored in the checkpoint.
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint, sgld_step_rule
from cli import UsageError, resolve_device, run
from data import dataset_info, save_grid
from sgld import ReplayBuffer, SGLDSampler, class_conditional_samples

NOISE_START_STEPS = 200  # fresh chains need far more steps than chains continued from the buffer


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train_jem.py")
    p.add_argument("--out", help="output folder (default: samples/<run>/draw-<init>)")
    p.add_argument("--n-per-class", type=int, default=64, help="samples per class (default: %(default)s)")
    p.add_argument("--classes", type=int, nargs="*", help="class indices to sample (default: all)")
    p.add_argument("--individual", action="store_true", help="also write OUT/<class>/<i>.png, one image each")
    p.add_argument("--init", choices=["buffer", "noise"], default="buffer",
                   help="start chains from the checkpoint's replay buffer (the class's slice when it "
                        "has one) or from uniform noise (default: %(default)s)")
    p.add_argument("--n-steps", type=int,
                   help=f"SGLD steps (default: the training value from the buffer, {NOISE_START_STEPS} from noise)")
    p.add_argument("--step-size", type=float, help="SGLD step (default: the training value)")
    p.add_argument("--noise-std", type=float, help="SGLD noise std (default: the training value)")
    p.add_argument("--batch-size", type=int, default=100, help="chains run at once (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that holds an earlier draw")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    info = dataset_info(cfg["dataset"])
    shape = (info.channels, info.image_size, info.image_size)
    model = model_from_checkpoint(ckpt, info, device, args.ckpt).eval()
    torch.manual_seed(args.seed)

    buffer = None
    if args.init == "buffer":
        if "buffer" not in ckpt:
            raise UsageError(f"'{args.ckpt}' holds no replay buffer; use --init noise")
        state = ckpt["buffer"]
        buffer = ReplayBuffer(len(state["x"]), shape, state["n_classes"], device=device)
        buffer.load_state_dict(state)
    n_steps = args.n_steps if args.n_steps is not None else (cfg["n_steps"] if buffer is not None else NOISE_START_STEPS)
    rule = sgld_step_rule(cfg)  # the training's step rule, unless told otherwise
    if args.step_size is not None:
        rule["step_size"] = args.step_size
    if args.noise_std is not None:
        rule["noise_std"] = args.noise_std
    sampler = SGLDSampler(n_steps, **rule)
    classes = args.classes if args.classes else list(range(info.n_classes))
    if any(not 0 <= c < info.n_classes for c in classes):
        raise UsageError(f"--classes must lie in [0, {info.n_classes})")
    out = args.out or os.path.join("samples", cfg["run_name"], f"draw-{args.init}")
    if os.path.exists(os.path.join(out, "sampling.json")) and not args.force:
        raise UsageError(f"'{out}' already holds a draw; choose another --out or pass --force")
    os.makedirs(out, exist_ok=True)

    nrow = max(1, int(args.n_per_class ** 0.5))
    for c in tqdm(classes, desc="classes"):
        y = torch.full((args.n_per_class,), c, dtype=torch.long)
        x = class_conditional_samples(model, sampler, y, shape, buffer, args.batch_size, device=device)
        save_grid(x, os.path.join(out, f"class_{c}.png"), nrow=nrow)
        if args.individual:
            os.makedirs(os.path.join(out, str(c)), exist_ok=True)
            for i, img in enumerate(x):
                save_grid(img, os.path.join(out, str(c), f"{i:05d}.png"))

    if buffer is not None:
        x0, _ = buffer.sample(args.n_per_class, reinit_freq=0)
    else:
        x0 = torch.rand((args.n_per_class, *shape), device=device) * 2 - 1
    x = sampler(model, x0)
    save_grid(x, os.path.join(out, "unconditional.png"), nrow=nrow)

    settings = {"ckpt": args.ckpt, "step": ckpt["step"], "init": args.init, "n_steps": n_steps,
                "step_size": sampler.step_size, "noise_std": sampler.noise_std, "clamp": sampler.clamp,
                "grad_clip": sampler.grad_clip, "seed": args.seed,
                "n_per_class": args.n_per_class, "classes": classes}
    with open(os.path.join(out, "sampling.json"), "w") as f:
        json.dump(settings, f, indent=2)
    print(f"wrote {len(classes)} class grids{' and individual PNGs' if args.individual else ''} to {out}")


if __name__ == "__main__":
    run(main)
