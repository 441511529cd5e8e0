"""JudgeCNN: a plain CNN classifier that scores generated samples, independent of the JEM models.

Deliberately a different family from the JEM networks (max-pooling, batch norm, dropout, no residual
connections, trained only with cross-entropy on real data), so that a sample it recognises is not
merely one that exploits the same features the generator was trained with.
"""
import torch.nn as nn

JUDGE_ARCH = "judge-cnn"  # a judge checkpoint's config["arch"], so that scorers can refuse JEM checkpoints


def _stage(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # BN supplies the bias
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2))


class JudgeCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (width, 2 width, 4 width channels), then a dropout MLP head.

    One conv per stage keeps MNIST training to a few CPU minutes; inputs are floats in [-1, 1].
    """

    def __init__(self, in_channels=1, n_classes=10, image_size=28, width=32, dropout=0.3):
        super().__init__()
        # kept so a scorer can check that images fit the network it was handed
        self.in_channels, self.image_size, self.n_classes = in_channels, image_size, n_classes
        w = [width, 2 * width, 4 * width]
        self.features = nn.Sequential(_stage(in_channels, w[0]), _stage(w[0], w[1]), _stage(w[1], w[2]))
        side = image_size // 8  # three 2x2 poolings (floored): 28 -> 3, 32 -> 4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(w[2] * side * side, 256),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(256, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build_judge(config, info):
    """The network a judge checkpoint's config describes."""
    return JudgeCNN(info.channels, info.n_classes, info.image_size, width=config["width"])
