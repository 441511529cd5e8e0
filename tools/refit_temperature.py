"""Refit a finished run's learned temperature as `train_jem.py --refit-temperature` does after its
last step: for checkpoints trained without that flag.

    python -m tools.refit_temperature --ckpt checkpoints/RUN/last.pt --out checkpoints/RUN/refit.pt

T becomes the one that minimises the NLL of the run's clean training images (its own split: the
validation images stay held out); the weights and everything else in the checkpoint are unchanged,
so the result evaluates and samples like the original. Where the classifier gets 99 % of those
images right nothing is written (a T fitted on them would be near 0). On the device the run
trained on, the T is bit for bit the flag's. Prints T before and after.
"""
import argparse
import math
import os

import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import UsageError, resolve_device, run
from data import dataset_info, load_jem_data
from train_jem import clean_image_temperature


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train_jem.py checkpoint trained with --learn-temperature (required)")
    p.add_argument("--out", required=True, help="where the refit checkpoint goes; must not exist (required)")
    p.add_argument("--data-root", help="datasets folder (default: the run's own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out):
        raise UsageError(f"'{args.out}' exists; give a new --out (nothing is overwritten)")
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    if "log_temperature" not in ckpt["model"]:
        raise UsageError(f"'{args.ckpt}' was trained without --learn-temperature: it has no T to refit")
    device = resolve_device(args.device)
    info = dataset_info(cfg["dataset"])
    model = model_from_checkpoint(ckpt, info, device, args.ckpt)
    data = load_jem_data(cfg["dataset"], args.data_root or cfg["data_root"], device, cfg["n_valid"],
                         cfg.get("train_subset"), cfg.get("labels_per_class"))
    before = model.log_temperature.exp().item()
    t, acc = clean_image_temperature(model, data.train_x[data.labelled], data.train_y[data.labelled])
    if t is None:
        raise UsageError(f"the classifier gets {100 * acc:.1f} % of its clean training images right: "
                         "a T fitted on them would make it near certain of everything; nothing written")
    log_t = torch.tensor(math.log(t), dtype=model.log_temperature.dtype)  # as train_jem.py stores it
    ckpt.update(model={**ckpt["model"], "log_temperature": log_t}, config={**cfg, "refit_temperature": True})
    save_checkpoint(ckpt, args.out)
    print(f"T {before:.5f} -> {t:.5f} (clean training images: {len(data.labelled):,}); wrote {args.out}")


if __name__ == "__main__":
    run(main)
