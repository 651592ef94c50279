"""pyoptim.pact: the problem model, the DP over the time-expanded graph against the exact optimum
(and the exact optimum against a plain enumeration), the baselines, and bad input."""
import itertools
import json
import math
import random

import pytest

from pyoptim.pact import (InfeasibleError, Instance, Level, LossCurve, Node, Plan, candidate_subsets,
                          exact_optimum, greedy, no_pruning, prune_once, random_plan, round_cost,
                          simulate, solve_adp)
from pyoptim.pact.instances import random_instance


def test_loss_curve_inverse_and_monotone():
    c = LossCurve(scale=3.0, power=0.4, floor=0.2, offset=50.0)
    for x in (0.0, 10.0, 1234.5, 1e6):
        assert c.samples_to(c.at(x)) == pytest.approx(x, rel=1e-9, abs=1e-6)
    assert c.advance(c.at(100.0), 50.0) == pytest.approx(c.at(150.0), rel=1e-12)
    assert c.advance(0.2, 1e9) == 0.2 and c.advance(0.1, 10.0) == 0.1        # at / under the floor
    assert c.advance(10.0, 0.0) <= 10.0                                        # above the start
    rng = random.Random(0)
    for _ in range(100):                # from a lower loss, a lower loss after the same samples
        a, b = sorted(rng.uniform(0.21, 2.0) for _ in range(2))
        s = rng.uniform(0, 1e4)
        assert c.advance(a, s) <= c.advance(b, s)


def test_round_cost_by_hand():
    nodes = (Node("a", flops=2e9, power=10.0, samples=500, bandwidth=1e6, latency=0.1, comm_power=2.0),
             Node("b", flops=1e9, power=4.0, samples=80, bandwidth=2e6, latency=0.0, comm_power=1.0))
    lv = Level("dense", flops_per_sample=1e7, model_bytes=4e5)
    inst = Instance(nodes, (lv,), (LossCurve(1.0, 0.5, 0.1),), 3, 100, 2.0, 1.0, 100.0, aggregation=0.5)
    samples, secs, joules = round_cost(inst, (0, 1), 0)
    # a: 100 samples (capped by samples_per_round), b: 80 (its local data)
    ta, ca = 100 * 1e7 / 2e9, 2 * (0.1 + 4e5 / 1e6)
    tb, cb = 80 * 1e7 / 1e9, 2 * (0.0 + 4e5 / 2e6)
    assert samples == 180
    assert secs == pytest.approx(max(ta + ca, tb + cb) + 0.5)
    assert joules == pytest.approx(10 * ta + 2 * ca + 4 * tb + 1 * cb)


def _enumerate(inst):
    """Every plan of every length, no pruning at all: the reference of the exhaustive search."""
    n, nl = len(inst.nodes), len(inst.levels)
    subs = [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]
    best = math.inf
    for length in range(1, inst.rounds + 1):
        for moves in itertools.product(subs, repeat=length):
            for levels in itertools.combinations_with_replacement(range(nl), length):
                out = simulate(inst, Plan(list(zip(moves, levels))))
                if out.feasible:
                    best = min(best, out.energy)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_exact_optimum_equals_plain_enumeration(seed):
    inst = random_instance(100 + seed, n_nodes=2, rounds=3, n_levels=2, tightness=0.8)
    ex = exact_optimum(inst)
    assert ex.outcome.feasible and ex.energy == pytest.approx(_enumerate(inst), rel=1e-12)


def test_adp_against_the_exact_optimum():
    """>= 3 nodes x 5 rounds x 3 levels, fresh random instances: always feasible, never below the
    optimum, mean gap <= 2% at the default buckets, and 0 at fine ones."""
    gaps = {4: [], 32: [], 64: []}
    for seed in range(8):
        inst = random_instance(seed, n_nodes=3, rounds=5, n_levels=3)
        ex = exact_optimum(inst)
        for b in gaps:
            r = solve_adp(inst, b, b)
            assert r.outcome.feasible and simulate(inst, r.plan).energy == r.energy
            assert r.energy >= ex.energy * (1 - 1e-12)
            gaps[b].append(r.energy / ex.energy - 1)
    assert sum(gaps[32]) / len(gaps[32]) <= 0.02
    assert max(gaps[64]) <= 1e-9
    assert sum(gaps[4]) >= sum(gaps[64])


