"""FLOP accounting for training: one count shared by pruning reports, the CLI and the benchmarks.

:func:`count_flops` runs torch's ``FlopCounterMode`` over one forward and one forward + backward
step; :func:`flops_per_sample` divides by the batch.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_per_sample", "flop_counter", "conv_backward_flops"]


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input gradient as torch counts it (a transposed
    convolution with the grouped weight, already per group), the weight gradient as torch counts
    it divided by ``groups`` (each group's weight sees only its own input and output channels)."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        if transposed:
            dense = conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), transposed=False)
        else:
            dense = conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), transposed=False)
        flops += dense // max(int(groups), 1)
    return flops


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode(display=False)`` with :func:`conv_backward_flops` for grouped convolutions."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def _count_flops(model: nn.Module, example_input: Tensor, meta: bool) -> Tuple[int, int]:
    if meta:   # shapes only: the same counts without computing anything
        params = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
                  for n, p in model.named_parameters()}
        state = dict(params)
        state.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
        x = torch.empty_like(example_input, device="meta")

        def run():
            return torch.func.functional_call(model, state, (x,))
        grads_of = [p for p in params.values() if p.requires_grad]
    else:
        def run():
            return model(example_input)
        grads_of = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), flop_counter() as fwd:
        run()
    with torch.enable_grad(), flop_counter() as train:
        out = run()
        if grads_of:
            torch.autograd.grad(out.float().sum(), grads_of, allow_unused=True)
    return fwd.get_total_flops(), train.get_total_flops()


def count_flops(model: nn.Module, example_input: Tensor) -> Tuple[int, int]:
    """``(forward FLOPs, forward + backward FLOPs)`` of one step of ``model`` on
    ``example_input``, counted by torch's ``FlopCounterMode`` in eval mode (BN statistics do not
    move), on meta tensors — by shapes, without computing — where every op allows it, else on the
    real tensors. The backward counts the gradients of every trainable parameter. Divide by
    ``example_input.shape[0]`` for FLOPs per sample."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        try:
            return _count_flops(model, example_input, meta=True)
        except Exception:
            return _count_flops(model, example_input, meta=False)
    finally:
        for m, t in modes.items():
            m.training = t


def flops_per_sample(model: nn.Module, example_input: Tensor) -> Tuple[float, float]:
    """:func:`count_flops` divided by the batch size of ``example_input``."""
    fwd, train = count_flops(model, example_input)
    n = example_input.shape[0]
    return fwd / n, train / n
