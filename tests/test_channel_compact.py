"""channel_compact against index_select, for every backend."""
import os

import pytest
import torch

import pyoptim


def cases(device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float64: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    idx = lambda *v: torch.tensor(v, dtype=torch.int64, device=device)
    return [
        (r(8, 6, 3, 3), 0, idx(0, 2, 7)),
        (r(8, 6, 3, 3), 1, idx(5, 1)),
        (r(5, 7), -1, idx(6, 0, 3, 3)),             # unsorted, repeated
        (r(9), 0, idx(1, 4, 8)),
        (r(4, 3, dtype=torch.float16), 0, idx(3)),
        (r(4, 3, dtype=torch.float32), 1, idx(0, 2)),
        (r(4, 6) > 0, 1, idx(1, 2, 5)),             # bool
        ((r(6, 2) * 100).long(), 0, idx(5, 0)),
        (r(3, 4), 0, idx()),                         # nothing kept
    ]


def test_matches_index_select(backend):
    device, _ = backend
    cs = cases(device)
    outs = torch.ops.pyoptim.channel_compact([c[0] for c in cs], [c[1] for c in cs], [c[2] for c in cs])
    assert len(outs) == len(cs)
    for (t, d, i), out in zip(cs, outs):
        want = t.index_select(d, i)
        assert out.dtype == t.dtype and out.shape == want.shape and torch.equal(out, want)


def test_opcheck(backend):
    device, _ = backend
    cs = cases(device)[:4]
    torch.library.opcheck(torch.ops.pyoptim.channel_compact.default,
                          ([c[0] for c in cs], [c[1] for c in cs], [c[2] for c in cs]))


def test_empty_list():
    assert pyoptim.ops.channel_compact([], [], []) == []


def bad(device):
    t = torch.randn(4, 3, device=device)
    i = torch.tensor([0, 1], device=device)
    c = torch.ops.pyoptim.channel_compact
    yield "lengths", lambda: c([t, t], [0], [i, i]), r"must have the same length"
    yield "dim", lambda: c([t], [2], [i]), r"dims\[0\]=2 is out of range for tensors\[0\]"
    yield "index dtype", lambda: c([t], [0], [i.int()]), r"indices\[0\] must be a 1-D int64 tensor"
    yield "non-contiguous", lambda: c([t.t()], [0], [i]), r"tensors\[0\] must be a contiguous"
    yield "range", lambda: c([t], [0], [torch.tensor([0, 4], device=device)]), r"indices\[0\]\[1\]=4 is out of range"


@pytest.mark.parametrize("case", [b[0] for b in bad("cpu")])
def test_bad_input_names_the_argument(backend, case):
    device, _ = backend
    if case == "range" and device == "cuda":
        pytest.skip("CUDA checks the range with a device assert (no host sync)")
    fn, pattern = {n: (f, p) for n, f, p in bad(device)}[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_triton_kernel_guards_an_index_out_of_range():
    """The Triton kernel itself, below the op's host checks (which a CUDA index skips, to avoid a
    sync): an index out of range is never read (its row comes out zero) and trips
    tl.device_assert where Triton's device asserts are compiled in (debug)."""
    from torch.utils._triton import has_triton_package
    if not has_triton_package() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the Triton kernel through the interpreter")
    from pyoptim.triton_kernels.channel_compact import channel_compact as triton_compact
    t = torch.randn(4, 3, dtype=torch.float64) + 10.0
    out = triton_compact([t], [0], [torch.tensor([3, 0])])[0]
    assert torch.equal(out, t[[3, 0]])
    for bad_index in (4, -1, 1 << 40):
        out = triton_compact([t], [0], [torch.tensor([2, bad_index])])[0]
        assert torch.equal(out[0], t[2]) and torch.equal(out[1], torch.zeros(3, dtype=t.dtype))
