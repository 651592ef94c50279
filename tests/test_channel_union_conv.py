"""channel_union_conv2d, batch_norm_add_relu and its backward against the plain-torch reference and
torch's own modules, for every backend; autograd (gradcheck), opcheck, bad input."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim.ops import channel_union_conv as cuc
from pyoptim.reference import channel_union_conv as ref

CL = torch.channels_last

# (N, C, H, W, K, R, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 5, 7, 6, 4, 3, 1, 1, 1, 1),
    (1, 3, 9, 9, 7, 1, 1, 0, 1, 1),
    (3, 4, 9, 8, 6, 3, 2, 1, 1, 2),
    (2, 6, 7, 7, 6, 3, 1, 2, 2, 6),     # depthwise, dilated
    (1, 16, 5, 5, 16, 3, 1, 1, 1, 1),
]


def _rand(g, *shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _conv_inputs(case, device, dtype=torch.float64, seed=0, residual=True, bias=True, fmt=None):
    N, C, H, W, K, R, s, p, d, groups = case
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, N, C, H, W, dtype=dtype, device=device)
    w = _rand(g, K, C // groups, R, R, dtype=dtype, device=device) / (C // groups * R * R) ** 0.5
    b = _rand(g, K, dtype=dtype, device=device) if bias else None
    P = (H + 2 * p - d * (R - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (R - 1) - 1) // s + 1
    r = _rand(g, N, K, P, Q, dtype=dtype, device=device) if residual else None
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
        r = r.contiguous(memory_format=fmt) if r is not None else None
    return x, w, b, r, [s, s], [p, p], [d, d], groups


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_conv_matches_torch(backend, case, residual, relu):
    device, _ = backend
    x, w, b, r, s, p, d, groups = _conv_inputs(case, device, residual=residual)
    out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, relu)
    want = F.conv2d(x, w, b, s, p, d, groups)
    if r is not None:
        want = want + r
    if relu:
        want = torch.relu(want)
    assert out.dtype == x.dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_conv_low_precision(backend, dtype):
    device, name = backend
    if dtype == torch.bfloat16 and name == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16 math")
    if dtype != torch.float32 and device == "cpu" and name == "triton" and dtype == torch.float16:
        pass
    x, w, b, r, s, p, d, groups = _conv_inputs(CONV_CASES[0], device, dtype=dtype)
    out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)
    want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), r.double(), s, p, d, groups, True)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_conv_channels_last(backend):
    device, _ = backend
    x, w, b, r, s, p, d, groups = _conv_inputs(CONV_CASES[2], device, fmt=CL)
    out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, w, b, s, p, d, groups) + r), rtol=1e-10, atol=1e-10)
    # a channels_last weight with NCHW x: the output follows x
    x2, w2, b2, r2, *_ = _conv_inputs(CONV_CASES[0], device)
    out2 = torch.ops.pyoptim.channel_union_conv2d(x2, w2.contiguous(memory_format=CL), b2, r2, [1, 1], [1, 1],
                                                  [1, 1], 1, True)
    assert out2.is_contiguous()
    torch.testing.assert_close(out2, torch.relu(F.conv2d(x2, w2, b2, 1, 1) + r2), rtol=1e-10, atol=1e-10)


def test_conv_gradcheck(backend):
    device, _ = backend
    # small: the numerical Jacobian calls the forward twice per input element
    x, w, b, r, s, p, d, groups = _conv_inputs((2, 2, 4, 3, 2, 3, 1, 1, 1, 1), device)
    for t in (x, w, b, r):
        t.requires_grad_(True)
    # keep the ReLU away from its kink so finite differences are exact
    with torch.no_grad():
        pre = F.conv2d(x, w, b, s, p, d, groups) + r
        r += torch.where(pre.abs() < 0.05, torch.full_like(pre, 0.2), torch.zeros_like(pre))
    f = lambda x, w, b, r: pyoptim.ops.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b, r), eps=1e-6, atol=1e-7)


def test_conv_opcheck(backend):
    device, _ = backend
    x, w, b, r, s, p, d, groups = _conv_inputs(CONV_CASES[2], device)
    torch.library.opcheck(torch.ops.pyoptim.channel_union_conv2d.default, (x, w, b, r, s, p, d, groups, True))
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.pyoptim.channel_union_conv2d.default, (x, w, None, None, s, p, d, groups, False))


# ---- batch norm + residual + ReLU ------------------------------------------------------------------

BN_SHAPES = [(2, 3, 5, 7), (1, 16, 4, 4), (3, 1, 9, 1), (4, 33, 1, 1)]


def _bn_inputs(shape, device, dtype=torch.float64, seed=1, fmt=None, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    # a large mean against the spread: the statistics must not cancel
    x = (_rand(g, *shape) * 0.5 + 3.0).to(device=device, dtype=dtype)
    r = _rand(g, *shape, dtype=dtype, device=device)
    pd = param_dtype or dtype
    w = (_rand(g, shape[1]) + 1.5).to(device=device, dtype=pd)
    b = _rand(g, shape[1], dtype=pd, device=device)
    if fmt is not None:
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    return x, w, b, r


def _torch_bn_block(x, w, b, r, eps, relu):
    y = F.batch_norm(x, None, None, w, b, True, 0.0, eps)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_bn_forward_backward_match_torch(backend, shape, fmt, residual):
    device, _ = backend
    x, w, b, r = _bn_inputs(shape, device, fmt=fmt)
    r = r if residual else None
    out, mean, invstd = torch.ops.pyoptim.batch_norm_add_relu(x, w, b, r, 1e-5, True)
    want = _torch_bn_block(x, w, b, r, 1e-5, True)
    assert out.shape == x.shape and out.dtype == x.dtype
    if fmt is CL and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(invstd, torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5), rtol=1e-9, atol=1e-9)

    g = torch.Generator().manual_seed(7)
    go = _rand(g, *shape, device=device)
    gx, gw, gb, gr = torch.ops.pyoptim.batch_norm_add_relu_backward(go, out, x, w, mean, invstd, True, residual)
    xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    rs = r.detach().clone().requires_grad_(True) if residual else None
    _torch_bn_block(xs, ws, bs, rs, 1e-5, True).backward(go)
    torch.testing.assert_close(gx, xs.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, ws.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gb, bs.grad, rtol=1e-9, atol=1e-10)
    if residual:
        torch.testing.assert_close(gr, rs.grad, rtol=0, atol=0)
    else:
        assert gr.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bn_low_precision_fp32_params(backend, dtype):
    device, name = backend
    if dtype == torch.bfloat16 and name == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16 math")
    x, w, b, r = _bn_inputs((2, 8, 6, 5), device, dtype=dtype, param_dtype=torch.float32)
    out, mean, invstd = torch.ops.pyoptim.batch_norm_add_relu(x, w, b, r, 1e-5, True)
    assert mean.dtype == invstd.dtype == torch.float32 and out.dtype == dtype
    want, wmean, winv = ref.batch_norm_add_relu(x.double(), w.double(), b.double(), r.double(), 1e-5, True)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), wmean, rtol=1e-5, atol=1e-5)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    gx, gw, gb, gr = torch.ops.pyoptim.batch_norm_add_relu_backward(go, out, x, w, mean, invstd, True, True)
    assert gw.dtype == gb.dtype == torch.float32 and gx.dtype == gr.dtype == dtype
    wx, ww, wb, wr = ref.batch_norm_add_relu_backward(go.double(), out.double(), x.double(), w.double(),
                                                      mean.double(), invstd.double(), True, True)
    torch.testing.assert_close(gx.double(), wx, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(gw.double(), ww, rtol=tol * 10, atol=tol * 10)


def test_bn_gradcheck(backend):
    device, _ = backend
    x, w, b, r = _bn_inputs((2, 2, 3, 3), device)
    with torch.no_grad():  # keep the ReLU off its kink
        pre = _torch_bn_block(x, w, b, r, 1e-5, False)
        r += torch.where(pre.abs() < 0.05, torch.full_like(pre, 0.2), torch.zeros_like(pre))
    for t in (x, w, b, r):
        t.requires_grad_(True)
    f = lambda x, w, b, r: pyoptim.ops.batch_norm_add_relu(x, w, b, r, 1e-5, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b, r), eps=1e-6, atol=1e-6)


def test_bn_opcheck(backend):
    device, _ = backend
    x, w, b, r = _bn_inputs((2, 5, 3, 4), device)
    torch.library.opcheck(torch.ops.pyoptim.batch_norm_add_relu.default, (x, w, b, r, 1e-5, True))
    for t in (x, w, b, r):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.pyoptim.batch_norm_add_relu.default, (x, w, b, None, 1e-3, False))
    out, mean, invstd = torch.ops.pyoptim.batch_norm_add_relu(x.detach(), w.detach(), b.detach(), r.detach(), 1e-5, True)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pyoptim.batch_norm_add_relu_backward.default,
                          (go, out, x.detach(), w.detach(), mean, invstd, True, True))


# ---- the block as models use it ----------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_conv_bn_add_relu_matches_modules(backend, momentum):
    device, _ = backend
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False).double().to(device)
    bn = torch.nn.BatchNorm2d(6, momentum=momentum).double().to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    conv2, bn2 = (torch.nn.Module(), None)
    import copy
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, device=device)
    r = torch.randn(3, 6, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    r2 = r.detach().clone().requires_grad_(True)
    for step in range(2):  # two steps: the cumulative average (momentum None) moves
        out = cuc.conv_bn_add_relu(x, conv, bn, r)
        want = torch.relu(bn2(conv2(x)) + r2)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        out.sum().backward()
        want.sum().backward()
    torch.testing.assert_close(bn.running_mean, bn2.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, bn2.running_var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(bn2.num_batches_tracked) == 2
    for a, b_ in ((conv.weight, conv2.weight), (bn.weight, bn2.weight), (bn.bias, bn2.bias), (r, r2)):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-9, atol=1e-10)
    # eval: folded BN, one kernel; and with gradients through the fold
    bn.eval()
    bn2.eval()
    with torch.no_grad():
        torch.testing.assert_close(cuc.conv_bn_add_relu(x, conv, bn, r), torch.relu(bn2(conv2(x)) + r2),
                                   rtol=1e-10, atol=1e-10)
    conv.weight.grad = None
    conv2.weight.grad = None
    cuc.conv_bn_add_relu(x, conv, bn, None).sum().backward()
    torch.relu(bn2(conv2(x))).sum().backward()
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad, rtol=1e-9, atol=1e-10)


def test_fold_batch_norm():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, bias=True).double()
    bn = torch.nn.BatchNorm2d(5).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w, b = cuc.fold_batch_norm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), rtol=1e-12, atol=1e-12)


# ---- bad input ----------------------------------------------------------------------------------

def _bad(device):
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    r = torch.randn(2, 6, 3, 3, device=device)
    c = torch.ops.pyoptim.channel_union_conv2d
    bn = torch.ops.pyoptim.batch_norm_add_relu
    v = torch.randn(4, device=device)
    yield "conv x dtype", lambda: c(x.int(), w, None, None, [1, 1], [0, 0], [1, 1], 1, True), r"x must be float16"
    yield "conv weight dtype", lambda: c(x, w.double(), None, None, [1, 1], [0, 0], [1, 1], 1, True), r"weight has dtype"
    yield "conv channels", lambda: c(x, w[:, :3], None, None, [1, 1], [0, 0], [1, 1], 1, True), r"x has 4 channels but weight"
    yield "conv x dims", lambda: c(x[0], w, None, None, [1, 1], [0, 0], [1, 1], 1, True), r"x must be \[N, C, H, W\]"
    yield "conv bias", lambda: c(x, w, v, None, [1, 1], [0, 0], [1, 1], 1, True), r"bias must have shape \[6\]"
    yield "conv residual", lambda: c(x, w, None, r[:, :5], [1, 1], [0, 0], [1, 1], 1, True), r"residual has shape"
    yield "conv stride", lambda: c(x, w, None, None, [0, 1], [0, 0], [1, 1], 1, True), r"stride must be >= 1"
    yield "conv groups", lambda: c(x, w, None, None, [1, 1], [0, 0], [1, 1], 4, True), r"expects|not divisible"
    yield "conv too small", lambda: c(x[:, :, :2], w, None, None, [1, 1], [0, 0], [1, 1], 1, True), r"larger than x's padded"
    yield "bn weight shape", lambda: bn(x, v[:3], v, None, 1e-5, True), r"weight must have shape \[4\]"
    yield "bn bias dtype", lambda: bn(x, v, v.half(), None, 1e-5, True), r"bias has dtype"
    yield "bn residual", lambda: bn(x, v, v, r, 1e-5, True), r"residual has shape"
    yield "bn empty", lambda: bn(x[:0], v, v, None, 1e-5, True), r"x is empty"
    yield "bn eps", lambda: bn(x, v, v, None, 0.0, True), r"eps must be > 0"


@pytest.mark.parametrize("case", [b[0] for b in _bad("cpu")])
def test_bad_input_names_the_argument(backend, case):
    device, _ = backend
    fn, pattern = {n: (f, p) for n, f, p in _bad(device)}[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


# ---- the CUDA routes: cuDNN (fused, unfused) and the hand SIMT kernel ------------------------------
# csrc/cuda/channel_union_conv.cu routes a call to cuDNN's fused conv+add+ReLU (groups 1, ReLU,
# float16/bfloat16/float32), to cuDNN's conv + one epilogue kernel (the rest), or, with cuDNN
# disabled, to the hand implicit GEMM. Each route against the float64 reference.

# (N, C, H, W, K, R, stride, padding, dilation, groups)
ROUTE_CASES = [
    (2, 16, 9, 9, 32, 3, 1, 1, 1, 1),     # aligned channel counts: cuDNN's fused engines' case
    (3, 23, 8, 7, 13, 1, 2, 0, 1, 1),     # pruned-looking odd counts, 1x1 stride 2
    (2, 12, 7, 7, 18, 3, 1, 1, 1, 3),     # grouped: cuDNN conv + epilogue
    (2, 16, 9, 9, 16, 3, 1, 2, 2, 16),    # depthwise, dilated: cuDNN conv + epilogue
]
LOW_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-10}


@contextlib.contextmanager
def _cuda_route(route):
    """'cudnn': cuDNN enabled (TF32 off: exact float32); 'simt': cuDNN disabled, the hand kernel."""
    with torch.backends.cudnn.flags(enabled=route == "cudnn", allow_tf32=False), pyoptim.use_backend("cpp"):
        yield


def _aten_ops_called(fn):
    """The aten ops a call dispatches, nested ones included (RecordFunction sees every one)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("route", ["cudnn", "simt"])
