"""Group-lasso ops: typed wrappers, fake kernels, autograd, and the Python (Triton / reference)
kernels registered behind ``torch.ops.pyoptim``.

Math (``W`` of shape ``[K, C/groups, *]``; see :mod:`pyoptim.reference.group_lasso` for the
channel groups of grouped and depthwise convs)::

    penalty = lam * (sum_k ||W[k]||_2 + sum_c ||W[:, c]||_2)
    dpenalty/dW = lam * (W / ||W[k]|| + W / ||W[:, c]||)      (a zero-norm group contributes 0)

Backends: C++ (CPU), CUDA (one launch set per 44 weights of the list), Triton, reference.
Weights: float16, bfloat16, float32 (norms and penalty in float32) and float64 (in float64);
contiguous, or channels_last (4-D) / channels_last_3d (5-D), each weight on its own (a list may mix
layouts). A grad must be laid out like its weight; ``group_lasso_norms_backward`` returns ``w``'s
layout. The norms are sums over each channel's elements, so they do not depend on the layout.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._util import acc_dtype
from ..reference import group_lasso as ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- input checks of the Python kernels (the same messages as csrc/group_lasso.h) -------------

def is_channels_last(t: Tensor) -> bool:
    """A 4-D channels_last / 5-D channels_last_3d tensor that is not also contiguous (one that is
    both, e.g. a 1x1 conv's, has the same element order either way)."""
    if t.is_contiguous():
        return False
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _layout_name(w: Tensor) -> str:
    if not is_channels_last(w):
        return "contiguous"
    return "channels_last_3d" if w.dim() == 5 else "channels_last"


def same_layout(g: Tensor, w: Tensor) -> bool:
    """``g`` is dense in the layout the kernels read ``w`` in."""
    if g.layout != torch.strided:
        return False
    if not is_channels_last(w):
        return g.is_contiguous()
    return g.is_contiguous(memory_format=torch.channels_last if w.dim() == 4 else torch.channels_last_3d)


def _check_weight(w: Tensor, groups: int, op: str, name: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOATS:
        raise RuntimeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {w.dtype}")
    if w.dim() < 2:
        raise RuntimeError(f"{op}: {name} must have at least 2 dims [out_channels, in_channels/groups, *], "
                           f"got shape {tuple(w.shape)}")
    if w.layout != torch.strided:
        raise RuntimeError(f"{op}: {name} must be a strided (dense) tensor")
    if not (w.is_contiguous() or is_channels_last(w)):
        raise RuntimeError(f"{op}: {name} must be contiguous, or channels_last (4-D) / channels_last_3d "
                           f"(5-D), got shape {list(w.shape)} with strides {list(w.stride())} "
                           f"(call .contiguous())")
    if groups < 1:
        raise RuntimeError(f"{op}: groups for {name} must be >= 1, got {groups}")
    if w.shape[0] % groups != 0:
        raise RuntimeError(f"{op}: {name} has {w.shape[0]} output channels, not divisible by groups={groups}")


def _check_lists(weights: Sequence[Tensor], grads: Optional[Sequence[Tensor]],
                 groups: Optional[Sequence[int]], op: str) -> None:
    if grads is not None and len(grads) != len(weights):
        raise RuntimeError(f"{op}: weights and grads must have the same length, got {len(weights)} "
                           f"weights and {len(grads)} grads")
    if groups is not None and len(groups) != len(weights):
        raise RuntimeError(f"{op}: groups must have one entry per weight, got {len(groups)} for "
                           f"{len(weights)} weights")
    for i, w in enumerate(weights):
        wn = f"weights[{i}]"
        _check_weight(w, groups[i] if groups is not None else 1, op, wn)
        if w.device != weights[0].device:
            raise RuntimeError(f"{op}: {wn} is on {w.device} but weights[0] is on {weights[0].device} "
                               f"(all tensors must be on one device)")
        if w.dtype != weights[0].dtype:
            raise RuntimeError(f"{op}: {wn} has dtype {w.dtype} but weights[0] has {weights[0].dtype} "
                               f"(all weights must share one dtype)")
        if grads is not None:
            g, gn = grads[i], f"grads[{i}]"
            if g.device != w.device:
                raise RuntimeError(f"{op}: {gn} is on {g.device} but {wn} is on {w.device}")
            if g.dtype != w.dtype:
                raise RuntimeError(f"{op}: {gn} has dtype {g.dtype} but {wn} has {w.dtype}")
            if g.shape != w.shape:
                raise RuntimeError(f"{op}: {gn} has shape {list(g.shape)} but {wn} has {list(w.shape)}")
            if not same_layout(g, w):
                raise RuntimeError(f"{op}: {gn} must be contiguous in the layout of {wn} "
                                   f"({_layout_name(w)}), got strides {list(g.stride())}")


def _check_disjoint(ts: Sequence[Tensor], op: str, list_name: str) -> None:
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(ts) if t.numel() > 0 and t.device.type != "meta")
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise RuntimeError(f"{op}: {list_name}[{i1}] and {list_name}[{i0}] share memory; each "
                               f"tensor written by one call must be distinct")


def _check_scalar(value: float, op: str, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise RuntimeError(f"{op}: {name} must be finite and >= 0, got {value}")


def _check_norms_backward(go, gi, w, on, inn, groups) -> None:
    op = "group_lasso_norms_backward"
    _check_weight(w, groups, op, "w")
    nd = acc_dtype(w.dtype)
    K, C = w.shape[0], groups * w.shape[1]
    for t, name, n in ((go, "grad_out_norms", K), (gi, "grad_in_norms", C), (on, "out_norms", K),
                       (inn, "in_norms", C)):
        if t.dim() != 1 or t.shape[0] != n:
            raise RuntimeError(f"{op}: {name} must have shape [{n}], got {list(t.shape)}")
        if t.dtype != nd:
            raise RuntimeError(f"{op}: {name} must have dtype {nd}, got {t.dtype}")
        if t.device != w.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but w is on {w.device}")
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous")


def _check_triton_device(t: Tensor, op: str) -> None:
    if t.device.type == "cpu" and not _backend.triton_interpreted():
        raise RuntimeError(f"{op}: the Triton kernels take CPU tensors only under TRITON_INTERPRET=1")


# ---- Python kernels: validate, then run the Triton launcher or the reference ---------------------

def _triton_module():
    from ..triton_kernels import group_lasso as tk  # imports triton: only when used
    return tk


def _py_norms(impl):
    def kernel(w: Tensor, groups: int = 1) -> Tuple[Tensor, Tensor]:
        _check_weight(w, groups, "group_lasso_norms", "w")
        if impl == "triton":
            _check_triton_device(w, "group_lasso_norms")
            return _triton_module().group_lasso_norms(w, groups)
        o, i = ref.group_lasso_norms(w, groups)
        return o.contiguous(), i.contiguous()
    return kernel


def _py_norms_backward(impl):
    def kernel(go: Tensor, gi: Tensor, w: Tensor, on: Tensor, inn: Tensor, groups: int = 1) -> Tensor:
        _check_norms_backward(go, gi, w, on, inn, groups)
        if impl == "triton":
            _check_triton_device(w, "group_lasso_norms_backward")
            return _triton_module().group_lasso_norms_backward(go, gi, w, on, inn, groups)
        # in w's layout, as the compiled kernels and the fake kernel give it
        return torch.empty_like(w).copy_(ref.group_lasso_norms_backward(go, gi, w, on, inn, groups))
    return kernel


def _py_grad(impl):
    def kernel(weights: List[Tensor], grads: List[Tensor], lam: float,
               groups: Optional[List[int]] = None) -> Tensor:
        _check_scalar(lam, "group_lasso_grad_", "lam")
        _check_lists(weights, grads, groups, "group_lasso_grad_")
        _check_disjoint(grads, "group_lasso_grad_", "grads")
        if len(weights) == 0:
            return torch.zeros((), dtype=torch.float32)
        if impl == "triton":
            _check_triton_device(weights[0], "group_lasso_grad_")
            return _triton_module().group_lasso_grad_(list(weights), list(grads), lam, groups)
        return ref.group_lasso_grad_(weights, grads, lam, groups)
    return kernel


def _py_prune(impl):
    def kernel(weights: List[Tensor], threshold: float,
               groups: Optional[List[int]] = None) -> Tuple[Tensor, Tensor]:
        _check_scalar(threshold, "group_lasso_prune_", "threshold")
        _check_lists(weights, None, groups, "group_lasso_prune_")
        _check_disjoint(weights, "group_lasso_prune_", "weights")
        if len(weights) == 0:
            empty = torch.zeros(0, dtype=torch.bool)
            return empty, empty.clone()
        if impl == "triton":
            _check_triton_device(weights[0], "group_lasso_prune_")
            masks = _triton_module().group_lasso_prune_(list(weights), threshold, groups)
            return torch.cat(masks[0::2]), torch.cat(masks[1::2])
        return ref.group_lasso_prune_(weights, threshold, groups)
    return kernel


for _name, _make in (("group_lasso_norms", _py_norms), ("group_lasso_norms_backward", _py_norms_backward),
                     ("group_lasso_grad_", _py_grad), ("group_lasso_prune_", _py_prune)):
    _backend.register_python_kernels(_name, triton=_make("triton"), reference=_make("reference"))


# ---- fake kernels and autograd (only where the schemas exist) -------------------------------------

if _backend.HAS_CPP:
    @torch.library.register_fake("pyoptim::group_lasso_norms")
    def _(w, groups=1):
        _check_weight(w, groups, "group_lasso_norms", "w")
        nd = acc_dtype(w.dtype)
        return w.new_empty((w.shape[0],), dtype=nd), w.new_empty((groups * w.shape[1],), dtype=nd)

    @torch.library.register_fake("pyoptim::group_lasso_norms_backward")
    def _(go, gi, w, on, inn, groups=1):
        _check_norms_backward(go, gi, w, on, inn, groups)
        return torch.empty_like(w)

    @torch.library.register_fake("pyoptim::group_lasso_grad_")
    def _(weights, grads, lam, groups=None):
        _check_lists(weights, grads, groups, "group_lasso_grad_")
        if len(weights) == 0:
            return torch.empty((), dtype=torch.float32)
        return weights[0].new_empty((), dtype=acc_dtype(weights[0].dtype))

    @torch.library.register_fake("pyoptim::group_lasso_prune_")
    def _(weights, threshold, groups=None):
        _check_lists(weights, None, groups, "group_lasso_prune_")
        n_out = sum(w.shape[0] for w in weights)
        n_in = sum((groups[i] if groups is not None else 1) * w.shape[1] for i, w in enumerate(weights))
        if len(weights) == 0:
            return torch.empty(0, dtype=torch.bool), torch.empty(0, dtype=torch.bool)
        return (weights[0].new_empty((n_out,), dtype=torch.bool),
                weights[0].new_empty((n_in,), dtype=torch.bool))

    def _norms_setup_context(ctx, inputs, output):
        w, groups = inputs[0], (inputs[1] if len(inputs) > 1 else 1)
        ctx.groups = groups
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(w, output[0], output[1])

    def _norms_backward(ctx, grad_out_norms, grad_in_norms):
        w, on, inn = ctx.saved_tensors
        gw = torch.ops.pyoptim.group_lasso_norms_backward(
            grad_out_norms.contiguous(), grad_in_norms.contiguous(), w, on, inn, ctx.groups)
        return gw, None

    torch.library.register_autograd("pyoptim::group_lasso_norms", _norms_backward,
                                    setup_context=_norms_setup_context)


# ---- typed wrappers --------------------------------------------------------------------------------

class _NormsFunction(torch.autograd.Function):
    """Autograd for the no-extension path (the dispatcher path uses register_autograd)."""

    @staticmethod
    def forward(ctx, w, groups):
        o, i = _backend.python_kernel("group_lasso_norms", w.device)(w, groups)
        ctx.groups = groups
        ctx.save_for_backward(w, o, i)
        return o, i

    @staticmethod
    def backward(ctx, go, gi):
        w, o, i = ctx.saved_tensors
        kernel = _backend.python_kernel("group_lasso_norms_backward", w.device)
        return kernel(go.contiguous(), gi.contiguous(), w, o, i, ctx.groups), None


def group_lasso_norms(w: Tensor, groups: int = 1) -> Tuple[Tensor, Tensor]:
    """``(out_norms [K], in_norms [groups*Cg])`` of a weight ``[K, Cg, *]``; differentiable."""
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.group_lasso_norms(w, groups)
    return _NormsFunction.apply(w, groups)


def group_lasso_norms_backward(grad_out_norms: Tensor, grad_in_norms: Tensor, w: Tensor,
                               out_norms: Tensor, in_norms: Tensor, groups: int = 1) -> Tensor:
    """``W * (grad_out/out_norm [k] + grad_in/in_norm [c])``, zero where a norm is zero."""
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.group_lasso_norms_backward(grad_out_norms, grad_in_norms, w,
                                                             out_norms, in_norms, groups)
    return _backend.python_kernel("group_lasso_norms_backward", w.device)(
        grad_out_norms, grad_in_norms, w, out_norms, in_norms, groups)


def group_lasso_grad_(weights: Sequence[Tensor], grads: Sequence[Tensor], lam: float,
                      groups: Optional[Sequence[int]] = None) -> Tensor:
    """Adds ``lam * (W/||W[k]|| + W/||W[:, c]||)`` into every grad in place, returns the penalty
    ``lam * sum(norms)`` as a 0-dim tensor on the weights' device (no device sync)."""
    weights, grads = list(weights), list(grads)
    groups = None if groups is None else [int(g) for g in groups]
    if len(weights) == 0 or not _backend.HAS_CPP:
        device = weights[0].device if weights else torch.device("cpu")
        return _backend.python_kernel("group_lasso_grad_", device)(weights, grads, float(lam), groups)
    return torch.ops.pyoptim.group_lasso_grad_(weights, grads, float(lam), groups)


def group_lasso_prune_(weights: Sequence[Tensor], threshold: float,
                       groups: Optional[Sequence[int]] = None) -> List[Tuple[Tensor, Tensor]]:
    """Zeroes every channel group whose norm is below ``threshold`` (norms taken before any zeroing)
    and returns one ``(out_keep [K], in_keep [groups*Cg])`` pair of bool masks per weight."""
    weights = list(weights)
    groups = None if groups is None else [int(g) for g in groups]
    if len(weights) == 0:
        return []
    if not _backend.HAS_CPP:
        out_keep, in_keep = _backend.python_kernel("group_lasso_prune_", weights[0].device)(
            weights, float(threshold), groups)
    else:
        out_keep, in_keep = torch.ops.pyoptim.group_lasso_prune_(weights, float(threshold), groups)
    gs = groups if groups is not None else [1] * len(weights)
    outs = out_keep.split([w.shape[0] for w in weights])
    ins = in_keep.split([g * w.shape[1] for g, w in zip(gs, weights)])
    return list(zip(outs, ins))
