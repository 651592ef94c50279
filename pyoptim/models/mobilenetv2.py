"""MobileNetV2 (Sandler et al., 2018) with a width multiplier and free input channels, size and
classes — the network of the sparse-update experiments (Lin et al., 2022).

Every conv → BN pair sits next to each other in an ``nn.Sequential`` so that
:func:`pyoptim.sparse.fuse_bn` can fold the BNs into conv biases, as on-device training does.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

# expansion t, output channels c, repeats n, first stride s
_SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
             [6, 160, 3, 2], [6, 320, 1, 1]]


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Rounds channel counts to a multiple of ``divisor`` without dropping more than 10%."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(in_ch * expand))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand != 1:
            layers += list(conv_bn_relu(in_ch, hidden, 1))
        layers += list(conv_bn_relu(hidden, hidden, 3, stride, groups=hidden))
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2, last_channels: int = 1280):
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"MobileNetV2: width must be in (0, 4], got {width}")
        in_ch = make_divisible(32 * width)
        self.last_channels = make_divisible(last_channels * max(1.0, width))
        features: List[nn.Module] = [conv_bn_relu(in_channels, in_ch, 3, 2)]
        for t, c, n, s in _SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_relu(in_ch, self.last_channels, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, **kw) -> MobileNetV2:
    return MobileNetV2(width, num_classes, in_channels, **kw)
