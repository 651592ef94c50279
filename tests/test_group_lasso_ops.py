"""The group-lasso ops against the float64 reference, for every backend (C++ CPU, Triton under the
interpreter, reference; CUDA and compiled Triton on a GPU machine)."""
import math

import pytest
import torch

import pyoptim
from pyoptim.reference import group_lasso as ref

# (shape, groups): linear, odd sizes, 1x1, 3x3, 7x7, grouped, depthwise, conv1d, conv3d
SHAPES = [
    ((7, 129), 1),
    ((1, 1, 1, 1), 1),
    ((64, 32, 1, 1), 1),
    ((33, 17, 3, 3), 1),
    ((8, 3, 7, 7), 1),
    ((12, 4, 3, 3), 3),
    ((16, 1, 3, 3), 16),
    ((5, 6, 4), 1),
    ((4, 3, 2, 3, 3), 1),
]
IDS = ["linear7x129", "1x1x1x1", "conv1x1", "conv3x3_odd", "conv7x7", "grouped3", "depthwise",
       "conv1d", "conv3d"]


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def tolerances(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12),
            torch.float32: dict(rtol=2e-5, atol=1e-6),
            torch.float16: dict(rtol=5e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=3e-2, atol=1e-2)}[dtype]


def skip_unsupported(device, name, dtype):
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 math (covered on the GPU)")


@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_norms_float64(backend, shape, groups):
    device, _ = backend
    w = rand(shape, torch.float64, device, 1)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, groups)
    ro, ri = ref.group_lasso_norms(w.cpu(), groups)
    assert out.dtype == inn.dtype == torch.float64
    assert out.shape == (shape[0],) and inn.shape == (groups * shape[1],)
    torch.testing.assert_close(out.cpu(), ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inn.cpu(), ri, rtol=1e-12, atol=1e-12)


def test_depthwise_channel_is_both_groups(backend):
    device, _ = backend
    w = rand((10, 1, 3, 3), torch.float64, device, 2)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, 10)
    torch.testing.assert_close(out, inn, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.cpu(), w.cpu().flatten(1).norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norms_reduced_precision(backend, dtype):
    device, name = backend
    skip_unsupported(device, name, dtype)
    w = rand((20, 9, 3, 3), dtype, device, 3)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, 1)
    assert out.dtype == inn.dtype == torch.float32  # accumulated in fp32
    ro, ri = ref.group_lasso_norms(w.cpu().double(), 1)
    torch.testing.assert_close(out.cpu().double(), ro, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inn.cpu().double(), ri, rtol=1e-5, atol=1e-6)


def weight_list(device, dtype, seed):
    ws = [rand(s, dtype, device, seed + i) for i, (s, _) in enumerate(SHAPES)]
    return ws, [g for _, g in SHAPES]


@pytest.mark.parametrize("lam", [0.0, 0.37])
def test_grad_float64(backend, lam):
    device, _ = backend
    ws, groups = weight_list(device, torch.float64, 10)
    grads = [rand(w.shape, torch.float64, device, 100 + i) for i, w in enumerate(ws)]
    want = [g.cpu().clone() for g in grads]
    want_pen = ref.group_lasso_grad_([w.cpu() for w in ws], want, lam, groups)
    pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, lam, groups)
    assert pen.dim() == 0 and pen.dtype == torch.float64 and pen.device.type == device
    torch.testing.assert_close(pen.cpu(), want_pen, rtol=1e-12, atol=1e-12)
    for i, (g, r) in enumerate(zip(grads, want)):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12, msg=lambda m: f"grads[{i}]: {m}")


