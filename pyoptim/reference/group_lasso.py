"""Reference group-lasso ops, written with torch ops only.

Geometry (shared by every backend). A weight ``W`` of shape ``[K, Cg, *]`` (conv
``[K, C/groups, kh, kw]``, linear ``[K, C]``) is viewed as ``[groups, K/groups, Cg, S]`` with ``S``
the product of the trailing dims:

* out-channel ``k``: the group ``W[k]``; ``out_norms[k] = ||W[k]||_2`` (``K`` values);
* in-channel ``c = g*Cg + j``: the rows of conv group ``g`` at input slot ``j``,
  ``in_norms[c] = ||W[g*K/groups:(g+1)*K/groups, j]||_2`` (``groups*Cg`` values).

With ``groups == 1`` this is the usual ``||W[:, c]||``. For a depthwise conv (``groups == K``,
``Cg == 1``) the in-channel group of channel ``k`` is ``W[k]`` again: the channel is both, so the
penalty counts it twice, exactly as the formula reads.

Norms are float64 for float64 weights and float32 otherwise (half weights accumulate in float32).
A group of norm zero contributes a zero (sub)gradient, never NaN.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._util import acc_dtype


def _spatial(w: Tensor) -> int:
    S = 1
    for d in w.shape[2:]:
        S *= d
    return S


def _view4(w: Tensor, groups: int) -> Tensor:
    """``w`` as ``[groups, K/groups, Cg, S]`` in the accumulation dtype."""
    K, Cg, S = w.shape[0], w.shape[1], _spatial(w)
    return w.to(acc_dtype(w.dtype)).reshape(groups, K // groups, Cg, S)


def group_lasso_norms(w: Tensor, groups: int = 1) -> Tuple[Tensor, Tensor]:
    K, Cg = w.shape[0], w.shape[1]
    sq = _view4(w, groups).square()
    out_norms = sq.sum(dim=(2, 3)).reshape(K).sqrt()
    in_norms = sq.sum(dim=(1, 3)).reshape(groups * Cg).sqrt()
    return out_norms, in_norms


def _safe_reciprocal(x: Tensor) -> Tensor:
    # 1/x where x > 0, 0 where x == 0 (the subgradient of a zero group); NaN stays NaN.
    return torch.where(x == 0, torch.zeros_like(x), x.reciprocal())


def _row_col_scale(w: Tensor, a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``W[k, j, s] * (a[k] + b[g*Cg + j])`` in the accumulation dtype, shaped like ``w``."""
    K, Cg = w.shape[0], w.shape[1]
    w4 = _view4(w, groups)
    coef = a.reshape(groups, K // groups, 1, 1) + b.reshape(groups, 1, Cg, 1)
    return (w4 * coef).reshape(w.shape)


def group_lasso_norms_backward(grad_out_norms: Tensor, grad_in_norms: Tensor, w: Tensor,
                               out_norms: Tensor, in_norms: Tensor, groups: int = 1) -> Tensor:
    a = grad_out_norms * _safe_reciprocal(out_norms)
    b = grad_in_norms * _safe_reciprocal(in_norms)
    return _row_col_scale(w, a, b, groups).to(w.dtype)


def group_lasso_penalty(weights: Sequence[Tensor], lam: float,
                        groups: Optional[Sequence[int]] = None) -> Tensor:
    """``lam * sum_i (sum_k ||W_i[k]|| + sum_c ||W_i[:, c]||)``, differentiable by autograd."""
    total = None
    for i, w in enumerate(weights):
        o, n = group_lasso_norms(w, groups[i] if groups is not None else 1)
        term = o.sum() + n.sum()
        total = term if total is None else total + term.to(total.dtype)
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total * lam


def group_lasso_grad_(weights: Sequence[Tensor], grads: Sequence[Tensor], lam: float,
                      groups: Optional[Sequence[int]] = None) -> Tensor:
    """Adds ``lam * (W/||W[k]|| + W/||W[:, c]||)`` into every grad; returns the penalty."""
    if len(weights) == 0:
        return torch.zeros((), dtype=torch.float32)
    acc = acc_dtype(weights[0].dtype)
    penalty = torch.zeros((), dtype=acc, device=weights[0].device)
    for i, (w, g) in enumerate(zip(weights, grads)):
        gr = groups[i] if groups is not None else 1
        o, n = group_lasso_norms(w, gr)
        penalty = penalty + o.sum() + n.sum()
        upd = _row_col_scale(w, lam * _safe_reciprocal(o), lam * _safe_reciprocal(n), gr)
        g.copy_((g.to(acc) + upd).to(g.dtype))
    return penalty * lam


def group_lasso_prune_(weights: Sequence[Tensor], threshold: float,
                       groups: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Zeroes every group whose norm is below ``threshold`` (norms taken before any zeroing).

    Returns the keep-masks of all weights concatenated, ``(out_keep [sum K_i], in_keep
    [sum groups_i*Cg_i])`` (bool), with ``keep = not (norm < threshold)``: a NaN group is kept, so
    a NaN stays visible.
    """
    masks: List[Tensor] = []
    for i, w in enumerate(weights):
        gr = groups[i] if groups is not None else 1
        K, Cg = w.shape[0], w.shape[1]
        o, n = group_lasso_norms(w, gr)
        keep_o = ~(o < threshold)
        keep_i = ~(n < threshold)
        keep = keep_o.reshape(gr, K // gr, 1, 1) & keep_i.reshape(gr, 1, Cg, 1)
        w4 = w.view(gr, K // gr, Cg, _spatial(w))
        w4.copy_(torch.where(keep, w4, torch.zeros((), dtype=w.dtype, device=w.device)))
        masks += [keep_o, keep_i]
    device = weights[0].device if len(weights) else None
    if not masks:
        return torch.zeros(0, dtype=torch.bool, device=device), torch.zeros(0, dtype=torch.bool, device=device)
    return torch.cat(masks[0::2]), torch.cat(masks[1::2])
