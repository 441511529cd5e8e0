"""Train an independent CNN classifier (the "judge") on real data, to score generated samples.

    python -m tools.train_classifier --dataset mnist --data-root data --out checkpoints/judge-mnist.pt

The judge never sees generated samples: it is trained on the real training split and its accuracy
on the real test split is printed and stored. Score samples with tools/score_samples.py.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import FORMAT_VERSION, save_checkpoint
from cli import UsageError, resolve_device, run
from data import augment, dataset_info, load_split, to_float
from models.judge import JUDGE_ARCH, build_judge


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset name (default: %(default)s)")
    p.add_argument("--data-root", default="data", help="folder holding <dataset>/<split>.npz (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per training step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate of the one-cycle schedule "
                                                          "(default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.3,
                   help="each training image gets Gaussian noise of a std drawn uniformly from [0, NOISE], "
                        "so that noisy, textured samples are not judged by features clean digits never "
                        "show (default: %(default)s)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv stage (default: %(default)s)")
    p.add_argument("--train-subset", type=int, help="train on this many random training images, for quick "
                                                    "tests (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, data order, shifts and "
                                                            "--train-subset pick (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--out", help="checkpoint path (default: checkpoints/judge-<dataset>.pt)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: refuse)")
    return p


@torch.inference_mode()
def accuracy(model, x_uint8, y, device, batch_size=1000):
    model.eval()
    correct = 0
    for i in range(0, len(x_uint8), batch_size):
        x = to_float(x_uint8[i:i + batch_size].to(device))
        correct += (model(x).argmax(1) == y[i:i + batch_size].to(device)).sum().item()
    return correct / len(x_uint8)


def main(argv=None):
    args = build_parser().parse_args(argv)
    info = dataset_info(args.dataset)
    out = args.out or os.path.join("checkpoints", f"judge-{args.dataset}.pt")
    # checked before any training, so a typo does not cost minutes and then destroy a good judge
    if os.path.exists(out) and not args.force:
        raise UsageError(f"'{out}' exists; pass --force to overwrite it")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    x, y, _ = load_split(args.dataset, "train", args.data_root)
    tx, ty, _ = load_split(args.dataset, "test", args.data_root)
    if args.noise < 0:
        raise UsageError("--noise must be >= 0")
    if args.train_subset is not None:
        if not 0 < args.train_subset <= len(x):
            raise UsageError(f"--train-subset must be in [1, {len(x)}]")
        keep = torch.randperm(len(x))[:args.train_subset].numpy()
        x, y = x[keep], y[keep]
    # uint8 NCHW on the device; floats are made per batch to keep memory small
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(y).to(device)
    tx, ty = torch.from_numpy(tx.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ty)

    config = {"arch": JUDGE_ARCH, "dataset": args.dataset, "width": args.width, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "noise": args.noise, "train_subset": args.train_subset,
              "seed": args.seed}
    model = build_judge(config, info).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            # shifts of up to 2 px; flips only where the dataset allows them (never for digits)
            xb = augment(to_float(x[idx]), pad=2, flip=info.flip, sigma=0.0)
            xb = xb + args.noise * torch.rand(len(xb), 1, 1, 1, device=device) * torch.randn_like(xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")

    test_acc = accuracy(model, tx, ty, device)
    print(f"test accuracy: {100 * test_acc:.2f}% ({len(tx)} test images, "
          f"trained {time.time() - start:.0f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint({"format_version": FORMAT_VERSION, "config": config,
                     "model": model.state_dict(), "test_acc": test_acc}, out)
    print(f"saved {out}")


if __name__ == "__main__":
    run(main)
