"""Triton kernels (and host launchers) of the channel-union convolution op family.

Same semantics as ``pyoptim/reference/channel_union_conv.py`` (the spec; the contract is in
``csrc/channel_union_conv.h``). After PruneTrain's channel-union reconfiguration a ResNet block's
residual has the same compact channel set as its last conv's output, so the block tail is dense:

* ``channel_union_conv2d``: ``act(conv2d(x, weight, bias) + residual)`` (inference, BN folded);
* ``batch_norm_add_relu``: ``act((x - mean) * invstd * weight + bias + residual)`` with the batch
  statistics of ``x`` over (N, H, W) (training), returning ``(out, mean, invstd)``;
* ``batch_norm_add_relu_backward``: its backward.

``act`` is ReLU when ``relu`` else the identity (written ``where(y < 0, 0, y)``: a NaN stays NaN,
like ``torch.relu``); ``residual`` is optional. Activations are written in ``x``'s format:
channels_last when ``x`` is channels_last-contiguous and not NCHW-contiguous, NCHW otherwise.

Kernels (only computed integer offsets, no pointer tables, no atomics: deterministic):

1. ``_conv_fwd_gemm_kernel``: the conv as an implicit GEMM, fused with its epilogue. Per conv
   group ``g``, ``out[m, kk]`` with ``m = (n, p, q)`` over ``N*P*Q`` output pixels and
   ``kk < K/groups`` is a reduction over ``j = (r, s, c)`` (``c`` fastest), ``J = C/groups*R*S``:
   ``sum_j x[n, g*Cg+c, p*sh-ph+r*dh, q*sw-pw+s*dw] * weight[g*Kg+kk, c, r, s]`` (zero outside
   the image: load masks). One program per ``[BLOCK_M, BLOCK_N]`` output tile (tiles never
   straddle a conv group; ``BLOCK_N`` shrinks to 16 for few channels per group); the 3-D
   (group, m tile, n tile) grid is flattened onto axis 0 with the n tile fastest (programs
   sharing a gathered ``x`` tile run together). The J loop gathers ``x`` as ``[BLOCK_M, BLOCK_K]``
   (separable offsets ``pixel part + (c, r, s) part``, 2-D image-bounds mask) and ``weight`` as
   ``[BLOCK_K, BLOCK_N]`` (any strides: NCHW or channels_last weights) and feeds ``tl.dot``
   (fp16/bf16 -> fp32 accumulator; fp32 with ``input_precision="ieee"``: no tf32). float64
   never reaches ``tl.dot``: a constexpr ``IS_FP64`` branch accumulates
   ``sum(a[:, :, None] * b[None, :, :], axis=1)`` in float64 (small tiles). The epilogue adds
   ``bias[k]`` and ``residual[n, k, p, q]`` (any strides) to the accumulator, applies the ReLU
   and stores the output once, in ``x``'s dtype.
2. ``_conv_fwd_direct_kernel``: ``C/groups == 1`` (depthwise, with or without a channel
   multiplier ``K = m*C``, and the ``C == 1`` first conv), a degenerate GEMM (reduction over
   ``R*S`` only, one column per out-channel): one program per ``[BLOCK_M, BLOCK_C]`` tile of
   (output pixels, out-channels), out-channel block fastest; ``R*S`` (and ``C/groups``) loop of
   elementwise multiply-adds in the accumulation dtype, out-channel ``k`` reading in-channel
   ``(k // Kg)*Cg + c``. Same fused epilogue as (1).
3. ``_bn_stats_kernel``: per-channel batch statistics, split reduction. The activation is seen
   as ``[A, C, B]``: NCHW ``[N, C, H*W]``, channels_last ``[1, C, N*H*W]`` with the channel
   the contiguous axis (constexpr ``C_INNER``; the strides follow from the format). Work comes in
   ``[BLOCK_C, BLOCK_B]`` tiles: a chunk ``t`` is one ``BLOCK_B`` run of ``B`` inside one ``a``
   (one scalar division per tile, none per element). One program per (split, channel block)
   (channel block fastest) walks a contiguous range of chunks and keeps a running per-channel
   ``(count, mean of x, mean of x - shift, M2)``, ``shift`` the channel's first element: each
   tile's means and centred sum of squares (corrected two-pass on the registers:
   ``sum(d^2) - sum(d)^2/n``) are merged with Chan's formula, so the variance never suffers the
   ``E[x^2] - E[x]^2`` cancellation, and the shift keeps the merged tile means small, so a large
   ``|mean|/std`` costs no precision either; the mean itself is merged from the unshifted
   values, so an outlying first element can only cost M2 the precision of ``x - shift``.
   Partials ``[4, n_split, C]`` (accumulation dtype). The
   split spreads a small-``C``, large-``N*H*W`` reduction (e.g. C=16, N*H*W=131072) over the
   GPU: about four programs per SM, at least four tiles each.
4. ``_bn_stats_finish_kernel``: one program per channel block combines the partials in two
   passes over ``[BLOCK_S, BLOCK_C]`` tiles (all splits' loads independent, fixed-shape
   ``tl.sum`` trees: deterministic): count-weighted means, then
   ``M2 = sum_i M2_i + n_i*(mean_i - mean)^2`` (non-negative terms, no cancellation); writes
   ``mean`` and ``invstd = 1/sqrt(M2/count + eps)`` (biased variance).
5. ``_bn_apply_kernel``: one elementwise pass over the ``[BLOCK_C, BLOCK_B]`` tiles:
   ``out = act((x - mean) * (invstd * weight) + bias + residual)``.
6. ``_bn_bwd_reduce_kernel``: same split grid as (3); ``g = grad_out`` masked by ``out > 0``
   when ``relu``; elementwise accumulators of ``g`` and ``g * (x - mean)`` reduced once at the
   end; partials ``[2, n_split, C]``.
7. ``_bn_bwd_finish_kernel``: sums the partials over the splits (``[BLOCK_S, BLOCK_C]`` tiles,
   fixed order): ``grad_bias = sum g``,
   ``grad_weight = invstd * sum g*(x - mean)`` (stored in ``weight``'s dtype) and the
   accumulation-dtype coefficients ``grad_bias/M``, ``grad_weight/M`` (``M = N*H*W``) for (8).
8. ``_bn_bwd_apply_kernel``: one elementwise pass writing
   ``grad_x = weight*invstd*(g - grad_bias/M - xhat*grad_weight/M)``, ``xhat = (x-mean)*invstd``,
   and ``grad_residual = g`` when requested.

Accumulation is float64 for float64 inputs and float32 otherwise (constexpr ``IS_FP64``); the
statistics are returned in that dtype, activations in ``x``'s dtype. ``weight``/``bias``/``mean``/
``invstd`` of the BN kernels may be in ``x``'s dtype or the accumulation dtype. float32 divisions
and square roots are IEEE-rounded (``div_rn``/``sqrt_rn``). ``eps`` reaches the kernel as a
float32 pair ``hi + lo`` (Triton passes Python floats as float32), rebuilt in float64 for float64.
``residual``, ``grad_out`` and ``out`` of the BN ops are brought to ``x``'s format first (a no-op
when they already are); the conv reads ``x``, ``weight`` and ``residual`` through their strides.
A zero-size batch gives an empty conv output without any launch. No host sync. Index math is
int32 where bounded by a dimension (``N*P*Q`` and ``N*H*W`` asserted below 2**30), int64 for
memory offsets.

GPU notes: tested under ``TRITON_INTERPRET=1`` only, never run on a GPU. Every kernel compiles
for sm_90a with the configurations below without register spills when the integer arguments
fit in int32 (``ptxas -v``; 16-bit dots lower to wgmma, fp32 IEEE dots to FMA; the conv tiles
with ``BLOCK_N >= 32`` need 8 warps for that). The gathered ``x`` loads of the conv are
per-element predicated loads (contiguity cannot be proven from computed offsets), so the conv is
load-latency bound rather than MMA bound. The BN passes are memory bound; the contiguous axis of
their tiles (``B`` for NCHW, ``C`` for channels_last) is known at compile time.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, memory_format, next_pow2, pair
from ._common import mma as _mma
from ._common import num_sms as _num_sms
from ._common import split_f32 as _split_f32
from ._common import split_range as _split_chunks
from ._common import to_acc as _to_acc

__all__ = ["channel_union_conv2d", "batch_norm_add_relu", "batch_norm_add_relu_backward"]

_MAX_INDEX = 2 ** 30  # pixel / position indices (plus one block) stay in int32
_MIN_CHUNKS_PER_SPLIT = 4  # a BN split program walks at least this many tiles
_MAX_SPLIT = 512


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    """IEEE-rounded a / b (Triton's fp32 ``/`` is the approximate division on GPUs)."""
    if IS_FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _rsqrt(x, IS_FP64: tl.constexpr):
    """1 / sqrt(x), each step IEEE-rounded."""
    if IS_FP64:
        return 1.0 / tl.sqrt(x)
    else:
        return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.sqrt_rn(x))