def test_grad_matches_autograd_of_penalty(backend):
    """The fused gradient is the autograd gradient of the penalty (independent of the reference)."""
    device, _ = backend
    ws, groups = weight_list(device, torch.float64, 20)
    leaves = [w.cpu().clone().requires_grad_(True) for w in ws]
    pen = 0
    for w, g in zip(leaves, groups):
        K, Cg = w.shape[0], w.shape[1]
        w4 = w.reshape(g, K // g, Cg, -1)
        pen = pen + w4.square().sum(dim=(2, 3)).sqrt().sum() + w4.square().sum(dim=(1, 3)).sqrt().sum()
    (0.5 * pen).backward()
    grads = [torch.zeros_like(w) for w in ws]
    got = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.5, groups)
    torch.testing.assert_close(got.cpu(), (0.5 * pen).detach(), rtol=1e-12, atol=0)
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g.cpu(), leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_grad_reduced_precision(backend, dtype):
    device, name = backend
    skip_unsupported(device, name, dtype)
    ws, groups = weight_list(device, dtype, 30)
    grads = [rand(w.shape, dtype, device, 200 + i) for i, w in enumerate(ws)]
    want = [g.cpu().double() for g in grads]
    want_pen = ref.group_lasso_grad_([w.cpu().double() for w in ws], want, 0.3, groups)
    pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.3, groups)
    assert pen.dtype == torch.float32
    torch.testing.assert_close(pen.cpu().double(), want_pen, rtol=1e-5, atol=0)
    for g, r in zip(grads, want):
        assert g.dtype == dtype
        # the only error allowed is the final rounding to the grad's dtype (plus fp32 arithmetic)
        torch.testing.assert_close(g.cpu().double(), r.to(dtype).double(), **tolerances(dtype))


def test_zero_groups_give_zero_subgradient(backend):
    device, _ = backend
    w = rand((6, 5, 3, 3), torch.float64, device, 40)
    w[2].zero_()
    w[:, 3].zero_()
    g = torch.zeros_like(w)
    pen = torch.ops.pyoptim.group_lasso_grad_([w], [g], 1.0, None)
    assert torch.isfinite(pen).item() and torch.isfinite(g).all().item()
    assert (g[2] == 0).all() and (g[:, 3] == 0).all()
    want = torch.zeros_like(w).cpu()
    ref.group_lasso_grad_([w.cpu()], [want], 1.0)
    torch.testing.assert_close(g.cpu(), want, rtol=1e-12, atol=1e-12)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, 1)
    assert out[2].item() == 0 and inn[3].item() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weight_makes_penalty_nonfinite(backend, bad):
    device, _ = backend
    ws = [rand((4, 3, 3, 3), torch.float32, device, 50), rand((8, 4, 1, 1), torch.float32, device, 51)]
    ws[1][5, 2, 0, 0] = bad
    grads = [torch.zeros_like(w) for w in ws]
    pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.1, None)
    assert not torch.isfinite(pen).item()
    assert torch.isfinite(grads[0]).all()  # other tensors are untouched by the bad one


def test_prune_zeroes_small_groups_and_returns_masks(backend):
    device, _ = backend
    ws, groups = [], []
    for i, (s, g) in enumerate(SHAPES):
        w = rand(s, torch.float64, device, 60 + i)
        if s[0] > 2:
            w[1] *= 1e-6                       # one small out-channel
        if s[1] > 2 and g == 1:
            w[:, 2] *= 1e-6                    # one small in-channel
        ws.append(w)
        groups.append(g)
    ws[3][4, 1, 1, 1] = float("nan")           # a NaN group is kept: visible, not hidden
    want = [w.cpu().clone() for w in ws]
    want_out, want_in = ref.group_lasso_prune_(want, 1e-3, groups)
    out_keep, in_keep = torch.ops.pyoptim.group_lasso_prune_(ws, 1e-3, groups)
    assert out_keep.dtype == in_keep.dtype == torch.bool and out_keep.device.type == device
    assert out_keep.shape == (sum(w.shape[0] for w in ws),)
    assert torch.equal(out_keep.cpu(), want_out) and torch.equal(in_keep.cpu(), want_in)
    for w, r in zip(ws, want):
        torch.testing.assert_close(w.cpu(), r, rtol=0, atol=0, equal_nan=True)
    # the typed wrapper splits the masks per weight; pruning again changes nothing
    pairs = pyoptim.ops.group_lasso_prune_(ws, 1e-3, groups)
    assert len(pairs) == len(ws)
    assert not pairs[0][0][1] and not pairs[0][1][2]           # the planted small groups went
    assert pairs[3][0][4] and torch.isnan(ws[3][4, 1, 1, 1])   # the NaN group stayed
    assert (ws[3][1] == 0).all() and (ws[3][:, 2] == 0).all()
    assert torch.equal(torch.cat([p[0] for p in pairs]).cpu(), want_out)


