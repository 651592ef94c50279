"""Triton kernels (and host launchers) of the group-lasso op family.

Same semantics as ``pyoptim/reference/group_lasso.py`` (the spec). A weight ``W`` of shape
``[K, Cg, *]`` is viewed as the matrix ``[groups, K/groups, N]`` with ``N = Cg*S`` (``S`` the
product of the trailing dims); column ``col`` of conv group ``g`` belongs to in-channel
``g*Cg + col//S``.

Layouts: ``W`` contiguous, or (4-D) channels_last / (5-D) channels_last_3d. Each out-channel's
row of ``N`` elements is contiguous in both, so the matrix view and the tile kernels read memory
order; only the column of in-channel slot ``j`` at spatial ``s`` differs (``j*S + s``, or
``s*Cg + j`` channels-last): the finish kernel gathers and the scale kernel maps columns under the
``CL`` constexpr.

Kernels (one launch set per tensor; only computed integer offsets, no pointer tables):

1. ``_gl_partials_kernel``: one program per ``[BLOCK_K, BLOCK_N]`` tile of the matrix view; tiles
   never straddle a conv group. The 3-D tile grid (group, row tile, column tile) is flattened onto
   grid axis 0 (axes 1/2 are limited to 65535 on CUDA) with the column tile fastest. Each program
   squares its tile in the accumulation dtype and stores row sums to ``out_partial[K, n_ct]`` and
   column sums to ``in_partial[groups*n_rt, N]``. No atomics: the result is deterministic.
2. ``_gl_finish_kernel``: one launch; the first programs reduce ``out_partial`` rows to
   ``out_norms``, the others reduce ``in_partial`` over row tiles and ``s`` to ``in_norms``.
3. ``_gl_scale_kernel``: same tile grid as (1), three constexpr modes:
   ``BACKWARD`` ``dst = W*(g_o[k]/o[k] + g_i[c]/i[c])``, ``GRAD`` ``dst += W*(lam/o[k] + lam/i[c])``
   (a reciprocal of a zero norm is 0), ``PRUNE`` stores zeros where a keep mask is false
   (``tl.where``-style masked store, never a multiply by 0, so NaN groups that are kept stay NaN).

Accumulation is float64 for float64 weights and float32 otherwise. ``lam`` reaches the kernel as
a float32 pair ``hi + lo`` (Triton passes Python floats as float32), rebuilt in float64 when the
weight is float64. Penalties are summed with torch ops on the norm tensors (no host sync).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, next_pow2, num_warps
from ._common import split_f32 as _split_f32
from ._common import to_acc as _to_acc

__all__ = [
    "group_lasso_norms",
    "group_lasso_norms_backward",
    "group_lasso_grad_",
    "group_lasso_prune_",
]

_MODE_BACKWARD = 0
_MODE_GRAD = 1
_MODE_PRUNE = 2


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.sqrt(x)  # f64 sqrt lowers to the IEEE-rounded instruction
    else:
        return tl.sqrt_rn(x)  # tl.sqrt is the approximate one for f32


@triton.jit
def _safe_recip(x, IS_FP64: tl.constexpr):
    """1/x, 0 where x == 0 (zero group: zero subgradient); NaN stays NaN."""
    zero = x == 0
    xs = tl.where(zero, 1.0, x)  # no inf is ever formed
    if IS_FP64:
        r = 1.0 / xs
    else:
        r = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), xs)
    return tl.where(zero, 0.0, r)


@triton.jit
def _tile_coords(KPG, N, n_rt, n_ct, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flattened (group, row tile, column tile) program id -> tile coordinates."""
    pid = tl.program_id(0)
    ct = pid % n_ct
    grt = pid // n_ct  # g * n_rt + rt
    g = grt // n_rt
    rt = grt % n_rt
    rows = rt * BLOCK_K + tl.arange(0, BLOCK_K)  # row inside the conv group
    cols = ct * BLOCK_N + tl.arange(0, BLOCK_N)  # column of the [*, Cg*S] view
    rmask = rows < KPG
    cmask = cols < N
    krow = g * KPG + rows  # global out-channel
    offs = krow.to(tl.int64)[:, None] * N + cols[None, :]
    return g, grt, ct, rows, cols, rmask, cmask, krow, offs


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gl_partials_kernel(w_ptr, out_part_ptr, in_part_ptr, KPG, N, n_rt, n_ct,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP64: tl.constexpr):
    g, grt, ct, rows, cols, rmask, cmask, krow, offs = _tile_coords(KPG, N, n_rt, n_ct,
                                                                    BLOCK_K, BLOCK_N)
    x = tl.load(w_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    x = _to_acc(x, IS_FP64)
    sq = x * x
    tl.store(out_part_ptr + krow.to(tl.int64) * n_ct + ct, tl.sum(sq, axis=1), mask=rmask)
    tl.store(in_part_ptr + grt.to(tl.int64) * N + cols, tl.sum(sq, axis=0), mask=cmask)


@triton.jit
def _gl_finish_kernel(out_part_ptr, in_part_ptr, out_norm_ptr, in_norm_ptr,
                      K, n_ct, C, Cg, S, N, n_rt, n_out_progs,
                      BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_RT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      IS_FP64: tl.constexpr, CL: tl.constexpr):
    pid = tl.program_id(0)
    # the two branches name their values apart: a runtime `if` may not give one name two types
    # (the accumulators differ in shape), which the compiler refuses and the interpreter allows
    if pid < n_out_progs:
        # out_norms[k] = sqrt(sum_t out_partial[k, t])
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < K
        row_base = rows.to(tl.int64) * n_ct
        acc_out = _to_acc(tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32), IS_FP64)
        for t0 in range(0, n_ct, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            m = rmask[:, None] & (t < n_ct)[None, :]
            acc_out += tl.load(out_part_ptr + row_base[:, None] + t[None, :], mask=m, other=0.0)
        tl.store(out_norm_ptr + rows, _sqrt(tl.sum(acc_out, axis=1), IS_FP64), mask=rmask)
    else:
        # in_norms[g*Cg + j] = sqrt(sum_{rt, s} in_partial[g*n_rt + rt, col(j, s)]),
        # col = j*S + s (contiguous) or s*Cg + j (channels-last)
        ch = (pid - n_out_progs) * BLOCK_C + tl.arange(0, BLOCK_C)
        chmask = ch < C
        g = ch // Cg
        j = ch % Cg
        if CL:
            ch_base = (g * n_rt).to(tl.int64) * N + j  # [BLOCK_C]
            s_step = Cg
        else:
            ch_base = (g * n_rt).to(tl.int64) * N + j * S
            s_step = 1
        acc_in = _to_acc(tl.zeros([BLOCK_RT, BLOCK_C, BLOCK_S], dtype=tl.float32), IS_FP64)
        for r0 in range(0, n_rt, BLOCK_RT):
            r = r0 + tl.arange(0, BLOCK_RT)
            roff = r.to(tl.int64) * N
            rm = r < n_rt
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                offs = roff[:, None, None] + ch_base[None, :, None] + (s * s_step)[None, None, :]
                m = rm[:, None, None] & chmask[None, :, None] & (s < S)[None, None, :]
                acc_in += tl.load(in_part_ptr + offs, mask=m, other=0.0)
        tot = tl.sum(tl.sum(acc_in, axis=2), axis=0)
        tl.store(in_norm_ptr + ch, _sqrt(tot, IS_FP64), mask=chmask)


@triton.jit
def _gl_scale_kernel(w_ptr, dst_ptr, on_ptr, in_ptr, so_ptr, si_ptr, lam_hi, lam_lo,
                     KPG, N, Cg, S, n_rt, n_ct,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     MODE: tl.constexpr, IS_FP64: tl.constexpr, CL: tl.constexpr):
    g, grt, ct, rows, cols, rmask, cmask, krow, offs = _tile_coords(KPG, N, n_rt, n_ct,
                                                                    BLOCK_K, BLOCK_N)
    if CL:
        ch = g * Cg + cols % Cg  # in-channel of each column
    else:
        ch = g * Cg + cols // S
    mask = rmask[:, None] & cmask[None, :]
    if MODE == 2:  # PRUNE: so/si are uint8 keep masks; write zeros where either is false
        ko = tl.load(so_ptr + krow, mask=rmask, other=1)
        ki = tl.load(si_ptr + ch, mask=cmask, other=1)
        drop = (ko == 0)[:, None] | (ki == 0)[None, :]
        zero = tl.zeros([BLOCK_K, BLOCK_N], dtype=w_ptr.dtype.element_ty)
        tl.store(w_ptr + offs, zero, mask=mask & drop)
    else:
        inv_o = _safe_recip(_to_acc(tl.load(on_ptr + krow, mask=rmask, other=1.0), IS_FP64),
                            IS_FP64)
        inv_i = _safe_recip(_to_acc(tl.load(in_ptr + ch, mask=cmask, other=1.0), IS_FP64),
                            IS_FP64)
        if MODE == 1:  # GRAD: coefficients lam/o, lam/i
            if IS_FP64:
                lam = tl.cast(lam_hi, tl.float64) + tl.cast(lam_lo, tl.float64)
            else:
                lam = tl.cast(lam_hi, tl.float32)
            a = lam * inv_o
            b = lam * inv_i
        else:  # BACKWARD: coefficients g_o/o, g_i/i
            a = _to_acc(tl.load(so_ptr + krow, mask=rmask, other=0.0), IS_FP64) * inv_o
            b = _to_acc(tl.load(si_ptr + ch, mask=cmask, other=0.0), IS_FP64) * inv_i
        x = _to_acc(tl.load(w_ptr + offs, mask=mask, other=0.0), IS_FP64)
        upd = x * (a[:, None] + b[None, :])
        if MODE == 1:
            upd = _to_acc(tl.load(dst_ptr + offs, mask=mask, other=0.0), IS_FP64) + upd
        tl.store(dst_ptr + offs, upd.to(dst_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def channels_last(t: Tensor) -> bool:
    """True for a 4-D channels_last / 5-D channels_last_3d tensor that is not also contiguous (a
    tensor that is both, e.g. a 1x1 conv's, has the same column order either way)."""
    if t.is_contiguous():
        return False
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _geometry(w: Tensor, groups: int) -> Tuple[int, int, int, int]:
    assert w.dim() >= 2 and groups >= 1 and w.shape[0] % groups == 0
    K, Cg = int(w.shape[0]), int(w.shape[1])
    S = 1
    for d in w.shape[2:]:
        S *= int(d)
    return K, Cg, S, K // groups


def _tile_cfg(KPG: int, N: int, fp64: bool) -> Tuple[int, int, int]:
    """BLOCK_K, BLOCK_N, num_warps of the tile kernels (~8K elements, ~4K for fp64)."""
    block_n = min(next_pow2(N), 128 if fp64 else 256)
    target = 4096 if fp64 else 8192
    block_k = min(next_pow2(KPG), max(1, target // block_n), 64)
    return block_k, block_n, num_warps(block_k * block_n)


def _finish_cfg(K: int, n_ct: int, C: int, S: int, n_rt: int) -> Tuple[int, int, int, int, int]:
    """BLOCK_R, BLOCK_T (out part: [BLOCK_R, BLOCK_T] tiles of out_partial) and BLOCK_RT,
    BLOCK_C, BLOCK_S (in part: tiles of in_partial seen as [groups, n_rt, Cg, S]). Few column
    positions per program so that even a wide weight spreads over many programs."""
    block_t = min(next_pow2(n_ct), 64)
    block_r = min(next_pow2(K), max(1, 2048 // block_t))
    block_s = min(next_pow2(S), 32)
    block_c = min(next_pow2(C), max(1, 64 // block_s))
    block_rt = min(next_pow2(n_rt), max(1, 2048 // (block_c * block_s)))
    return block_r, block_t, block_rt, block_c, block_s


class _Plan:
    """Geometry and tile configuration of one weight (non-empty)."""

    __slots__ = ("K", "Cg", "S", "KPG", "N", "groups", "fp64", "cl", "BK", "BN", "nw", "n_rt",
                 "n_ct")

    def __init__(self, w: Tensor, groups: int):
        self.cl = channels_last(w)
        assert self.cl or w.is_contiguous()
        self.K, self.Cg, self.S, self.KPG = _geometry(w, groups)
        self.N = self.Cg * self.S
        self.groups = groups
        self.fp64 = w.dtype == torch.float64
        self.BK, self.BN, self.nw = _tile_cfg(self.KPG, self.N, self.fp64)
        self.n_rt = triton.cdiv(self.KPG, self.BK)
        self.n_ct = triton.cdiv(self.N, self.BN)

    @property
    def grid(self):
        return (self.groups * self.n_rt * self.n_ct,)


def _norms_into(w: Tensor, groups: int, out_norms: Tensor, in_norms: Tensor) -> Optional[_Plan]:
    """Writes the norms of ``w`` into the (contiguous, norm-dtype) ``out_norms``/``in_norms``.

    Returns the tile plan, or ``None`` for a zero-size weight (norms zero-filled, nothing to
    launch)."""
    if w.numel() == 0:
        out_norms.zero_()
        in_norms.zero_()
        return None
    p = _Plan(w, groups)
    acc = out_norms.dtype
    out_part = torch.empty((p.K, p.n_ct), dtype=acc, device=w.device)
    in_part = torch.empty((groups * p.n_rt, p.N), dtype=acc, device=w.device)
    _gl_partials_kernel[p.grid](w, out_part, in_part, p.KPG, p.N, p.n_rt, p.n_ct,
                                BLOCK_K=p.BK, BLOCK_N=p.BN, IS_FP64=p.fp64, num_warps=p.nw)

    C = groups * p.Cg
    block_r, block_t, block_rt, block_c, block_s = _finish_cfg(p.K, p.n_ct, C, p.S, p.n_rt)
    n_out_progs = triton.cdiv(p.K, block_r)
    n_in_progs = triton.cdiv(C, block_c)
    nw = num_warps(max(block_r * block_t, block_rt * block_c * block_s))
    _gl_finish_kernel[(n_out_progs + n_in_progs,)](
        out_part, in_part, out_norms, in_norms,
        p.K, p.n_ct, C, p.Cg, p.S, p.N, p.n_rt, n_out_progs,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_RT=block_rt, BLOCK_C=block_c, BLOCK_S=block_s,
        IS_FP64=p.fp64, CL=p.cl, num_warps=nw)
    return p


def _scale(p: _Plan, w: Tensor, dst: Tensor, on: Tensor, inn: Tensor, so: Tensor, si: Tensor,
           lam: Tuple[float, float], mode: int) -> None:
    lam_hi, lam_lo = lam
    _gl_scale_kernel[p.grid](w, dst, on, inn, so, si, lam_hi, lam_lo,
                             p.KPG, p.N, p.Cg, p.S, p.n_rt, p.n_ct,
                             BLOCK_K=p.BK, BLOCK_N=p.BN, MODE=mode, IS_FP64=p.fp64, CL=p.cl,
                             num_warps=p.nw)


def _alloc_norms(w: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(w.dtype)
    C = groups * int(w.shape[1])
    return (torch.empty(int(w.shape[0]), dtype=acc, device=w.device),
            torch.empty(C, dtype=acc, device=w.device))


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def group_lasso_norms(w: Tensor, groups: int = 1) -> Tuple[Tensor, Tensor]:
    """``(out_norms[K], in_norms[groups*Cg])`` of ``w`` (float64 for float64, else float32)."""
    out_norms, in_norms = _alloc_norms(w, groups)
    _norms_into(w, groups, out_norms, in_norms)
    return out_norms, in_norms


def group_lasso_norms_backward(grad_out_norms: Tensor, grad_in_norms: Tensor, w: Tensor,
                               out_norms: Tensor, in_norms: Tensor, groups: int = 1) -> Tensor:
    """``W * (g_o[k]/o[k] + g_i[c]/i[c])`` (a term is 0 where its norm is 0), dtype and layout
    of ``w``."""
    out = torch.empty_like(w)  # a dense w: the same strides, so the same column order
    if w.numel() == 0:
        return out
    p = _Plan(w, groups)
    acc = acc_dtype(w.dtype)
    cv = lambda t: t.to(dtype=acc).contiguous()  # no-ops for the usual inputs
    _scale(p, w, out, cv(out_norms), cv(in_norms), cv(grad_out_norms), cv(grad_in_norms),
           (0.0, 0.0), _MODE_BACKWARD)
    return out


def group_lasso_grad_(weights: Sequence[Tensor], grads: Sequence[Tensor], lam: float,
                      groups: Optional[Sequence[int]] = None) -> Tensor:
    """``grads[i] += lam * W_i * (1/||W_i[k]|| + 1/||W_i[:, c]||)`` in place (zero norm -> 0);
    returns the penalty ``lam * sum_i (sum out_norms_i + sum in_norms_i)`` (0-dim, no sync)."""
    if len(weights) == 0:
        return torch.zeros((), dtype=torch.float32)
    assert len(grads) == len(weights)
    device = weights[0].device
    lam = float(lam)
    lam_split = _split_f32(lam)
    gl = [int(groups[i]) if groups is not None else 1 for i in range(len(weights))]

    # one flat norm buffer per norm dtype, so the penalty is a single reduction per dtype
    sizes = {}
    slots = []
    for w, gr in zip(weights, gl):
        acc = acc_dtype(w.dtype)
        n = int(w.shape[0]) + gr * int(w.shape[1])
        slots.append((acc, sizes.get(acc, 0)))
        sizes[acc] = sizes.get(acc, 0) + n
    bufs = {acc: torch.empty(n, dtype=acc, device=device) for acc, n in sizes.items()}

    for (acc, start), w, g, gr in zip(slots, weights, grads, gl):
        K = int(w.shape[0])
        C = gr * int(w.shape[1])
        on = bufs[acc][start:start + K]
        inn = bufs[acc][start + K:start + K + C]
        p = _norms_into(w, gr, on, inn)
        if p is None:
            continue
        assert g.shape == w.shape and channels_last(g) == p.cl  # checked by the op
        _scale(p, w, g, on, inn, on, inn, lam_split, _MODE_GRAD)

    res = torch.float64 if torch.float64 in bufs else torch.float32
    penalty = None
    for acc in (torch.float32, torch.float64):
        if acc in bufs:
            s = bufs[acc].sum().to(res)
            penalty = s if penalty is None else penalty + s
    return penalty * lam


def group_lasso_prune_(weights: Sequence[Tensor], threshold: float,
                       groups: Optional[Sequence[int]] = None) -> List[Tensor]:
    """Zeroes (in place) every group whose norm, taken before any zeroing, is below
    ``threshold``; returns ``[keep_o_0, keep_i_0, keep_o_1, keep_i_1, ...]`` with
    ``keep = ~(norm < threshold)`` (a NaN group is kept)."""
    masks: List[Tensor] = []
    for i, w in enumerate(weights):
        gr = int(groups[i]) if groups is not None else 1
        on, inn = _alloc_norms(w, gr)
        p = _norms_into(w, gr, on, inn)
        keep_o = ~(on < threshold)
        keep_i = ~(inn < threshold)
        if p is not None:
            _scale(p, w, w, on, inn, keep_o.view(torch.uint8), keep_i.view(torch.uint8),
                   (0.0, 0.0), _MODE_PRUNE)
        masks += [keep_o, keep_i]
    return masks
