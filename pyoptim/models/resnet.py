"""ResNets: CIFAR-style (depth 6n+2, 16-32-64 channels, He et al. 2016) and ImageNet-style
ResNet-18 (basic blocks) and ResNet-50 (bottlenecks), with the layer shapes of the papers.

CIFAR shortcuts use 1x1 projection convs when the shape changes (option B), as PruneTrain does, so
that every layer is a conv and channel union needs no zero-padding shortcut.

``width`` multiplies every layer's channel count (stem included; ``round(c * width)``, at least 1),
so parameters and FLOPs scale by about ``width**2``.
"""
from __future__ import annotations

from typing import List, Sequence, Type, Union

import torch
from torch import Tensor, nn


def scale_width(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1: the channel count of a width-scaled layer."""
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 widths: Sequence[int], num_classes: int, in_channels: int = 3,
                 imagenet_stem: bool = False, width: float = 1.0):
        super().__init__()
        widths = [scale_width(w, width) for w in widths]
        stem_width = scale_width(64, width) if imagenet_stem else widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True))
        stages: List[nn.Module] = []
        in_ch = stem_width
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, stride=2 if (j == 0 and i > 0) else 1))
                in_ch = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 56, ...), ``width`` x (16, 32, 64) channels."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"cifar_resnet: depth must be 6n+2 (20, 32, 56, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels, width=width)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(20, num_classes, in_channels, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(32, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(56, num_classes, in_channels, width)


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, True, width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, True, width)
