"""The CPU suite's blind spots (issue 23): the shapes and situations tools/gpu_smoke.py checks on a
GPU, as tests.

* group-lasso tilings with several row chunks per conv group (ResNet-50's (256,64,3,3),
  (512,8,3,3) groups=2 and (4096,1000) on CUDA; (130,8,3,3), (260,4,3,3) groups=2 and (300,70) --
  the same 3, 3 and 5 chunks of 64 rows -- on the CPU backends, which the interpreter runs in
  seconds): norms, norms_backward, grad_ and prune_ on the list;
* batch_norm_add_relu forward and backward with the input's mean at 1e3 (a one-pass
  E[x^2] - E[x]^2 in float32 would lose the variance), NCHW and channels_last;
* channel_compact with rows wider than 16 KiB and float16 views at storage offset 1;
* (cuda only) every op on a side stream equal to the default stream's result, and every op's
  forward/backward under ``torch.cuda.set_sync_debug_mode("error")``.

Every numeric case compares with the float64 reference on fresh random inputs. The op table of the
cuda-only cases is tools/gpu_smoke.py's (one list of every op, checked against csrc/ops.cpp by
tests/test_gpu_smoke.py).
"""
import importlib.util
import os

import pytest
import torch

from pyoptim.reference import channel_compact as ref_cc
from pyoptim.reference import channel_union_conv as ref_bn
from pyoptim.reference import group_lasso as ref_gl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_smoke", os.path.join(ROOT, "tools", "gpu_smoke.py"))
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
smoke._import("cuda" if torch.cuda.is_available() else "cpu")

# a cancellation in the variance costs ~1e-1; these allow the float32 mean's rounding (3e-5 at 1e3)
# and a Welford merge's
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float32: dict(rtol=2e-6, atol=1e-6),
       torch.float16: dict(rtol=1e-3, atol=1e-5)}
BN_TOL = {torch.float64: dict(mean=dict(rtol=1e-12, atol=0), invstd=dict(rtol=1e-10, atol=0),
                             act=dict(rtol=1e-10, atol=1e-10)),
          torch.float32: dict(mean=dict(rtol=2e-6, atol=0), invstd=dict(rtol=1e-4, atol=0),
                             act=dict(rtol=1e-4, atol=5e-4))}
OPS = ["group_lasso_norms", "group_lasso_norms_backward", "group_lasso_grad_", "group_lasso_prune_",
       "sparse_conv2d", "sparse_conv2d_weight_grad", "sparse_linear", "sparse_linear_weight_grad",
       "channel_compact", "channel_union_conv2d", "batch_norm_add_relu", "batch_norm_add_relu_backward"]


def size_of(device):
    """The full shapes on a GPU, the small ones (same structure) on the CPU backends."""
    return "full" if device == "cuda" else "small"


