#!/usr/bin/env python3
"""GPU smoke test of every ``torch.ops.pyoptim`` op family on the shapes the CPU suite never reaches
(issue 23): one line per check, a JSON summary (``--out``), exit code 1 if any check fails.

Cases (``--size full`` for the GPU; ``small``: the same structure, scaled down so that the Triton
interpreter runs it in seconds on CPU; the shapes are in ``SIZES``, docs/gpu_first_run.md lists them):

* ``gl_tilings``   group lasso with several 64-row chunks per conv group, as ResNet-50's weights
  take it: norms and norms_backward per weight, grad_ and prune_ on the list in one call;
* ``bn_mean1e3``   batch_norm_add_relu forward and backward, input mean 1e3 and std 1 (a one-pass
  E[x^2] - E[x]^2 in float32 loses the variance: ~1e-1 error), NCHW and channels_last;
* ``compact_wide`` channel_compact with rows wider than 16 KiB and float16 views at storage offset 1;
* ``side_stream``  (cuda) every op on a ``torch.cuda.Stream()`` whose inputs are written there after
  a NaN poison and a ``torch.cuda._sleep``, equal to the default stream's result;
* ``sync_free``    (cuda) every op's forward, and backward where it has autograd, under
  ``torch.cuda.set_sync_debug_mode("error")``. ``EXPECTED_SYNCS`` is empty: the list kernels take
  their metadata by value in the launch arguments (no copy), nothing reads device data on the host,
  the penalty stays on the device, and channel_compact checks index ranges on the host only for CPU
  indices.

Errors are normwise, ``max|got - ref| / max|ref|`` against the float64 reference (pyoptim.reference
on CPU copies); copies, masks and stream comparisons count mismatched elements (tolerance 0)::

    python tools/gpu_smoke.py --device cuda --size full --isolate --child-timeout 50 --out $OUT
    TRITON_INTERPRET=1 python tools/gpu_smoke.py --device cpu --size small
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

CASES = ("gl_tilings", "bn_mean1e3", "compact_wide", "side_stream", "sync_free")
CUDA_ONLY = ("side_stream", "sync_free")
BACKENDS = ("cpp", "triton", "reference")
EXPECTED_SYNCS: Dict[str, str] = {}   # op -> why it must sync (none does)
SLEEP_CYCLES = 50_000_000             # ~25 ms on the side stream before its inputs are written

SIZES = {
    "full": dict(gl=[((256, 64, 3, 3), 1), ((512, 8, 3, 3), 2), ((4096, 1000), 1)],
                 bn=[((8, 16, 64, 64), "nchw"), ((32, 3, 32, 32), "channels_last")],
                 compact=[((8, 96, 4500), 1, 60, "float32", 0), ((6, 64, 9001), 1, 40, "float16", 1),
                          ((48, 9001), 0, 30, "float16", 1)]),
    "small": dict(gl=[((130, 8, 3, 3), 1), ((260, 4, 3, 3), 2), ((300, 70), 1)],
                  bn=[((4, 6, 24, 24), "nchw"), ((8, 3, 12, 12), "channels_last")],
                  compact=[((2, 6, 4100), 1, 5, "float32", 0), ((2, 5, 8195), 1, 4, "float16", 1),
                           ((7, 8195), 0, 5, "float16", 1)]),
}
# normwise tolerances: group lasso and BN results by dtype; BN at mean 1e3 in float32 loses what the
# float32 mean's rounding (3e-5 at 1e3) and a Welford merge cost, nothing like E[x^2]-E[x]^2 (~1e-1)
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 1e-3}
BN_TOL = {"float64": dict(mean=1e-12, invstd=1e-10, act=1e-10, grad=1e-10),
          "float32": dict(mean=2e-6, invstd=1e-4, act=3e-4, grad=1e-4)}

torch = pyoptim = ref_gl = ref_cu = ref_cc = None   # imported in main(), after TRITON_INTERPRET is set


def _import(device: str) -> None:
    global torch, pyoptim, ref_gl, ref_cu, ref_cc
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PYOPTIM_QUIET", "1")
    import torch as _torch
    torch = _torch
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import pyoptim as _pyoptim
    from pyoptim.reference import channel_compact as _cc, channel_union_conv as _cu, group_lasso as _gl
    pyoptim, ref_gl, ref_cu, ref_cc = _pyoptim, _gl, _cu, _cc


# ---- helpers -------------------------------------------------------------------------------------

def _rand(shape, seed: int, dtype="float32", device="cpu", mean=0.0, std=1.0, fmt=None):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(getattr(torch, dtype))
    t = t.to(device)
    return t.contiguous(memory_format=fmt) if fmt is not None else t


def _flat(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat(o)]
    return [obj] if isinstance(obj, torch.Tensor) else []


def normwise(got, want) -> float:
    """``max|got - want| / max|want|`` in float64 (inf when got is not finite where want is)."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if g.shape != w.shape:
        return float("inf")
    if w.numel() == 0:
        return 0.0
    d = (g - w).abs()
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.max() / w.abs().max().clamp_min(1e-300))