def test_baselines_are_feasible_or_none_and_never_beat_the_optimum():
    for seed in range(5):
        inst = random_instance(seed, n_nodes=3, rounds=5, n_levels=3)
        opt = exact_optimum(inst).energy
        for r in (no_pruning(inst), prune_once(inst), greedy(inst), random_plan(inst, seed)):
            if r.plan is not None:
                assert r.outcome.feasible and r.energy >= opt * (1 - 1e-12), r.method
            else:
                assert math.isinf(r.energy)
        assert prune_once(inst).energy <= no_pruning(inst).energy


def test_candidate_subsets_are_the_non_dominated_ones():
    inst = random_instance(7, n_nodes=5, rounds=4, n_levels=2)
    kept = candidate_subsets(inst, 0)
    every = [(c, round_cost(inst, c, 0)) for k in range(1, 6) for c in itertools.combinations(range(5), k)]
    for sub, (s, t, e) in every:           # each subset is kept or dominated by a kept one
        assert any(s2 >= s and t2 <= t and e2 <= e for _, (s2, t2, e2) in kept)
    for sub, (s, t, e) in kept:            # no kept subset is strictly dominated by any subset
        assert not any(s2 >= s and t2 <= t and e2 <= e and (s2, t2, e2) != (s, t, e) for _, (s2, t2, e2) in every)
    many = random_instance(8, n_nodes=14, rounds=3, n_levels=2)
    fam = candidate_subsets(many, 0, max_subsets=255)      # the polynomial family
    assert 1 <= len(fam) <= 14 * 14


def test_infeasible_names_the_tightest_constraint():
    inst = random_instance(3, n_nodes=3, rounds=5, n_levels=3)
    d = inst.to_dict()
    with pytest.raises(InfeasibleError, match="loss target .* out of reach in 5 rounds"):
        solve_adp(Instance.from_dict({**d, "target_loss": 0.01}))
    with pytest.raises(InfeasibleError, match="deadline .* too short"):
        solve_adp(Instance.from_dict({**d, "deadline": inst.deadline / 50}))


def test_bad_input_is_named():
    inst = random_instance(2)
    d = json.loads(json.dumps(inst.to_dict()))
    assert Instance.from_dict(d) == inst
    bad_node = dict(d["nodes"][0])
    del bad_node["power"]
    with pytest.raises(ValueError, match=r"node 'n0': missing fields \['power'\]"):
        Instance.from_dict({**d, "nodes": [bad_node] + d["nodes"][1:]})
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        Instance.from_dict({**d, "nodes": [{**d["nodes"][0], "colour": 1}]})
    with pytest.raises(ValueError, match=r"missing fields \['deadline'\]"):
        Instance.from_dict({k: v for k, v in d.items() if k != "deadline"})
    with pytest.raises(ValueError, match="flops must be > 0"):
        Node("x", flops=0, power=1, samples=1, bandwidth=1)
    with pytest.raises(ValueError, match="target_loss .* must be below initial_loss"):
        Instance.from_dict({**d, "target_loss": d["initial_loss"] * 2})
    with pytest.raises(ValueError, match="one loss curve per level"):
        Instance.from_dict({**d, "curves": d["curves"][:1]})
    with pytest.raises(ValueError, match="goes back from level 1 to 0"):
        simulate(inst, Plan([((0,), 1), ((0,), 0)]))
    with pytest.raises(ValueError, match="round 0 names nodes"):
        simulate(inst, Plan([((0, 0), 0)]))
    with pytest.raises(ValueError, match="exceed the horizon"):
        simulate(inst, Plan([((0,), 0)] * (inst.rounds + 1)))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="loss_buckets"):
            solve_adp(inst, loss_buckets=bad)
    out = simulate(inst, Plan([((0,), 0)]))
    assert not out.feasible and "loss" in out.reason


