"""What a ``pyoptim train`` run prints while it trains: one progress line rewritten in place every
``--log-every`` steps, and one line per epoch. Both are the Trainer's ``progress`` callback
(``info["event"]`` is ``"step"`` or ``"epoch"``; the epoch event carries the history row with the
plug-ins' columns), so printing is kept apart from recording.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict

__all__ = ["training_printer", "budget_printer"]


def training_printer(total_epochs: int, channels: int, flops: float, stream=None) -> Callable:
    """Progress of a dense or PruneTrain run: epoch, batch, loss, accuracy, channels left and
    training FLOPs per sample (from the last epoch row), samples/s and ETA."""
    state = {"channels": channels, "flops": flops}

    def show(info: Dict[str, Any]) -> None:
        out = stream or sys.stderr
        if info.get("event") == "epoch":
            state.update(channels=info["channels"], flops=info["train_flops_per_sample"])
            ev = info.get("eval_accuracy")
            print(f"\nepoch {info['epoch'] + 1}: loss {info['loss']:.4f} acc {100 * info['accuracy']:.2f}% "
                  f"test acc {100 * (ev if ev is not None else float('nan')):.2f}% channels "
                  f"{info['channels']} train {info['train_flops_per_sample'] / 1e6:.1f} MFLOP/sample "
                  f"batch {info['batch_size']} lr {info['lr']:.4g} ({info['time_s']:.0f}s)", file=out)
            return
        b, nb = info.get("batch"), info.get("batches")
        frac = f"{b}/{nb}" if nb else f"{b}"
        eta = info.get("eta_s")
        extra = f" | channels {state['channels']} | {state['flops'] / 1e6:.1f} MFLOP/sample"
        out.write(f"\repoch {info['epoch'] + 1}/{total_epochs} [{frac}] loss {info['loss']:.4f} "
                  f"acc {100 * (info['accuracy'] or 0):.1f}%{extra} | "
                  f"{info['samples_per_s']:.0f} samples/s"
                  + (f" | ETA {eta:.0f}s" if eta is not None else "") + "   ")
        out.flush()
    return show


def budget_printer(budget, stream=None) -> Callable:
    """Progress of a budgeted run: a bar of the budget spent, time left, step, loss, accuracy,
    learning rate and samples/s; per epoch the test accuracy and the seconds spent."""
    from ..budget import format_duration

    def show(info: Dict[str, Any]) -> None:
        out = stream or sys.stderr
        clock = budget.clock
        if info.get("event") == "epoch":
            ev = info.get("eval_accuracy")
            print(f"\nepoch {info['epoch'] + 1}: loss {info['loss']:.4f} acc {100 * info['accuracy']:.2f}%"
                  + (f" test acc {100 * ev:.2f}%" if ev is not None else "")
                  + f" ({info['budget_elapsed_s']:.1f}s of {clock.seconds:.0f}s)", file=out)
            return
        frac = min(max(clock.fraction(), 0.0), 1.0)
        bar = "#" * int(round(24 * frac)) + "." * (24 - int(round(24 * frac)))
        acc = info.get("accuracy")
        out.write(f"\r[{bar}] {format_duration(max(clock.remaining(), 0.0))} left of "
                  f"{format_duration(clock.seconds)} | epoch {info['epoch'] + 1} step {info['step']} | "
                  f"loss {info['loss']:.4f}" + (f" acc {100 * acc:.1f}%" if acc is not None else "")
                  + f" | lr {info['lr']:.3g} | {info['samples_per_s']:.0f} samples/s   ")
        out.flush()
    return show
