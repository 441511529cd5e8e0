"""Models' energy interface and the data pipeline on the real arrays."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data import DataError, augment, epoch_permutation, load_jem_data, load_split, save_grid
from conftest import REPO, local_mnist_mirror
from models import build_model


@pytest.mark.parametrize("arch, kw", [("resnet", dict(width=4)), ("wrn", dict(depth=10, widen=1))])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("norm", ["none", "batch", "group", "instance"])
def test_models_give_logits_and_energies(arch, kw, channels, size, norm):
    model = build_model(arch, 10, channels, norm=norm, **kw).eval()
    x = torch.randn(4, channels, size, size)
    logits = model(x)
    assert logits.shape == (4, 10)
    assert torch.allclose(model.energy(x), -torch.logsumexp(logits, 1), atol=1e-5)
    y = torch.tensor([0, 3, 9, 3])
    assert torch.allclose(model.energy(x, y), -logits[torch.arange(4), y], atol=1e-5)


@pytest.mark.parametrize("size, stride", [(28, 2), (7, 2), (8, 2), (7, 1)])
def test_the_subsampled_shortcut_is_the_strided_1x1_conv(size, stride):
    """Same outputs and same gradients as nn.Conv2d(c_in, c_out, 1, stride) with its weights, at odd
    and even sizes: the skip path of the models, checkpoints of the strided form load into it."""
    from models.energy import SubsampledConv1x1
    torch.manual_seed(0)
    plain, subsampled = torch.nn.Conv2d(4, 8, 1, stride), SubsampledConv1x1(4, 8, stride)
    subsampled.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, size, size)
    outs = [conv(x) for conv in (plain, subsampled)]
    assert outs[0].shape == outs[1].shape and torch.allclose(outs[0], outs[1], atol=1e-6)
    for out in outs:
        out.square().sum().backward()
    assert torch.allclose(plain.weight.grad, subsampled.weight.grad, rtol=1e-5, atol=1e-5)


def test_a_narrow_small_resnet_trains_channels_last_on_one_thread():
    """Width 4 gives the first downsampling block's skip path 4 input channels. As a strided 1x1
    conv in channels-last its weight gradient crashed the process on one thread (double free,
    segfault: oneDNN's AVX2 kernel, uxlfoundation/oneDNN issue 6035; CPUs with AVX-512 took
    another kernel and passed). A subprocess, because what fails is the process."""
    code = ("import torch\n"
            "from models import build_model\n"
            "from sgld import prepare_model\n"
            "model = prepare_model(build_model('resnet', 10, 1, width=4), channels_last=True)\n"
            "for _ in range(20):\n"
            "    x = torch.rand(16, 1, 28, 28).to(memory_format=torch.channels_last)\n"
            "    model(x).logsumexp(1).sum().backward()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-500:]


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        build_model("wrn", 10, 3, depth=12)


def test_offline_arrays_and_splits(data_root):
    x, y, classes = load_split("mnist", "test", data_root)
    assert x.shape == (400, 28, 28, 1) and x.dtype == np.uint8 and len(classes) == 10
    d = load_jem_data("mnist", data_root, "cpu", n_valid=200, train_subset=0.5, labels_per_class=5)
    assert d.train_x.shape[1:] == (1, 28, 28) and len(d.valid_y) == 200
    assert torch.bincount(d.train_y).tolist() == [50] * 10  # class-balanced half of 1,000
    assert torch.bincount(d.train_y[d.labelled]).tolist() == [5] * 10
    again = load_jem_data("mnist", data_root, "cpu", n_valid=200, train_subset=0.5)
    assert torch.equal(d.valid_x, again.valid_x)  # the split never depends on the run


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("imagenet", "train", str(tmp_path))


def test_a_failed_download_is_one_clear_error_and_leaves_no_folders(tmp_path, monkeypatch):
    """No arrays: torchvision downloads into the data root, made for it. A failed download names
    the address tried and the offline alternative, and removes the folders it made."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [(tmp_path / "no-mirror").as_uri() + "/"])
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"downloading mnist from file://.*no-mirror/train-images-idx3-ubyte.gz "
                                        r"failed .*offline, put the arrays at"):
        load_split("mnist", "train", str(root))
    assert not root.exists()


def test_download_from_a_local_mirror(data_root, tmp_path, monkeypatch):
    with local_mnist_mirror(monkeypatch, data_root, tmp_path / "mirror") as served:
        x, y, classes = load_split("mnist", "test", str(tmp_path / "data"))
    assert np.array_equal(x, served["test"][0]) and np.array_equal(y, served["test"][1])
    assert classes[0].startswith("0") and (tmp_path / "data" / "mnist" / "MNIST" / "raw").is_dir()