def test_measured_levels_come_from_the_reconfigured_model():
    import torch
    from pyoptim.models import resnet20
    from pyoptim.flops import flops_per_sample
    from pyoptim.pact.levels import measure_levels, pruned_model
    torch.set_num_threads(1)
    rows = measure_levels(lambda: resnet20(10, in_channels=1), [1.0, 0.5], (1, 12, 12), 10, batch_size=4, reps=1)
    dense, half = rows
    assert dense["flops_ratio"] == 1.0 and 0.15 < half["flops_ratio"] < 0.5      # ~keep^2 in the convs
    assert half["parameters"] < dense["parameters"] and half["level"].model_bytes == 4 * half["parameters"]
    x = torch.randn(2, 1, 12, 12)
    m = pruned_model(resnet20(10, in_channels=1), 0.5, x)
    assert flops_per_sample(m, x)[1] == half["train_flops_per_sample"]
    assert max(c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)) == 32
    with pytest.raises(ValueError, match="keeps must be decreasing"):
        measure_levels(lambda: resnet20(10, in_channels=1), [0.5, 1.0], (1, 12, 12), 10)


def test_plan_command_writes_a_plan_and_refuses_bad_input(tmp_path, capsys):
    from pyoptim import cli
    inst = random_instance(4, n_nodes=3, rounds=6, n_levels=2)
    d = inst.to_dict()
    (tmp_path / "nodes.json").write_text(json.dumps({"nodes": d["nodes"], "aggregation": 0.01}))
    (tmp_path / "curves.json").write_text(json.dumps(d["curves"]))
    base = ["plan", "--nodes", str(tmp_path / "nodes.json"), "--curves", str(tmp_path / "curves.json"),
            "--keeps", "1,0.5", "--input-shape", "1,12,12", "--rounds", "6"]
    out = tmp_path / "out"
    assert cli.main(base + ["--target-loss", "1.1", "--deadline", "60s", "--out", str(out)]) == 0
    doc = json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").exists()
    plan = Plan.from_dict(doc["plan"])
    again = Instance.from_dict(doc["instance"])
    assert simulate(again, plan).energy == pytest.approx(doc["predicted"]["energy"])
    assert doc["predicted"]["feasible"] and doc["predicted"]["losses"][-1] <= 1.1
    assert set(doc["methods"]) >= {"adp", "no_pruning", "prune_once", "greedy"}
    assert [lv["keep"] for lv in doc["levels"]] == [1.0, 0.5]
    capsys.readouterr()
    for extra, msg in ((["--target-loss", "0.01", "--deadline", "60s"], "infeasible: the loss target"),
                       (["--target-loss", "1.1", "--deadline", "1ms"], "infeasible: the deadline")):
        assert cli.main(base + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    (tmp_path / "bad.json").write_text(json.dumps({"nodes": [{"name": "a", "flops": 1}]}))
    bad = ["plan", "--nodes", str(tmp_path / "bad.json"), "--curves", str(tmp_path / "curves.json"),
           "--keeps", "1,0.5", "--target-loss", "1", "--deadline", "1m"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node 'a': missing fields ['power', 'samples', 'bandwidth']" in err[0]
    for argv, opt in ((base + ["--keeps", "0.5,1", "--target-loss", "1", "--deadline", "1m"], "--keeps"),
                      (base + ["--target-loss", "1", "--deadline", "soon"], "--deadline")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and opt in capsys.readouterr().err


def test_fit_curve_recovers_a_power_law_and_reports_held_back_error():
    import numpy as np
    from pyoptim.pact.loss import curve_error, fit_curve
    true = LossCurve(scale=40.0, power=0.6, floor=0.3, offset=500.0)
    rng = np.random.default_rng(0)
    xs = np.linspace(0, 40000, 60)
    ys = np.array([true.at(x) for x in xs]) * np.exp(rng.normal(0, 0.01, xs.size))
    fit = fit_curve(xs, ys)
    clean = np.array([true.at(x) for x in xs])
    err = curve_error(fit, xs, clean)
    assert err["mean_rel"] < 0.01 and err["max_rel"] < 0.04
    held = np.array([true.at(x) for x in xs]) * np.exp(rng.normal(0, 0.01, xs.size))
    assert curve_error(fit, xs, held)["mean_rel"] < 0.03
    with pytest.raises(ValueError, match="matching 1-D"):
        fit_curve([1, 2], [1, 2])
    with pytest.raises(ValueError, match="losses finite and > 0"):
        fit_curve([0, 1, 2, 3], [1, 0, 1, 1])


def _bench(name, args, tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", name), *args, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_bench_pact_smoke(tmp_path):
    _bench("bench_pact.py", ["--instances", "3", "--granularities", "4,32", "--size-instances", "1",
                             "--baseline-instances", "2", "--exact-limit", "100000", "--name", "p",
                             "--sections", "gap,sizes,baselines"], tmp_path)
    res = json.loads((tmp_path / "p_cpu.json").read_text())
    assert (tmp_path / "p_cpu.png").exists()
    g = res["gap"]["by_granularity"]
    assert set(g) == {"4", "32"} and all(v >= -1e-12 for k in g for v in g[k]["gaps"])
    assert set(res["sizes"]) == {"n_nodes", "rounds", "n_levels"}
    assert set(res["baselines"]["baselines"]) == {"no_pruning", "prune_once", "greedy", "random"}


def test_bench_pact_real_runs_smoke(tmp_path):
    """Two plans of the docs' example run for real (one round, few samples): the measured loss of
    each round sits beside its prediction, beta is fitted within [0, 1] on one run and judged on
    the other, and seconds and joules accounted from the trained model equal the plan's."""
    from pyoptim.data import DatasetNotFoundError, load_fashion_mnist
    try:
        load_fashion_mnist("train")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {str(exc).splitlines()[0]}")
    _bench("bench_pact.py", ["--sections", "real", "--real-runs", "2", "--real-rounds", "2",
                             "--real-samples", "64", "--name", "r"], tmp_path)
    res = json.loads((tmp_path / "r_cpu.json").read_text())["real"]
    assert (tmp_path / "r_cpu.png").exists() and set(res) >= {"runs", "fedavg_exponent", "held_back"}
    assert 0.0 <= res["fedavg_exponent"] <= 1.0 and len(res["runs"]) == 2
    for run in res["runs"]:
        assert len(run["measured"]) == len(run["predicted_beta0"]) == len(run["plan"]["rounds"])
        assert all(math.isfinite(v) and v > 0 for v in run["measured"])
        (ms, ps), (me, pe) = run["seconds_measured_predicted"], run["energy_measured_predicted"]
        assert ms == pytest.approx(ps, rel=1e-9) and me == pytest.approx(pe, rel=1e-9)


def test_pact_curves_smoke(tmp_path):
    from pyoptim.data import DatasetNotFoundError, load_fashion_mnist
    try:
        load_fashion_mnist("train")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {str(exc).splitlines()[0]}")
    _bench("pact_curves.py", ["--keeps", "1,0.5", "--train-subset", "512", "--epochs", "1", "--window", "2",
                              "--curves-out", str(tmp_path / "c.json"), "--name", "c"], tmp_path)
    res = json.loads((tmp_path / "c_cpu.json").read_text())
    assert [lv["keep"] for lv in res["levels"]] == [1.0, 0.5]
    for lv in res["levels"]:
        assert len(lv["curves"]) == 2 and len(lv["held_back"]) == 1 and lv["held_back_mean_rel"] >= 0
        LossCurve(**lv["fit"])
    out = json.loads((tmp_path / "c.json").read_text())
    assert len(out["curves"]) == 2 and out["keeps"] == [1.0, 0.5] and out["recipe"]["batch_size"] == 64


def test_a_plan_runs_for_real_in_gloo_processes(tmp_path):
    """Two node processes, the level raised twice (1 -> 0.75 -> 0.5) and node b left out of one
    round: the accounted seconds and joules come from the model really trained and equal the
    plan's (same FLOPs, same bytes: the second pruning keeps 0.5 of the unpruned channels, not
    0.5 of 0.75), the measured loss is finite for every round, and the report pairs it with the
    predicted one."""
    import torch
    from pyoptim import cli
    from pyoptim.pact.run import run_plan
    nodes = {"nodes": [{"name": "a", "flops": 1e11, "power": 10.0, "samples": 96, "bandwidth": 1e7},
                       {"name": "b", "flops": 5e10, "power": 3.0, "samples": 64, "bandwidth": 1e7}]}
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    (tmp_path / "c.json").write_text(json.dumps([{"scale": 2.0, "power": 0.5, "floor": 0.2, "offset": 1.0}] * 3))
    assert cli.main(["plan", "--nodes", str(tmp_path / "n.json"), "--curves", str(tmp_path / "c.json"),
                     "--keeps", "1,0.75,0.5", "--initial-loss", "2.3", "--target-loss", "0.45",
                     "--deadline", "1m", "--rounds", "4", "--samples-per-round", "32",
                     "--out", str(tmp_path / "p")]) == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["model"] == "resnet20"
    doc["plan"] = {"rounds": [{"nodes": [0, 1], "level": 0}, {"nodes": [0], "level": 1},
                              {"nodes": [0, 1], "level": 2}]}
    inst = Instance.from_dict(doc["instance"])
    out = simulate(inst, Plan.from_dict(doc["plan"]))
    doc["predicted"] = out.to_dict()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g)
    res = run_plan({**doc, "batch_size": 16}, x, y)
    assert [r["level"] for r in res["rounds"]] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in res["rounds"])
    assert [r["train_flops_per_sample"] for r in res["rounds"]] == [lv.flops_per_sample for lv in inst.levels]
    assert res["measured"]["energy"] == pytest.approx(out.energy, rel=1e-9)
    assert res["measured"]["seconds"] == pytest.approx(out.seconds, rel=1e-9)
    assert [r["predicted_loss"] for r in res["rounds"]] == out.losses[1:]
    with pytest.raises(ValueError, match="the data has 100"):
        run_plan(doc, x[:100], y[:100])
    assert cli.main(["train", "--plan", str(tmp_path / "n.json")]) == 2     # not a plan: one line


def _one_rank_group():
    import torch.distributed as dist
    from pyoptim.pact.run import _free_port
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def test_pact_plugin_in_a_trainer_prunes_in_the_planned_rounds_and_keeps_momentum():
    """The plug-in in one process (a group of one rank): the model is pruned when the plan raises
    the level, through the trainer's replace_model, with the optimizer's momentum compacted (not
    reset); every round's loss is the trainer's own. (A node left out of a round: the two-process
    test above.)"""
    import torch
    import torch.distributed as dist
    from pyoptim.models import resnet20
    from pyoptim.pact.plugin import PactPlugin, RoundShard
    from pyoptim.train import Trainer
    torch.manual_seed(0)
    node = Node("solo", 1e11, 10.0, 48, 1e7)
    x, y = torch.randn(48, 1, 12, 12), torch.randint(0, 10, (48,))
    sizes = []
    from pyoptim.pact.levels import measure_levels
    rows = measure_levels(lambda: resnet20(10, in_channels=1), [1.0, 0.5], (1, 12, 12), 10, batch_size=4, reps=1)
    inst = Instance((node,), tuple(r["level"] for r in rows), (LossCurve(2.0, 0.5, 0.2),) * 2, 4, 32,
                    2.3, 1.0, 100.0)
    plan = Plan([((0,), 0), ((0,), 0), ((0,), 1)])
    _one_rank_group()
    try:
        model = resnet20(10, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        plugin = PactPlugin(inst, plan, [1.0, 0.5], x[:2], rank=0)

        class Watch:
            def on_epoch_start(self, trainer, epoch):
                sizes.append(sum(p.numel() for p in trainer.model.parameters()))
                if epoch == 2:
                    assert any("momentum_buffer" in st for st in trainer.optimizer.state.values())

        shard = RoundShard(x, y, 32, 8, [0, 1, 2])
        hist = Trainer(model, opt, shard, plugins=[plugin, Watch()], ddp=False, max_epochs=3,
                       log_every=0, progress=False).fit()
    finally:
        dist.destroy_process_group()
    assert sizes[0] == sizes[1] > sizes[2] == rows[1]["parameters"]
    assert [r["train_flops_per_sample"] for r in plugin.rows] == [rows[0]["train_flops_per_sample"]] * 2 \
        + [rows[1]["train_flops_per_sample"]]
    assert hist["samples"] == [32, 32, 32]
    assert hist["pact_loss"] == pytest.approx(hist["loss"])
    with pytest.raises(ValueError, match="take must be in 1..48"):
        RoundShard(x, y, 49, 8, [0])
    with pytest.raises(ValueError, match="one keep ratio per level"):
        PactPlugin(inst, plan, [1.0], x[:2], rank=0)


def test_trainer_refuses_an_empty_epoch_unless_the_loader_allows_it():
    import torch
    from pyoptim.train import Trainer

    class Empty(list):
        pass

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="yielded no batch"):
        Trainer(model, opt, Empty(), ddp=False, log_every=0, progress=False).fit()
    ok = Empty()
    ok.empty_epochs_ok = True
    hist = Trainer(model, opt, ok, ddp=False, log_every=0, progress=False).fit()
    assert hist["samples"] == [0]


def test_fedavg_exponent_shrinks_what_a_round_of_several_nodes_advances():
    """beta = 0 counts every sample of the round, beta = 1 one node's worth (here the two nodes
    train alike); it survives the JSON round trip and is range-checked."""
    a = Node("a", 1e11, 10.0, 100, 1e7)
    b = Node("b", 1e11, 10.0, 100, 1e7)
    lv = (Level("full", 1e8, 1e6),)
    base = Instance((a, b), lv, (LossCurve(2.0, 0.5, 0.2),), 3, 50, 2.3, 1.0, 100.0)
    half = Instance.from_dict({**base.to_dict(), "fedavg_exponent": 1.0})
    assert half.fedavg_exponent == 1.0 and Instance.from_dict(half.to_dict()) == half
    s0, t0, e0 = round_cost(base, (0, 1), 0)
    s1, t1, e1 = round_cost(half, (0, 1), 0)
    assert (s0, s1) == (100.0, 50.0) and (t0, e0) == (t1, e1)
    assert round_cost(half, (0,), 0)[0] == 50.0                 # one node: nothing averaged away
    assert simulate(half, Plan([((0, 1), 0)])).losses[1] > simulate(base, Plan([((0, 1), 0)])).losses[1]
    with pytest.raises(ValueError, match="fedavg_exponent must be in"):
        Instance.from_dict({**base.to_dict(), "fedavg_exponent": 1.5})


def test_a_plan_runs_under_torchrun_and_the_plan_options_are_checked(tmp_path):
    """``torchrun --nproc-per-node 2 -m pyoptim.cli train --plan``: each rank trains its node in
    the group torchrun made, rank 0 writes the report (accounting equal to the plan's); a wrong
    rank count and a bad --fedavg-exponent get one line."""
    import os
    import subprocess
    import sys
    from pyoptim import cli
    from pyoptim.data import DatasetNotFoundError, load_fashion_mnist
    try:
        load_fashion_mnist("train")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {str(exc).splitlines()[0]}")
    nodes = {"nodes": [{"name": "a", "flops": 1e11, "power": 10.0, "samples": 96, "bandwidth": 1e7},
                       {"name": "b", "flops": 5e10, "power": 3.0, "samples": 64, "bandwidth": 1e7}]}
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    (tmp_path / "c.json").write_text(json.dumps([{"scale": 2.0, "power": 0.5, "floor": 0.2, "offset": 1.0}] * 2))
    args = ["plan", "--nodes", str(tmp_path / "n.json"), "--curves", str(tmp_path / "c.json"), "--keeps", "1,0.5",
            "--initial-loss", "2.3", "--target-loss", "1.5", "--deadline", "1m", "--rounds", "3",
            "--samples-per-round", "32", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit):
        cli.main(args + ["--fedavg-exponent", "1.5"])
    assert cli.main(args + ["--fedavg-exponent", "0.5"]) == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["instance"]["fedavg_exponent"] == 0.5
    doc["plan"] = {"rounds": [{"nodes": [0, 1], "level": 0}, {"nodes": [1], "level": 1}]}
    doc["predicted"] = simulate(Instance.from_dict(doc["instance"]), Plan.from_dict(doc["plan"])).to_dict()
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(n, out):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                               "--master-port", str(_free_port()), "-m", "pyoptim.cli", "train", "--plan",
                               str(tmp_path / "plan.json"), "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
    ok = torchrun(2, tmp_path / "run")
    assert ok.returncode == 0, ok.stderr[-2000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["nodes"] for r in rep["rounds"]] == [[0, 1], [1]]
    assert rep["measured"]["energy"] == pytest.approx(doc["predicted"]["energy"], rel=1e-9)
    bad = torchrun(1, tmp_path / "bad")
    assert bad.returncode != 0 and "the plan has 2 nodes, the process group 1 ranks" in bad.stderr


def _free_port():
    from pyoptim.pact.run import _free_port as free
    return free()
