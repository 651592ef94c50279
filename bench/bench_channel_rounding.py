"""Why PruneTrain rounds channel counts (``round_to``): the time of a residual block's two 3x3 convs
(forward + backward; ``C -> c -> C``, the inner count ``c`` being what pruning shrinks) against
``c``, at the shapes of ResNet-20's three stages, per FLOP against the full block measured in the
same run.

A vendor convolution blocks channels (oneDNN: 8 or 16 on AVX2 / AVX-512 CPUs; tensor cores: 8),
so a pruned layer of 24 channels can take longer than one of 32. Writes
bench/results/channel_rounding_<device>.json and a picture beside it.

    python bench/bench_channel_rounding.py [--device cpu|cuda] [--batch 64] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import report  # noqa: E402

#: (full channel count, spatial size) of ResNet-20's stages on 28x28 Fashion-MNIST
STAGES = ((16, 28), (32, 14), (64, 7))


def conv_step_ms(full: int, c: int, hw: int, batch: int, device: torch.device) -> float:
    """Median ms of forward + backward of 3x3 convs full -> c -> full on a [batch, full, hw, hw] input."""
    block = nn.Sequential(nn.Conv2d(full, c, 3, padding=1, bias=False),
                          nn.Conv2d(c, full, 3, padding=1, bias=False)).to(device)
    x = torch.randn(batch, full, hw, hw, device=device, requires_grad=True)

    def step():
        block(x).sum().backward()
    return bu.timeit(step, device, warmup=3, reps=15)["median_ms"]


def draw(result, path):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for full, rows in result["stages"].items():
        ax.plot([r["channels"] for r in rows], [r["time_per_flop_vs_full"] for r in rows], marker="o",
                label=f"stage of {full} channels")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="inner channels c of the block C -> c -> C", ylabel="time per FLOP / full block's",
           title=f"two 3x3 convs fwd+bwd, batch {result['config']['batch']}, {result['device']}"[:70])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    stages = {}
    for full, hw in STAGES:
        base = conv_step_ms(full, full, hw, a.batch, device)
        rows = []
        for c in sorted({max(1, full * k // 8) for k in range(1, 9)} | {full - 4, full - 8} - {0}):
            ms = base if c == full else conv_step_ms(full, c, hw, a.batch, device)
            rows.append({"channels": c, "median_ms": ms, "flops_vs_full": c / full,
                         "time_vs_full": ms / base, "time_per_flop_vs_full": ms / base / (c / full)})
        stages[str(full)] = rows
    result = {"benchmark": "channel_rounding", **bu.environment(device),
              "config": {"batch": a.batch, "threads": torch.get_num_threads(),
                         "block": "conv3x3(C->c) + conv3x3(c->C), stride 1, padding 1, no bias"},
              "sizes": {str(f): [a.batch, f, hw, hw] for f, hw in STAGES}, "stages": stages}
    path = bu.write_result("channel_rounding", device, result, a.out_dir)
    png = draw(result, os.path.splitext(path)[0] + ".png")
    for full, rows in stages.items():
        print(f"stage {full}: " + ", ".join(f"c={r['channels']} {r['time_vs_full']:.2f}x time "
                                            f"({r['flops_vs_full']:.2f}x FLOPs)" for r in rows))
    print(f"results: {path}\npicture: {png}")


if __name__ == "__main__":
    main()
