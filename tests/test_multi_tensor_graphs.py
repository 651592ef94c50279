"""The CUDA multi-tensor ops (group lasso, channel_compact) in CUDA graphs, and lists longer than
one launch holds.

Their per-tensor metadata travels by value in the kernel arguments (csrc/cuda/multi_tensor.cuh),
so a captured call replays on whatever the captured tensors hold at replay time. Each test
captures an op, writes new values into its inputs in place, replays, and compares with the eager
op on the same values (bitwise: the kernels have no atomics and replay the same launches) and with
the float64 reference. A launch holds 44 group-lasso weights or 55 channel_compact tensors; the
long lists here take several launches. All GPU-only (skipped without a CUDA device)."""
import pytest
import torch

import pyoptim
from pyoptim.reference import group_lasso as ref

pytestmark = pytest.mark.gpu

LONG = 150  # tensors in the long lists: 4 group-lasso launches, 3 channel_compact launches


@pytest.fixture(autouse=True)
def cuda_kernels():
    """The compiled CUDA kernels (not Triton, not the reference) serve every op."""
    with pyoptim.use_backend("cpp"):
        yield


def rand(shape, dtype=torch.float32, seed=0, fmt=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(device="cuda", dtype=dtype)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def capture(fn):
    """``fn`` warmed up on a side stream, then captured; returns (graph, captured outputs)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def weight_list(n, dtype=torch.float32, seed=0):
    """n weights cycling through NCHW, channels_last, grouped, depthwise and linear shapes."""
    specs = [((16, 8, 3, 3), 1, None), ((24, 12, 3, 3), 1, torch.channels_last), ((10, 33), 1, None),
             ((12, 4, 3, 3), 3, torch.channels_last), ((16, 1, 3, 3), 16, None),
             ((32, 16, 1, 1), 1, torch.channels_last), ((70, 9, 3, 3), 1, None)]
    ws, groups = [], []
    for i in range(n):
        shape, gr, fmt = specs[i % len(specs)]
        ws.append(rand(shape, dtype, seed + i, fmt))
        groups.append(gr)
    return ws, groups


def refill(tensors, seed):
    """New values in place (same storage, same strides)."""
    for i, t in enumerate(tensors):
        t.copy_(rand(t.shape, t.dtype, seed + i))


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["contiguous", "channels_last"])
def test_norms_and_backward_in_a_graph(fmt):
    w = rand((40, 24, 3, 3), torch.float32, 1, fmt)
    on, inn = torch.ops.pyoptim.group_lasso_norms(w, 2)
    go, gi = torch.randn_like(on), torch.randn_like(inn)
    g1, (out, ins) = capture(lambda: torch.ops.pyoptim.group_lasso_norms(w, 2))
    g2, gw = capture(lambda: torch.ops.pyoptim.group_lasso_norms_backward(go, gi, w, on, inn, 2))
    for seed in (10, 20):
        refill([w, go, gi], seed)
        g1.replay()
        on.copy_(out)
        inn.copy_(ins)
        g2.replay()
        torch.cuda.synchronize()
        eo, ei = torch.ops.pyoptim.group_lasso_norms(w, 2)
        assert torch.equal(out, eo) and torch.equal(ins, ei)
        assert torch.equal(gw, torch.ops.pyoptim.group_lasso_norms_backward(go, gi, w, on, inn, 2))
        ro, ri = ref.group_lasso_norms(w.double().contiguous(), 2)
        torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ins.double(), ri, rtol=1e-5, atol=1e-6)
        assert gw.stride() == w.stride()


@pytest.mark.parametrize("n", [5, LONG], ids=["one_launch", "several_launches"])
def test_grad_in_a_graph(n):
    ws, groups = weight_list(n, torch.float32, 100)
    grads = [torch.empty_like(w) for w in ws]
    graph, pen = capture(lambda: torch.ops.pyoptim.group_lasso_grad_(ws, grads, 0.05, groups))
    for seed in (1000, 2000):
        refill(ws, seed)
        refill(grads, seed + 500)
        start = [g.clone() for g in grads]
        graph.replay()
        torch.cuda.synchronize()
        eager = [s.clone() for s in start]
        want_pen = torch.ops.pyoptim.group_lasso_grad_(ws, eager, 0.05, groups)
        assert torch.equal(pen, want_pen)
        for i, (g, e) in enumerate(zip(grads, eager)):
            assert torch.equal(g, e), f"grads[{i}]"
        ref_grads = [s.double().contiguous() for s in start]
        ref_pen = ref.group_lasso_grad_([w.double().contiguous() for w in ws], ref_grads, 0.05, groups)
        torch.testing.assert_close(pen.double(), ref_pen, rtol=1e-5, atol=0)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=1e-6, msg=lambda m: f"grads[{i}]: {m}")


@pytest.mark.parametrize("n", [5, LONG], ids=["one_launch", "several_launches"])
def test_prune_in_a_graph(n):
    ws, groups = weight_list(n, torch.float64, 300)

    def fresh(seed):
        refill(ws, seed)
        for w in ws:
            w[1] *= 1e-6                 # one small out-channel
            w[:, 0] *= 1e-6 if w.shape[1] > 1 else 1.0  # one small in-channel slot

    graph, (out_keep, in_keep) = capture(lambda: torch.ops.pyoptim.group_lasso_prune_(ws, 1e-3, groups))
    for seed in (3000, 4000):
        fresh(seed)
        before = [w.clone() for w in ws]
        graph.replay()
        torch.cuda.synchronize()
        eager = [b.clone() for b in before]
        eo, ei = torch.ops.pyoptim.group_lasso_prune_(eager, 1e-3, groups)
        assert torch.equal(out_keep, eo) and torch.equal(in_keep, ei)
        assert not eo.all() and not ei.all()
        for i, (w, e) in enumerate(zip(ws, eager)):
            assert torch.equal(w, e), f"weights[{i}]"
        rw = [b.cpu().contiguous() for b in before]
        ro, ri = ref.group_lasso_prune_(rw, 1e-3, groups)
        assert torch.equal(out_keep.cpu(), ro) and torch.equal(in_keep.cpu(), ri)
        for i, (w, r) in enumerate(zip(ws, rw)):
            assert torch.equal(w.cpu(), r), f"weights[{i}]"


@pytest.mark.parametrize("n", [4, LONG], ids=["one_launch", "several_launches"])
def test_channel_compact_in_a_graph(n):
    shapes = [((16, 8, 3, 3), 0), ((16, 8, 3, 3), 1), ((33, 5), 1), ((64,), 0), ((9, 130), 0)]
    tensors, dims, indices = [], [], []
    for i in range(n):
        shape, d = shapes[i % len(shapes)]
        tensors.append(rand(shape, torch.float32 if i % 3 else torch.float16, 500 + i))
        dims.append(d)
        size = shape[d]
        indices.append(torch.randperm(size, device="cuda")[: max(1, size // 2)])
    graph, outs = capture(lambda: torch.ops.pyoptim.channel_compact(tensors, dims, indices))
    for seed in (5000, 6000):
        refill(tensors, seed)
        gen = torch.Generator().manual_seed(seed)
        for t, d, idx in zip(tensors, dims, indices):  # new kept channels, same count
            idx.copy_(torch.randperm(t.shape[d], generator=gen)[: idx.numel()].to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (t, d, idx, out) in enumerate(zip(tensors, dims, indices, outs)):
            assert torch.equal(out, t.index_select(d, idx)), f"tensors[{i}]"
