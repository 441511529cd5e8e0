"""WideResNet (Zagoruyko & Komodakis 2016) as in the JEM code: optional norm, leaky ReLU (or SiLU), dropout."""
import torch.nn as nn

from .energy import EnergyClassifier, make_act, make_norm, make_shortcut


class WideBasic(nn.Module):
    def __init__(self, c_in, c_out, stride, norm, dropout, activation):
        super().__init__()
        self.act = make_act(activation)
        self.norm1, self.conv1 = make_norm(norm, c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        self.norm2, self.conv2 = make_norm(norm, c_out), nn.Conv2d(c_out, c_out, 3, stride, 1)
        self.skip = make_shortcut(c_in, c_out, stride)

    def forward(self, x):
        h = self.dropout(self.conv1(self.act(self.norm1(x))))
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class WideResNet(EnergyClassifier):
    """WRN-depth-widen: depth = 6n + 4, three stages of n blocks with 16k, 32k, 64k channels."""

    def __init__(self, depth=28, widen=10, n_classes=10, in_channels=3, norm="none", dropout=0.0,
                 activation="leaky_relu"):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        layers, c_in = [], widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(WideBasic(c_in, c_out, stride, norm, dropout, activation))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.norm, self.act = make_norm(norm, c_in), make_act(activation)
        self.head = nn.Linear(c_in, n_classes)

    def features(self, x):
        return self.act(self.norm(self.blocks(self.stem(x)))).mean(dim=(2, 3))