def mismatches(got, want) -> float:
    """Elements that differ (bitwise for floats: NaN equals NaN); inf for a shape mismatch."""
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.shape != w.shape or g.dtype != w.dtype:
        return float("inf")
    if g.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
        g, w = g.contiguous().view(bits), w.contiguous().view(bits)
    return float((g != w).sum())


class Recorder:
    """Collects one record per check (or per skipped/broken case) and prints its line."""

    def __init__(self, quiet: bool = False):
        self.records: List[dict] = []
        self.quiet = quiet

    def add(self, case, op, backend, shape, dtype, err, tol, note="", status=None) -> None:
        ok = status == "skip" or (status is None and err <= tol)
        r = dict(case=case, op=op, backend=backend, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                 max_err=err, tol=tol, ok=ok, status=status or ("pass" if ok else "fail"), note=note)
        self.records.append(r)
        if self.quiet:
            return
        if status:
            print(f"{case:<13} {backend:<15} {status.upper()}: {note}", flush=True)
        else:
            print(f"{case:<13} {op:<30} {backend:<15} {r['shape']:<22} {r['dtype']:<8} err {err:.2e} tol {tol:.0e} "
                  f"{'ok' if ok else 'FAIL'}{'  ' + note if note else ''}", flush=True)

    def skip(self, case, backend, reason) -> None:
        self.add(case, "*", backend, "", "", None, None, reason, status="skip")

    def error(self, case, backend, exc) -> None:
        self.add(case, "*", backend, "", "", None, None, f"{type(exc).__name__}: {exc}"[:500], status="error")


# ---- numeric cases -------------------------------------------------------------------------------

def _prune_threshold(norms) -> float:
    """A threshold in the widest gap between 30% and 60% of the sorted norms: no norm lies within
    rounding of it, so every backend keeps and prunes the same groups."""
    s = torch.sort(torch.cat([n.double().cpu() for n in norms])).values
    lo, hi = int(0.3 * len(s)), max(int(0.6 * len(s)), int(0.3 * len(s)) + 1)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def prune_weights(ws, groups):
    """``ws`` with out- and in-channels scaled by factors in [0.1, 1.1], so that one threshold
    prunes some groups of both kinds; and their float64 copies."""
    out = []
    for i, (w, g) in enumerate(zip(ws, groups)):
        gen = torch.Generator().manual_seed(500 + i)
        so = torch.rand(w.shape[0], generator=gen, dtype=torch.float64) + 0.1
        si = torch.rand(w.shape[1], generator=gen, dtype=torch.float64) + 0.1
        scale = (so.view(-1, 1) * si.view(1, -1)).view(*w.shape[:2], *([1] * (w.dim() - 2)))
        out.append((w.cpu().double() * scale).to(w.dtype).to(w.device))
    return out, [w.cpu().double().clone() for w in out]   # a copy even of float64 CPU weights


