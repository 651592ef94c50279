"""Benchmark of the fused group-lasso gradient (``group_lasso_grad_``) over every conv weight of
ResNet-50 (ImageNet, ~94 MB of fp32 weights) and of a CIFAR ResNet-32 (~1.9 MB).

Providers, all timed in the same run on the same tensors:
  prunetrain   PruneTrain's way: the penalty written with torch ops, differentiated by autograd
  composite_*  the best composites of torch ops we could write: two norm reductions and one
               broadcast addcmul_ per tensor, or squares once, column norms by a GEMV and two
               addcmul_ (the faster of the two is the baseline)
  pyoptim      our op through torch.ops.pyoptim (C++ on CPU, CUDA on GPU)
  triton       our Triton kernels (GPU only)

Reported: median/p20/p80 time, the speedup over each baseline, and the achieved bandwidth against
the floor: the op must read the weights once for the norms, then read weights and grads and write
the grads (4 x weight bytes), compared to this machine's measured copy bandwidth.

    python bench/bench_group_lasso.py [--device cpu|cuda] [--reps N] [--models resnet50,resnet32]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import pyoptim  # noqa: E402
from pyoptim import models  # noqa: E402
from pyoptim.reference import group_lasso as ref  # noqa: E402

LAM = 1e-4


def conv_weights(name: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = {"resnet50": models.resnet50, "resnet32": models.resnet32}[name]()
    targets = pyoptim.group_lasso_targets(model)
    weights = [w.detach().to(device, dtype).contiguous() for _, w, _ in targets]
    groups = [g for _, _, g in targets]
    return weights, groups


def prunetrain_step(leaves, lam):
    """PruneTrain's formulation: sum of sqrt(sum of squares) per group, then autograd."""
    penalty = 0
    for w in leaves:
        dims_out = tuple(range(1, w.dim()))
        dims_in = (0,) + tuple(range(2, w.dim()))
        penalty = penalty + torch.sqrt(torch.sum(w ** 2, dim=dims_out)).sum()
        penalty = penalty + torch.sqrt(torch.sum(w ** 2, dim=dims_in)).sum()
    penalty = penalty * lam
    penalty.backward()
    return penalty.detach()


def composite_norm_step(weights, grads, lam):
    """Torch-op composite 1: two vector_norm reductions and one broadcast addcmul_ per tensor
    (fewest ops: the better one for many small tensors)."""
    total = torch.zeros((), device=weights[0].device, dtype=torch.float32)
    for w, g in zip(weights, grads):
        dims_out = tuple(range(1, w.dim()))
        dims_in = (0,) + tuple(range(2, w.dim()))
        o = torch.linalg.vector_norm(w, dim=dims_out, keepdim=True, dtype=torch.float32)
        i = torch.linalg.vector_norm(w, dim=dims_in, keepdim=True, dtype=torch.float32)
        total += o.sum() + i.sum()
        coef = torch.where(o == 0, 0.0, lam / o) + torch.where(i == 0, 0.0, lam / i)
        g.addcmul_(w, coef.to(w.dtype))
    return total * lam


def composite_gemv_step(weights, grads, lam):
    """Torch-op composite 2 (the faster one on large weights, of several tried): squares once, row
    norms by a contiguous reduction, column norms by a GEMV (ones @ squares), two addcmul_."""
    total = torch.zeros((), device=weights[0].device, dtype=torch.float32)
    for w, g in zip(weights, grads):
        K, C = w.shape[0], w.shape[1]
        S = w[0, 0].numel()
        w2 = w.view(K, -1)
        sq = w2.float().square()
        o = sq.sum(1).sqrt()
        i = (torch.ones(1, K, device=w.device) @ sq).view(C, S).sum(1).sqrt()
        total += o.sum() + i.sum()
        co = torch.where(o == 0, 0.0, lam / o).to(w.dtype)
        ci = torch.where(i == 0, 0.0, lam / i).to(w.dtype)
        g.view(K, -1).addcmul_(w2, co[:, None]).addcmul_(w2, ci.repeat_interleave(S)[None, :])
    return total * lam


