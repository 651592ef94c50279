"""Triton split reductions with explicit ``n_split`` (issue 23, item 2).

The weight-gradient kernels of the sparse update and the BN statistics / backward reductions of the
fused block split their reduction axis over programs only when the output tiles cannot fill the
GPU's SMs. On CPU (one "SM") every launch takes one split, so ``_split_sum_kernel`` and the
multi-split finish kernels never ran in the suite. These tests pass ``n_split`` in {2, 7} (and 1,
the plan's own choice on CPU) through the interpreter, in float64 against the plain references, in
both memory formats, on fresh random inputs with sizes that do not divide evenly into the splits.
"""
import os

import pytest
import torch
from torch.utils._triton import has_triton_package

from pyoptim.reference import channel_union_conv as ref_bn
from pyoptim.reference import sparse_update as ref_su

if not has_triton_package() or (not torch.cuda.is_available()
                                and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")):
    pytest.skip("needs Triton (the interpreter on CPU)", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
SPLITS = [1, 2, 7]
FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture
def used_splits(monkeypatch):
    """The split counts the kernels really ran with (the plan clamps a request to the chunks)."""
    from pyoptim.triton_kernels import channel_union_conv as tcu
    from pyoptim.triton_kernels import sparse_update as tsu
    seen = []
    finish = tsu._finish

    def spy_finish(gw, gb, wp, bp, n_split):
        seen.append(n_split)
        return finish(gw, gb, wp, bp, n_split)

    init = tcu._BNGeometry.__init__

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.n_split)

    monkeypatch.setattr(tsu, "_finish", spy_finish)
    monkeypatch.setattr(tcu._BNGeometry, "__init__", spy_init)
    return seen


def _rand(*shape, fmt=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3
    return t.to(DEV).contiguous(memory_format=fmt)


@pytest.mark.parametrize("n_split", SPLITS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [
    # (N, C, H, W, K, R, stride, padding, dilation, groups): reductions of 13+ chunks, so that
    # 7 splits are 7 (the last one shorter)
    (7, 5, 13, 11, 6, 3, 1, 1, 1, 1),      # dense, odd sizes
    (9, 8, 23, 21, 4, 3, 2, 1, 1, 2),      # grouped, strided
    (5, 6, 22, 21, 6, 3, 1, 2, 2, 6),      # depthwise, dilated
], ids=["dense", "grouped", "depthwise"])
def test_conv_weight_grad_splits(case, fmt, n_split, used_splits):
    from pyoptim.triton_kernels.sparse_update import _conv2d_weight_grad
    N, C, H, W, K, R, s, p, d, g = case
    x = _rand(N, C, H, W, fmt=fmt, seed=1)
    P = (H + 2 * p - d * (R - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (R - 1) - 1) // s + 1
    grad_out = _rand(N, K, P, Q, fmt=fmt, seed=2)
    shape = (K, C // g, R, R)
    gw, gb = _conv2d_weight_grad(grad_out, x, shape, (s, s), (p, p), (d, d), g, True, n_split=n_split)
    rw, rb = ref_su.sparse_conv2d_weight_grad(grad_out.cpu(), x.cpu(), shape, (s, s), (p, p), (d, d), g, True)
    torch.testing.assert_close(gw.cpu(), rw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb.cpu(), rb, rtol=1e-10, atol=1e-10)
    # without the bias: the same weight gradient, no bias partials
    gw2, gb2 = _conv2d_weight_grad(grad_out, x, shape, (s, s), (p, p), (d, d), g, False, n_split=n_split)
    assert gb2 is None or gb2.numel() == 0
    torch.testing.assert_close(gw2.cpu(), rw, rtol=1e-10, atol=1e-10)
    assert used_splits == [n_split, n_split]


@pytest.mark.parametrize("n_split", SPLITS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_weight_grad_splits(n_split, bias, used_splits):
    from pyoptim.triton_kernels.sparse_update import _linear_weight_grad
    grad_out, x = _rand(419, 9, seed=3), _rand(419, 13, seed=4)
    gw, gb = _linear_weight_grad(grad_out, x, bias, n_split=n_split)
    rw, rb = ref_su.sparse_linear_weight_grad(grad_out.cpu(), x.cpu(), bias)
    torch.testing.assert_close(gw.cpu(), rw, rtol=1e-10, atol=1e-10)
    if bias:
        torch.testing.assert_close(gb.cpu(), rb, rtol=1e-10, atol=1e-10)
    assert used_splits == [n_split]


@pytest.mark.parametrize("n_split", SPLITS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_batch_norm_forward_backward_splits(fmt, n_split, residual, relu, used_splits):
    from pyoptim.triton_kernels.channel_union_conv import (_batch_norm_add_relu,
                                                           _batch_norm_add_relu_backward)
    shape = (13, 6, 7, 19)      # 13 chunks of positions in NCHW, 14 in channels_last
    x = _rand(*shape, fmt=fmt, seed=5) * 3.0 + 20.0           # a mean far from 0
    w, b = _rand(6, seed=6), _rand(6, seed=7)
    res = _rand(*shape, fmt=fmt, seed=8) if residual else None
    out, mean, invstd = _batch_norm_add_relu(x, w, b, res, 1e-5, relu, n_split=n_split)
    r_out, r_mean, r_invstd = ref_bn.batch_norm_add_relu(x.cpu(), w.cpu(), b.cpu(),
                                                          None if res is None else res.cpu(), 1e-5, relu)
    torch.testing.assert_close(out.cpu(), r_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean.cpu(), r_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(invstd.cpu(), r_invstd, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=fmt)
    go = _rand(*shape, fmt=fmt, seed=9)
    got = _batch_norm_add_relu_backward(go, out, x, w, mean, invstd, relu, residual, n_split=n_split)
    want = ref_bn.batch_norm_add_relu_backward(go.cpu(), r_out, x.cpu(), w.cpu(), r_mean, r_invstd,
                                               relu, residual)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-9, atol=1e-9)
    assert got[0].is_contiguous(memory_format=fmt)
    assert used_splits == [n_split, n_split]
