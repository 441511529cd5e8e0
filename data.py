"""Datasets for JEM: in-memory image tensors, splits, and on-device augmentation.

Two sources behind one call, `load_split(name, split, data_root)`:
  1. offline arrays `<data_root>/<name>/<split>.npz` (x: uint8 N x H x W x C, y: int64, classes),
  2. otherwise torchvision's own dataset class with download=True (the usual path on a networked box).

Images stay uint8 in memory (on the training device) and become floats in [-1, 1] per batch, so an
epoch never decodes a file. Augmentation follows the JEM paper: reflect-pad 4 + random crop,
horizontal flip where it makes sense, and additive Gaussian noise of std `sigma`.
"""
import functools
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """Bad dataset name, missing files, unreadable arrays: reported as one line by the scripts."""


@dataclass(frozen=True)
class DatasetInfo:
    image_size: int
    channels: int
    n_classes: int
    flip: bool  # horizontal flips keep the label (not for digits)


DATASETS = {
    "mnist": DatasetInfo(28, 1, 10, flip=False),
    "fashion_mnist": DatasetInfo(28, 1, 10, flip=True),
    "cifar10": DatasetInfo(32, 3, 10, flip=True),
    "cifar100": DatasetInfo(32, 3, 100, flip=True),
    "svhn": DatasetInfo(32, 3, 10, flip=False),
}


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(name, split, data_root):
    """Return (x uint8 N x H x W x C numpy, y int64 numpy, class names) for split 'train' or 'test'."""
    dataset_info(name)
    if os.path.exists(data_root) and not os.path.isdir(data_root):
        raise DataError(f"data root '{data_root}' is not a folder")
    path = os.path.join(data_root, name, f"{split}.npz")
    if os.path.exists(path):
        return _load_npz(path, name)
    return _load_torchvision(name, split, data_root)


def _load_npz(path, name):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y", "classes") if k not in f.files]
            if missing:
                raise DataError(f"'{path}' lacks the array(s) {', '.join(missing)} (it needs x, y and classes)")
            x, y, classes = f["x"], f["y"], [str(c) for c in f["classes"]]
    except DataError:
        raise
    except Exception as e:  # zip/npz errors come in many types: truncated, not a zip, bad CRC, ...
        raise DataError(f"cannot read '{path}' (truncated or damaged?): {e}") from None
    check_arrays(path, name, x, y, classes)
    return x, y.astype(np.int64), classes


def check_arrays(path, name, x, y, classes):
    """Every way a dataset's arrays can be wrong, as one DataError naming the file and the fault,
    before any training starts."""
    info = DATASETS[name]
    want = f"N x {info.image_size} x {info.image_size} x {info.channels}"
    if x.dtype != np.uint8:
        raise DataError(f"'{path}': x has dtype {x.dtype}; images must be uint8 (0..255)")
    if x.ndim != 4 or x.shape[1:] != (info.image_size, info.image_size, info.channels):
        raise DataError(f"'{path}': x has shape {x.shape}; {name} images are {want} (N x H x W x C)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"'{path}': y has dtype {y.dtype}; labels must be integers")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"'{path}': y has shape {y.shape} for {len(x)} images; it needs one label each")
    if len(x) == 0:
        raise DataError(f"'{path}' holds no images")
    if y.min() < 0 or y.max() >= info.n_classes:
        raise DataError(f"'{path}': labels run from {y.min()} to {y.max()}; {name} has classes "
                        f"0..{info.n_classes - 1}")
    if len(classes) != info.n_classes:
        raise DataError(f"'{path}': {len(classes)} class names for the {info.n_classes} classes of {name}")


def _torchvision_class(name):
    import torchvision.datasets as tvd
    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
            "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]


def download_url(name, split):
    """The first address torchvision's dataset class downloads this split from (its class
    attributes: `mirrors` + `resources` for the MNISTs, `url` for CIFAR, `split_list` for SVHN)."""
    cls = _torchvision_class(name)
    if hasattr(cls, "mirrors"):
        return cls.mirrors[0] + cls.resources[0][0]
    if name == "svhn":
        return cls.split_list[split][0]
    return cls.url


def _load_torchvision(name, split, data_root):
    """The users' path: torchvision downloads into data_root/<name>/ when the arrays are absent.
    Folders this call created are removed again when the download fails."""
    root = os.path.join(data_root, name)
    created = [d for d in (data_root, root) if not os.path.isdir(d)]
    cls = _torchvision_class(name)
    try:
        os.makedirs(root, exist_ok=True)
        if name == "svhn":
            ds = cls(root, split=split, download=True)
            x, y = ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels)
            classes = [str(i) for i in range(10)]
        else:
            ds = cls(root, train=split == "train", download=True)
            x, y, classes = np.asarray(ds.data), np.asarray(ds.targets), list(ds.classes)
    except Exception as e:  # no network, bad checksum, ...
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"downloading {name} from {download_url(name, split)} failed ({reason}); "
                        f"offline, put the arrays at '{os.path.join(root, split + '.npz')}' "
                        "(x uint8 N x H x W x C, y int64, classes) and pass --data-root") from None
    if x.ndim == 3:
        x = x[..., None]
    return x.astype(np.uint8), y.astype(np.int64), classes