def case_gl_tilings(rec: Recorder, device: str, bname: str, size: str, dtype="float32") -> None:
    ops = torch.ops.pyoptim
    spec = SIZES[size]["gl"]
    tol = TOL[dtype]
    ws = [_rand(s, 10 + i, dtype, device) for i, (s, _) in enumerate(spec)]
    groups = [g for _, g in spec]
    w64 = [w.cpu().double().clone() for w in ws]   # the references write; .double() may alias
    for i, (w, g) in enumerate(zip(ws, groups)):
        shape = f"{tuple(w.shape)}/g{g}"
        o, n = ops.group_lasso_norms(w, g)
        ro, rn = ref_gl.group_lasso_norms(w64[i], g)
        rec.add("gl_tilings", "group_lasso_norms.out", bname, shape, dtype, normwise(o, ro), tol)
        rec.add("gl_tilings", "group_lasso_norms.in", bname, shape, dtype, normwise(n, rn), tol)
        go, gi = _rand(o.shape, 20 + i, str(o.dtype)[6:], device), _rand(n.shape, 30 + i, str(n.dtype)[6:], device)
        gw = ops.group_lasso_norms_backward(go, gi, w, ro.to(o.dtype).to(device), rn.to(n.dtype).to(device), g)
        want = ref_gl.group_lasso_norms_backward(go.cpu().double(), gi.cpu().double(), w64[i],
                                                 ro.to(o.dtype).double(), rn.to(n.dtype).double(), g)
        rec.add("gl_tilings", "group_lasso_norms_backward", bname, shape, dtype, normwise(gw, want), tol)
    shapes = "+".join(f"{tuple(w.shape)}" for w in ws)
    grads = [_rand(w.shape, 40 + i, dtype, device, std=0.01) for i, w in enumerate(ws)]
    want = [g.cpu().double().clone() for g in grads]
    want_pen = ref_gl.group_lasso_grad_(w64, want, 0.5, groups)
    pen = ops.group_lasso_grad_(ws, grads, 0.5, groups)
    rec.add("gl_tilings", "group_lasso_grad_.penalty", bname, shapes, dtype, normwise(pen, want_pen), tol)
    for i, (g, r) in enumerate(zip(grads, want)):
        rec.add("gl_tilings", f"group_lasso_grad_.grads[{i}]", bname, tuple(g.shape), dtype, normwise(g, r), tol)
    ws, w64 = prune_weights(ws, groups)
    thr = _prune_threshold([n for i, g in enumerate(groups) for n in ref_gl.group_lasso_norms(w64[i], g)])
    want_ok, want_ik = ref_gl.group_lasso_prune_(w64, thr, groups)
    ok, ik = ops.group_lasso_prune_(ws, thr, groups)
    note = f"threshold {thr:.4g}, {int((~want_ok).sum())}+{int((~want_ik).sum())} groups pruned"
    rec.add("gl_tilings", "group_lasso_prune_.out_keep", bname, shapes, "bool", mismatches(ok, want_ok), 0, note)
    rec.add("gl_tilings", "group_lasso_prune_.in_keep", bname, shapes, "bool", mismatches(ik, want_ik), 0)
    for i, (w, r) in enumerate(zip(ws, w64)):
        rec.add("gl_tilings", f"group_lasso_prune_.weights[{i}]", bname, tuple(w.shape), dtype,
                mismatches(w, r.to(w.dtype)), 0)


