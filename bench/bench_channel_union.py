"""Benchmark of PruneTrain's channel-union reconfiguration and the fused pruned convolution.

1. Models: ResNet-50 (ImageNet layout) and ResNet-32 (CIFAR layout) with every prunable channel
   group cut to 70%, 50% and 30% of its channels (random channel subsets, same seed for every
   variant). Forward+backward time of one training step (train mode, SGD not included) of
     dense       the unpruned model
     masked      the dense model with the dropped channels' weights zeroed (what a pruning method
                 without reconfiguration runs: the same FLOPs as dense)
     pruned      the model after pyoptim.prune.reconfigure (physically smaller, plain modules)
     fused       the pruned model through pyoptim.prune.fuse_blocks (conv -> BN -> add -> ReLU on
                 the fused kernels)
     round_to_16 the pruning with every group's count rounded up to a multiple of 16 (more
                 channels kept; the width of the CPU's blocked layouts), against its own FLOPs
     channels_last  the dense and the pruned model in channels_last (realised over FLOPs against
                 the channels_last dense model)
   and the ratio realised speedup / FLOPs speedup, with FLOPs from torch.utils.flop_counter
   (training FLOPs of the same step; goal >= 0.7 on CPU, >= 0.8 on GPU).
2. The fused block against torch's conv -> BN -> add -> ReLU (train: forward + backward; eval:
   forward with BN folded into one conv + bias + residual + ReLU kernel), at the block shapes of
   the two networks (goal >= 1.2x on GPU).
3. Reconfiguration time of ResNet-50 with its SGD-momentum optimizer (state filled by one step),
   with the channel graph given (traced once per model) and without the FLOPs report (goal
   < 100 ms on GPU); the tracing time is reported separately.
4. CUDA only ("routes"): channel_union_conv2d (eval forward, no grad) on each of its CUDA paths
   against the plain torch sequence relu(conv2d(x, w, b) + r), in the same run, NCHW and
   channels_last, at block-tail, odd (pruned) width, strided 1x1, grouped and depthwise shapes:
     torch  relu(F.conv2d(x, w, b) + r), torch's own kernels
     cudnn  the op as it runs by default: cuDNN's fused conv+add+ReLU (groups 1) or cuDNN's conv +
            one epilogue kernel (grouped, depthwise)
     simt   the op's hand implicit-GEMM kernel, selected with torch.backends.cudnn.flags(enabled=False)
   with the ratios torch/cudnn, torch/simt and simt/cudnn, and each path's max error against the
   float64 reference. float32 runs under torch.backends.cudnn.allow_tf32 as set (recorded).
   Part 2 on CUDA also times the eval block on the hand kernel (eval_fused_simt).

    python bench/bench_channel_union.py [--device cpu|cuda] [--reps 10] [--fractions 0.7,0.5,0.3]
        [--r50-batch 8 --r50-res 128] [--r32-batch 64] [--skip models,blocks,reconfigure,routes]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import pyoptim  # noqa: E402
from pyoptim.models import resnet32, resnet50  # noqa: E402
from pyoptim.ops import channel_union_conv2d, conv_bn_add_relu  # noqa: E402
from pyoptim.reference import channel_union_conv as ref  # noqa: E402
from pyoptim.prune import ChannelGraph, fuse_blocks, reconfigure  # noqa: E402
from pyoptim.flops import count_flops  # noqa: E402


def keep_masks(graph: ChannelGraph, fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in graph.prunable_groups():
        k = max(1, int(round(fraction * grp.size)))
        keep = torch.zeros(grp.size, dtype=torch.bool)
        keep[torch.randperm(grp.size, generator=g)[:k]] = True
        masks[grp.index] = keep
    return masks


@torch.no_grad()
def zero_dropped(model, graph: ChannelGraph, masks) -> None:
    """The masked baseline: dropped channels' conv/linear weights (and BN affine) set to zero."""
    for gi, keep in masks.items():
        dropped = (~keep).nonzero().flatten()
        if not dropped.numel():
            continue
        for m in graph.groups[gi].members:
            for _, t in m.tensors(model):
                if t.is_floating_point() and t.dim() >= 1:
                    t.index_fill_(m.dim, m.indices(dropped).to(t.device), 0.0)


