"""Which channels of a model are dead: a diagnostic for pruned training.

A channel is *dead* on a batch when the ReLU after its BatchNorm is zero for every sample and
position, so nothing downstream sees it vary and, through the ReLU, it gets no gradient. Group
lasso makes such channels (a small BN scale with a negative shift); PruneTrain's plain zeroing
made permanent ones (docs/prunetrain.md, "Zombie channels")."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["dead_channels"]


@torch.no_grad()
def dead_channels(model: nn.Module, x: Tensor, train_mode: bool = True) -> Dict[str, Tensor]:
    """``{BatchNorm name: bool [C]}``: the channels whose ``relu(BN output)`` is zero everywhere on
    the batch ``x`` (BN in train mode by default, i.e. batch statistics; the model's mode and the
    BN running statistics are left as they were)."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("dead_channels: x must be a non-empty batch tensor [N, C, ...]")
    outs: Dict[str, Tensor] = {}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    saved = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in bns.items() if m.track_running_stats and m.running_mean is not None}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, m in bns.items()]
    was_training = model.training
    try:
        model.train(train_mode)
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for n, (rm, rv, nb) in saved.items():
            bns[n].running_mean.copy_(rm)
            bns[n].running_var.copy_(rv)
            bns[n].num_batches_tracked.copy_(nb)
    return {n: ~(o > 0).transpose(0, 1).reshape(o.shape[1], -1).any(1) for n, o in outs.items()}
