"""The JEM reading of a classifier (Grathwohl et al. 2019, eq. 4-5).

With logits f(x), p(x, y) = exp(f(x)[y]) / Z and p(x) = sum_y exp(f(x)[y]) / Z, so
    E(x, y) = -f(x)[y]          and          E(x) = -logsumexp_y f(x)[y].
"""
import torch
import torch.nn as nn


def make_norm(kind, channels):
    """JEM trains without normalisation by default: batch norm couples samples and data in a batch."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm '{kind}'; choose none, batch, group or instance")


class EnergyClassifier(nn.Module):
    """Base class: a subclass defines `features(x)` (N x D) and sets `self.head = nn.Linear(D, K)`."""

    def __init__(self):
        super().__init__()
        # None (no entry in the state_dict) unless build_model(learn_temperature=True) sets it
        self.register_parameter("log_temperature", None)

    def forward(self, x):
        return self.head(self.features(x))

    def class_logits(self, logits):
        """The classifier's logits: p(y|x) = softmax(f(x) / T). JEM's own reading is T = 1. A learned
        T (--learn-temperature) is trained by the cross-entropy alone and never enters E(x, y): the
        energy terms fix the scale of f only up to the temperature of the SGLD chains, which is far
        from 1 (steps of a with noise s sample exp(f / T') at T' = s^2 / 2a, 1.25e-5 for the
        presets), so the classifier's temperature is a free parameter of the model, not of JEM."""
        if self.log_temperature is None:
            return logits
        return logits * torch.exp(-self.log_temperature)

    def energy(self, x, y=None):
        """E(x) = -logsumexp f(x) if y is None, else E(x, y) = -f(x)[y]."""
        return energy_from_logits(self(x), y)


def energy_from_logits(logits, y=None):
    if y is None:
        return -torch.logsumexp(logits, dim=1)
    return -logits.gather(1, y[:, None]).squeeze(1)


ACTIVATIONS = ("leaky_relu", "silu")


def make_act(kind):
    """leaky ReLU with the JEM code's slope 0.2: the input gradient never vanishes, which SGLD needs.
    SiLU (Swish) is smooth too, so its input gradient changes continuously along a chain; the JEM
    authors advise it for stability (wgrathwohl/JEM issue 8)."""
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.2)
    if kind == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation '{kind}'; choose one of: {', '.join(ACTIVATIONS)}")


def make_shortcut(c_in, c_out, stride):
    """A residual block's skip path: the identity, or a 1x1 conv where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return SubsampledConv1x1(c_in, c_out, stride)


class SubsampledConv1x1(nn.Conv2d):
    """nn.Conv2d(c_in, c_out, 1, stride), computed as a stride-1 1x1 conv of every stride-th pixel:
    the same function and the same parameters (checkpoints load either way). Why: for the strided
    form, oneDNN's AVX2 weight-gradient kernel writes past its buffer when the input is channels-last
    with fewer than 8 channels (uxlfoundation/oneDNN issue 6035): on this project's 2-core AVX2 CPU a
    width-4 small ResNet crashed (double free, segfault) at one thread; upstream reports wrong
    gradients at more. Stride 1 takes another kernel."""

    def __init__(self, c_in, c_out, stride):
        super().__init__(c_in, c_out, 1)
        self.step = stride

    def forward(self, x):
        return super().forward(x[:, :, ::self.step, ::self.step])