@triton.jit
def _act(y, RELU: tl.constexpr):
    """ReLU that keeps NaN (like torch.relu), or the identity."""
    if RELU:
        return tl.where(y < 0, 0.0, y)
    else:
        return y


@triton.jit
def _conv_epilogue(acc, n, p, q, mmask, k, kmask, bias_ptr, res_ptr, out_ptr,
                   srn, src, srh, srw, son, soc, soh, sow,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                   IS_FP64: tl.constexpr):
    """out[n, k, p, q] = act(acc + bias[k] + residual[n, k, p, q]) for a [pixels, channels]
    accumulator tile: the single store of the conv output."""
    mask = mmask[:, None] & kmask[None, :]
    k64 = k.to(tl.int64)
    n64 = n.to(tl.int64)
    p64 = p.to(tl.int64)
    q64 = q.to(tl.int64)
    if HAS_BIAS:
        acc += _to_acc(tl.load(bias_ptr + k, mask=kmask, other=0.0), IS_FP64)[None, :]
    if HAS_RES:
        r_offs = (n64 * srn + p64 * srh + q64 * srw)[:, None] + (k64 * src)[None, :]
        acc += _to_acc(tl.load(res_ptr + r_offs, mask=mask, other=0.0), IS_FP64)
    acc = _act(acc, RELU)
    o_offs = (n64 * son + p64 * soh + q64 * sow)[:, None] + (k64 * soc)[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixels(mt, NPQ, PQ, Q, BLOCK_M: tl.constexpr):
    """Output pixels m = (n, p, q) of m tile ``mt``."""
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < NPQ
    n = m // PQ
    pq = m - n * PQ
    p = pq // Q
    q = pq - p * Q
    return n, p, q, mmask


@triton.jit
def _bn_tile(t, cb, C, B, CB, nb, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
             C_INNER: tl.constexpr):
    """Offsets and mask of the [BLOCK_C, BLOCK_B] tile (channel block ``cb``, chunk ``t``) of the
    [A, C, B] view; also the channels, their mask and the number of valid positions."""
    a = t // nb
    b0 = (t - a * nb) * BLOCK_B
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    b = b0 + tl.arange(0, BLOCK_B)
    cmask = c < C
    mask = cmask[:, None] & (b < B)[None, :]
    if C_INNER:  # channels_last: [1, C, N*H*W], element (c, b) at b*C + c
        offs = b.to(tl.int64)[None, :] * C + c[:, None]
    else:  # NCHW: [N, C, H*W], element (a, c, b) at a*C*B + c*B + b
        offs = a.to(tl.int64) * CB + c.to(tl.int64)[:, None] * B + b[None, :]
    n_valid = tl.minimum(B - b0, BLOCK_B)
    return offs, mask, c, cmask, n_valid


# ---------------------------------------------------------------------------------------------
# conv kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_gemm_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
                          H, W, Q, PQ, NPQ, Kg, Cg, S, JN,
                          sh, sw, ph, pw, dh, dw,
                          sxn, sxc, sxh, sxw, swk, swc, swr, sws,
                          srn, src, srh, srw, son, soc, soh, sow,
                          n_mt, n_nt,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                          IS_FP32: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    nt = pid % n_nt
    t = pid // n_nt
    mt = t % n_mt
    g = t // n_mt

    # rows: output pixels; their part of the x offset
    n, p, q, mmask = _pixels(mt, NPQ, PQ, Q, BLOCK_M)
    hp = p * sh - ph
    wq = q * sw - pw
    a_row = n.to(tl.int64) * sxn + hp.to(tl.int64) * sxh + wq.to(tl.int64) * sxw  # [BLOCK_M]
    # columns: out-channels of the group; their part of the weight offset
    kk = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < Kg
    k = g * Kg + kk
    b_col = k.to(tl.int64) * swk  # [BLOCK_N]
    c_base = g * Cg

    acc = _to_acc(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IS_FP64)
    for j0 in range(0, JN, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)  # (r, s, c), c fastest
        jmask = j < JN
        rs = j // Cg
        c = j - rs * Cg
        r = rs // S
        s = rs - r * S
        hr = r * dh
        ws = s * dw
        a_col = ((c_base + c).to(tl.int64) * sxc + hr.to(tl.int64) * sxh
                 + ws.to(tl.int64) * sxw)  # [BLOCK_K]
        hh = hp[:, None] + hr[None, :]
        ww = wq[:, None] + ws[None, :]
        amask = (mmask[:, None] & jmask[None, :] & (hh >= 0) & (hh < H)
                 & (ww >= 0) & (ww < W))
        a = tl.load(x_ptr + (a_row[:, None] + a_col[None, :]), mask=amask,
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        b_row = c.to(tl.int64) * swc + r.to(tl.int64) * swr + s.to(tl.int64) * sws
        b = tl.load(w_ptr + (b_row[:, None] + b_col[None, :]),
                    mask=jmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if IS_FP64:  # no fp64 tl.dot: broadcast product reduced over the K axis
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = _mma(a, b, acc, IS_FP32)

    _conv_epilogue(acc, n, p, q, mmask, k, kmask, bias_ptr, res_ptr, out_ptr,
                   srn, src, srh, srw, son, soc, soh, sow, HAS_BIAS, HAS_RES, RELU, IS_FP64)


@triton.jit
def _conv_fwd_direct_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
                            H, W, Q, PQ, NPQ, K, Kg, Cg, S, RS,
                            sh, sw, ph, pw, dh, dw,
                            sxn, sxc, sxh, sxw, swk, swc, swr, sws,
                            srn, src, srh, srw, son, soc, soh, sow,
                            n_kb,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                            IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    kb = pid % n_kb
    mt = pid // n_kb

    n, p, q, mmask = _pixels(mt, NPQ, PQ, Q, BLOCK_M)
    hp = p * sh - ph
    wq = q * sw - pw
    a_row = n.to(tl.int64) * sxn + hp.to(tl.int64) * sxh + wq.to(tl.int64) * sxw  # [BLOCK_M]
    k = kb * BLOCK_C + tl.arange(0, BLOCK_C)  # out-channels
    kmask = k < K
    cin0 = (k // Kg) * Cg  # first in-channel of each out-channel's group
    w_k = k.to(tl.int64) * swk

    acc = _to_acc(tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), IS_FP64)
    for c in range(Cg):
        x_c = (cin0 + c).to(tl.int64) * sxc  # [BLOCK_C]
        w_c = w_k + c * swc
        for rs in range(RS):
            r = rs // S
            s = rs - r * S
            hh = hp + r * dh
            ww = wq + s * dw
            pmask = mmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)  # [BLOCK_M]
            x_offs = a_row + ((r * dh).to(tl.int64) * sxh + (s * dw).to(tl.int64) * sxw)
            xv = tl.load(x_ptr + (x_offs[:, None] + x_c[None, :]),
                         mask=pmask[:, None] & kmask[None, :], other=0.0)
            wv = tl.load(w_ptr + (w_c + (r.to(tl.int64) * swr + s.to(tl.int64) * sws)),
                         mask=kmask, other=0.0)
            acc += _to_acc(xv, IS_FP64) * _to_acc(wv, IS_FP64)[None, :]

    _conv_epilogue(acc, n, p, q, mmask, k, kmask, bias_ptr, res_ptr, out_ptr,
                   srn, src, srh, srw, son, soc, soh, sow, HAS_BIAS, HAS_RES, RELU, IS_FP64)


# ---------------------------------------------------------------------------------------------
# batch-norm kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bn_stats_kernel(x_ptr, part_ptr, C, B, CB, nb, n_chunks, CHUNKS_PER_SPLIT, n_cb, n_part,
                     shift_stride,
                     BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, C_INNER: tl.constexpr,
                     IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    sp = pid // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # per-channel shift: the channel's first element (every split uses the same one)
    shift = _to_acc(tl.load(x_ptr + c.to(tl.int64) * shift_stride, mask=cmask, other=0.0),
                    IS_FP64)
    zero = _to_acc(tl.zeros([BLOCK_C], dtype=tl.float32), IS_FP64)
    cnt = zero
    mean_x = zero  # mean of x
    mean = zero  # mean of x - shift
    m2 = zero
    t_lo, t_hi = _split_chunks(sp, n_chunks, CHUNKS_PER_SPLIT)
    for t in range(t_lo, t_hi):
        offs, mask, c, cmask, n_valid = _bn_tile(t, cb, C, B, CB, nb, BLOCK_C, BLOCK_B, C_INNER)
        x_raw = _to_acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
        xv = tl.where(mask, x_raw - shift[:, None], 0.0)
        t_cnt = zero + _to_acc(n_valid, IS_FP64)
        t_mean_x = _div(tl.sum(x_raw, axis=1), t_cnt, IS_FP64)
        # corrected two-pass over the tile in registers
        t_mean = _div(tl.sum(xv, axis=1), t_cnt, IS_FP64)
        d = tl.where(mask, xv - t_mean[:, None], 0.0)
        d_sum = tl.sum(d, axis=1)
        t_m2 = tl.sum(d * d, axis=1) - _div(d_sum * d_sum, t_cnt, IS_FP64)
        t_mean = t_mean + _div(d_sum, t_cnt, IS_FP64)
        # Chan: merge (cnt, mean, m2) with the tile's (t_cnt, t_mean, t_m2)
        new_cnt = cnt + t_cnt
        frac = _div(t_cnt, new_cnt, IS_FP64)
        delta = t_mean - mean
        mean_x = mean_x + (t_mean_x - mean_x) * frac
        mean = mean + delta * frac
        m2 = m2 + t_m2 + delta * delta * (cnt * frac)
        cnt = new_cnt
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs = sp.to(tl.int64) * C + c
    tl.store(part_ptr + offs, cnt, mask=cmask)
    tl.store(part_ptr + n_part + offs, mean_x, mask=cmask)
    tl.store(part_ptr + 2 * n_part + offs, mean, mask=cmask)
    tl.store(part_ptr + 3 * n_part + offs, m2, mask=cmask)


@triton.jit
def _bn_stats_finish_kernel(part_ptr, mean_ptr, invstd_ptr, C, n_split, n_part, eps_hi, eps_lo,
                            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                            IS_FP64: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # pass 1: count-weighted sums of the split means ([BLOCK_S, BLOCK_C] tiles of the partials)
    zero = _to_acc(tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32), IS_FP64)
    acc_n = zero
    acc_mean_x = zero
    acc_mean = zero
    for s0 in range(0, n_split, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        mask = (sp < n_split)[:, None] & cmask[None, :]
        offs = sp.to(tl.int64)[:, None] * C + c[None, :]
        n_i = tl.load(part_ptr + offs, mask=mask, other=0.0)
        acc_n += n_i
        acc_mean_x += n_i * tl.load(part_ptr + n_part + offs, mask=mask, other=0.0)
        acc_mean += n_i * tl.load(part_ptr + 2 * n_part + offs, mask=mask, other=0.0)
    cnt = tl.sum(acc_n, axis=0)
    cnt = tl.where(cmask, cnt, 1.0)
    mean_x = _div(tl.sum(acc_mean_x, axis=0), cnt, IS_FP64)
    mean = _div(tl.sum(acc_mean, axis=0), cnt, IS_FP64)  # of x - shift
    # pass 2: M2 = sum_i M2_i + n_i * (mean_i - mean)^2 (no cancellation)
    acc_m2 = zero
    for s0 in range(0, n_split, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        mask = (sp < n_split)[:, None] & cmask[None, :]
        offs = sp.to(tl.int64)[:, None] * C + c[None, :]
        n_i = tl.load(part_ptr + offs, mask=mask, other=0.0)
        d = tl.load(part_ptr + 2 * n_part + offs, mask=mask, other=0.0) - mean[None, :]
        acc_m2 += tl.load(part_ptr + 3 * n_part + offs, mask=mask, other=0.0) + n_i * d * d
    m2 = tl.sum(acc_m2, axis=0)
    if IS_FP64:
        eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    else:
        eps = tl.cast(eps_hi, tl.float32)
    var = _div(m2, cnt, IS_FP64)  # biased
    var = tl.where(var < 0, 0.0, var)  # >= 0 despite rounding; NaN stays NaN
    tl.store(mean_ptr + c, mean_x, mask=cmask)
    tl.store(invstd_ptr + c, _rsqrt(var + eps, IS_FP64), mask=cmask)


@triton.jit
def _bn_apply_kernel(x_ptr, res_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                     C, B, CB, nb, n_cb,
                     BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, C_INNER: tl.constexpr,
                     HAS_RES: tl.constexpr, RELU: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    offs, mask, c, cmask, n_valid = _bn_tile(t, cb, C, B, CB, nb, BLOCK_C, BLOCK_B, C_INNER)
    mean = _to_acc(tl.load(mean_ptr + c, mask=cmask, other=0.0), IS_FP64)
    invstd = _to_acc(tl.load(invstd_ptr + c, mask=cmask, other=0.0), IS_FP64)
    weight = _to_acc(tl.load(w_ptr + c, mask=cmask, other=0.0), IS_FP64)
    bias = _to_acc(tl.load(b_ptr + c, mask=cmask, other=0.0), IS_FP64)
    scale = invstd * weight
    xv = _to_acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
    y = (xv - mean[:, None]) * scale[:, None] + bias[:, None]
    if HAS_RES:
        y += _to_acc(tl.load(res_ptr + offs, mask=mask, other=0.0), IS_FP64)
    y = _act(y, RELU)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_grad(go_ptr, out_ptr, offs, mask, RELU: tl.constexpr, IS_FP64: tl.constexpr):
    """g = grad_out, zero where the ReLU output is not positive."""
    g = _to_acc(tl.load(go_ptr + offs, mask=mask, other=0.0), IS_FP64)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o > 0, g, 0.0)
    return g


@triton.jit
def _bn_bwd_reduce_kernel(go_ptr, out_ptr, x_ptr, mean_ptr, part_ptr,
                          C, B, CB, nb, n_chunks, CHUNKS_PER_SPLIT, n_cb, n_part,
                          BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, C_INNER: tl.constexpr,
                          RELU: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    sp = pid // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = _to_acc(tl.load(mean_ptr + c, mask=cmask, other=0.0), IS_FP64)
    sum_g = _to_acc(tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32), IS_FP64)
    sum_gd = _to_acc(tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32), IS_FP64)
    t_lo, t_hi = _split_chunks(sp, n_chunks, CHUNKS_PER_SPLIT)
    for t in range(t_lo, t_hi):
        offs, mask, c, cmask, n_valid = _bn_tile(t, cb, C, B, CB, nb, BLOCK_C, BLOCK_B, C_INNER)
        g = _bn_grad(go_ptr, out_ptr, offs, mask, RELU, IS_FP64)
        xv = _to_acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
        sum_g += g
        sum_gd += tl.where(mask, g * (xv - mean[:, None]), 0.0)
    offs = sp.to(tl.int64) * C + c
    tl.store(part_ptr + offs, tl.sum(sum_g, axis=1), mask=cmask)
    tl.store(part_ptr + n_part + offs, tl.sum(sum_gd, axis=1), mask=cmask)


@triton.jit
def _bn_bwd_finish_kernel(part_ptr, invstd_ptr, gw_ptr, gb_ptr, coef_ptr, C, n_split, n_part, M,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_g = _to_acc(tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32), IS_FP64)
    acc_gd = _to_acc(tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32), IS_FP64)
    for s0 in range(0, n_split, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        mask = (sp < n_split)[:, None] & cmask[None, :]
        offs = sp.to(tl.int64)[:, None] * C + c[None, :]
        acc_g += tl.load(part_ptr + offs, mask=mask, other=0.0)
        acc_gd += tl.load(part_ptr + n_part + offs, mask=mask, other=0.0)
    sum_g = tl.sum(acc_g, axis=0)
    sum_gd = tl.sum(acc_gd, axis=0)
    invstd = _to_acc(tl.load(invstd_ptr + c, mask=cmask, other=0.0), IS_FP64)
    grad_weight = sum_gd * invstd
    tl.store(gw_ptr + c, grad_weight.to(gw_ptr.dtype.element_ty), mask=cmask)
    tl.store(gb_ptr + c, sum_g.to(gb_ptr.dtype.element_ty), mask=cmask)
    m = _to_acc(tl.zeros([BLOCK_C], dtype=tl.float32), IS_FP64) + _to_acc(M, IS_FP64)
    tl.store(coef_ptr + c, _div(sum_g, m, IS_FP64), mask=cmask)
    tl.store(coef_ptr + C + c, _div(grad_weight, m, IS_FP64), mask=cmask)


@triton.jit
def _bn_bwd_apply_kernel(go_ptr, out_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, coef_ptr,
                         gx_ptr, gres_ptr, C, B, CB, nb, n_cb,
                         BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, C_INNER: tl.constexpr,
                         RELU: tl.constexpr, RES_GRAD: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    offs, mask, c, cmask, n_valid = _bn_tile(t, cb, C, B, CB, nb, BLOCK_C, BLOCK_B, C_INNER)
    weight = _to_acc(tl.load(w_ptr + c, mask=cmask, other=0.0), IS_FP64)
    mean = _to_acc(tl.load(mean_ptr + c, mask=cmask, other=0.0), IS_FP64)
    invstd = _to_acc(tl.load(invstd_ptr + c, mask=cmask, other=0.0), IS_FP64)
    mean_g = tl.load(coef_ptr + c, mask=cmask, other=0.0)  # grad_bias / M
    mean_gxhat = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)  # grad_weight / M
    scale = weight * invstd
    g = _bn_grad(go_ptr, out_ptr, offs, mask, RELU, IS_FP64)
    xv = _to_acc(tl.load(x_ptr + offs, mask=mask, other=0.0), IS_FP64)
    xhat = (xv - mean[:, None]) * invstd[:, None]
    gx = scale[:, None] * (g - mean_g[:, None] - xhat * mean_gxhat[:, None])
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if RES_GRAD:
        tl.store(gres_ptr + offs, g.to(gres_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _gemm_cfg(Kg: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps of the implicit-GEMM conv (tl.dot needs >= 16).
    float64 uses the broadcast-product path: a [32, 8, <=16] product per step."""
    if dtype == torch.float64:
        return 32, min(next_pow2(Kg), 16), 8, 4
    block_n = min(max(next_pow2(Kg), 16), 64)
    return 64, block_n, 32, (4 if block_n == 16 else 8)


def _direct_cfg(K: int, fp64: bool) -> Tuple[int, int, int]:
    """BLOCK_M, BLOCK_C, num_warps of the direct (depthwise) conv."""
    block_c = min(next_pow2(K), 16 if fp64 else 32)
    return 64, block_c, max(1, min(8, 64 * block_c // 256))


def _conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
            relu: bool, direct: Optional[bool] = None) -> Tensor:
    N, C, H, W = (int(v) for v in x.shape)
    K, Cg, R, S = (int(v) for v in weight.shape)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    groups = int(groups)
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (S - 1) - 1) // sw + 1
    out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x))
    NPQ = N * P * Q
    if out.numel() == 0:
        return out
    assert NPQ <= _MAX_INDEX, "too many output pixels for int32 pixel indices"
    fp64 = x.dtype == torch.float64
    Kg = K // groups
    RS = R * S
    sx = [int(v) for v in x.stride()]
    sw_ = [int(v) for v in weight.stride()]
    so = [int(v) for v in out.stride()]
    sr = [int(v) for v in residual.stride()] if residual is not None else [0, 0, 0, 0]
    bias_arg = bias.contiguous() if bias is not None else out  # the kernels index [K] densely
    res_arg = residual if residual is not None else out
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
                 IS_FP64=fp64)
    if direct is None:
        direct = Cg == 1
    if direct:
        bm, bc, nw = _direct_cfg(K, fp64)
        n_kb = triton.cdiv(K, bc)
        grid = (triton.cdiv(NPQ, bm) * n_kb,)
        _conv_fwd_direct_kernel[grid](
            x, weight, bias_arg, res_arg, out,
            H, W, Q, P * Q, NPQ, K, Kg, Cg, S, RS,
            sh, sw, ph, pw, dh, dw, *sx, *sw_, *sr, *so, n_kb,
            BLOCK_M=bm, BLOCK_C=bc, num_warps=nw, **flags)
    else:
        bm, bn, bk, nw = _gemm_cfg(Kg, x.dtype)
        n_mt = triton.cdiv(NPQ, bm)
        n_nt = triton.cdiv(Kg, bn)
        _conv_fwd_gemm_kernel[(groups * n_mt * n_nt,)](
            x, weight, bias_arg, res_arg, out,
            H, W, Q, P * Q, NPQ, Kg, max(Cg, 1), S, Cg * RS,
            sh, sw, ph, pw, dh, dw, *sx, *sw_, *sr, *so, n_mt, n_nt,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IS_FP32=x.dtype == torch.float32,
            num_warps=nw, **flags)
    return out


def _finish_cfg(n_split: int, C: int) -> Tuple[int, int, int]:
    """BLOCK_S, BLOCK_C, num_warps of the finish kernels: [BLOCK_S, BLOCK_C] tiles of the
    [n_split, C] partials (channels contiguous), at most 2K elements."""
    block_s = min(next_pow2(n_split), 64)
    block_c = min(next_pow2(C), 256, max(1, 2048 // block_s))
    tile = block_s * block_c
    return block_s, block_c, (4 if tile >= 1024 else 2 if tile >= 256 else 1)


class _BNGeometry:
    """The [A, C, B] view of an activation in its format and the tile / split plan."""

    __slots__ = ("C", "B", "CB", "M", "c_inner", "fp64", "BC", "BB", "nw", "nb", "n_cb",
                 "n_chunks", "n_split", "chunks_per_split", "shift_stride")

    def __init__(self, x: Tensor, fmt: torch.memory_format, n_split: Optional[int]):
        N, C, H, W = (int(v) for v in x.shape)
        self.C = C
        self.M = N * H * W
        self.c_inner = fmt == torch.channels_last
        A, self.B = (1, self.M) if self.c_inner else (N, H * W)
        self.CB = C * self.B
        self.shift_stride = 1 if self.c_inner else self.B  # offset of channel c's first element
        assert self.M <= _MAX_INDEX, "too many positions per channel for int32 indices"
        self.fp64 = x.dtype == torch.float64
        target = 1024 if self.fp64 else 2048  # elements per tile
        if self.c_inner:  # channel axis contiguous: wide channel blocks
            self.BC = min(next_pow2(C), 32 if self.fp64 else 64)
            self.BB = min(next_pow2(self.B), max(1, target // self.BC))
        else:  # position axis contiguous
            self.BB = min(next_pow2(self.B), target // 2)
            self.BC = min(next_pow2(C), max(1, target // self.BB))
        self.nw = 4 if self.BC * self.BB >= 1024 else (2 if self.BC * self.BB >= 256 else 1)
        self.nb = triton.cdiv(self.B, self.BB)
        self.n_cb = triton.cdiv(C, self.BC)
        self.n_chunks = A * self.nb
        assert self.n_chunks * self.n_cb <= 2 ** 31 - 1
        # split plan of the reductions: about four programs per SM, >= a few tiles each
        if n_split is None:
            want = 4 * _num_sms(x.device)
            if self.n_cb >= want:
                n_split = 1
            else:
                n_split = min(triton.cdiv(want, self.n_cb),
                              max(1, self.n_chunks // _MIN_CHUNKS_PER_SPLIT), _MAX_SPLIT)
        n_split = max(1, min(int(n_split), self.n_chunks))
        self.chunks_per_split = triton.cdiv(self.n_chunks, n_split)
        self.n_split = triton.cdiv(self.n_chunks, self.chunks_per_split)

    def tile_args(self):
        return self.C, self.B, self.CB, self.nb

    def consts(self):
        return dict(BLOCK_C=self.BC, BLOCK_B=self.BB, C_INNER=self.c_inner, IS_FP64=self.fp64,
                    num_warps=self.nw)


def _batch_norm_add_relu(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                         eps: float, relu: bool,
                         n_split: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index [C] densely
    acc = acc_dtype(x.dtype)
    geo = _BNGeometry(x, fmt, n_split)
    C = geo.C
    dev = x.device
    out = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt)
    mean = torch.empty((C,), dtype=acc, device=dev)
    invstd = torch.empty((C,), dtype=acc, device=dev)
    n_part = geo.n_split * C
    part = torch.empty((4, geo.n_split, C), dtype=acc, device=dev)
    _bn_stats_kernel[(geo.n_split * geo.n_cb,)](
        x, part, *geo.tile_args(), geo.n_chunks, geo.chunks_per_split, geo.n_cb, n_part,
        geo.shift_stride, **geo.consts())
    eps_hi, eps_lo = _split_f32(float(eps))
    block_s, block_c, nw = _finish_cfg(geo.n_split, C)
    _bn_stats_finish_kernel[(triton.cdiv(C, block_c),)](
        part, mean, invstd, C, geo.n_split, n_part, eps_hi, eps_lo,
        BLOCK_S=block_s, BLOCK_C=block_c, IS_FP64=geo.fp64, num_warps=nw)
    _bn_apply_kernel[(geo.n_chunks * geo.n_cb,)](
        x, residual if residual is not None else x, out, mean, invstd, weight, bias,
        *geo.tile_args(), geo.n_cb, HAS_RES=residual is not None, RELU=bool(relu),
        **geo.consts())
    return out, mean, invstd


def _batch_norm_add_relu_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor,
                                  mean: Tensor, invstd: Tensor, relu: bool, residual_grad: bool,
                                  n_split: Optional[int] = None
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    relu = bool(relu)
    if relu:
        out = out.contiguous(memory_format=fmt)
    weight, mean, invstd = weight.contiguous(), mean.contiguous(), invstd.contiguous()
    acc = acc_dtype(x.dtype)
    geo = _BNGeometry(x, fmt, n_split)
    C = geo.C
    dev = x.device
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt)
    grad_res = (torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt)
                if residual_grad else x.new_empty((0,)))
    grad_weight = torch.empty((C,), dtype=weight.dtype, device=dev)
    grad_bias = torch.empty((C,), dtype=weight.dtype, device=dev)
    n_part = geo.n_split * C
    part = torch.empty((2, geo.n_split, C), dtype=acc, device=dev)
    coef = torch.empty((2, C), dtype=acc, device=dev)
    out_arg = out if relu else grad_out
    _bn_bwd_reduce_kernel[(geo.n_split * geo.n_cb,)](
        grad_out, out_arg, x, mean, part, *geo.tile_args(), geo.n_chunks, geo.chunks_per_split,
        geo.n_cb, n_part, RELU=relu, **geo.consts())
    block_s, block_c, nw = _finish_cfg(geo.n_split, C)
    _bn_bwd_finish_kernel[(triton.cdiv(C, block_c),)](
        part, invstd, grad_weight, grad_bias, coef, C, geo.n_split, n_part, geo.M,
        BLOCK_S=block_s, BLOCK_C=block_c, IS_FP64=geo.fp64, num_warps=nw)
    _bn_bwd_apply_kernel[(geo.n_chunks * geo.n_cb,)](
        grad_out, out_arg, x, weight, mean, invstd, coef, grad_x,
        grad_res if residual_grad else grad_x, *geo.tile_args(), geo.n_cb,
        RELU=relu, RES_GRAD=bool(residual_grad), **geo.consts())
    return grad_x, grad_weight, grad_bias, grad_res


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def channel_union_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         residual: Optional[Tensor], stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], groups: int,
                         relu: bool) -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` in one
    kernel (``act`` = ReLU if ``relu``); ``bias``/``residual`` may be ``None``. Inputs of any
    strides (validated by the caller); output in ``x``'s dtype and format."""
    return _conv2d(x, weight, bias, residual, stride, padding, dilation, groups, relu)


def batch_norm_add_relu(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                        eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``x [N, C, H, W]`` with batch statistics over (N, H, W), plus
    ``residual``, then ReLU: ``(out, mean, invstd)``, ``invstd = 1/sqrt(biased_var + eps)``;
    statistics in the accumulation dtype, ``out`` in ``x``'s dtype and format."""
    return _batch_norm_add_relu(x, weight, bias, residual, eps, relu)


def batch_norm_add_relu_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor,
                                 mean: Tensor, invstd: Tensor, relu: bool, residual_grad: bool
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`batch_norm_add_relu`: ``(grad_x, grad_weight, grad_bias,
    grad_residual)``; ``grad_weight``/``grad_bias`` in ``weight``'s dtype, ``grad_x`` and
    ``grad_residual`` (the ReLU-masked ``grad_out``; empty unless ``residual_grad``) in ``x``'s
    dtype and format."""
    return _batch_norm_add_relu_backward(grad_out, out, x, weight, mean, invstd, relu,
                                         residual_grad)
