"""Score class-conditional samples with a judge classifier trained by tools/train_classifier.py.

    python -m tools.score_samples --classifier checkpoints/judge-mnist.pt --samples DIR [--json OUT.json]

DIR holds DIR/<class index>/*.png (e.g. what `sample.py --individual` writes); other entries of DIR
are ignored. For each class, prints the fraction of its images that the judge assigns to that class,
then the mean over classes and the worst class.
"""
import argparse
import glob
import json
import os

import numpy as np
import torch
from PIL import Image

from checkpoint import load_judge
from cli import resolve_device, run
from data import DataError, to_float


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True, help="judge checkpoint written by tools/train_classifier.py (required)")
    p.add_argument("--samples", required=True, help="folder with <class index>/*.png (required)")
    p.add_argument("--json", help="also write the scores to this JSON file (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return p


def _load_pngs(files, channels, size):
    # save_image writes grayscale as RGB with equal channels, so convert to what the judge needs
    mode = "L" if channels == 1 else "RGB"
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                img = np.asarray(im.convert(mode)).reshape(im.height, im.width, channels)
        except Exception as e:  # PIL raises several types for truncated or non-image files
            raise DataError(f"cannot read image '{f}': {e}") from None
        if img.shape[:2] != (size, size):
            raise DataError(f"'{f}' is {img.shape[1]}x{img.shape[0]}; the judge expects {size}x{size}")
        images.append(img)
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())  # uint8 N x C x H x W


@torch.inference_mode()
def score_directory(model, directory, device, batch_size=500):
    """{'per_class': {'k': fraction judged k}, 'n_per_class', 'mean', 'min', 'n'} for directory/<k>/*.png."""
    if not os.path.isdir(directory):
        raise DataError(f"samples folder '{directory}' does not exist")
    classes = sorted(int(d) for d in os.listdir(directory)
                     if d.isdigit() and os.path.isdir(os.path.join(directory, d)))
    if not classes:
        raise DataError(f"'{directory}' holds no class folders (<class index>/*.png)")
    if classes[-1] >= model.n_classes:
        raise DataError(f"class folder {classes[-1]} in '{directory}', but the judge knows "
                        f"{model.n_classes} classes")
    model.eval()
    per_class, counts = {}, {}
    for c in classes:
        files = sorted(glob.glob(os.path.join(directory, str(c), "*.png")))
        if not files:  # an empty class would otherwise silently drop out of the mean
            raise DataError(f"class folder '{os.path.join(directory, str(c))}' holds no .png files")
        x = _load_pngs(files, model.in_channels, model.image_size)
        hits = sum((model(to_float(x[i:i + batch_size].to(device))).argmax(1) == c).sum().item()
                   for i in range(0, len(x), batch_size))
        per_class[str(c)], counts[str(c)] = hits / len(x), len(x)
    scores = list(per_class.values())
    return {"per_class": per_class, "n_per_class": counts, "mean": sum(scores) / len(scores),
            "min": min(scores), "n": sum(counts.values())}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    model = load_judge(args.classifier, device)
    result = score_directory(model, args.samples, device)
    print(f"{'class':>5}  {'n':>6}  {'judged as class':>15}")
    for c, frac in result["per_class"].items():
        print(f"{c:>5}  {result['n_per_class'][c]:>6}  {frac:>15.3f}")
    print(f"{'mean':>5}  {result['n']:>6}  {result['mean']:>15.3f}")
    print(f"{'min':>5}  {'':>6}  {result['min']:>15.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run(main)