def case_bn_mean1e3(rec: Recorder, device: str, bname: str, size: str, dtype="float32") -> None:
    ops = torch.ops.pyoptim
    tol = BN_TOL[dtype]
    acc = "float64" if dtype == "float64" else "float32"
    for k, (shape, layout) in enumerate(SIZES[size]["bn"]):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        C = shape[1]
        x = _rand(shape, 50 + k, dtype, device, mean=1e3, fmt=fmt)
        w, b = _rand(C, 60 + k, dtype, device, mean=1.0, std=0.5), _rand(C, 70 + k, dtype, device, std=0.5)
        res = _rand(shape, 80 + k, dtype, device, fmt=fmt)
        x64, w64, b64, r64 = (t.cpu().double() for t in (x, w, b, res))
        tag = f"{shape}/{layout}"
        out, mean, invstd = ops.batch_norm_add_relu(x, w, b, res, 1e-5, True)
        r_out, r_mean, r_inv = ref_cu.batch_norm_add_relu(x64, w64, b64, r64, 1e-5, True)
        rec.add("bn_mean1e3", "batch_norm_add_relu.out", bname, tag, dtype, normwise(out, r_out), tol["act"])
        rec.add("bn_mean1e3", "batch_norm_add_relu.mean", bname, tag, dtype, normwise(mean, r_mean), tol["mean"])
        rec.add("bn_mean1e3", "batch_norm_add_relu.invstd", bname, tag, dtype, normwise(invstd, r_inv), tol["invstd"])
        rec.add("bn_mean1e3", "batch_norm_add_relu.format", bname, tag, dtype,
                0.0 if out.is_contiguous(memory_format=fmt) else 1.0, 0, "out keeps x's memory format")
        # the backward gets the reference's forward results (rounded as the kernel's would be), so a
        # ReLU mask never differs between the two sides
        o_k = r_out.to(getattr(torch, dtype)).contiguous(memory_format=fmt).to(device)
        m_k, i_k = r_mean.to(getattr(torch, acc)).to(device), r_inv.to(getattr(torch, acc)).to(device)
        go = _rand(shape, 90 + k, dtype, device, fmt=fmt)
        got = ops.batch_norm_add_relu_backward(go, o_k, x, w, m_k, i_k, True, True)
        want = ref_cu.batch_norm_add_relu_backward(go.cpu().double(), o_k.cpu().double(), x64, w64,
                                                   m_k.cpu().double(), i_k.cpu().double(), True, True)
        for name, g_, w_ in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), got, want):
            rec.add("bn_mean1e3", f"batch_norm_add_relu_backward.{name}", bname, tag, dtype,
                    normwise(g_, w_), tol["grad"])


def compact_inputs(size: str, device: str):
    """The tensors (float16 ones as views at storage offset 1), dims and indices (unsorted, with
    repeats) of the ``compact_wide`` case."""
    tensors, dims, indices = [], [], []
    for i, (shape, dim, k, dtype, offset) in enumerate(SIZES[size]["compact"]):
        flat = _rand((math.prod(shape) + offset,), 100 + i, dtype, device)
        t = flat[offset:].view(shape)
        assert t.storage_offset() == offset and t.is_contiguous()
        g = torch.Generator().manual_seed(200 + i)
        perm = torch.randperm(shape[dim], generator=g)[:k - 2]
        idx = torch.cat([perm, perm[:2]])[torch.randperm(k, generator=g)]
        tensors, dims, indices = tensors + [t], dims + [dim], indices + [idx.to(device)]
    return tensors, dims, indices


def case_compact_wide(rec: Recorder, device: str, bname: str, size: str) -> None:
    tensors, dims, indices = compact_inputs(size, device)
    outs = torch.ops.pyoptim.channel_compact(tensors, dims, indices)
    want = ref_cc.channel_compact([t.cpu() for t in tensors], dims, [i.cpu() for i in indices])
    for i, (o, w, t) in enumerate(zip(outs, want, tensors)):
        row = t.element_size() * math.prod(t.shape[dims[i] + 1:])
        note = f"dim {dims[i]}, rows of {row} B, storage offset {t.storage_offset()}"
        rec.add("compact_wide", f"channel_compact[{i}]", bname, tuple(t.shape), t.dtype, mismatches(o, w), 0, note)


# ---- every op once (side stream, sync-free) --------------------------------------------------------

