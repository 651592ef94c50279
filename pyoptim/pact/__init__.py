"""PACT (Malandrino et al., INFOCOM'23): plan how much and when to prune and which nodes train,
to reach a loss target before a deadline at the least energy, by approximate dynamic programming
over a time-expanded graph of the learning process (docs/pact.md).

* :mod:`pyoptim.pact.problem` -- :class:`Node`, :class:`Level`, :class:`LossCurve`,
  :class:`Instance`, :class:`Plan`, :func:`simulate` (a plan's loss, time and energy).
* :mod:`pyoptim.pact.solve` -- :func:`solve_adp` (the DP; its accuracy knob is the bucket
  granularity), :func:`exact_optimum` (exhaustive, for small instances) and the baselines
  :func:`no_pruning`, :func:`prune_once`, :func:`greedy`, :func:`random_plan`.
"""
from .problem import (InfeasibleError, Instance, Level, LossCurve, Node, Outcome, Plan, check_plan,
                      round_cost, simulate)
from .solve import (SolveResult, all_methods, candidate_subsets, exact_optimum, explain_infeasible,
                    greedy, no_pruning, prune_once, random_plan, solve_adp)

__all__ = ["InfeasibleError", "Instance", "Level", "LossCurve", "Node", "Outcome", "Plan", "check_plan",
           "round_cost", "simulate", "SolveResult", "all_methods", "candidate_subsets", "exact_optimum",
           "explain_infeasible", "greedy", "no_pruning", "prune_once", "random_plan", "solve_adp"]