def test_prune_threshold_by_norm_not_sign(backend):
    device, _ = backend
    w = -rand((5, 4, 3, 3), torch.float64, device, 70).abs() - 1.0  # all negative, large norms
    out_keep, in_keep = torch.ops.pyoptim.group_lasso_prune_([w], 0.5, None)
    assert out_keep.all() and in_keep.all()


def test_zero_size_weight(backend):
    device, _ = backend
    w = torch.empty((0, 3, 3, 3), dtype=torch.float64, device=device)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, 1)
    assert out.shape == (0,) and inn.shape == (3,) and (inn == 0).all()
    g = torch.empty_like(w)
    w2 = rand((3, 2, 3, 3), torch.float64, device, 80)
    g2 = torch.zeros_like(w2)
    pen = torch.ops.pyoptim.group_lasso_grad_([w, w2], [g, g2], 1.0, None)
    want = torch.zeros_like(w2).cpu()
    want_pen = ref.group_lasso_grad_([w2.cpu()], [want], 1.0)
    torch.testing.assert_close(pen.cpu(), want_pen)
    torch.testing.assert_close(g2.cpu(), want)


def test_empty_list(backend):
    pen = pyoptim.ops.group_lasso_grad_([], [], 0.1)
    assert pen.item() == 0.0
    assert pyoptim.ops.group_lasso_prune_([], 0.1) == []


def test_norms_backward_float64(backend):
    device, _ = backend
    for (shape, groups), seed in zip(SHAPES, range(90, 200)):
        w = rand(shape, torch.float64, device, seed)
        w[0].zero_()  # a zero group: zero gradient, not NaN
        out, inn = torch.ops.pyoptim.group_lasso_norms(w, groups)
        go, gi = rand(out.shape, torch.float64, device, seed + 1), rand(inn.shape, torch.float64, device, seed + 2)
        got = torch.ops.pyoptim.group_lasso_norms_backward(go, gi, w, out, inn, groups)
        want = ref.group_lasso_norms_backward(go.cpu(), gi.cpu(), w.cpu(), out.cpu(), inn.cpu(), groups)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


def test_backward_through_one_output(backend):
    device, _ = backend
    w = rand((5, 4, 3, 3), torch.float64, device, 290).requires_grad_(True)
    out, _ = torch.ops.pyoptim.group_lasso_norms(w, 1)
    out.sum().backward()
    want = w.detach().cpu() / w.detach().cpu().flatten(1).norm(dim=1)[:, None, None, None]
    torch.testing.assert_close(w.grad.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,groups", [((5, 4, 3, 3), 1), ((6, 2, 3, 3), 3), ((7, 9), 1)])
def test_gradcheck_norms(backend, shape, groups):
    device, _ = backend
    w = rand(shape, torch.float64, device, 300).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.pyoptim.group_lasso_norms(x, groups), (w,))


def test_gradcheck_penalty(backend):
    device, _ = backend
    ws = [rand((4, 3, 3, 3), torch.float64, device, 310).requires_grad_(True),
          rand((6, 1, 3, 3), torch.float64, device, 311).requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda a, b: pyoptim.group_lasso_penalty([a, b], 0.7, [1, 6]), ws)


def opcheck_cases(device):
    w = rand((6, 4, 3, 3), torch.float64, device, 400)
    wd = rand((4, 1, 3, 3), torch.float64, device, 401)
    out, inn = ref.group_lasso_norms(w.cpu(), 1)
    out, inn = out.to(device), inn.to(device)
    yield torch.ops.pyoptim.group_lasso_norms.default, (w, 1)
    yield torch.ops.pyoptim.group_lasso_norms.default, (w.clone().requires_grad_(True), 1)
    yield torch.ops.pyoptim.group_lasso_norms.default, (wd.clone().requires_grad_(True), 4)
    yield torch.ops.pyoptim.group_lasso_norms.default, (w.float(), 2)
    yield torch.ops.pyoptim.group_lasso_norms_backward.default, (
        rand((6,), torch.float64, device, 402), rand((4,), torch.float64, device, 403), w, out, inn, 1)
    yield torch.ops.pyoptim.group_lasso_grad_.default, (
        [w, wd], [torch.randn_like(w), torch.randn_like(wd)], 0.25, [1, 4])
    yield torch.ops.pyoptim.group_lasso_grad_.default, ([w.float()], [torch.randn_like(w).float()], 0.25, None)
    yield torch.ops.pyoptim.group_lasso_prune_.default, ([w.clone(), wd.clone()], 0.5, [1, 4])