def op_table(device: str, size: str) -> List[dict]:
    """Every ``torch.ops.pyoptim`` op with fresh inputs: ``build() -> args`` (identical on every
    call), ``mutates`` (indices of the arguments it writes), ``diff`` (indices of the arguments the
    autograd backward differentiates; empty where the op has no autograd) and ``vendor`` (results
    from cuDNN/cuBLAS, compared with a tolerance rather than bit for bit)."""
    gl = SIZES[size]["gl"]
    (bn_shape, _), C = SIZES[size]["bn"][0], SIZES[size]["bn"][0][0][1]
    R = lambda shape, seed, **kw: _rand(shape, seed, "float32", device, **kw)  # noqa: E731
    ws = lambda seed: [R(s, seed + i) for i, (s, _) in enumerate(gl)]  # noqa: E731
    groups = [g for _, g in gl]
    w0, g0 = gl[0]
    nrm = lambda: ref_gl.group_lasso_norms(R(w0, 1).cpu().double(), g0)  # noqa: E731
    x = lambda: R((4, 16, 18, 18), 5)  # noqa: E731
    pw = lambda: prune_weights(ws(10), groups)[0]  # noqa: E731
    thr = _prune_threshold([n for w, g in zip(pw(), groups) for n in ref_gl.group_lasso_norms(w.cpu().double(), g)])
    return [
        dict(name="group_lasso_norms", build=lambda: (R(w0, 1), g0), diff=(0,)),
        dict(name="group_lasso_norms_backward", build=lambda: (
            R(w0[:1], 2), R((g0 * w0[1],), 3), R(w0, 1), *[n.float().to(device) for n in nrm()], g0)),
        dict(name="group_lasso_grad_", build=lambda: (ws(10), ws(20), 0.5, groups), mutates=(1,)),
        dict(name="group_lasso_prune_", build=lambda: (pw(), thr, groups), mutates=(0,)),
        dict(name="sparse_conv2d", build=lambda: (x(), R((8, 6, 3, 3), 6), R((8, 10, 3, 3), 7), R(8, 8),
                                                  [1, 1], [1, 1], [1, 1], 1), diff=(0, 1, 3), vendor=True),
        dict(name="sparse_conv2d_weight_grad", build=lambda: (
            R((4, 8, 18, 18), 9), x()[:, :6].contiguous(), [8, 6, 3, 3], [1, 1], [1, 1], [1, 1], 1, True),
            vendor=True),
        dict(name="sparse_linear", build=lambda: (R((64, 40), 11), R((24, 16), 12), R((24, 24), 13), R(24, 14)),
             diff=(0, 1, 3), vendor=True),
        dict(name="sparse_linear_weight_grad", build=lambda: (R((64, 24), 15), R((64, 16), 16), True), vendor=True),
        dict(name="channel_compact", build=lambda: compact_inputs(size, device)),
        dict(name="channel_union_conv2d", build=lambda: (x(), R((8, 16, 3, 3), 17), R(8, 18), R((4, 8, 18, 18), 19),
                                                         [1, 1], [1, 1], [1, 1], 1, True), diff=(0, 1, 2, 3)),
        dict(name="batch_norm_add_relu", build=lambda: (
            R(bn_shape, 21, mean=1e3), R(C, 22, mean=1.0), R(C, 23), R(bn_shape, 24), 1e-5, True), diff=(0, 1, 2, 3)),
        dict(name="batch_norm_add_relu_backward", build=lambda: (
            R(bn_shape, 25), R(bn_shape, 26).relu(), R(bn_shape, 21, mean=1e3), R(C, 22, mean=1.0),
            R(C, 27, mean=1e3), R(C, 28, mean=1.0).abs(), True, True)),
    ]


def call(spec: dict, args) -> list:
    """Runs the op; returns its outputs followed by the arguments it wrote."""
    out = getattr(torch.ops.pyoptim, spec["name"])(*args)
    return _flat(out) + [t for i in spec.get("mutates", ()) for t in _flat(args[i])]


def call_backward(spec: dict, args) -> list:
    """The op's forward and its autograd backward (random output gradients); the input gradients."""
    args = list(args)
    leaves = [args[i].detach().clone().requires_grad_(True) for i in spec["diff"]]
    for i, leaf in zip(spec["diff"], leaves):
        args[i] = leaf
    outs = [o for o in _flat(getattr(torch.ops.pyoptim, spec["name"])(*args)) if o.requires_grad]
    gos = [torch.randn_like(o) for o in outs]   # on the device: an H2D copy here would sync
    return list(torch.autograd.grad(outs, leaves, gos, allow_unused=True))


def _map(obj, fn):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    return fn(obj) if isinstance(obj, torch.Tensor) else obj


