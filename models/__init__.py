"""Classifiers read as energy models: `build_model(config)` gives a WideResNet or a small ResNet."""
import torch

from .energy import ACTIVATIONS, EnergyClassifier
from .resnet import SmallResNet
from .wideresnet import WideResNet

ARCHS = ("wrn", "resnet")
ARCH_SETTINGS = {"wrn": ("depth", "widen"), "resnet": ("width",)}  # the sizes each architecture reads


def build_model(arch, n_classes, in_channels, norm="none", depth=28, widen=10, width=32,
                dropout=0.0, activation="leaky_relu", learn_temperature=False):
    """One builder for every script: the checkpoint stores these arguments, sample.py replays them."""
    if arch == "wrn":
        model = WideResNet(depth, widen, n_classes, in_channels, norm=norm, dropout=dropout,
                           activation=activation)
    elif arch == "resnet":
        model = SmallResNet(width, n_classes, in_channels, norm=norm, dropout=dropout,
                            activation=activation)
    else:
        raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHS)}")
    if learn_temperature:
        model.log_temperature = torch.nn.Parameter(torch.zeros(()))  # T = 1 to start: JEM's reading
    return model


__all__ = ["ACTIVATIONS", "ARCHS", "ARCH_SETTINGS", "EnergyClassifier", "SmallResNet", "WideResNet", "build_model"]
