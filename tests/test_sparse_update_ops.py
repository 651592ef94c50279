"""The sparse sub-tensor update ops against dense autograd in float64, for every backend."""
import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim.reference import sparse_update as ref

# (x shape, weight shape, stride, padding, dilation, groups, trained prefix k)
CONVS = [
    ((2, 6, 7, 7), (5, 6, 1, 1), 1, 0, 1, 1, 2),
    ((2, 6, 7, 7), (5, 6, 3, 3), 1, 1, 1, 1, 3),
    ((1, 5, 9, 8), (4, 5, 3, 3), 2, 1, 1, 1, 1),
    ((2, 4, 9, 9), (3, 4, 3, 3), 1, 2, 2, 1, 4),      # dilation, everything trained
    ((2, 6, 7, 7), (6, 1, 3, 3), 1, 1, 1, 6, 2),      # depthwise: output-channel prefix
    ((2, 6, 8, 8), (6, 1, 3, 3), 2, 1, 1, 6, 3),
    ((2, 4, 6, 6), (6, 2, 3, 3), 1, 1, 1, 2, 3),      # grouped: one whole group of 3 outputs
]
CONV_IDS = ["1x1", "3x3", "3x3s2", "dil2_all", "dw", "dw_s2", "grouped"]


def rand(shape, seed, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def split(w, k, groups):
    dim = ref.split_dim(groups)
    return w.narrow(dim, 0, k).clone(), w.narrow(dim, k, w.shape[dim] - k).clone()


@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_matches_dense_autograd(backend, case, with_bias):
    device, _ = backend
    xs, ws, stride, padding, dilation, groups, k = case
    x = rand(xs, 1, device).requires_grad_(True)
    w = rand(ws, 2, device)
    b = rand((ws[0],), 3, device).requires_grad_(True) if with_bias else None
    wt, wf = split(w, k, groups)
    wt.requires_grad_(True)
    y = pyoptim.ops.sparse_conv2d(x, wt, wf, b, stride, padding, dilation, groups)
    g = rand(y.shape, 4, device)
    y.backward(g)

    xr = x.detach().clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True) if with_bias else None
    yr = F.conv2d(xr, wr, br, stride, padding, dilation, groups)
    yr.backward(g)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(wt.grad, wr.grad.narrow(ref.split_dim(groups), 0, k), **tol)
    assert wf.grad is None  # the frozen rest gets no gradient
    if with_bias:
        torch.testing.assert_close(b.grad, br.grad, **tol)