def _written_late(args):
    """Copies of ``args`` made on the current stream: poison (NaN, or index 0), a sleep, then the
    real values. A kernel that does not wait for the current stream reads the poison."""
    copies = _map(args, lambda t: torch.empty_like(t).fill_(float("nan") if t.is_floating_point() else 0))
    torch.cuda._sleep(SLEEP_CYCLES)
    for c, t in zip(_flat(copies), _flat(args)):
        c.copy_(t)
    return copies


def side_stream_one(spec: dict, bname: str, emulate: bool = False):
    """``(err, tol, note)`` of one op on a side stream against the default stream. ``emulate``
    (CPU): the same calls and comparisons with no stream, to check the harness."""
    want = call(spec, spec["build"]())
    if emulate:
        got = call(spec, _map(spec["build"](), lambda t: t.clone()))
    else:
        args = spec["build"]()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            got = call(spec, _written_late(args))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    # cuDNN/cuBLAS need not pick the same algorithm twice; our own kernels are bitwise reproducible
    vendor = spec.get("vendor") or (spec["name"] == "channel_union_conv2d" and not bname.endswith("triton"))
    err = max([normwise(g, w) if vendor else mismatches(g, w) for g, w in zip(got, want)] +
              [0.0 if len(got) == len(want) else float("inf")])
    return err, (1e-5 if vendor else 0.0), ("normwise (cuDNN/cuBLAS)" if vendor else "mismatched elements")


def case_side_stream(rec: Recorder, device: str, bname: str, size: str, emulate: bool = False) -> None:
    for spec in op_table(device, size):
        err, tol, note = side_stream_one(spec, bname, emulate)
        rec.add("side_stream", spec["name"], bname, f"{len(_flat(spec['build']()))} inputs", "float32", err, tol, note)


def sync_free_one(spec: dict, phase: str, emulate: bool = False):
    """``(err, note)``: the op's ``forward`` or ``backward`` after a warm-up, under
    ``set_sync_debug_mode("error")``; err 1 when it synchronises and is not in EXPECTED_SYNCS."""
    fn = call if phase == "forward" else call_backward
    args = spec["build"]()
    fn(spec, _map(args, lambda t: t.clone()))      # warm-up: compiles, workspaces, handles
    if not emulate:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn(spec, args)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        if spec["name"] in EXPECTED_SYNCS:
            return 0.0, f"syncs (expected: {EXPECTED_SYNCS[spec['name']]})"
        return 1.0, f"SYNCS: {str(exc).splitlines()[0][:120]}"
    finally:
        if not emulate:
            torch.cuda.set_sync_debug_mode("default")
    return 0.0, "no sync"


def phases(spec: dict) -> List[str]:
    return ["forward"] + (["backward"] if spec.get("diff") else [])


def case_sync_free(rec: Recorder, device: str, bname: str, size: str, emulate: bool = False) -> None:
    for spec in op_table(device, size):
        for phase in phases(spec):
            err, note = sync_free_one(spec, phase, emulate)
            rec.add("sync_free", f"{spec['name']}.{phase}", bname, "", "float32", err, 0, note)


CASE_FNS: Dict[str, Callable] = dict(gl_tilings=case_gl_tilings, bn_mean1e3=case_bn_mean1e3,
                                     compact_wide=case_compact_wide, side_stream=case_side_stream,
                                     sync_free=case_sync_free)


# ---- driver --------------------------------------------------------------------------------------