def rand(shape, dtype, device, seed, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(device)


def close(got, want, tol, what):
    torch.testing.assert_close(got.cpu().double(), want.double(), **tol, msg=lambda m: f"{what}: {m}")


# ---- group-lasso tilings ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_gl_tilings_norms_and_backward(backend, dtype):
    device, _ = backend
    for i, (shape, groups) in enumerate(smoke.SIZES[size_of(device)]["gl"]):
        w = rand(shape, dtype, device, 10 + i)
        w64 = w.cpu().double()
        o, n = torch.ops.pyoptim.group_lasso_norms(w, groups)
        ro, rn = ref_gl.group_lasso_norms(w64, groups)
        nt = TOL[o.dtype]
        close(o, ro, nt, f"out_norms of {shape}/g{groups}")
        close(n, rn, nt, f"in_norms of {shape}/g{groups}")
        go, gi = rand(o.shape, o.dtype, device, 20 + i), rand(n.shape, n.dtype, device, 30 + i)
        on, inn = ro.to(o.dtype), rn.to(n.dtype)
        gw = torch.ops.pyoptim.group_lasso_norms_backward(go, gi, w, on.to(device), inn.to(device), groups)
        want = ref_gl.group_lasso_norms_backward(go.cpu().double(), gi.cpu().double(), w64, on.double(),
                                                 inn.double(), groups)
        assert gw.dtype == dtype and gw.shape == w.shape
        close(gw, want, TOL[dtype], f"norms_backward of {shape}/g{groups}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_gl_tilings_grad_and_prune_on_the_list(backend, dtype):
    device, _ = backend
    spec = smoke.SIZES[size_of(device)]["gl"]
    groups = [g for _, g in spec]
    ws = [rand(s, dtype, device, 40 + i) for i, (s, _) in enumerate(spec)]
    grads = [rand(w.shape, dtype, device, 50 + i, std=0.01) for i, w in enumerate(ws)]
    want = [g.cpu().double().clone() for g in grads]     # written by the reference: never an alias
    want_pen = ref_gl.group_lasso_grad_([w.cpu().double() for w in ws], want, 0.5, groups)
    pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.5, groups)
    close(pen, want_pen, TOL[pen.dtype], "penalty")
    for i, (g, r) in enumerate(zip(grads, want)):
        close(g, r, TOL[dtype], f"grads[{i}] {tuple(g.shape)}")
    # channels scaled so that one threshold, in a wide gap of the norms, prunes groups of both kinds
    ws, w64 = smoke.prune_weights(ws, groups)
    thr = smoke._prune_threshold([n for w, g in zip(w64, groups) for n in ref_gl.group_lasso_norms(w, g)])
    want_o, want_i = ref_gl.group_lasso_prune_(w64, thr, groups)
    assert 0 < int((~want_o).sum()) < len(want_o) and 0 < int((~want_i).sum()) < len(want_i)
    got_o, got_i = torch.ops.pyoptim.group_lasso_prune_(ws, thr, groups)
    assert torch.equal(got_o.cpu(), want_o) and torch.equal(got_i.cpu(), want_i)
    for i, (w, r) in enumerate(zip(ws, w64)):
        assert torch.equal(w.cpu(), r.to(dtype)), f"weights[{i}] after prune_"


# ---- batch norm at mean 1e3 ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", [0, 1], ids=["nchw", "channels_last"])
def test_bn_mean_1e3_forward_backward(backend, layout, dtype):
    device, _ = backend
    shape, name = smoke.SIZES[size_of(device)]["bn"][layout]
    fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
    C, tol = shape[1], BN_TOL[dtype]
    x = rand(shape, dtype, device, 60, mean=1e3).contiguous(memory_format=fmt)
    w, b = rand(C, dtype, device, 61, mean=1.0, std=0.5), rand(C, dtype, device, 62, std=0.5)
    res = rand(shape, dtype, device, 63).contiguous(memory_format=fmt)
    x64, w64, b64, r64 = (t.cpu().double() for t in (x, w, b, res))
    out, mean, invstd = torch.ops.pyoptim.batch_norm_add_relu(x, w, b, res, 1e-5, True)
    r_out, r_mean, r_inv = ref_bn.batch_norm_add_relu(x64, w64, b64, r64, 1e-5, True)
    assert r_inv.min() > 0.5 and r_inv.max() < 2.0          # the data's std is ~1 around 1e3
    close(mean, r_mean, tol["mean"], "mean")
    close(invstd, r_inv, tol["invstd"], "invstd")
    close(out, r_out, tol["act"], "out")
    assert out.is_contiguous(memory_format=fmt)
    # the backward gets the reference's forward results, rounded as the kernel's are
    o_k = r_out.to(dtype).contiguous(memory_format=fmt).to(device)
    m_k, i_k = r_mean.to(mean.dtype).to(device), r_inv.to(invstd.dtype).to(device)
    go = rand(shape, dtype, device, 64).contiguous(memory_format=fmt)
    got = torch.ops.pyoptim.batch_norm_add_relu_backward(go, o_k, x, w, m_k, i_k, True, True)
    want = ref_bn.batch_norm_add_relu_backward(go.cpu().double(), o_k.cpu().double(), x64, w64,
                                               m_k.cpu().double(), i_k.cpu().double(), True, True)
    for name_, g_, w_ in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), got, want):
        scale = float(w_.abs().max())     # sums over N*H*W: the error scales with the largest entry
        close(g_, w_, dict(rtol=tol["act"]["rtol"], atol=tol["act"]["atol"] * max(scale, 1.0)), name_)
    assert got[0].is_contiguous(memory_format=fmt)


# ---- channel_compact: wide rows, fp16 at storage offset 1 ----------------------------------------------

def test_compact_wide_rows_and_fp16_at_offset_1(backend):
    device, _ = backend
    tensors, dims, indices = smoke.compact_inputs(size_of(device), device)
    assert [t.storage_offset() for t in tensors] == [0, 1, 1]
    for t, d in zip(tensors, dims):
        row_bytes = t.element_size() * t[(0,) * (d + 1)].numel()
        assert row_bytes > 16 * 1024, "rows wider than the CUDA kernel's 16 KiB tile"
    outs = torch.ops.pyoptim.channel_compact(tensors, dims, indices)
    want = ref_cc.channel_compact([t.cpu() for t in tensors], dims, [i.cpu() for i in indices])
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.dtype == w.dtype and o.shape == w.shape, f"outs[{i}]"
        assert torch.equal(o.cpu(), w), f"outs[{i}]"


# ---- cuda only: side stream, sync-free -------------------------------------------------------------------

def _spec(op):
    table = {s["name"]: s for s in smoke.op_table("cuda", "full")}
    return table[op]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_side_stream_equals_default_stream(name, op):
    import pyoptim
    with pyoptim.use_backend(name):
        err, tol, note = smoke.side_stream_one(_spec(op), f"cuda-{name}")
    assert err <= tol, f"{op} on a side stream differs from the default stream: {err} ({note})"


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_sync_free(name, op):
    import pyoptim
    spec = _spec(op)
    with pyoptim.use_backend(name):
        for phase in smoke.phases(spec):
            err, note = smoke.sync_free_one(spec, phase)
            assert err == 0, f"{op} {phase}: {note}"
