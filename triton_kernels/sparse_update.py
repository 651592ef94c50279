"""Triton kernels (and host launchers) of the sparse sub-tensor update op family.

Sparse update (Lin et al., *On-Device Training Under 256KB Memory*): a layer trains only a
sub-tensor of its weight (the first input channels of a normal conv, the first output channels of
a depthwise/grouped conv). The caller slices the saved input and ``grad_out``; the kernels here
compute the full weight gradient of the tensors they are given, with the bias gradient
``grad_out.sum`` fused into the same pass over ``grad_out``. Inputs may be strided (a channel
slice ``x[:, :k]`` or an expanded ``grad_out`` needs no copy): every offset is built from the
tensor strides, in int64.

Kernels (only computed integer offsets, no pointer tables, no atomics: deterministic):

1. ``_conv_wgrad_gemm_kernel``: dense/grouped conv weight grad as an implicit GEMM. Per conv
   group ``g``, ``out[kk, j]`` with ``kk < K/groups`` and ``j = (c, r, s)`` flattened over
   ``C/groups*R*S`` is a reduction over ``l = (n, p, q)``, ``L = N*P*Q``:
   ``sum_l grad_out[n, g*Kg+kk, p, q] * x[n, g*Cg+c, p*sh-ph+r*dh, q*sw-pw+s*dw]`` (zero outside
   the image: load masks). One program per ``[BLOCK_M, BLOCK_N]`` output tile (tiles never
   straddle a conv group) and per L split; the 4-D (split, group, m tile, n tile) grid is
   flattened onto axis 0 with the n tile fastest (programs sharing a ``grad_out`` tile run
   together). The L loop loads ``grad_out`` as ``[BLOCK_M, BLOCK_L]`` and ``x`` as
   ``[BLOCK_N, BLOCK_L]`` (l is the memory-contiguous axis of both) and feeds ``tl.dot`` (fp32
   with ``input_precision="ieee"``: no tf32; fp64 through Triton's fp64 dot). Both operand
   offsets are separable, ``row part + l part``; only the ``x`` image-bounds mask is 2-D. Bias:
   the programs of n tile 0 also accumulate ``grad_out`` over the same loop.
2. ``_dw_wgrad_kernel``: ``C/groups == 1`` (depthwise, with or without a channel multiplier
   ``K = m*C``, and the ``C == 1`` first conv), a degenerate GEMM (one column per r*s): one
   program per (split, channel block, r*s) (r*s fastest), ``[BLOCK_C, BLOCK_L]`` elementwise
   products accumulated in registers and reduced once at the end; out-channel ``k`` reads
   in-channel ``k // m``. Bias fused into the programs with ``r*s == 0``.
3. ``_linear_wgrad_kernel``: ``grad_out.T @ x`` as a GEMM tiled ``[BLOCK_M, BLOCK_N]`` over the
   output with the reduction over the rows of both operands; bias fused into n tile 0.
4. ``_split_sum_kernel``: weight-grad GEMMs are small and deep (few output tiles, huge L), so when
   the output tiles cannot fill the GPU the reduction axis is split over programs that store
   accumulation-dtype partials ``[n_split, numel]``; this one launch sums them (weight and bias
   regions) in a fixed order and casts to the output dtype. With one split the main kernels
   store the output directly.

Accumulation is float64 for float64 inputs and float32 otherwise (constexpr ``IS_FP64``);
outputs have the input dtype. Zero-size inputs never launch an empty grid: an empty reduction
gives zero gradients, an empty output gives empty tensors. No host sync. Index math is int32
where bounded by a dimension or by ``L`` (asserted below 2**30), int64 for memory offsets.

GPU notes: tile sizes and warp counts were chosen so that every configuration ``_gemm_cfg`` /
``_dw_cfg`` can return compiles for sm_90 without register spills (16-bit dots lower to wgmma,
fp64 to mma, fp32 IEEE to FMA). The gathered operand loads are per-element predicated loads
(their contiguity is not provable from computed offsets), so they are not vectorized nor
turned into cp.async pipelines: the conv kernel is load-latency bound, not MMA bound.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, next_pow2, pair
from ._common import mma as _mma
from ._common import num_sms as _num_sms
from ._common import split_range as _split_range
from ._common import to_acc as _to_acc

__all__ = ["conv2d_weight_grad", "linear_weight_grad"]

_INT32_MAX = 2 ** 31 - 1
_MAX_L = 2 ** 30  # reduction indices (and split bounds, < 2*L) stay in int32
_MIN_CHUNKS_PER_SPLIT = 8  # a split program runs at least this many reduction iterations
_MAX_SPLIT = 64


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _conv_wgrad_gemm_kernel(go_ptr, x_ptr, w_dst, b_dst,
                            H, W, Q, PQ, Kg, Cg, S, RS, JN,
                            sh, sw, ph, pw, dh, dw,
                            sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                            L, L_PER_SPLIT, n_groups, n_mt, n_nt, w_split_stride, b_split_stride,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                            HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr,
                            IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    nt = pid % n_nt
    t = pid // n_nt
    mt = t % n_mt
    t = t // n_mt
    g = t % n_groups
    sp = t // n_groups

    # rows: out-channels of the group
    kk = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    kmask = kk < Kg
    k = g * Kg + kk
    a_row = k.to(tl.int64) * sgc  # [BLOCK_M]
    # columns: (c, r, s) of the group's weight slice
    j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < JN
    c = j // RS
    rs = j - c * RS
    r = rs // S
    s = rs - r * S
    hr = r * dh
    ws = s * dw
    b_col = ((g * Cg + c).to(tl.int64) * sxc + hr.to(tl.int64) * sxh
             + ws.to(tl.int64) * sxw)  # [BLOCK_N]

    acc = _to_acc(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IS_FP64)
    bacc = _to_acc(tl.zeros([BLOCK_M], dtype=tl.float32), IS_FP64)
    l_lo, l_hi = _split_range(sp, L, L_PER_SPLIT)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        lmask = l < l_hi
        n = l // PQ
        pq = l - n * PQ
        p = pq // Q
        q = pq - p * Q
        n64 = n.to(tl.int64)
        hp = p * sh - ph
        wq = q * sw - pw
        a_l = n64 * sgn + p.to(tl.int64) * sgh + q.to(tl.int64) * sgw
        b_l = n64 * sxn + hp.to(tl.int64) * sxh + wq.to(tl.int64) * sxw
        a = tl.load(go_ptr + (a_row[:, None] + a_l[None, :]),
                    mask=kmask[:, None] & lmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_L]
        hh = hr[:, None] + hp[None, :]
        ww = ws[:, None] + wq[None, :]
        bmask = (jmask[:, None] & lmask[None, :] & (hh >= 0) & (hh < H)
                 & (ww >= 0) & (ww < W))
        bt = tl.load(x_ptr + (b_col[:, None] + b_l[None, :]), mask=bmask,
                     other=0.0)  # [BLOCK_N, BLOCK_L]
        acc = _mma(a, tl.trans(bt), acc, IS_FP32)
        if HAS_BIAS:
            if nt == 0:
                bacc += tl.sum(_to_acc(a, IS_FP64), axis=1)

    w_offs = sp.to(tl.int64) * w_split_stride + k.to(tl.int64)[:, None] * JN + j[None, :]
    tl.store(w_dst + w_offs, acc.to(w_dst.dtype.element_ty),
             mask=kmask[:, None] & jmask[None, :])
    if HAS_BIAS:
        if nt == 0:
            b_offs = sp.to(tl.int64) * b_split_stride + k
            tl.store(b_dst + b_offs, bacc.to(b_dst.dtype.element_ty), mask=kmask)


@triton.jit
def _dw_wgrad_kernel(go_ptr, x_ptr, w_dst, b_dst,
                     K, H, W, Q, PQ, MULT, S, RS,
                     sh, sw, ph, pw, dh, dw,
                     sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                     L, L_PER_SPLIT, n_cb, w_split_stride, b_split_stride,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    rs = pid % RS
    t = pid // RS
    cb = t % n_cb
    sp = t // n_cb
    r = rs // S
    s = rs - r * S

    k = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # out-channels
    kmask = k < K
    g_row = k.to(tl.int64) * sgc
    x_row = (k // MULT).to(tl.int64) * sxc  # in-channel of each out-channel

    acc = _to_acc(tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32), IS_FP64)
    bacc = _to_acc(tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32), IS_FP64)
    l_lo, l_hi = _split_range(sp, L, L_PER_SPLIT)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        lmask = l < l_hi
        n = l // PQ
        pq = l - n * PQ
        p = pq // Q
        q = pq - p * Q
        n64 = n.to(tl.int64)
        hh = p * sh - ph + r * dh
        ww = q * sw - pw + s * dw
        xin = lmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        g_l = n64 * sgn + p.to(tl.int64) * sgh + q.to(tl.int64) * sgw
        x_l = n64 * sxn + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw
        gv = tl.load(go_ptr + (g_row[:, None] + g_l[None, :]),
                     mask=kmask[:, None] & lmask[None, :], other=0.0)
        xv = tl.load(x_ptr + (x_row[:, None] + x_l[None, :]),
                     mask=kmask[:, None] & xin[None, :], other=0.0)
        gv = _to_acc(gv, IS_FP64)
        acc += gv * _to_acc(xv, IS_FP64)
        if HAS_BIAS:
            if rs == 0:
                bacc += gv

    w_offs = sp.to(tl.int64) * w_split_stride + k.to(tl.int64) * RS + rs
    tl.store(w_dst + w_offs, tl.sum(acc, axis=1).to(w_dst.dtype.element_ty), mask=kmask)
    if HAS_BIAS:
        if rs == 0:
            b_offs = sp.to(tl.int64) * b_split_stride + k
            tl.store(b_dst + b_offs, tl.sum(bacc, axis=1).to(b_dst.dtype.element_ty), mask=kmask)


@triton.jit
def _linear_wgrad_kernel(go_ptr, x_ptr, w_dst, b_dst, K, KI, sgm, sgk, sxm, sxk,
                         L, L_PER_SPLIT, n_mt, n_nt, w_split_stride, b_split_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                         HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr,
                         IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    nt = pid % n_nt
    t = pid // n_nt
    mt = t % n_mt
    sp = t // n_mt

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # out features
    rmask = rows < K
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)  # in features
    cmask = cols < KI
    g_col = rows.to(tl.int64) * sgk
    x_col = cols.to(tl.int64) * sxk

    acc = _to_acc(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IS_FP64)
    bacc = _to_acc(tl.zeros([BLOCK_M], dtype=tl.float32), IS_FP64)
    l_lo, l_hi = _split_range(sp, L, L_PER_SPLIT)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        m = l0 + tl.arange(0, BLOCK_L)
        mmask = m < l_hi
        m64 = m.to(tl.int64)
        at = tl.load(go_ptr + (m64[:, None] * sgm + g_col[None, :]),
                     mask=mmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_L, BLOCK_M]
        b = tl.load(x_ptr + (m64[:, None] * sxm + x_col[None, :]),
                    mask=mmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_L, BLOCK_N]
        acc = _mma(tl.trans(at), b, acc, IS_FP32)
        if HAS_BIAS:
            if nt == 0:
                bacc += tl.sum(_to_acc(at, IS_FP64), axis=0)

    w_offs = sp.to(tl.int64) * w_split_stride + rows.to(tl.int64)[:, None] * KI + cols[None, :]
    tl.store(w_dst + w_offs, acc.to(w_dst.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
    if HAS_BIAS:
        if nt == 0:
            b_offs = sp.to(tl.int64) * b_split_stride + rows
            tl.store(b_dst + b_offs, bacc.to(b_dst.dtype.element_ty), mask=rmask)


@triton.jit
def _split_sum_kernel(wp_ptr, w_ptr, n_w, bp_ptr, b_ptr, n_b, n_split, n_w_progs,
                      BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[i] = sum_s part[s, i] (s ascending); programs < n_w_progs: weight, others: bias."""
    pid = tl.program_id(0)
    if pid < n_w_progs:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_w
        src = wp_ptr + offs
        acc = tl.load(src, mask=mask, other=0.0)
        for _ in range(1, n_split):
            src += n_w  # pointer arithmetic is 64-bit
            acc += tl.load(src, mask=mask, other=0.0)
        tl.store(w_ptr + offs, acc.to(w_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            offs = (pid - n_w_progs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_b
            src = bp_ptr + offs
            acc = tl.load(src, mask=mask, other=0.0)
            for _ in range(1, n_split):
                src += n_b
                acc += tl.load(src, mask=mask, other=0.0)
            tl.store(b_ptr + offs, acc.to(b_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _gemm_cfg(M: int, N: int, L: int, dtype: torch.dtype,
              conv: bool) -> Tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_L, num_warps of the GEMM kernels (tl.dot needs >= 16).

    Sized for sm_90 without register spills (checked with ptxas -v): the conv kernel keeps
    per-element loop invariants of its gathered ``x`` tile (column offsets, image bounds), so it
    gets fewer elements per thread than the plain linear GEMM."""
    if dtype == torch.float64:  # fp64 mma
        cap, bl, max_tile, wide = 32, 16, 1024, 1024
    elif dtype == torch.float32:  # IEEE fp32 dot runs on the FMA units: moderate tiles
        cap, bl, max_tile, wide = 64, 32, 4096, (512 if conv else 2048)
    else:  # fp16 / bf16: wgmma
        cap, bl, max_tile, wide = 128, 32, (8192 if conv else 16384), (2048 if conv else 4096)
    bm = min(max(next_pow2(M), 16), cap)
    bn = min(max(next_pow2(N), 16), cap)
    while bm * bn > max_tile:
        if bn >= bm:
            bn //= 2
        else:
            bm //= 2
    bl = min(bl, max(next_pow2(L), 16))
    return bm, bn, bl, (8 if bm * bn > wide else 4)  # wide: most elements for 4 warps


def _dw_cfg(K: int, L: int, fp64: bool) -> Tuple[int, int, int]:
    """BLOCK_C, BLOCK_L, num_warps of the depthwise kernel (~2K-element tiles, 1K for fp64)."""
    target = 1024 if fp64 else 2048
    bl = min(next_pow2(L), 128 if fp64 else 256)
    bc = min(next_pow2(K), max(1, target // bl))
    return bc, bl, max(1, min(4, bc * bl // 256))


def _split_plan(n_tiles: int, L: int, block_l: int, device: torch.device,
                n_split: Optional[int]) -> Tuple[int, int]:
    """(n_split, L_PER_SPLIT): split the reduction when the output tiles cannot fill the GPU
    (about two programs per SM); every split gets at least one BLOCK_L chunk."""
    n_chunks = triton.cdiv(L, block_l)
    if n_split is None:
        target = 2 * _num_sms(device)
        if n_tiles >= target:
            n_split = 1
        else:
            n_split = min(triton.cdiv(target, n_tiles),
                          max(1, n_chunks // _MIN_CHUNKS_PER_SPLIT), _MAX_SPLIT)
    n_split = max(1, min(int(n_split), n_chunks))
    per = triton.cdiv(n_chunks, n_split)
    return triton.cdiv(n_chunks, per), per * block_l


def _dsts(gw: Tensor, gb: Optional[Tensor], n_split: int, acc: torch.dtype):
    """Destination of the main kernel: the outputs themselves, or split partials."""
    if n_split == 1:
        return gw, (gb if gb is not None else gw)
    wp = torch.empty((n_split, gw.numel()), dtype=acc, device=gw.device)
    bp = (torch.empty((n_split, gb.numel()), dtype=acc, device=gw.device)
          if gb is not None else wp)
    return wp, bp


def _finish(gw: Tensor, gb: Optional[Tensor], wp: Tensor, bp: Tensor, n_split: int) -> None:
    if n_split == 1:
        return
    block = 1024
    n_w = gw.numel()
    n_b = gb.numel() if gb is not None else 0
    n_w_progs = triton.cdiv(n_w, block)
    n_progs = n_w_progs + triton.cdiv(n_b, block)
    if n_progs == 0:
        return
    _split_sum_kernel[(n_progs,)](wp, gw, n_w, bp, gb if gb is not None else gw, n_b,
                                  n_split, n_w_progs, BLOCK=block, HAS_BIAS=gb is not None,
                                  num_warps=4)


def _conv_out_size(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _conv2d_weight_grad(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int],
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                        groups: int, bias_grad: bool,
                        n_split: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    assert grad_out.dim() == 4 and x.dim() == 4 and len(weight_shape) == 4
    assert grad_out.dtype == x.dtype and grad_out.device == x.device
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    N, C, H, W = (int(v) for v in x.shape)
    Ng, K, P, Q = (int(v) for v in grad_out.shape)
    Kw, Cg, R, S = (int(v) for v in weight_shape)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    assert sh >= 1 and sw >= 1 and dh >= 1 and dw >= 1 and ph >= 0 and pw >= 0
    groups = int(groups)
    assert Ng == N and Kw == K, "grad_out / weight_shape mismatch"
    assert groups >= 1 and K % groups == 0 and Cg * groups == C, "bad groups"
    assert P == _conv_out_size(H, R, sh, ph, dh) and Q == _conv_out_size(W, S, sw, pw, dw), \
        "grad_out spatial size does not match the conv output size"
    dev = x.device
    gw = torch.empty((K, Cg, R, S), dtype=x.dtype, device=dev)
    gb = torch.empty((K,), dtype=x.dtype, device=dev) if bias_grad else None
    L = N * P * Q
    if K == 0:
        return gw, gb
    if L == 0:  # empty reduction
        gw.zero_()
        if gb is not None:
            gb.zero_()
        return gw, gb
    if gw.numel() == 0 and gb is None:
        return gw, gb
    assert L <= _MAX_L and gw.numel() <= _INT32_MAX, "too large for int32 indices"
    acc = acc_dtype(x.dtype)
    fp64 = x.dtype == torch.float64
    sg = [int(v) for v in grad_out.stride()]
    sx = [int(v) for v in x.stride()]
    RS = R * S
    Kg = K // groups

    if Cg == 1 and RS > 0:
        # depthwise (K = m*C, groups = C) and single-input-channel convs: elementwise kernel
        mult = K // C
        bc, bl, nw = _dw_cfg(K, L, fp64)
        n_cb = triton.cdiv(K, bc)
        ns, lps = _split_plan(n_cb * RS, L, bl, dev, n_split)
        wd, bd = _dsts(gw, gb, ns, acc)
        _dw_wgrad_kernel[(ns * n_cb * RS,)](
            grad_out, x, wd, bd, K, H, W, Q, P * Q, mult, S, RS,
            sh, sw, ph, pw, dh, dw, *sg, *sx,
            L, lps, n_cb, K * RS, K,
            BLOCK_C=bc, BLOCK_L=bl, HAS_BIAS=gb is not None, IS_FP64=fp64, num_warps=nw)
    else:
        JN = Cg * RS
        if JN == 0:  # empty weight, bias only: any nonzero divisors (all columns are masked)
            S_k, RS_k = 1, 1
        else:
            S_k, RS_k = S, RS
        bm, bn, bl, nw = _gemm_cfg(Kg, JN, L, x.dtype, True)
        n_mt = triton.cdiv(Kg, bm)
        n_nt = max(1, triton.cdiv(JN, bn))  # >= 1 so that the bias programs exist
        ns, lps = _split_plan(groups * n_mt * n_nt, L, bl, dev, n_split)
        wd, bd = _dsts(gw, gb, ns, acc)
        _conv_wgrad_gemm_kernel[(ns * groups * n_mt * n_nt,)](
            grad_out, x, wd, bd, H, W, Q, P * Q, Kg, Cg, S_k, RS_k, JN,
            sh, sw, ph, pw, dh, dw, *sg, *sx,
            L, lps, groups, n_mt, n_nt, K * JN, K,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_L=bl, HAS_BIAS=gb is not None,
            IS_FP32=x.dtype == torch.float32, IS_FP64=fp64, num_warps=nw)
    _finish(gw, gb, wd, bd, ns)
    return gw, gb


def _linear_weight_grad(grad_out: Tensor, x: Tensor, bias_grad: bool,
                        n_split: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    assert grad_out.dim() == 2 and x.dim() == 2 and grad_out.shape[0] == x.shape[0]
    assert grad_out.dtype == x.dtype and grad_out.device == x.device
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    M, K = (int(v) for v in grad_out.shape)
    KI = int(x.shape[1])
    dev = x.device
    gw = torch.empty((K, KI), dtype=x.dtype, device=dev)
    gb = torch.empty((K,), dtype=x.dtype, device=dev) if bias_grad else None
    if K == 0:
        return gw, gb
    if M == 0:
        gw.zero_()
        if gb is not None:
            gb.zero_()
        return gw, gb
    if KI == 0 and gb is None:
        return gw, gb
    assert M <= _MAX_L and gw.numel() <= _INT32_MAX, "too large for int32 indices"
    acc = acc_dtype(x.dtype)
    fp64 = x.dtype == torch.float64
    bm, bn, bl, nw = _gemm_cfg(K, KI, M, x.dtype, False)
    n_mt = triton.cdiv(K, bm)
    n_nt = max(1, triton.cdiv(KI, bn))
    ns, lps = _split_plan(n_mt * n_nt, M, bl, dev, n_split)
    wd, bd = _dsts(gw, gb, ns, acc)
    _linear_wgrad_kernel[(ns * n_mt * n_nt,)](
        grad_out, x, wd, bd, K, KI, int(grad_out.stride(0)), int(grad_out.stride(1)),
        int(x.stride(0)), int(x.stride(1)), M, lps, n_mt, n_nt, K * KI, K,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_L=bl, HAS_BIAS=gb is not None,
        IS_FP32=x.dtype == torch.float32, IS_FP64=fp64, num_warps=nw)
    _finish(gw, gb, wd, bd, ns)
    return gw, gb


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def conv2d_weight_grad(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                       groups: int, bias_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(grad_weight, grad_bias)`` of a conv2d: ``grad_weight`` (shape ``weight_shape``, dtype of
    ``x``) equals ``torch.nn.grad.conv2d_weight(x, weight_shape, grad_out, stride, padding,
    dilation, groups)``; ``grad_bias = grad_out.sum((0, 2, 3))`` if ``bias_grad`` else ``None``.
    ``grad_out [N, K, P, Q]`` and ``x [N, C, H, W]`` (NCHW, any strides), same dtype."""
    return _conv2d_weight_grad(grad_out, x, weight_shape, stride, padding, dilation, groups,
                               bias_grad)


def linear_weight_grad(grad_out: Tensor, x: Tensor,
                       bias_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(grad_out.T @ x, grad_out.sum(0) if bias_grad else None)`` for ``grad_out [M, K]``,
    ``x [M, k]`` (2-D, any strides, same dtype); results in the input dtype."""
    return _linear_weight_grad(grad_out, x, bias_grad)