def test_augment_crops_flips_and_adds_noise():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    out = augment(x, pad=4, flip=True, sigma=0.0)
    assert out.shape == x.shape
    rows_equal = (out[:, :, 1:] == out[:, :, :-1]).all()
    assert rows_equal  # a horizontal ramp stays constant down each column
    shifts = (out[:, 0, 0, 16] - x[:, 0, 0, 16]).abs()
    assert (shifts > 0).float().mean() > 0.5  # most images moved
    flipped = out[:, 0, 0, 20] < out[:, 0, 0, 10]
    assert 0.3 < flipped.float().mean() < 0.7
    noisy = augment(x, pad=0, flip=False, sigma=0.03)
    assert abs((noisy - x).std().item() - 0.03) < 0.002
    assert noisy.min() < -1 and noisy.max() > 1  # the ramp's ends pushed out of the box by noise
    boxed = augment(x, pad=0, flip=False, sigma=0.03, clamp=True)
    assert boxed.min() == -1 and boxed.max() == 1  # back in the box clamped SGLD chains live in
    same = augment(x, pad=0, flip=False, sigma=0.03, generator=torch.Generator().manual_seed(5))
    same_boxed = augment(x, pad=0, flip=False, sigma=0.03, clamp=True, generator=torch.Generator().manual_seed(5))
    inside = same.abs() <= 1
    assert torch.equal(same_boxed[inside], same[inside])  # only what left the box changed


def test_epoch_permutation_is_reproducible():
    a = epoch_permutation(100, 1, 3, torch.device("cpu"))
    epoch_permutation(100, 1, 4, torch.device("cpu"))
    assert torch.equal(a, epoch_permutation(100, 1, 3, torch.device("cpu")))
    assert not torch.equal(a, epoch_permutation(100, 2, 3, torch.device("cpu")))


def test_save_grid_writes_minus_one_black_and_one_white(tmp_path):
    save_grid(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3), tmp_path / "g.png")
    assert np.asarray(Image.open(tmp_path / "g.png"))[..., 0].tolist() == [[0, 128, 255]]


def test_the_scripts_start_without_torchvision():
    """Importing torchvision (its ops load torch._dynamo: ~3 s on an AVX2 CPU) waits until a
    picture is written, so a script's start and its one-line errors stay quick."""
    code = "import sys, train_jem, sample, eval_jem; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]


def _write(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


@pytest.mark.parametrize("fault, message", [
    ("truncated", "truncated or damaged"),
    ("not a zip", "truncated or damaged"),
    ("no labels", "lacks the array(s) y"),
    ("float images", "x has dtype float32"),
    ("channels last missing", "x has shape (1200, 28, 28)"),
    ("wrong size", "x has shape (1200, 32, 32, 1)"),
    ("float labels", "y has dtype float64"),
    ("fewer labels", "y has shape (1199,) for 1200 images"),
    ("label 10", "labels run from 0 to 10"),
    ("negative label", "labels run from -1 to 9"),
    ("class names", "9 class names for the 10 classes"),
    ("empty", "holds no images"),
])
def test_every_damaged_data_file_is_one_clear_line_naming_it(data_root, tmp_path, fault, message):
    with np.load(f"{data_root}/mnist/train.npz") as f:
        x, y, classes = f["x"], f["y"], f["classes"]
    path = tmp_path / "mnist" / "train.npz"
    good = dict(x=x, y=y, classes=classes)
    arrays = {"no labels": dict(x=x, classes=classes), "float images": {**good, "x": x.astype(np.float32)},
              "channels last missing": {**good, "x": x[..., 0]},
              "wrong size": {**good, "x": np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))},
              "float labels": {**good, "y": y.astype(np.float64)}, "fewer labels": {**good, "y": y[:-1]},
              "label 10": {**good, "y": np.where(y == 9, 10, y)},
              "negative label": {**good, "y": np.where(y == 0, -1, y)},
              "class names": {**good, "classes": classes[:9]},
              "empty": dict(x=x[:0], y=y[:0], classes=classes)}.get(fault, good)
    _write(path, **arrays)
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if fault == "not a zip":
        path.write_bytes(b"x,y\n1,2\n")
    with pytest.raises(DataError) as e:
        load_jem_data("mnist", str(tmp_path), "cpu", n_valid=100)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)