def round_up_masks(masks, multiple: int, seed: int):
    """The keep-masks with each group's kept count rounded up to a multiple of ``multiple`` (at
    most the group size) by keeping more random channels: what ``round_to`` does, for the SIMD
    width of the CPU's blocked layouts (16 floats) or the tensor cores (8)."""
    if multiple <= 1:
        return masks
    g = torch.Generator().manual_seed(seed)
    out = {}
    for gi, keep in masks.items():
        keep = keep.clone()
        want = min(keep.numel(), -(-int(keep.sum()) // multiple) * multiple)
        dropped = (~keep).nonzero().flatten()
        extra = want - int(keep.sum())
        if extra > 0:
            keep[dropped[torch.randperm(dropped.numel(), generator=g)[:extra]]] = True
        out[gi] = keep
    return out


def step_fn(model, x):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        out = model(x)
        grads = torch.autograd.grad(out.float().square().mean(), params)
        return grads
    return run


def bench_models(args, device, dtype):
    rows = []
    specs = [("resnet32", lambda: resnet32(num_classes=10), (args.r32_batch, 3, 32, 32)),
             ("resnet50", lambda: resnet50(num_classes=1000), (args.r50_batch, 3, args.r50_res, args.r50_res))]
    for name, make, shape in specs:
        if args.models and name not in args.models:
            continue
        torch.manual_seed(0)
        dense = make().to(device=device, dtype=dtype).train()
        x = torch.randn(*shape, device=device, dtype=dtype)
        graph = ChannelGraph(dense, x[:2])
        _, train_dense = count_flops(dense, x)
        t_dense = bu.timeit(step_fn(dense, x), device, warmup=args.warmup, reps=args.reps)
        print(f"{name} {list(shape)}: dense {t_dense['median_ms']:.1f} ms, {train_dense / 1e9:.2f} GFLOP/step",
              flush=True)
        for frac in args.fractions:
            masks = keep_masks(graph, frac, seed=1)
            masked = copy.deepcopy(dense)
            zero_dropped(masked, graph, masks)
            pruned = copy.deepcopy(dense)
            pruned, _, report = reconfigure(pruned, None, x[:2], keep=masks, graph=graph)
            _, train_pruned = count_flops(pruned, x)
            fused = fuse_blocks(pruned)
            t = {k: bu.timeit(step_fn(m, x), device, warmup=args.warmup, reps=args.reps)
                 for k, m in (("masked", masked), ("pruned", pruned), ("fused", fused))}
            flops_speedup = train_dense / train_pruned
            row = {
                "model": name, "input": list(shape), "dtype": str(dtype).replace("torch.", ""),
                "channel_fraction": frac,
                "channels": [report.channels_before, report.channels_after],
                "params": [report.params_before, report.params_after],
                "train_gflop": [train_dense / 1e9, train_pruned / 1e9],
                "flops_speedup": flops_speedup,
                "dense": t_dense, **t,
            }
            for k in ("masked", "pruned", "fused"):
                row[f"speedup_{k}"] = t_dense["median_ms"] / t[k]["median_ms"]
                row[f"realised_over_flops_{k}"] = row[f"speedup_{k}"] / flops_speedup
            # the same pruning with channel counts rounded up to multiples of 16 (the blocked layouts'
            # SIMD width on CPU), and the dense/pruned pair in channels_last
            for mult in args.round_to:
                if mult <= 1:
                    continue
                masks_r = round_up_masks(masks, mult, seed=2)
                pr, _, rep_r = reconfigure(copy.deepcopy(dense), None, x[:2], keep=masks_r, graph=graph)
                _, train_r = count_flops(pr, x)
                tr = bu.timeit(step_fn(pr, x), device, warmup=args.warmup, reps=args.reps)
                sp = t_dense["median_ms"] / tr["median_ms"]
                row[f"round_to_{mult}"] = {"channels": rep_r.channels_after, "train_gflop": train_r / 1e9,
                                           "flops_speedup": train_dense / train_r, "pruned": tr, "speedup": sp,
                                           "realised_over_flops": sp / (train_dense / train_r)}
            if args.channels_last and x.dim() == 4:
                cl = torch.channels_last
                xc = x.contiguous(memory_format=cl)
                dc = copy.deepcopy(dense).to(memory_format=cl)
                pc = copy.deepcopy(pruned).to(memory_format=cl)
                td = bu.timeit(step_fn(dc, xc), device, warmup=args.warmup, reps=args.reps)
                tp = bu.timeit(step_fn(pc, xc), device, warmup=args.warmup, reps=args.reps)
                row["channels_last"] = {"dense": td, "pruned": tp, "speedup": td["median_ms"] / tp["median_ms"],
                                        "realised_over_flops": td["median_ms"] / tp["median_ms"] / flops_speedup,
                                        "pruned_vs_contiguous_dense": t_dense["median_ms"] / tp["median_ms"]}
            rows.append(row)
            extra = "".join(f" | round_to {m}: {row[f'round_to_{m}']['speedup']:.2f}x of "
                            f"{row[f'round_to_{m}']['flops_speedup']:.2f}x FLOPs "
                            f"(realised/FLOPs {row[f'round_to_{m}']['realised_over_flops']:.2f})"
                            for m in args.round_to if m > 1)
            if "channels_last" in row:
                extra += (f" | channels_last: pruned {row['channels_last']['speedup']:.2f}x its dense "
                          f"(realised/FLOPs {row['channels_last']['realised_over_flops']:.2f})")
            print(f"  {int(frac * 100)}% channels: FLOPs {flops_speedup:.2f}x fewer | masked "
                  f"{row['speedup_masked']:.2f}x | pruned {row['speedup_pruned']:.2f}x "
                  f"(realised/FLOPs {row['realised_over_flops_pruned']:.2f}) | fused "
                  f"{row['speedup_fused']:.2f}x (realised/FLOPs {row['realised_over_flops_fused']:.2f})"
                  + extra, flush=True)
    return rows


def bench_blocks(args, device, dtype):
    rows = []
    # (network, N, C, H) of the residual tails: conv C -> C 3x3 with identity residual
    shapes = [("resnet32", args.r32_batch, 16, 32), ("resnet32", args.r32_batch, 32, 16),
              ("resnet32", args.r32_batch, 64, 8), ("resnet50", args.r50_batch, 64, args.r50_res // 4),
              ("resnet50", args.r50_batch, 128, args.r50_res // 8)]
    for net, N, C, H in shapes:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(device=device, dtype=dtype)
        bn = torch.nn.BatchNorm2d(C).to(device=device, dtype=dtype)
        x = torch.randn(N, C, H, H, device=device, dtype=dtype, requires_grad=True)
        r = torch.randn(N, C, H, H, device=device, dtype=dtype, requires_grad=True)
        params = [x, r, conv.weight, bn.weight, bn.bias]

        def torch_block():
            return torch.relu(bn(conv(x)) + r)

        def fused_block():
            return conv_bn_add_relu(x, conv, bn, r, True)

        def train(fn):
            def run():
                out = fn()
                return torch.autograd.grad(out, params, out)
            return run
        bn.train()
        tt = bu.timeit(train(torch_block), device, warmup=args.warmup, reps=args.reps)
        tf = bu.timeit(train(fused_block), device, warmup=args.warmup, reps=args.reps)
        bn.eval()
        with torch.no_grad():
            et = bu.timeit(torch_block, device, warmup=args.warmup, reps=args.reps)
            ef = bu.timeit(fused_block, device, warmup=args.warmup, reps=args.reps)
            if device.type == "cuda":
                with torch.backends.cudnn.flags(enabled=False):  # the op's hand kernel
                    es = bu.timeit(fused_block, device, warmup=args.warmup, reps=args.reps)
        row = {"network": net, "shape": [N, C, H, H], "dtype": str(dtype).replace("torch.", ""),
               "train_torch": tt, "train_fused": tf, "train_speedup": tt["median_ms"] / tf["median_ms"],
               "eval_torch": et, "eval_fused": ef, "eval_speedup": et["median_ms"] / ef["median_ms"]}
        extra = ""
        if device.type == "cuda":
            row.update(eval_fused_simt=es, eval_speedup_simt=et["median_ms"] / es["median_ms"],
                       eval_cudnn_over_simt=es["median_ms"] / ef["median_ms"])
            extra = f" (hand kernel: {row['eval_speedup_simt']:.2f}x)"
        rows.append(row)
        print(f"block {net} [{N},{C},{H},{H}]: train fwd+bwd {row['train_speedup']:.2f}x, "
              f"eval fwd {row['eval_speedup']:.2f}x{extra} vs torch conv->BN->add->ReLU", flush=True)
    return rows


def route_shapes(args):
    """(name, N, C, H, K, R, stride, groups) of part 4; padding R // 2, square inputs."""
    r50 = args.r50_batch
    return [("resnet32 tail", args.r32_batch, 32, 16, 32, 3, 1, 1),
            ("resnet50 tail", r50, 128, args.r50_res // 8, 128, 3, 1, 1),
            ("pruned width", r50, 45, args.r50_res // 8, 45, 3, 1, 1),
            ("1x1 stride 2", r50, 64, args.r50_res // 4, 128, 1, 2, 1),
            ("grouped", r50, 128, args.r50_res // 8, 128, 3, 1, 32),
            ("depthwise", r50, 96, args.r50_res // 4, 96, 3, 1, 96)]


def bench_route(args, device, dtype, spec, fmt):
    name, N, C, H, K, R, stride, groups = spec
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, H, H, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(K, C // groups, R, R, device=device, dtype=dtype, generator=g) / (C // groups * R * R) ** 0.5
    b = torch.randn(K, device=device, dtype=dtype, generator=g)
    conf = ((stride, stride), (R // 2, R // 2), (1, 1), groups)
    P = (H + 2 * (R // 2) - R) // stride + 1
    r = torch.randn(N, K, P, P, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)

    def plain():
        return torch.relu(F.conv2d(x, w, b, *conf) + r)

    def op():
        return channel_union_conv2d(x, w, b, r, *conf, relu=True)
    want = ref.channel_union_conv2d(x.double(), w.double(), b.double(), r.double(), *conf, relu=True)
    t = {"torch": bu.timeit(plain, device, warmup=args.warmup, reps=args.reps),
         "cudnn": bu.timeit(op, device, warmup=args.warmup, reps=args.reps)}
    err = {"cudnn": (op().double() - want).abs().max().item()}
    with torch.backends.cudnn.flags(enabled=False):  # the op's hand kernel
        t["simt"] = bu.timeit(op, device, warmup=args.warmup, reps=args.reps)
        err["simt"] = (op().double() - want).abs().max().item()
    err["torch"] = (plain().double() - want).abs().max().item()
    ms = {k: v["median_ms"] for k, v in t.items()}
    # which cuDNN path the timed calls took: a shape cuDNN refused fused falls back (and is remembered)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op()
    names = {e.name for e in prof.events()}
    path = "fused" if "aten::cudnn_convolution_add_relu" in names else (
        "conv+epilogue" if "aten::convolution" in names else "other")
    return {"name": name, "x": [N, C, H, H], "weight": list(w.shape), "stride": stride, "groups": groups,
            "format": "channels_last" if fmt is torch.channels_last else "nchw",
            "dtype": str(dtype).replace("torch.", ""), "allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_path": path, **t, "max_abs_err": err, "speedup_cudnn": ms["torch"] / ms["cudnn"],
            "speedup_simt": ms["torch"] / ms["simt"], "cudnn_over_simt": ms["simt"] / ms["cudnn"]}


def bench_routes(args, device, dtype):
    if not pyoptim.backends()["cuda"]:
        reason = "pyoptim was built without its CUDA kernels: no route to compare"
        print(f"routes: skipped ({reason})", flush=True)
        return {"skipped": reason}
    rows = []
    with torch.no_grad():
        for spec in route_shapes(args):
            for fmt in (torch.contiguous_format, torch.channels_last):
                row = bench_route(args, device, dtype, spec, fmt)
                rows.append(row)
                print(f"route {row['name']} {row['x']} {row['format']}: torch {row['torch']['median_ms']:.3f} ms | "
                      f"cudnn ({row['cudnn_path']}) {row['speedup_cudnn']:.2f}x | simt {row['speedup_simt']:.2f}x | "
                      f"cudnn/simt {row['cudnn_over_simt']:.2f}x | max err cudnn "
                      f"{row['max_abs_err']['cudnn']:.1e} simt {row['max_abs_err']['simt']:.1e}", flush=True)
    return rows


def bench_reconfigure(args, device, dtype):
    torch.manual_seed(0)
    model = resnet50(num_classes=1000).to(device=device, dtype=dtype).train()
    x = torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
    t0 = time.perf_counter()
    graph = ChannelGraph(model, x)
    trace_ms = (time.perf_counter() - t0) * 1e3
    masks = keep_masks(graph, 0.5, seed=1)
    times = []
    for _ in range(max(3, args.reps // 3)):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        m(x).sum().backward()
        opt.step()
        bu.synchronize(device)
        t0 = time.perf_counter()
        reconfigure(m, opt, x, keep=masks, graph=graph, report_flops=False)
        bu.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    row = {"model": "resnet50", "fraction": 0.5, "params": sum(p.numel() for p in model.parameters()),
           "optimizer": "SGD momentum", "median_ms": times[len(times) // 2], "min_ms": times[0],
           "trace_ms": trace_ms}
    print(f"reconfigure ResNet-50 + SGD momentum state (50% channels): {row['median_ms']:.1f} ms "
          f"(channel graph traced once: {trace_ms:.0f} ms)", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fractions", default="0.7,0.5,0.3")
    p.add_argument("--models", default="", help="comma list (resnet32,resnet50); default both")
    p.add_argument("--r50-batch", type=int, default=8)
    p.add_argument("--r50-res", type=int, default=128)
    p.add_argument("--r32-batch", type=int, default=64)
    p.add_argument("--round-to", default="16", help="comma list of channel multiples to also measure "
                   "the pruned models at (counts rounded up; 1 or empty: none)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="skip the channels_last dense/pruned pair")
    p.add_argument("--skip", default="", help="comma list of parts to skip: models,blocks,reconfigure,routes "
                   "(routes: CUDA only)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args()
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    args.models = [m for m in args.models.split(",") if m]
    args.round_to = [int(r) for r in args.round_to.split(",") if r]
    skip = set(s for s in args.skip.split(",") if s)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_channel_union: --device {args.device} but torch sees no CUDA device "
                 f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(pyoptim.describe() if hasattr(pyoptim, "describe") else "", flush=True)
    payload = {"family": "channel_union", "environment": bu.environment(device), "args": vars(args)}
    payload["models"] = [] if "models" in skip else bench_models(args, device, dtype)
    payload["blocks"] = [] if "blocks" in skip else bench_blocks(args, device, dtype)
    payload["reconfigure"] = None if "reconfigure" in skip else bench_reconfigure(args, device, dtype)
    if device.type == "cuda":
        payload["routes"] = [] if "routes" in skip else bench_routes(args, device, dtype)
    path = bu.write_result("channel_union", device, payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
