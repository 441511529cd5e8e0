"""Classifiers read as energy models: `build_model(config)` gives a WideResNet or a small ResNet."""
from .energy import ACTIVATIONS, EnergyClassifier
from .resnet import SmallResNet
from .wideresnet import WideResNet

ARCHS = ("wrn", "resnet")
ARCH_SETTINGS = {"wrn": ("depth", "widen"), "resnet": ("width",)}  # the sizes each architecture reads


def build_model(arch, n_classes, in_channels, norm="none", depth=28, widen=10, width=32,
                dropout=0.0, activation="leaky_relu"):
    """One builder for every script: the checkpoint stores these arguments, sample.py replays them."""
    if arch == "wrn":
        return WideResNet(depth, widen, n_classes, in_channels, norm=norm, dropout=dropout,
                          activation=activation)
    if arch == "resnet":
        return SmallResNet(width, n_classes, in_channels, norm=norm, dropout=dropout,
                           activation=activation)
    raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHS)}")


__all__ = ["ACTIVATIONS", "ARCHS", "ARCH_SETTINGS", "EnergyClassifier", "SmallResNet", "WideResNet", "build_model"]
