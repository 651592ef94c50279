"""``pyoptim.budget``: the best model a wall-clock budget can buy.

* :class:`Budgeted` — a :class:`~pyoptim.train.Trainer` plug-in: one clock over everything the
  user waits for, a stop predicted to end the run within 2% (or 1 s) of the budget and never
  after (the same step on every DDP rank), the budget-aware LR (``"schedule"``), weight
  averaging (``"ema"``) and sample selection (``"uniform"``, ``"selective"``, ``"importance"``),
  from losses kept from the training forwards (``select_scores="stale"``, :class:`SampleScores`)
  or from a scoring forward over each batch (``"forward"``).
* :func:`choose_width` / :func:`probe_widths` — the model knob: a width multiplier picked by
  short timed probes.
* :func:`plan` — all knobs for a budget from probes, with the reasons.
* :class:`BudgetClock`, :func:`parse_duration` (``"90s"``, ``"2m"``), :func:`budget_lr_factor`,
  :class:`WeightEMA`, the selectors and their pure functions (:func:`select_highest_loss`,
  :func:`importance_sample`).

See docs/budget.md.
"""
from .clock import BudgetClock, format_duration, machine_steal_seconds, parse_duration
from .planner import Plan, plan
from .plugin import KNOBS, SELECT_SCORES, Budgeted
from .schedule import WeightEMA, budget_lr_factor
from .selection import (ImportanceSampling, SampleScores, SelectiveBackprop, Selector, UniformSelection,
                        importance_probabilities, importance_sample, make_selector,
                        select_highest_loss)
from .width import DEFAULT_WIDTHS, WidthChoice, choose_width, count_parameters, probe_widths

__all__ = [
    "Budgeted", "KNOBS", "SELECT_SCORES", "BudgetClock", "parse_duration", "format_duration",
    "machine_steal_seconds",
    "budget_lr_factor", "WeightEMA",
    "Selector", "UniformSelection", "SelectiveBackprop", "ImportanceSampling", "make_selector",
    "SampleScores",
    "select_highest_loss", "importance_probabilities", "importance_sample",
    "probe_widths", "choose_width", "count_parameters", "WidthChoice", "DEFAULT_WIDTHS",
    "plan", "Plan",
]