def test_opcheck(backend):
    device, _ = backend
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


# ---- channels_last weights: the same norms, in-place writes through the layout ---------------------

# (shape, groups, memory format): plain, odd, grouped, depthwise (Cg == 1: also contiguous), 1x1
# (S == 1: also contiguous) and conv3d in channels_last_3d
CL_SHAPES = [
    ((33, 17, 3, 3), 1, torch.channels_last),
    ((12, 4, 3, 3), 3, torch.channels_last),
    ((8, 6, 5, 7), 2, torch.channels_last),
    ((16, 1, 3, 3), 16, torch.channels_last),
    ((64, 32, 1, 1), 1, torch.channels_last),
    ((4, 3, 2, 3, 3), 1, torch.channels_last_3d),
]
CL_IDS = ["conv3x3_odd", "grouped3", "grouped2_5x7", "depthwise", "conv1x1", "conv3d"]


def to_format(t, fmt):
    out = t.contiguous(memory_format=fmt)
    assert out.is_contiguous(memory_format=fmt)
    return out


@pytest.mark.parametrize("shape,groups,fmt", CL_SHAPES, ids=CL_IDS)
def test_channels_last_norms_float64(backend, shape, groups, fmt):
    device, _ = backend
    w = to_format(rand(shape, torch.float64, device, 700), fmt)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, groups)
    ro, ri = ref.group_lasso_norms(w.cpu().contiguous(), groups)
    torch.testing.assert_close(out.cpu(), ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inn.cpu(), ri, rtol=1e-12, atol=1e-12)


def mixed_list(device, dtype, seed):
    """NCHW, channels_last (plain, grouped, depthwise, 1x1), channels_last_3d and linear weights."""
    specs = [((6, 5, 3, 3), 1, None), ((33, 17, 3, 3), 1, torch.channels_last), ((7, 129), 1, None),
             ((12, 4, 3, 3), 3, torch.channels_last), ((16, 1, 3, 3), 16, torch.channels_last),
             ((9, 8, 3, 3), 1, None), ((64, 32, 1, 1), 1, torch.channels_last),
             ((4, 3, 2, 3, 3), 1, torch.channels_last_3d), ((8, 6, 5, 7), 2, torch.channels_last)]
    ws = []
    for i, (shape, _, fmt) in enumerate(specs):
        w = rand(shape, dtype, device, seed + i)
        ws.append(w if fmt is None else to_format(w, fmt))
    return ws, [g for _, g, _ in specs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_channels_last_mixed_list_grad(backend, dtype):
    device, _ = backend
    ws, groups = mixed_list(device, dtype, 710)
    grads = [torch.empty_like(w).copy_(rand(w.shape, dtype, device, 720 + i)) for i, w in enumerate(ws)]
    strides = [g.stride() for g in grads]
    want = [g.cpu().double().contiguous() for g in grads]
    want_pen = ref.group_lasso_grad_([w.cpu().double().contiguous() for w in ws], want, 0.37, groups)
    pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.37, groups)
    tol = tolerances(dtype)
    torch.testing.assert_close(pen.cpu().double(), want_pen, **tol)
    for i, (g, r) in enumerate(zip(grads, want)):
        assert g.stride() == strides[i]  # written in place, through its own layout
        torch.testing.assert_close(g.cpu().double(), r.to(dtype).double(), **tol,
                                   msg=lambda m: f"grads[{i}]: {m}")