def test_conv_frozen_weight_bias_only_and_no_input_grad(backend):
    """Bias-only layer at the bottom of the window: no weight grad, no input grad, nothing of x."""
    device, _ = backend
    x = rand((2, 4, 6, 6), 5, device)                      # does not require grad
    w = rand((3, 4, 3, 3), 6, device)
    wt, wf = w[:, :0].clone(), w.clone()
    b = rand((3,), 7, device).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pyoptim.ops.sparse_conv2d(x, wt, wf, b, 1, 1, 1, 1)
    assert all(t.data_ptr() != x.data_ptr() for t in saved) and all(t.shape != x.shape for t in saved)
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full((3,), float(y[0, 0].numel() * 2), dtype=torch.float64, device=device))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("groups,k", [(1, 2), (1, 8), (8, 3)], ids=["prefix", "all", "dw"])
def test_conv_saves_only_the_input_prefix(backend, n, groups, k):
    """A compact copy owning just the prefix, also at batch 1 where the slice ``x[:, :k]`` is
    contiguous (and ``.contiguous()`` a view keeping all of x alive); x itself when k == C."""
    device, _ = backend
    x = rand((n, 8, 5, 5), 8, device)
    w = rand((4, 8, 3, 3) if groups == 1 else (8, 1, 3, 3), 9, device)
    wt, wf = split(w, k, groups)
    wt.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pyoptim.ops.sparse_conv2d(x, wt, wf, None, 1, 1, 1, groups)
    acts = [t for t in saved if t.shape[0] == n]    # the weights have 3 to 8 output channels
    assert len(acts) == 1 and acts[0].shape == (n, k, 5, 5)
    if k == x.shape[1]:
        assert acts[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # no copy
    else:
        assert acts[0].untyped_storage().nbytes() == n * k * 5 * 5 * 8  # not a view of x


@pytest.mark.parametrize("case", [CONVS[1], CONVS[4], CONVS[6], CONVS[3]], ids=["3x3", "dw", "grouped", "all"])
def test_conv_keeps_channels_last(backend, case):
    """A channels_last input stays channels_last: the saved slice is a compact channels_last
    copy (x itself when every channel trains), nothing is copied to NCHW for the backward, and
    the gradients equal dense autograd's."""
    device, _ = backend
    xs, ws, stride, padding, dilation, groups, k = case
    x = rand(xs, 21, device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = rand(ws, 22, device)
    b = rand((ws[0],), 23, device).requires_grad_(True)
    wt, wf = split(w, k, groups)
    wt.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pyoptim.ops.sparse_conv2d(x, wt, wf, b, stride, padding, dilation, groups)
    acts = [t for t in saved if t.dim() == 4 and t.shape[0] == xs[0] and t.shape[2:] == xs[2:]]
    assert len(acts) == 1 and acts[0].is_contiguous(memory_format=torch.channels_last)
    if acts[0].shape[1] == xs[1]:
        assert acts[0].data_ptr() == x.data_ptr()                       # x itself, no copy
    g = rand(y.shape, 24, device).contiguous(memory_format=torch.channels_last)
    y.backward(g)
    xr = x.detach().contiguous().requires_grad_(True)
    wr, br = w.clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    F.conv2d(xr, wr, br, stride, padding, dilation, groups).backward(g.contiguous())
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(wt.grad, wr.grad.narrow(ref.split_dim(groups), 0, k), **tol)
    torch.testing.assert_close(b.grad, br.grad, **tol)


@pytest.mark.parametrize("shape", [(1, 7), (3, 7), (1, 1, 7), (2, 3, 7)], ids=str)
@pytest.mark.parametrize("k", [3, 7])
def test_linear_saves_only_the_input_prefix(backend, shape, k):
    device, _ = backend
    x = rand(shape, 14, device)
    w = rand((5, 7), 15, device)
    wt, wf = w[:, :k].clone().requires_grad_(True), w[:, k:].clone()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pyoptim.ops.sparse_linear(x, wt, wf, None)
    rows = x.numel() // 7
    acts = [t for t in saved if t.dim() == 2 and t.shape == (rows, k)]
    assert len(acts) == 1
    if k == 7:
        assert acts[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # no copy
    else:
        assert acts[0].untyped_storage().nbytes() == rows * k * 8  # not a view of x


@pytest.mark.parametrize("k", [0, 3, 7])
def test_linear_matches_dense_autograd(backend, k):
    device, _ = backend
    x = rand((4, 3, 7), 10, device).requires_grad_(True)
    w = rand((5, 7), 11, device)
    b = rand((5,), 12, device).requires_grad_(True)
    wt, wf = w[:, :k].clone().requires_grad_(k > 0), w[:, k:].clone()
    y = pyoptim.ops.sparse_linear(x, wt, wf, b)
    g = rand(y.shape, 13, device)
    y.backward(g)
    xr, wr, br = (x.detach().clone().requires_grad_(True), w.clone().requires_grad_(True),
                  b.detach().clone().requires_grad_(True))
    F.linear(xr, wr, br).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, br.grad, rtol=1e-12, atol=1e-12)
    if k:
        torch.testing.assert_close(wt.grad, wr.grad[:, :k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
def test_weight_grad_op_matches_reference(backend, case):
    device, _ = backend
    xs, ws, stride, padding, dilation, groups, _ = case
    x = rand(xs, 20, device)
    y = F.conv2d(x, rand(ws, 21, device), None, stride, padding, dilation, groups)
    g = rand(y.shape, 22, device)
    gw, gb = torch.ops.pyoptim.sparse_conv2d_weight_grad(g, x, list(ws), [stride] * 2, [padding] * 2,
                                                         [dilation] * 2, groups, True)
    rw, rb = ref.sparse_conv2d_weight_grad(g.cpu(), x.cpu(), ws, [stride] * 2, [padding] * 2,
                                           [dilation] * 2, groups, True)
    torch.testing.assert_close(gw.cpu(), rw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb.cpu(), rb, rtol=1e-10, atol=1e-10)
    _, none = torch.ops.pyoptim.sparse_conv2d_weight_grad(g, x, list(ws), [stride] * 2, [padding] * 2,
                                                          [dilation] * 2, groups, False)
    assert none.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision(backend, dtype):
    device, name = backend
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 math (covered on the GPU)")
    x = rand((2, 8, 6, 6), 30, device, dtype)
    w = rand((4, 8, 3, 3), 31, device, dtype)
    wt, wf = split(w, 4, 1)
    wt.requires_grad_(True)
    y = pyoptim.ops.sparse_conv2d(x, wt, wf, None, 1, 1, 1, 1)
    g = rand(y.shape, 32, device, dtype)
    y.backward(g)
    want = torch.nn.grad.conv2d_weight(x.double(), list(w.shape), g.double(), 1, 1)[:, :4]
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(wt.grad.double(), want, rtol=tol, atol=tol * 10)
    assert wt.grad.dtype == dtype


def test_gradcheck(backend):
    device, name = backend
    # the interpreted Triton backward takes ~0.5 s a call: check random projections there
    fast = name == "triton" and device == "cpu"
    x = rand((2, 4, 5, 5), 40, device).requires_grad_(True)
    w = rand((3, 4, 3, 3), 41, device)
    wt, wf = split(w, 2, 1)
    wt.requires_grad_(True)
    b = rand((3,), 42, device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c, d: torch.ops.pyoptim.sparse_conv2d(a, c, wf, d, [2, 2], [1, 1], [1, 1], 1), (x, wt, b), fast_mode=fast)
    xd = rand((2, 6, 5, 5), 43, device).requires_grad_(True)
    wd = rand((6, 1, 3, 3), 44, device)
    wdt, wdf = split(wd, 2, 6)
    wdt.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c: torch.ops.pyoptim.sparse_conv2d(a, c, wdf, None, [1, 1], [1, 1], [1, 1], 6), (xd, wdt), fast_mode=fast)
    xl = rand((3, 6), 45, device).requires_grad_(True)
    wl = rand((4, 6), 46, device)
    wlt = wl[:, :2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c: torch.ops.pyoptim.sparse_linear(a, c, wl[:, 2:].clone(), None), (xl, wlt), fast_mode=fast)


def test_opcheck(backend):
    device, _ = backend
    x = rand((2, 4, 5, 5), 50, device)
    w = rand((3, 4, 3, 3), 51, device)
    wt, wf = split(w, 2, 1)
    b = rand((3,), 52, device)
    y = F.conv2d(x, w, b, 1, 1)
    g = rand(y.shape, 53, device)
    wd = rand((4, 1, 3, 3), 54, device)
    xd = rand((2, 4, 5, 5), 55, device)
    cases = [
        (torch.ops.pyoptim.sparse_conv2d.default, (x, wt, wf, b, [1, 1], [1, 1], [1, 1], 1)),
        (torch.ops.pyoptim.sparse_conv2d.default,
         (x.clone().requires_grad_(True), wt.clone().requires_grad_(True), wf, b.clone().requires_grad_(True),
          [1, 1], [1, 1], [1, 1], 1)),
        (torch.ops.pyoptim.sparse_conv2d.default,
         (xd, wd[:2].clone().requires_grad_(True), wd[2:].clone(), None, [2, 2], [1, 1], [1, 1], 4)),
        (torch.ops.pyoptim.sparse_conv2d_weight_grad.default, (g, x, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, True)),
        (torch.ops.pyoptim.sparse_conv2d_weight_grad.default, (g, x, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, False)),
        (torch.ops.pyoptim.sparse_linear.default,
         (rand((3, 6), 56, device).requires_grad_(True), rand((4, 2), 57, device).requires_grad_(True),
          rand((4, 4), 58, device), rand((4,), 59, device).requires_grad_(True))),
        (torch.ops.pyoptim.sparse_linear_weight_grad.default, (rand((5, 4), 60, device), rand((5, 2), 61, device), True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def bad_cases(device):
    x = rand((2, 4, 5, 5), 70, device)
    w = rand((3, 4, 3, 3), 71, device)
    wt, wf = split(w, 2, 1)
    c = torch.ops.pyoptim.sparse_conv2d
    yield "int x", lambda: c(x.long(), wt, wf, None, [1, 1], [0, 0], [1, 1], 1), r"x must be float16"
    yield "dtype", lambda: c(x, wt.float(), wf, None, [1, 1], [0, 0], [1, 1], 1), r"weight_train has dtype"
    yield "3-d x", lambda: c(x[0], wt, wf, None, [1, 1], [0, 0], [1, 1], 1), r"x must be \[N, C, H, W\]"
    yield "split", lambda: c(x, wt, wf[:2], None, [1, 1], [0, 0], [1, 1], 1), r"must differ only in dim 1"
    yield "channels", lambda: c(x[:, :3], wt, wf, None, [1, 1], [0, 0], [1, 1], 1), r"x has 3 channels but the weight expects 4"
    yield "bias", lambda: c(x, wt, wf, torch.zeros(4, dtype=x.dtype, device=device), [1, 1], [0, 0], [1, 1], 1), r"bias must have shape \[3\]"
    yield "stride", lambda: c(x, wt, wf, None, [0, 1], [0, 0], [1, 1], 1), r"stride must be >= 1"
    yield "groups prefix", lambda: c(rand((2, 4, 5, 5), 72, device), rand((2, 2, 3, 3), 73, device), rand((4, 2, 3, 3), 74, device), None, [1, 1], [0, 0], [1, 1], 2), r"must cover whole conv groups"
    yield "wgrad spatial", lambda: torch.ops.pyoptim.sparse_conv2d_weight_grad(rand((2, 3, 4, 4), 75, device), x, [3, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1, True), r"grad_out has spatial size"
    yield "linear features", lambda: torch.ops.pyoptim.sparse_linear(rand((3, 5), 76, device), rand((4, 2), 77, device), rand((4, 4), 78, device), None), r"x has 5 features but the weight expects 6"
    yield "linear rows", lambda: torch.ops.pyoptim.sparse_linear_weight_grad(rand((5, 4), 79, device), rand((4, 2), 80, device), True), r"grad_out has 5 rows but x has 4"


@pytest.mark.parametrize("case", [c[0] for c in bad_cases("cpu")])
def test_bad_input_names_the_argument(backend, case):
    device, _ = backend
    fn, pattern = {n: (f, p) for n, f, p in bad_cases(device)}[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()