def test_cuda_route_matches_float64(case, dtype, fmt, residual, relu, route):
    x, w, b, r, s, p, d, groups = _conv_inputs(case, "cuda", dtype=dtype, residual=residual, fmt=fmt)
    with _cuda_route(route):
        out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, relu)
    want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), None if r is None else r.double(),
                                    s, p, d, groups, relu)
    assert out.dtype == dtype and out.shape == want.shape
    assert out.is_contiguous(memory_format=fmt or torch.contiguous_format)
    tol = LOW_TOL[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cudnn", "simt"])
def test_cuda_route_float64(route):
    for case in ROUTE_CASES:
        x, w, b, r, s, p, d, groups = _conv_inputs(case, "cuda", fmt=CL)
        with _cuda_route(route):
            out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)
        assert out.is_contiguous(memory_format=CL)
        want = torch.relu(F.conv2d(x, w, b, s, p, d, groups) + r)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype, residual, relu, cudnn, want, not_want", [
    (ROUTE_CASES[0], torch.float16, True, True, True, "aten::cudnn_convolution_add_relu", "aten::convolution"),
    (ROUTE_CASES[0], torch.float32, False, True, True, "aten::cudnn_convolution_relu", "aten::convolution"),
    (ROUTE_CASES[0], torch.float16, True, False, True, "aten::convolution", "aten::cudnn_convolution_add_relu"),
    (ROUTE_CASES[0], torch.float64, True, True, True, "aten::convolution", "aten::cudnn_convolution_add_relu"),
    (ROUTE_CASES[2], torch.float16, True, True, True, "aten::convolution", "aten::cudnn_convolution_add_relu"),
    (ROUTE_CASES[3], torch.bfloat16, True, True, True, "aten::convolution", "aten::cudnn_convolution_add_relu"),
    (ROUTE_CASES[0], torch.float16, True, True, False, None, "aten::convolution"),
], ids=["fused-res", "fused-nores", "linear", "float64", "grouped", "depthwise", "cudnn-off"])
def test_cuda_route_taken(case, dtype, residual, relu, cudnn, want, not_want):
    x, w, b, r, s, p, d, groups = _conv_inputs(case, "cuda", dtype=dtype, residual=residual, fmt=CL)
    with _cuda_route("cudnn" if cudnn else "simt"):
        names = _aten_ops_called(lambda: torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, relu))
    # a fused case failing on not_want: cuDNN refused the fused graph and the call fell back
    assert (want is None or want in names) and not_want not in names, sorted(names)
    if not cudnn:
        assert not any("cudnn" in n for n in names), sorted(names)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_cudnn_relu_ignores_stale_output_memory(dtype):
    # at::cudnn_convolution_relu hands cuDNN its uninitialised output as the residual with scale 0:
    # NaN left in that memory by an earlier tensor must not leak into the result
    x, w, b, _, s, p, d, groups = _conv_inputs(ROUTE_CASES[0], "cuda", dtype=dtype, residual=False, fmt=CL)
    want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), None, s, p, d, groups, True)
    with _cuda_route("cudnn"):
        for _ in range(3):
            # blocks of the output's size full of NaN, back in the caching allocator's free lists
            junk = [torch.full(want.shape, float("nan"), device="cuda", dtype=dtype) for _ in range(8)]
            del junk
            out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, None, s, p, d, groups, True)
            assert not out.isnan().any()
            torch.testing.assert_close(out.double(), want, rtol=LOW_TOL[dtype], atol=LOW_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cudnn", "simt"])
def test_cuda_route_output_memory_format(route):
    case = ROUTE_CASES[0]
    with _cuda_route(route):
        for x_fmt, w_fmt, r_fmt in [(CL, None, None), (None, CL, CL), (CL, CL, None), (None, None, CL)]:
            x, w, b, r, s, p, d, groups = _conv_inputs(case, "cuda", dtype=torch.float16)
            x = x.contiguous(memory_format=x_fmt or torch.contiguous_format)
            w = w.contiguous(memory_format=w_fmt or torch.contiguous_format)
            r = r.contiguous(memory_format=r_fmt or torch.contiguous_format)
            out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)
            assert out.is_contiguous(memory_format=x_fmt or torch.contiguous_format), (x_fmt, w_fmt, r_fmt)
            want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), r.double(), s, p, d, groups, True)
            torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
        # strided views of x and the residual: any strides in, x's activation format out
        x, w, b, r, s, p, d, groups = _conv_inputs((2, 32, 9, 9, 32, 3, 1, 1, 1, 1), "cuda", dtype=torch.float16)
        xv, rv = x[:, ::2], r[:, 1::2]
        out = torch.ops.pyoptim.channel_union_conv2d(xv, w[1::2, ::2], b[1::2], rv, s, p, d, groups, True)
        assert out.is_contiguous()
        want = ref.channel_union_conv2d(xv.double(), w[1::2, ::2].double(), b[1::2].double(), rv.double(),
                                        s, p, d, groups, True)
        torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_route_under_autocast():
    # the op is not on autocast's lists: float32 in, float32 out, also for its inner aten calls
    x, w, b, r, s, p, d, groups = _conv_inputs(ROUTE_CASES[1], "cuda", dtype=torch.float32)
    with _cuda_route("cudnn"), torch.autocast("cuda", dtype=torch.float16):
        outs = [torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, relu) for relu in (True, False)]
    for out, relu in zip(outs, (True, False)):
        assert out.dtype == torch.float32
        want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), r.double(), s, p, d, groups, relu)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cudnn", "simt"])
