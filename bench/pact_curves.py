"""PACT's loss predictor from real training curves (issue 20, item 2): ResNet-20 on Fashion-MNIST
at each pruning level (the model PruneTrain's reconfiguration yields, pyoptim.pact.levels), trained
from scratch with several seeds; the training loss against samples seen is fitted per level by a
power law (pyoptim.pact.loss.fit_curve) on the first seed's curve, and the fit's error is measured
on the curves of the other seeds, held back from the fit.

Also writes --curves-out (one LossCurve per level and the training recipe, for `pyoptim plan
--curves`). Writes
bench/results/<--name>_cpu.json and .png (measured and fitted curves per level).

    python bench/pact_curves.py [--keeps 1,0.75,0.5] [--seeds 0,1] [--train-subset 10000]
        [--epochs 2] [--batch-size 64] [--lr 0.05] [--window 20] [--curves-out runs/curves.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pyoptim import report  # noqa: E402
from pyoptim.data import dataset_spec, load_fashion_mnist  # noqa: E402
from pyoptim.models import resnet20  # noqa: E402
from pyoptim.pact.levels import measure_levels, pruned_model  # noqa: E402
from pyoptim.pact.loss import curve_error, fit_curve  # noqa: E402


WEIGHT_DECAY = 5e-4


def train_curve(keep: float, seed: int, x: torch.Tensor, y: torch.Tensor, a) -> dict:
    """The training loss, averaged over windows of ``a.window`` steps, against samples seen."""
    torch.manual_seed(seed)
    model = pruned_model(resnet20(10, in_channels=1), keep, x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(seed)
    samples, losses, window, seen = [], [], [], 0
    t0 = time.perf_counter()
    model.train()
    for _ in range(a.epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - a.batch_size + 1, a.batch_size):
            idx = order[i:i + a.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += idx.numel()
            window.append(loss.item())
            if len(window) == a.window:
                samples.append(seen - a.batch_size * (a.window - 1) / 2)   # the window's middle
                losses.append(sum(window) / len(window))
                window = []
    return {"keep": keep, "seed": seed, "samples": samples, "losses": losses,
            "seconds": time.perf_counter() - t0}


def draw(res: dict, path: str):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    from pyoptim.pact import LossCurve
    for j, lv in enumerate(res["levels"]):
        color = f"C{j}"
        for c in lv["curves"]:
            ax.plot(c["samples"], c["losses"], color=color, lw=0.8, alpha=0.6,
                    ls="-" if c["seed"] == res["config"]["seeds"][0] else ":")
        fit = LossCurve(**lv["fit"])
        xs = lv["curves"][0]["samples"]
        ax.plot(xs, [fit.at(v) for v in xs], color=color, lw=2,
                label=f"keep {lv['keep']:g}: fit, held-back error {100 * lv['held_back_mean_rel']:.1f}%")
    ax.set(xlabel="samples seen", ylabel="training loss (window mean)", yscale="log",
           title="ResNet-20 on Fashion-MNIST per pruning level:\nmeasured (thin; dotted = held back) and the power law fitted to the first seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keeps", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.75, 0.5])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--curves-out", default=None)
    p.add_argument("--name", default="pact_curves")
    p.add_argument("--out-dir", default=bu.RESULTS_DIR)
    a = p.parse_args(argv)
    if len(a.seeds) < 2:
        p.error("--seeds: need two or more (the first is fitted, the others held back)")
    torch.set_num_threads(a.threads)
    xs, ys = load_fashion_mnist("train", a.data_dir)
    spec = dataset_spec("fashion-mnist")
    xs = (xs[:a.train_subset].float() / 255.0 - spec.mean[0]) / spec.std[0]
    ys = ys[:a.train_subset]
    measured = measure_levels(lambda: resnet20(10, in_channels=1), a.keeps, (1, 28, 28), 10, reps=3)
    levels = []
    for keep, m in zip(a.keeps, measured):
        curves = [train_curve(keep, s, xs, ys, a) for s in a.seeds]
        fit = fit_curve(curves[0]["samples"], curves[0]["losses"])
        errs = [curve_error(fit, c["samples"], c["losses"]) for c in curves[1:]]
        levels.append({"keep": keep, "fit": asdict(fit),
                       "fit_error": curve_error(fit, curves[0]["samples"], curves[0]["losses"]),
                       "held_back": errs, "held_back_mean_rel": sum(e["mean_rel"] for e in errs) / len(errs),
                       "measured": {k: v for k, v in m.items() if k != "level"}, "curves": curves})
        print(f"keep {keep:g}: fit {levels[-1]['fit']}, error on the fitted curve "
              f"{100 * levels[-1]['fit_error']['mean_rel']:.2f}%, on held-back curves "
              f"{100 * levels[-1]['held_back_mean_rel']:.2f}% (mean relative)", flush=True)
    res = {"config": vars(a), "levels": levels, **report.environment(torch.device("cpu"))}
    path = report.write_result(a.name, torch.device("cpu"), res, a.out_dir)
    pic = draw(res, path[:-5] + ".png")
    if a.curves_out:
        with open(a.curves_out, "w") as f:
            json.dump({"curves": [lv["fit"] for lv in levels], "keeps": a.keeps,
                       "recipe": {"model": "resnet20", "batch_size": a.batch_size, "lr": a.lr,
                                  "weight_decay": WEIGHT_DECAY, "momentum": 0.9}}, f, indent=1)
    print(f"results: {path}\npicture: {pic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