def bench_model(name: str, device: torch.device, dtype: torch.dtype, reps: int, copy_gbs: float):
    weights, groups = conv_weights(name, device, dtype)
    assert all(g == 1 for g in groups), "the baselines below are written for ungrouped convs"
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    floor_bytes = 4 * wbytes
    torch.manual_seed(1)
    grads0 = [torch.randn_like(w) for w in weights]

    # correctness of every provider against the float64 reference, once, before timing
    want = [g.double().clone() for g in grads0]
    want_pen = ref.group_lasso_grad_([w.double() for w in weights], want, LAM, groups)

    providers = {}
    leaves = [w.clone().requires_grad_(True) for w in weights]
    for leaf, g in zip(leaves, grads0):
        leaf.grad = g.clone()
    providers["prunetrain"] = lambda: prunetrain_step(leaves, LAM)
    comp_grads = [g.clone() for g in grads0]
    providers["composite_norm"] = lambda: composite_norm_step(weights, comp_grads, LAM)
    providers["composite_gemv"] = lambda: composite_gemv_step(weights, comp_grads, LAM)
    op_grads = [g.clone() for g in grads0]
    providers["pyoptim"] = lambda: pyoptim.ops.group_lasso_grad_(weights, op_grads, LAM, groups)
    tri_grads = [g.clone() for g in grads0]
    if device.type == "cuda" and pyoptim.backends()["triton"]:
        from pyoptim.triton_kernels import group_lasso as tk
        providers["triton"] = lambda: tk.group_lasso_grad_(weights, tri_grads, LAM, groups)

    # check: one call from the initial grads
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for pname, fn in providers.items():
        if pname == "prunetrain":
            for leaf, g in zip(leaves, grads0):
                leaf.grad = g.clone()
            pen = fn()
            got = [leaf.grad for leaf in leaves]
        else:
            buf = {"composite_norm": comp_grads, "composite_gemv": comp_grads, "pyoptim": op_grads,
                   "triton": tri_grads}[pname]
            for b, g in zip(buf, grads0):
                b.copy_(g)
            pen = fn()
            got = buf
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{pname} {name}[{i}]: {m}")
        torch.testing.assert_close(pen.double().cpu(), want_pen.cpu(), rtol=1e-3, atol=0)

    rows = []
    for pname, fn in providers.items():
        t = bu.timeit(fn, device, warmup=3, reps=reps)
        gbs = floor_bytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append({"provider": pname, **t, "achieved_gbs": gbs,
                     "fraction_of_copy_bandwidth": gbs / copy_gbs})
    base = {r["provider"]: r["median_ms"] for r in rows}
    best_composite = min(base["composite_norm"], base["composite_gemv"])
    for r in rows:
        r["speedup_vs_prunetrain"] = base["prunetrain"] / r["median_ms"]
        r["speedup_vs_best_composite"] = best_composite / r["median_ms"]
    return {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(weights),
        "weight_bytes": wbytes,
        "floor_bytes": floor_bytes,
        "floor_ms_at_copy_bandwidth": floor_bytes / (copy_gbs * 1e9) * 1e3,
        "shapes": [list(w.shape) for w in weights],
        "groups": groups,
        "results": rows,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--models", default="resnet50,resnet32")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    copy_gbs = bu.copy_bandwidth_gbs(device)
    env = bu.environment(device)
    print(f"# group_lasso_grad_ on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit'][:12]}")
    print(f"# copy bandwidth (read+write): {copy_gbs:.1f} GB/s; lam={LAM}, dtype={args.dtype}")
    out = {"op": "group_lasso_grad_", "unit": "ms", "lam": LAM, "copy_bandwidth_gbs": copy_gbs, **env,
           "models": []}
    for name in args.models.split(","):
        res = bench_model(name, device, dtype, args.reps, copy_gbs)
        out["models"].append(res)
        print(f"\n{name}: {res['tensors']} conv weights, {res['weight_bytes'] / 1e6:.1f} MB, floor "
              f"{res['floor_bytes'] / 1e6:.0f} MB = {res['floor_ms_at_copy_bandwidth']:.2f} ms at copy bandwidth")
        print(f"{'provider':<16}{'median ms':>11}{'p20':>9}{'p80':>9}{'x prunetrain':>14}"
              f"{'x best composite':>18}{'GB/s':>8}{'% copy bw':>11}")
        for r in res["results"]:
            print(f"{r['provider']:<16}{r['median_ms']:>11.3f}{r['p20_ms']:>9.3f}{r['p80_ms']:>9.3f}"
                  f"{r['speedup_vs_prunetrain']:>14.2f}{r['speedup_vs_best_composite']:>18.2f}"
                  f"{r['achieved_gbs']:>8.1f}{100 * r['fraction_of_copy_bandwidth']:>10.0f}%")
    path = bu.write_result("group_lasso", device, out, args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