def test_cuda_route_nothing_to_convolve(route):
    x = torch.randn(2, 0, 5, 5, device="cuda")
    w = torch.randn(4, 0, 3, 3, device="cuda")
    b = torch.randn(4, device="cuda")
    r = torch.randn(2, 4, 3, 3, device="cuda")
    with _cuda_route(route):
        out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, [1, 1], [0, 0], [1, 1], 1, True)
        empty = torch.ops.pyoptim.channel_union_conv2d(x[:0], w, b, None, [1, 1], [0, 0], [1, 1], 1, True)
    torch.testing.assert_close(out, torch.relu(b.view(1, -1, 1, 1) + r))
    assert empty.shape == (0, 4, 3, 3)


@pytest.mark.gpu
def test_cuda_route_deterministic_mode():
    # cudnn.deterministic: the unfused route (at::convolution honours the flag); same values
    x, w, b, r, s, p, d, groups = _conv_inputs(ROUTE_CASES[0], "cuda", dtype=torch.float32, fmt=CL)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False), pyoptim.use_backend("cpp"):
        names = _aten_ops_called(lambda: torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True))
        out = torch.ops.pyoptim.channel_union_conv2d(x, w, b, r, s, p, d, groups, True)
    assert "aten::cudnn_convolution_add_relu" not in names and "aten::convolution" in names
    want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), r.double(), s, p, d, groups, True)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
