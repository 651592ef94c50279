"""A LayerNorm over the channels that still counts the channels pruned away.

A LayerNorm over the channels takes its mean and variance over all ``n`` of them. When pruning
removes channels that were zero, an ordinary LayerNorm over the ``k`` left would divide by ``k``
instead of ``n`` and change the function (Torch-Pruning's ConvNeXt moves by ~0.2 this way).
:class:`CountedLayerNorm` keeps ``n``: with ``x`` the ``k`` kept channels,

    mean = sum(x) / n
    var  = (sum((x - mean)^2) + (n - k) * mean^2) / n       (the removed zeros' share)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

which is exactly the original LayerNorm's output on the kept channels. Reconfiguration swaps the
class of a pruned LayerNorm in place (same parameters, same module object); ``stat_features``
stays the original ``n`` through later prunings.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["CountedLayerNorm", "count_layer_norm"]


class CountedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channels — the last dim, or dim 1 with ``channels_first`` (as
    torchvision's ``LayerNorm2d``) — whose statistics count ``stat_features`` channels."""
    _pyoptim_fx_leaf = True   # ChannelGraph reads it as a LayerNorm, not its arithmetic
    stat_features: int
    channels_first: bool

    def forward(self, x: Tensor) -> Tensor:
        d = 1 if self.channels_first else -1
        n = self.stat_features
        mean = x.sum(d, keepdim=True) / n
        c = x - mean
        var = ((c * c).sum(d, keepdim=True) + (n - x.shape[d]) * mean * mean) / n
        y = c * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = [1] * x.dim()
            shape[d] = -1
            y = y * self.weight.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        where = "dim 1" if self.channels_first else "the last dim"
        return f"{super().extra_repr()}, stat_features={self.stat_features}, over {where}"


def count_layer_norm(mod: nn.LayerNorm, where: str) -> None:
    """Makes ``mod`` (about to lose channels) a :class:`CountedLayerNorm` counting its current
    width; ``where`` is ``"last"`` or ``"first"`` (:attr:`ChannelGraph.layer_norms`). A module
    already counted keeps its count."""
    if isinstance(mod, CountedLayerNorm):
        return
    if not isinstance(mod, nn.LayerNorm) or len(mod.normalized_shape) != 1:
        raise ValueError(f"count_layer_norm: expected a LayerNorm over one dim, got {mod}")
    if where not in ("last", "first"):
        raise ValueError(f"count_layer_norm: where must be 'last' or 'first', got {where!r}")
    n = mod.normalized_shape[0]
    mod.__class__ = CountedLayerNorm
    mod.stat_features = n
    mod.channels_first = where == "first"


def layer_norms_to_count(graph, masks: Dict[int, Tensor]) -> Dict[str, str]:
    """``{module name: where}`` of the graph's LayerNorms over channels that ``masks`` prune."""
    pruned = set()
    for gi, keep in masks.items():
        if bool(keep.all()):
            continue
        pruned.update(m.module for m in graph.groups[gi].members)
    return {name: where for name, where in graph.layer_norms.items() if name in pruned}
