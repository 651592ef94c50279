"""VGG with batch norm (Simonyan & Zisserman, 2015), CIFAR-style: 3x3 conv -> BN -> ReLU stages
with 2x2 max pools, then flatten -> a small fully connected head.

With a 32x32 input the features end at 512 x 1 x 1; ``input_size`` sets the head's input
(``512 * (input_size // 32)**2`` features) for larger inputs. ``width`` multiplies every conv's and
hidden linear layer's width (``round(c * width)``, at least 1).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

from .resnet import scale_width

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``cfg``: conv widths with ``"M"`` for a max pool; ``hidden``: width of the two hidden linear
    layers of the head (0: a single linear classifier)."""

    def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int = 10, in_channels: int = 3,
                 input_size: int = 32, hidden: int = 512, dropout: float = 0.5, width: float = 1.0):
        super().__init__()
        hidden = scale_width(hidden, width) if hidden else 0
        layers: List[nn.Module] = []
        ch = in_channels
        size = input_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                c = scale_width(int(v), width)
                layers += [nn.Conv2d(ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                           nn.ReLU(inplace=True)]
                ch = c
        if size < 1:
            raise ValueError(f"VGG: input_size {input_size} is too small for {cfg.count('M')} pools")
        self.features = nn.Sequential(*layers)
        flat = ch * size * size
        if hidden:
            self.classifier = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(flat, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(depth: int, num_classes: int = 10, in_channels: int = 3, **kw) -> VGG:
    if depth not in CONFIGS:
        raise ValueError(f"vgg: depth must be one of {sorted(CONFIGS)}, got {depth}")
    return VGG(CONFIGS[depth], num_classes, in_channels, **kw)


def vgg11(num_classes: int = 10, in_channels: int = 3, **kw) -> VGG:
    return vgg(11, num_classes, in_channels, **kw)


def vgg16(num_classes: int = 10, in_channels: int = 3, **kw) -> VGG:
    return vgg(16, num_classes, in_channels, **kw)
