"""A small pre-activation ResNet that trains JEM at useful speed on a CPU (28x28 or 32x32, 1 or 3 ch)."""
import torch.nn as nn
import torch.nn.functional as F

from .energy import EnergyClassifier, make_act, make_norm, make_shortcut


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, norm, activation):
        super().__init__()
        self.act = make_act(activation)
        self.norm1, self.conv1 = make_norm(norm, c_in), nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.norm2, self.conv2 = make_norm(norm, c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = make_shortcut(c_in, c_out, stride)

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class SmallResNet(EnergyClassifier):
    """Stem conv, then three stages of one residual block each (width, 2 width, 4 width channels).

    The head sees a 4x4 grid of pooled features rather than one global average: where the strokes
    are matters on small images (a plain MNIST classifier reached 95.7% instead of 92.4% after 400
    steps at width 16), and the grid works for 28x28 and 32x32 inputs alike."""

    def __init__(self, width=32, n_classes=10, in_channels=3, norm="none", dropout=0.0,
                 activation="leaky_relu"):
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.stem = nn.Conv2d(in_channels, w[0], 3, 1, 1)
        self.blocks = nn.Sequential(Block(w[0], w[0], 1, norm, activation),
                                    Block(w[0], w[1], 2, norm, activation),
                                    Block(w[1], w[2], 2, norm, activation))
        self.norm, self.act = make_norm(norm, w[2]), make_act(activation)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(w[2] * 16, n_classes)

    def features(self, x):
        h = self.act(self.norm(self.blocks(self.stem(x))))
        return self.dropout(F.adaptive_avg_pool2d(h, 4).flatten(1))
