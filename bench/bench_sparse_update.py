"""Benchmark of sparse sub-tensor updates (Lin et al., "On-Device Training Under 256KB Memory",
2022) on MobileNetV2 (widths 0.35 and 1.0, BN folded into the convs for every variant so they are
comparable): the memory of one training step and the backward time.

Variants, all measured in the same run on the same model:
  full         every parameter trains (plain convs, dense backward)
  last8        the last 8 convs (full weights and biases) + the classifier
  masked       tiny-training's PyTorch way for the paper scheme: the whole network trains with a
               dense loss.backward(), then the gradients are masked to the scheme's entries
               (tensors with no trained entry get grad None, so the optimizer skips them)
  paper        our sparse update, the paper-like scheme: biases of the last 16 convs, weights of 8
               of them at 1/4 or 1/8 of their channels, the classifier
  bias8        our sparse update: biases of the last 8 convs + the classifier
  bias16_w4    biases of the last 16 + the weights of the last 4 (non-depthwise) convs at 1/8
  half         the paper's layers with every weight ratio at 1/2

For each: the measured training-step memory (saved activations + gradients + optimizer state
(SGD momentum) + parameters; on CUDA also the allocator's peak during the step), the analytic
estimate (pyoptim.sparse.memory_estimate), the backward time (median of interleaved repeats after
warm-up; for `masked` the gradient masking is included) and the ratios against `full`.

    python bench/bench_sparse_update.py [--device cpu|cuda] [--batch-size 8] [--resolution 128]
        [--widths 0.35,1.0] [--num-classes 1000,10] [--reps 12] [--warmup 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim.models.mobilenetv2 import mobilenet_v2  # noqa: E402
from pyoptim.sparse import (SparseUpdateScheme, apply_scheme, fuse_bn, measure_memory,  # noqa: E402
                            memory_estimate, scheme_masks)

PAPER = {-1: 0.25, -2: 0.25, -4: 0.125, -5: 0.25, -7: 0.125, -8: 0.25, -10: 0.125, -11: 0.25}
OPTIMIZER = "sgd_momentum"


def variants(model):
    """name -> (scheme, masked); scheme None is the full update."""
    return {
        "full": (None, False),
        "last8": (SparseUpdateScheme.last_layers(model, 8, {-i: 1.0 for i in range(1, 9)}), False),
        "masked": (SparseUpdateScheme.last_layers(model, 16, PAPER), True),
        "paper": (SparseUpdateScheme.last_layers(model, 16, PAPER), False),
        "bias8": (SparseUpdateScheme.last_layers(model, 8, {}), False),
        "bias16_w4": (SparseUpdateScheme.last_layers(model, 16, {-1: 0.125, -2: 0.125, -4: 0.125,
                                                                  -5: 0.125}), False),
        "half": (SparseUpdateScheme.last_layers(model, 16, {k: 0.5 for k in PAPER}), False),
    }


class Trainer:
    """One variant ready to run forward + backward on a fixed batch."""

    def __init__(self, model, scheme, masked, x, target, device):
        self.model = copy.deepcopy(model)
        if scheme is None or masked:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            apply_scheme(self.model, scheme)
        self.model.to(device).train()
        self.masks = None
        if masked:
            named = dict(self.model.named_parameters())
            self.masks = [(named[n], None if mk is None else mk.to(device))
                          for n, mk in scheme_masks(model, scheme).items()]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.x, self.target, self.device = x, target, device

    def step(self):
        """(forward ms, backward ms)."""
        for p in self.params:
            p.grad = None
        bu.synchronize(self.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.target)
        bu.synchronize(self.device)
        t1 = time.perf_counter()
        loss.backward()
        if self.masks is not None:
            with torch.no_grad():
                for p, mk in self.masks:
                    if mk is None or p.grad is None:
                        continue
                    if bool(mk.any()):
                        p.grad.mul_(mk)
                    else:
                        p.grad = None
        bu.synchronize(self.device)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _stats(times):
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def bench_config(width, num_classes, args, device):
    torch.manual_seed(0)
    model = fuse_bn(mobilenet_v2(width, num_classes=num_classes).eval())
    shape = (3, args.resolution, args.resolution)
    var = variants(model)

    rows = {}
    for name, (scheme, masked) in var.items():
        est = memory_estimate(model, scheme, shape, args.batch_size, OPTIMIZER, device=device,
                              masked=masked)
        meas = measure_memory(model, scheme, shape, args.batch_size, OPTIMIZER, device=device,
                              masked=masked)
        rows[name] = {"variant": name, "masked": masked,
                      "scheme": None if scheme is None else scheme.to_dict(),
                      "measured": {k: v for k, v in meas.items() if k not in ("per_layer", "backward_ms")},
                      "estimate": {k: v for k, v in est.items() if k != "per_layer"}}

    # backward times: interleaved rounds so that every variant sees the same machine state
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, *shape, generator=gen).to(device)
    target = torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device)
    trainers = {name: Trainer(model, s, masked, x, target, device) for name, (s, masked) in var.items()}
    fwd = {n: [] for n in trainers}
    bwd = {n: [] for n in trainers}
    for r in range(args.warmup + args.reps):
        for name, tr in trainers.items():
            f, b = tr.step()
            if r >= args.warmup:
                fwd[name].append(f)
                bwd[name].append(b)
    for name in trainers:
        rows[name]["backward"] = _stats(bwd[name])
        rows[name]["forward"] = _stats(fwd[name])

    full = rows["full"]
    for r in rows.values():
        m, e = r["measured"], r["estimate"]
        r["memory_reduction_vs_full"] = full["measured"]["total"] / m["total"]
        r["activation_reduction_vs_full"] = (full["measured"]["saved_activations"]
                                             / max(1, m["saved_activations"]))
        r["backward_speedup_vs_full"] = full["backward"]["median_ms"] / r["backward"]["median_ms"]
        r["estimate_over_measured"] = {k: e[k] / max(1, m[k]) for k in
                                       ("saved_activations", "gradients", "optimizer_state",
                                        "parameters", "total")}
        if "peak_allocated" in m:
            r["peak_reduction_vs_full"] = full["measured"]["peak_allocated"] / m["peak_allocated"]
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": f"mobilenet_v2(width={width})", "width": width, "num_classes": num_classes,
            "bn_fused": True, "params": n_params, "input": [args.batch_size, *shape],
            "results": list(rows.values())}


def print_config(res, cuda):
    mb = 1e6
    print(f"\n{res['model']}, {res['num_classes']} classes, input {res['input']}, BN fused, "
          f"{res['params'] / 1e6:.2f} M params")
    head = (f"{'variant':<11}{'saved MB':>9}{'est':>8}{'grad MB':>8}{'opt MB':>7}{'param MB':>9}"
            f"{'total MB':>9}{'est':>8}{'est/meas':>9}{'x mem':>7}")
    if cuda:
        head += f"{'peak MB':>9}{'x peak':>7}"
    head += f"{'bwd ms':>9}{'p20':>8}{'p80':>8}{'x bwd':>7}{'fwd ms':>8}"
    print(head)
    for r in res["results"]:
        m, e = r["measured"], r["estimate"]
        line = (f"{r['variant']:<11}{m['saved_activations'] / mb:>9.2f}{e['saved_activations'] / mb:>8.2f}"
                f"{m['gradients'] / mb:>8.2f}{m['optimizer_state'] / mb:>7.2f}{m['parameters'] / mb:>9.2f}"
                f"{m['total'] / mb:>9.2f}{e['total'] / mb:>8.2f}{e['total'] / m['total']:>9.3f}"
                f"{r['memory_reduction_vs_full']:>7.2f}")
        if cuda:
            line += f"{m['peak_allocated'] / mb:>9.2f}{r['peak_reduction_vs_full']:>7.2f}"
        b = r["backward"]
        line += (f"{b['median_ms']:>9.2f}{b['p20_ms']:>8.2f}{b['p80_ms']:>8.2f}"
                 f"{r['backward_speedup_vs_full']:>7.2f}{r['forward']['median_ms']:>8.2f}")
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--widths", default="0.35,1.0")
    ap.add_argument("--num-classes", default="1000,10",
                    help="classifier sizes: the ImageNet head, and a small downstream head as in the "
                         "paper's on-device transfer learning")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    env = bu.environment(device)
    print(f"# sparse update on {env['device']}; torch {env['torch']}, commit {env['commit'][:12]}")
    print(f"# batch {args.batch_size}, {args.resolution}x{args.resolution}, optimizer SGD momentum, "
          f"backward median of {args.reps} interleaved reps after {args.warmup} warm-up; "
          f"MB = 1e6 bytes; x mem / x bwd = full update / variant")
    out = {"benchmark": "sparse_update", "unit_memory": "bytes", "unit_time": "ms",
           "optimizer": OPTIMIZER, "batch_size": args.batch_size, "resolution": args.resolution,
           **env, "configs": []}
    t0 = time.perf_counter()
    for nc in [int(v) for v in args.num_classes.split(",")]:
        for w in [float(v) for v in args.widths.split(",")]:
            res = bench_config(w, nc, args, device)
            out["configs"].append(res)
            print_config(res, cuda)
    out["wall_s"] = time.perf_counter() - t0
    path = bu.write_result("sparse_update", device, out, args.out_dir)
    print(f"\nwrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