def to_float(x_uint8):
    """uint8 N x C x H x W -> float in [-1, 1]."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x):
    """Float images in [-1, 1] -> uint8, clamped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(x, path, nrow=8):
    """Float images in [-1, 1] (one, or a batch) -> one PNG, `nrow` images per row."""
    # Imported here, not at the top: importing torchvision loads torch._dynamo through its ops, about
    # 3 s on a CPU without AVX-512, which every script would pay before its first line (or its one-line
    # error) although most runs write a picture only now and then.
    from torchvision.utils import save_image
    save_image((x + 1) / 2, path, nrow=nrow)


def _class_balanced_pick(y, per_class, generator):
    """Indices of `per_class` random examples of each class (fewer if a class has fewer)."""
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = torch.randperm(len(idx), generator=generator).numpy()
        picks.append(idx[perm[:per_class]])
    return np.sort(np.concatenate(picks))


@dataclass
class JEMData:
    """Everything the training loop needs, as tensors on one device (images uint8 N x C x H x W)."""
    info: DatasetInfo
    classes: list
    train_x: torch.Tensor
    train_y: torch.Tensor
    labelled: torch.Tensor  # indices into train_* that may be used for cross-entropy
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


SPLIT_SEED = 1234  # splits never depend on --seed, so runs with different seeds share a validation set


def load_jem_data(name, data_root, device, n_valid=5000, train_subset=None, labels_per_class=None):
    """Load train/test, hold out a validation set, optionally subsample and drop labels.

    train_subset: None, a fraction in (0, 1], or a count > 1 of training images (class-balanced).
    labels_per_class: None (all labelled) or the number of labelled images per class; the energy
    term still sees every training image (the semi-supervised setting of the paper).
    """
    info = dataset_info(name)
    x, y, classes = load_split(name, "train", data_root)
    tx, ty, _ = load_split(name, "test", data_root)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g).numpy()
    if not 0 <= n_valid < len(x):
        raise DataError(f"--n-valid {n_valid} must be in [0, {len(x)})")
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    if train_subset is not None:
        n = round(train_subset * len(train_idx)) if train_subset <= 1 else int(train_subset)
        keep = _class_balanced_pick(y[train_idx], max(1, n // info.n_classes), g)
        train_idx = train_idx[keep]
    labelled = np.arange(len(train_idx))
    if labels_per_class is not None:
        labelled = _class_balanced_pick(y[train_idx], labels_per_class, g)

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    def images(a):
        return tensor(a.transpose(0, 3, 1, 2))

    return JEMData(info, classes,
                   images(x[train_idx]), tensor(y[train_idx]), tensor(labelled),
                   images(x[valid_idx]), tensor(y[valid_idx]),
                   images(tx), tensor(ty))


@functools.lru_cache(maxsize=1)  # called every step, computed once per epoch
def epoch_permutation(n, seed, epoch, device):
    """Data order for one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def augment(x, pad=4, flip=True, sigma=0.03, clamp=False, generator=None):
    """JEM's training transform on a float batch in [-1, 1]: reflect-pad + crop, flip, + noise,
    then with `clamp` back into [-1, 1], the box that clamped SGLD chains live in.

    Runs on the batch's device with `generator` (one on that device), else the global torch RNG.
    """
    n, _, h, w = x.shape
    g = dict(generator=generator, device=x.device)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), **g)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), **g)
        rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
        cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        flipped = torch.rand(n, 1, 1, 1, **g) < 0.5
        x = torch.where(flipped, x.flip(3), x)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, dtype=x.dtype, **g)
    if clamp:
        x = x.clamp(-1.0, 1.0)
    return x.contiguous()