def backend_missing(device: str, name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here (None when it can)."""
    b = pyoptim.backends()
    if not b["cpp_cpu"]:
        return f"the compiled extension is not loaded ({b['extension_error']}): torch.ops.pyoptim is empty"
    if name == "cpp" and device == "cuda" and not b["cuda"]:
        return "the extension was built without CUDA kernels"
    if name == "triton" and not b["triton"]:
        return "the triton package is not installed"
    if name == "triton" and device == "cpu" and not b["triton_interpreter"]:
        return "Triton on CPU tensors needs TRITON_INTERPRET=1"
    return None


def summarize(device, size, cases, backends, records, seconds, timing, env) -> dict:
    failed = [r for r in records if not r["ok"]]
    return dict(tool="gpu_smoke", device=device, size=size, cases=list(cases), backends=list(backends),
                ok=not failed, passed=sum(r["status"] == "pass" for r in records), failed=len(failed),
                skipped=sum(r["status"] == "skip" for r in records), seconds=round(seconds, 2),
                case_seconds=timing, expected_syncs=EXPECTED_SYNCS, env=env, records=records)


def run(device: str, size: str, cases, backends, quiet=False) -> dict:
    rec, t0, timing = Recorder(quiet), time.time(), {}
    for name in backends:
        bname = f"{device}-{name}"
        why = backend_missing(device, name)
        if why:
            rec.error("*", bname, RuntimeError(f"backend unavailable: {why}"))
            continue
        for case in cases:
            if case in CUDA_ONLY and device != "cuda":
                rec.skip(case, bname, "skipped: cuda only")
                continue
            t = time.time()
            try:
                with pyoptim.use_backend(name):
                    CASE_FNS[case](rec, device, bname, size)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # one broken case must not hide the others' results
                rec.error(case, bname, exc)
            timing[f"{case}/{bname}"] = round(time.time() - t, 3)
    env = dict(torch=torch.__version__, pyoptim_backends=pyoptim.backends(),
               triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return summarize(device, size, cases, backends, rec.records, time.time() - t0, timing, env)


def run_isolated(args, save: Callable[[dict], None]) -> dict:
    """Each backend in a process of its own (``--isolate``): a crash, a hang (``--child-timeout``) or
    a CUDA error that breaks the context costs that backend's results only. ``save`` gets the
    merged result after each backend, so a run killed later still leaves the earlier ones."""
    t0, records, timing, env = time.time(), [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"gpu_smoke_{args.device}_{args.size}.json")
        for name in args.backends:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--size", args.size,
                   "--cases", ",".join(args.cases), "--backends", name, "--out", tmp] + ["--quiet"] * args.quiet
            try:
                rc = subprocess.run(cmd, timeout=args.child_timeout or None).returncode
            except subprocess.TimeoutExpired:
                rc = f"killed after --child-timeout {args.child_timeout} s"
            if rc in (0, 1) and os.path.exists(path):
                with open(path) as f:
                    res = json.load(f)
                os.remove(path)
                records += res["records"]
                timing.update(res["case_seconds"])
                env = env or res["env"]
            else:
                records.append(dict(case="*", op="*", backend=f"{args.device}-{name}", shape="", dtype="",
                                    max_err=None, tol=None, ok=False, status="error",
                                    note=f"the smoke's process for this backend died ({rc})"))
            save(summarize(args.device, args.size, args.cases, args.backends, records, time.time() - t0,
                           timing, env))
    return summarize(args.device, args.size, args.cases, args.backends, records, time.time() - t0, timing, env)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default=None, help="folder for gpu_smoke_<device>_<size>.json")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of cpp,triton,reference")
    ap.add_argument("--quiet", action="store_true", help="only the summary line")
    ap.add_argument("--isolate", action="store_true", help="each backend in a process of its own")
    ap.add_argument("--child-timeout", type=float, default=0, help="with --isolate: seconds per backend (0: none)")
    args = ap.parse_args(argv)
    for key, allowed in (("cases", CASES), ("backends", BACKENDS)):
        picked = [c for c in getattr(args, key).split(",") if c]
        bad = [c for c in picked if c not in allowed]
        if bad:
            ap.error(f"--{key}: unknown {bad[0]!r} (choose from {', '.join(allowed)})")
        setattr(args, key, picked)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    path = os.path.join(args.out, f"gpu_smoke_{args.device}_{args.size}.json") if args.out else None

    def save(result: dict) -> None:
        if path:
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)

    if args.isolate:
        result = run_isolated(args, save)
    else:
        _import(args.device)
        if args.device == "cuda" and not torch.cuda.is_available():
            print("gpu_smoke: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        result = run(args.device, args.size, args.cases, args.backends, args.quiet)
    save(result)
    bad = [f"{r['case']}/{r['op']}/{r['backend']}" for r in result["records"] if not r["ok"]]
    print(json.dumps(dict(ok=result["ok"], passed=result["passed"], failed=result["failed"],
                          skipped=result["skipped"], seconds=result["seconds"], failures=bad[:20],
                          json=path)), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