def test_channels_last_mixed_list_prune(backend):
    device, _ = backend
    ws, groups = mixed_list(device, torch.float64, 730)
    for w in ws:
        if w.shape[0] > 2:
            w[1] *= 1e-6                       # a small out-channel
        if w.shape[1] > 2:
            w[:, 2] *= 1e-6                    # a small in-channel (slot 2 of every conv group)
    strides = [w.stride() for w in ws]
    want = [w.cpu().contiguous() for w in ws]
    want_out, want_in = ref.group_lasso_prune_(want, 1e-3, groups)
    out_keep, in_keep = torch.ops.pyoptim.group_lasso_prune_(ws, 1e-3, groups)
    assert torch.equal(out_keep.cpu(), want_out) and torch.equal(in_keep.cpu(), want_in)
    assert not want_out.all() and not want_in.all()
    for i, (w, r) in enumerate(zip(ws, want)):
        assert w.stride() == strides[i]
        torch.testing.assert_close(w.cpu(), r, rtol=0, atol=0, msg=lambda m: f"weights[{i}]: {m}")


@pytest.mark.parametrize("shape,groups,fmt", CL_SHAPES, ids=CL_IDS)
def test_channels_last_norms_backward(backend, shape, groups, fmt):
    device, _ = backend
    w = to_format(rand(shape, torch.float64, device, 740), fmt)
    out, inn = torch.ops.pyoptim.group_lasso_norms(w, groups)
    go, gi = rand(out.shape, torch.float64, device, 741), rand(inn.shape, torch.float64, device, 742)
    got = torch.ops.pyoptim.group_lasso_norms_backward(go, gi, w, out, inn, groups)
    assert got.stride() == w.stride()  # w's layout
    want = ref.group_lasso_norms_backward(go.cpu(), gi.cpu(), w.cpu().contiguous(), out.cpu(), inn.cpu(), groups)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    # autograd through the norms of a channels_last leaf
    leaf = w.clone().requires_grad_(True)
    o, i = torch.ops.pyoptim.group_lasso_norms(leaf, groups)
    (o * go).sum().add((i * gi).sum()).backward()
    torch.testing.assert_close(leaf.grad.cpu(), want, rtol=1e-12, atol=1e-12)


def test_channels_last_opcheck(backend):
    device, _ = backend
    w = to_format(rand((6, 4, 3, 3), torch.float64, device, 750), torch.channels_last)
    wd = to_format(rand((8, 3, 3, 3), torch.float64, device, 751), torch.channels_last)
    out, inn = (t.to(device) for t in ref.group_lasso_norms(w.cpu(), 1))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_norms.default, (w, 1))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_norms.default, (w.clone().requires_grad_(True), 1))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_norms.default, (wd.clone().requires_grad_(True), 2))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_norms_backward.default, (
        rand((6,), torch.float64, device, 752), rand((4,), torch.float64, device, 753), w, out, inn, 1))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_grad_.default, (
        [w, wd.contiguous()], [torch.randn_like(w), torch.randn_like(wd.contiguous())], 0.25, [1, 2]))
    torch.library.opcheck(torch.ops.pyoptim.group_lasso_prune_.default, ([w.clone(), wd.clone()], 0.5, [1, 2]))


# ---- bad input: a clear error that names the argument -------------------------------------------

def bad_input_cases(device):
    w = rand((4, 3, 3, 3), torch.float32, device, 500)
    g = torch.zeros_like(w)
    nc = rand((3, 4, 3, 3), torch.float32, device, 501).transpose(0, 1)
    yield "int dtype", lambda: torch.ops.pyoptim.group_lasso_norms(torch.ones(4, 3, dtype=torch.int64, device=device), 1), r"w must be float16"
    yield "1-d", lambda: torch.ops.pyoptim.group_lasso_norms(torch.ones(4, device=device), 1), r"w must have at least 2 dims"
    yield "non-contiguous", lambda: torch.ops.pyoptim.group_lasso_norms(nc, 1), r"w must be contiguous"
    yield "sliced weight", lambda: torch.ops.pyoptim.group_lasso_grad_([w, rand((8, 3, 3, 3), torch.float32, device, 502)[::2]], [g, g.clone()], 0.1, None), r"weights\[1\] must be contiguous, or channels_last"
    yield "transposed spatial", lambda: torch.ops.pyoptim.group_lasso_norms(w.transpose(2, 3), 1), r"w must be contiguous, or channels_last"
    yield "channels_last 3-D", lambda: torch.ops.pyoptim.group_lasso_norms(rand((4, 3, 5), torch.float32, device, 503).transpose(1, 2).contiguous().transpose(1, 2), 1), r"w must be contiguous"
    yield "grad layout", lambda: torch.ops.pyoptim.group_lasso_grad_([w.contiguous(memory_format=torch.channels_last)], [g], 0.1, None), r"grads\[0\] must be contiguous in the layout of weights\[0\] \(channels_last\)"
    yield "channels_last grad", lambda: torch.ops.pyoptim.group_lasso_grad_([w], [g.contiguous(memory_format=torch.channels_last)], 0.1, None), r"grads\[0\] must be contiguous in the layout of weights\[0\] \(contiguous\)"
    yield "groups", lambda: torch.ops.pyoptim.group_lasso_norms(w, 3), r"w has 4 output channels, not divisible by groups=3"
    yield "list lengths", lambda: torch.ops.pyoptim.group_lasso_grad_([w, w], [g], 0.1, None), r"weights and grads must have the same length"
    yield "grad shape", lambda: torch.ops.pyoptim.group_lasso_grad_([w], [torch.zeros(4, 3, 3, 2, device=device)], 0.1, None), r"grads\[0\] has shape \[4, 3, 3, 2\] but weights\[0\] has \[4, 3, 3, 3\]"
    yield "grad dtype", lambda: torch.ops.pyoptim.group_lasso_grad_([w], [g.double()], 0.1, None), r"grads\[0\] has dtype"
    yield "weight dtype", lambda: torch.ops.pyoptim.group_lasso_grad_([w, w.double()], [g, g.double()], 0.1, None), r"weights\[1\] has dtype"
    yield "non-contiguous grad", lambda: torch.ops.pyoptim.group_lasso_grad_([nc.contiguous()], [torch.zeros_like(nc)], 0.1, None), r"grads\[0\] must be contiguous"
    yield "non-contiguous weight", lambda: torch.ops.pyoptim.group_lasso_grad_([w, nc], [g, torch.zeros_like(nc)], 0.1, None), r"weights\[1\] must be contiguous"
    yield "int weight", lambda: torch.ops.pyoptim.group_lasso_prune_([w, torch.ones(3, 3, dtype=torch.int32, device=device)], 0.1, None), r"weights\[1\] must be float16"
    yield "groups length", lambda: torch.ops.pyoptim.group_lasso_grad_([w], [g], 0.1, [1, 1]), r"groups must have one entry per weight"
    yield "negative lam", lambda: torch.ops.pyoptim.group_lasso_grad_([w], [g], -1.0, None), r"lam must be finite and >= 0"
    yield "nan threshold", lambda: torch.ops.pyoptim.group_lasso_prune_([w], float("nan"), None), r"threshold must be finite and >= 0"
    yield "mixed devices", lambda: torch.ops.pyoptim.group_lasso_grad_([w, w.to("meta")], [g, g.to("meta")], 0.1, None), r"weights\[1\] is on meta but weights\[0\] is on"
    yield "aliased grads", lambda: torch.ops.pyoptim.group_lasso_grad_([w, w.clone()], [g, g], 0.1, None), r"grads\[1\] and grads\[0\] share memory"
    yield "aliased weights", lambda: torch.ops.pyoptim.group_lasso_prune_([w, w[1:]], 0.1, None), r"weights\[\d\] and weights\[\d\] share memory"
    yield "backward shape", lambda: torch.ops.pyoptim.group_lasso_norms_backward(torch.zeros(3, device=device), torch.zeros(3, device=device), w, torch.zeros(4, device=device), torch.zeros(3, device=device), 1), r"grad_out_norms must have shape \[4\]"


@pytest.mark.parametrize("case", [c[0] for c in bad_input_cases("cpu")])
def test_bad_input_names_the_argument(backend, case):
    device, _ = backend
    cases = {name: (fn, pattern) for name, fn, pattern in bad_input_cases(device)}
    fn, pattern = cases[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


@pytest.mark.gpu
def test_grad_has_no_device_sync():
    """The hot path never waits for the device (no .item(), no host reads of device data)."""
    ws, groups = weight_list("cuda", torch.float32, 600)
    grads = [torch.zeros_like(w) for w in ws]
    torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.1, groups)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pen = torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.1, groups)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(pen.item())
