"""The sparse update as a Trainer plug-in (pyoptim.sparse.plugin), the scheme for a memory budget,
the search comparison (pyoptim.sparse.compare), and the commands ``pyoptim train --method sparse``
and ``pyoptim search-scheme`` on a tiny pretrained model (resolution 32). The command tests need
the real Fashion-MNIST (the tasks are defined on its classes) and are skipped without it."""
import copy
import itertools
import json
import random

import pytest
import torch

from pyoptim import cli
from pyoptim.data import DatasetNotFoundError, load_fashion_mnist
from pyoptim.models import mobilenet_v2
from pyoptim.sparse import (SearchSpace, SparseUpdate, SparseUpdateScheme, exact_search, fuse_bn,
                            memory_estimate, parse_bytes, scheme_for_budget)
from pyoptim.sparse.compare import (compare_searches, curve_from_steps, curve_steps, reach_target,
                                    run_curves)
from pyoptim.sparse.contribution import ContributionTables, conv_positions, model_digest, update_scheme
from pyoptim.sparse.search import evaluations_to_reach, evolution_search, random_search
from pyoptim.sparse import tasks as T
from pyoptim.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 32


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = mobilenet_v2(0.35, num_classes=5, in_channels=1)
        for mod in m.modules():                 # BN statistics that are not the identity
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        return m.eval()


def _batches(n=4, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, RES, RES, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


# ---- sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("100KB", 100_000), ("256KiB", 262_144), ("1.5MB", 1_500_000),
                                        ("4096", 4096), (" 2 gib ", 2 * 2 ** 30), ("1e3B", 1000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "KB", "100 parsecs", "-5KB", "0", "0.1", "nan", "1..2MB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


# ---- the plug-in -----------------------------------------------------------------------------

def test_plugin_trains_exactly_the_scheme_and_leaves_the_model_untouched(model):
    scheme = SparseUpdateScheme.last_layers(fuse_bn(copy.deepcopy(model)), 6, {-1: 0.5, -4: 1.0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = fuse_bn(copy.deepcopy(model))
    plug = SparseUpdate(scheme)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    t = Trainer(copy.deepcopy(model), opt, _batches(), plugins=[plug], max_epochs=2, log_every=0,
                progress=False)
    t.fit()
    for k, v in model.state_dict().items():                   # the caller's model: unchanged
        assert torch.equal(v, before[k]), k
    trained = {id(p) for p in t.model.parameters() if p.requires_grad}
    in_opt = [p for g in t.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == trained and len(in_opt) == len(trained)
    assert t.optimizer.param_groups[0]["weight_decay"] == 1e-3 and t.optimizer.param_groups[0]["momentum"] == 0.9
    assert plug.trained_parameters == sum(p.numel() for p in in_opt) > 0
    assert not any(isinstance(m, torch.nn.Dropout) for m in t.model.modules())
    # state-dict keys of the plain (folded) model; frozen entries bit-identical, trained ones moved
    from pyoptim.sparse import scheme_masks
    masks = scheme_masks(start, scheme)
    after = t.model.state_dict()
    start_sd = start.state_dict()
    for name, w0 in start_sd.items():
        if name not in after:
            continue
        mask = masks.get(name, "frozen")
        if mask == "frozen":
            assert torch.equal(after[name], w0), name
        elif mask is None:
            assert not torch.equal(after[name], w0), name
        else:
            assert torch.equal(after[name][~mask], w0[~mask]), name
            if mask.any():
                assert not torch.equal(after[name][mask], w0[mask]), name
    # a second fit keeps the sparse model and its optimizer
    sparse_model, sparse_opt = t.model, t.optimizer
    t.fit(max_epochs=3)
    assert t.model is sparse_model and t.optimizer is sparse_opt


def test_plugin_refuses_a_scheme_that_does_not_fit_and_changes_nothing(model):
    bad = SparseUpdateScheme(["features.99.0"], {})
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    t = Trainer(m, opt, _batches(1), plugins=[SparseUpdate(bad)], max_epochs=1, log_every=0, progress=False)
    with pytest.raises(ValueError, match="features.99.0"):
        t.fit()
    assert t.model is m and t.optimizer is opt
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(TypeError, match="SparseUpdateScheme"):
        SparseUpdate({"bias_layers": []})


# ---- the scheme for a budget -----------------------------------------------------------------

def _est(m, scheme, batch=4):
    return memory_estimate(m, scheme, (1, RES, RES), batch)["training"]


def test_budget_without_tables_takes_the_largest_bias_window_that_fits(model):
    m = fuse_bn(copy.deepcopy(model))
    w = [_est(m, update_scheme(m, k, {}) or SparseUpdateScheme()) for k in (0, 5, 6)]
    assert w[0] < w[1] < w[2]
    budget = (w[1] + w[2]) / 2
    got = scheme_for_budget(m, budget, (1, RES, RES), 4)
    assert got["scheme"].bias_layers == update_scheme(m, 5, {}).bias_layers
    assert got["memory"] == w[1] <= budget and got["score"] is None
    with pytest.raises(ValueError, match=r"below the smallest scheme's .* \(the classifier alone"):
        scheme_for_budget(m, w[0] - 1, (1, RES, RES), 4)


def _random_space(m, rng: random.Random, ratios=(0.25, 0.5, 1.0), n_layers=3, big_k=8):
    pos = conv_positions(m)
    cands = [n for n, p in sorted(pos.items(), key=lambda kv: kv[1]) if p <= big_k][:n_layers]
    return SearchSpace(list(ratios), [0.0] + sorted(rng.uniform(0, 0.1) for _ in range(big_k)),
                       [1000.0 * k for k in range(big_k + 1)], {c: pos[c] for c in cands},
                       {c: sorted(rng.uniform(-0.01, 0.05) for _ in ratios) for c in cands},
                       {c: sorted(rng.uniform(100, 3000) for _ in ratios) for c in cands})


def test_budget_with_a_space_is_the_exact_optimum(model):
    m = fuse_bn(copy.deepcopy(model))
    space = _random_space(m, random.Random(3))
    got = scheme_for_budget(m, 1e9, (1, RES, RES), 4, space=space)  # real memory far under
    best = exact_search(space, 1e9)
    assert got["score"] == best.score
    assert got["scheme"].to_dict() == update_scheme(m, best.scheme.k, best.scheme.ratios).to_dict()


# ---- the search comparison -------------------------------------------------------------------

def _brute(space, budget):
    best = None
    names = sorted(space.positions, key=space.positions.get)
    for k in range(space.max_k + 1):
        for levels in itertools.product(range(len(space.ratios) + 1), repeat=len(names)):
            ratios = {n: space.ratios[lv - 1] for n, lv in zip(names, levels) if lv}
            from pyoptim.sparse import Scheme
            s = Scheme(k, ratios)
            if space.feasible(s, budget):
                best = max(best if best is not None else -1e9, space.score(s))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_searches_counts_evaluations_to_the_target(model, seed):
    m = fuse_bn(copy.deepcopy(model))
    space = _random_space(m, random.Random(seed))
    budget = 5500.0
    res = compare_searches(space, budget, 150, seeds=[0, 1, 2], population=20)
    assert res["optimum"]["score"] == pytest.approx(_brute(space, budget), abs=1e-12)
    assert res["target"] == reach_target(res["optimum"]["score"], 0.99)
    for method, search in (("evolution", evolution_search), ("random", random_search)):
        curves = run_curves(res, method)
        for run, reach, curve, s in zip(res[method]["runs"], res[method]["to_target"], curves, [0, 1, 2]):
            assert len(curve) == 150 and run["memory"] <= budget and "curve" not in run
            again = (search(space, budget, 150, s, population=20) if method == "evolution"
                     else search(space, budget, 150, s))
            assert curve == again.curve                          # the steps are lossless
            assert reach == evaluations_to_reach(curve, res["target"])
            assert run["score"] <= res["optimum"]["score"] + 1e-12
    e, r = res["evolution"]["median_to_target"], res["random"]["median_to_target"]
    assert res["speedup"] == (None if e is None or r is None else r / e)
    assert res["speedup_at_least"] == (150 / e if e is not None and r is None else res["speedup"])
    json.dumps(res)                                              # JSON-ready


def test_compare_searches_gives_random_search_more_evaluations(model):
    space = _random_space(fuse_bn(copy.deepcopy(model)), random.Random(5))
    res = compare_searches(space, 5500.0, 60, seeds=[0, 1], population=20, random_evaluations=400)
    assert res["random_evaluations"] == 400
    assert [len(c) for c in run_curves(res, "random")] == [400, 400]
    assert [len(c) for c in run_curves(res, "evolution")] == [60, 60]
    assert res["random"]["at_evaluations"] == [c[59] for c in run_curves(res, "random")]
    r = res["random"]["median_to_target"]
    assert r is None or r <= 400
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="random_evaluations"):
            compare_searches(space, 5500.0, 60, seeds=[0], random_evaluations=bad)


def test_curve_steps_round_trip():
    curve = [0.1, 0.1, 0.3, 0.3, 0.3, 0.35, 0.5, 0.5]
    steps = curve_steps(curve)
    assert steps == [[1, 0.1], [3, 0.3], [6, 0.35], [7, 0.5]]
    assert curve_from_steps(steps, len(curve)) == curve
    assert curve_from_steps(curve_steps([2.0]), 1) == [2.0]


def test_reach_target_and_bad_comparisons(model):
    assert reach_target(0.5, 0.99) == pytest.approx(0.495)
    assert reach_target(-0.5, 0.99) == pytest.approx(-0.505)
    space = _random_space(fuse_bn(copy.deepcopy(model)), random.Random(0))
    with pytest.raises(ValueError, match="evaluations"):
        compare_searches(space, 5000.0, 0, seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        compare_searches(space, 5000.0, 10, seeds=[])
    with pytest.raises(ValueError, match="below space.min_memory"):
        compare_searches(space, -1.0, 10, seeds=[0])


# ---- the commands ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    try:
        load_fashion_mnist("train")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {str(exc).splitlines()[0]}")
    path = tmp_path_factory.mktemp("pt") / "tiny.pt"
    T.pretrain(T.PretrainConfig(resolution=RES, epochs=1, batch_size=16, train_per_class=16,
                                test_per_class=8), path=path, log=None)
    return str(path)


TINY = ["--task-train-per-class", "16", "--task-test-per-class", "8", "--batch-size", "16"]


def _no_data(monkeypatch):
    monkeypatch.setattr(T, "make_task", lambda *a, **k: pytest.fail("the task's data was loaded"))


def test_train_sparse_with_a_scheme_file(ckpt, tmp_path, capsys):
    m = fuse_bn(T.load_pretrained(ckpt))
    scheme = SparseUpdateScheme.last_layers(m, 4, {-1: 0.5})
    (tmp_path / "s.json").write_text(scheme.to_json())
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "sparse", "--init", ckpt, "--task", "few_shot",
                     "--scheme", str(tmp_path / "s.json"), "--epochs", "2", "--lr", "0.05",
                     "--out", str(out), "--log-every", "0", *TINY]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.png").exists()
    sp = rep["sparse"]
    assert sp["scheme"] == scheme.to_dict() and 0 < sp["trained_parameters"] < sp["total_parameters"]
    assert sp["training_memory"] < sp["full_update_training_memory"]
    assert rep["config"]["method"] == "sparse" and len(rep["history"]) == 2
    assert rep["final"]["train_flops_per_sample"] < rep["train_flops_per_sample_initial"]
    assert 0 <= rep["final"]["test_accuracy"] <= 1
    assert "sparse update (--scheme" in capsys.readouterr().out


def test_train_sparse_with_a_memory_budget(ckpt, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "sparse", "--init", ckpt, "--task", "class_increment",
                     "--memory-budget", "400KB", "--epochs", "1", "--out", str(out), "--log-every", "0",
                     *TINY]) == 0
    sp = json.loads((out / "report.json").read_text())["sparse"]
    assert sp["training_memory"] <= 400_000 and sp["memory_budget"] == 400_000
    assert "largest bias window" in sp["how"] and sp["scheme"]["bias_layers"]


def _tables_for(ckpt, task="few_shot", digest=None):
    m = T.load_pretrained(ckpt)
    pos = conv_positions(fuse_bn(copy.deepcopy(m)))
    cands = [n for n, p in pos.items() if p in (1, 3)]
    rng = random.Random(0)
    ratios = [0.25, 0.5, 1.0]
    ks = list(range(0, 7))
    bias_acc = {k: 0.5 + 0.01 * k for k in ks}
    w_acc = {c: [bias_acc[pos[c]] + rng.uniform(0, 0.03) * r for r in ratios] for c in cands}
    return ContributionTables(ratios, ks, [0], {c: pos[c] for c in cands}, bias_acc,
                              {k: a - bias_acc[0] for k, a in bias_acc.items()}, w_acc,
                              {c: [a - bias_acc[pos[c]] for a in row] for c, row in w_acc.items()},
                              {"model": digest or model_digest(m), "task": {"name": task, "classes": [5, 6, 7, 8, 9]}})


def test_search_scheme_writes_a_scheme_train_accepts(ckpt, tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(_tables_for(ckpt).to_dict()))
    out = tmp_path / "search"
    assert cli.main(["search-scheme", "--init", ckpt, "--task", "few_shot", "--tables", str(tmp_path / "t.json"),
                     "--memory-budget", "2MB", "--evaluations", "60", "--population", "12", "--seeds", "0,1",
                     "--random-evaluations", "90", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "search.json").read_text())
    assert (out / "search.png").exists()
    comp = res["comparison"]
    assert comp["random_evaluations"] == 90 and [len(c) for c in run_curves(comp, "random")] == [90, 90]
    assert len(comp["evolution"]["runs"]) == 2 and comp["optimum"]["memory"] <= 2e6
    assert res["chosen"]["score"] == max(r["score"] for r in comp["evolution"]["runs"])
    assert "evaluations to 99% of the optimum" in capsys.readouterr().out
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "sparse", "--init", ckpt, "--task", "few_shot", "--scheme",
                     str(out / "scheme.json"), "--epochs", "1", "--out", str(run), "--log-every", "0", *TINY]) == 0
    # the budget with the tables: the exact optimum of their additive model
    run2 = tmp_path / "run2"
    assert cli.main(["train", "--method", "sparse", "--init", ckpt, "--task", "few_shot", "--memory-budget", "2MB",
                     "--tables", str(tmp_path / "t.json"), "--epochs", "1", "--out", str(run2), "--log-every", "0",
                     *TINY]) == 0
    sp = json.loads((run2 / "report.json").read_text())["sparse"]
    assert sp["predicted_gain"] == pytest.approx(comp["optimum"]["score"]) and sp["how"].startswith("exact")


def _one_line(capsys, code=None):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1 and not any("Traceback" in e for e in err), err
    return err[0] if err else ""


@pytest.mark.parametrize("argv,expected", [
    (["--memory-budget", "12 parsecs"], "argument --memory-budget"),
    (["--memory-budget", "0"], "argument --memory-budget"),
    (["--scheme", "/nonexistent.json"], "argument --scheme: cannot read"),
    (["--tables", "/nonexistent.json"], "argument --tables: cannot read"),
    (["--task", "imagenet"], "argument --task: invalid choice"),
])
def test_bad_sparse_options_are_refused_when_parsed(ckpt, argv, expected, capsys, monkeypatch):
    _no_data(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--method", "sparse", "--init", ckpt, *argv])
    assert e.value.code == 2 and expected in _one_line(capsys)


def test_sparse_option_contradictions_and_bad_files_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    base = ["train", "--method", "sparse", "--init", ckpt]
    (tmp_path / "not_ckpt.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--method", "sparse", "--init", str(tmp_path / "not_ckpt.pt")])
    assert e.value.code == 2 and "argument --init" in _one_line(capsys)
    for argv, msg in [(base, "one of --scheme JSON and --memory-budget"),
                      (base + ["--memory-budget", "1MB", "--scheme", ckpt], "argument --scheme"),
                      (["train", "--method", "sparse", "--memory-budget", "1MB"], "needs --init"),
                      (["train", "--method", "dense", "--memory-budget", "1MB"], "an option of --method sparse"),
                      (base + ["--budget", "1m", "--memory-budget", "1MB"], "does not take --budget")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert msg in str(e.value.code) + _one_line(capsys), argv
    # a scheme naming a layer the model lacks: named, before the data loads
    (tmp_path / "s.json").write_text(SparseUpdateScheme(["features.77.0"], {}).to_json())
    with pytest.raises(SystemExit, match=r"features\.77\.0"):
        cli.main(base + ["--scheme", str(tmp_path / "s.json")])
    # tables of another model / another task: refused before the data loads
    (tmp_path / "t.json").write_text(json.dumps(_tables_for(ckpt, digest="0" * 16).to_dict()))
    with pytest.raises(SystemExit, match="another model"):
        cli.main(base + ["--memory-budget", "1MB", "--tables", str(tmp_path / "t.json")])
    (tmp_path / "t2.json").write_text(json.dumps(_tables_for(ckpt, task="shift").to_dict()))
    with pytest.raises(SystemExit, match="measured on task 'shift', not 'few_shot'"):
        cli.main(base + ["--task", "few_shot", "--memory-budget", "1MB", "--tables", str(tmp_path / "t2.json")])
    # zero evaluations: refused by the parser
    with pytest.raises(SystemExit) as e:
        cli.main(["search-scheme", "--init", ckpt, "--memory-budget", "1MB", "--tables",
                  str(tmp_path / "t.json"), "--evaluations", "0"])
    assert e.value.code == 2 and "argument --evaluations" in _one_line(capsys)
    with pytest.raises(SystemExit) as e:
        cli.main(["search-scheme", "--init", ckpt, "--memory-budget", "1MB", "--tables",
                  str(tmp_path / "t.json"), "--random-evaluations", "0"])
    assert e.value.code == 2 and "argument --random-evaluations" in _one_line(capsys)


def test_a_budget_below_the_smallest_scheme_names_the_minimum(ckpt, tmp_path):
    with pytest.raises(SystemExit, match=r"memory budget 1 KB is below the smallest scheme's [0-9.]+ KB"):
        cli.main(["train", "--method", "sparse", "--init", ckpt, "--task", "few_shot", "--memory-budget", "1KB",
                  "--out", str(tmp_path / "r"), *TINY])


def test_bench_scheme_search_smoke(ckpt, tmp_path):
    """bench/bench_scheme_search.py end to end on tiny tables and a tiny task: every budget has
    its comparison (evolution, random search with more evaluations, the optimum, the coarse
    optimum), the fine-tuned schemes, rho and the picture."""
    import os
    import subprocess
    import sys
    tables = _tables_for(ckpt)
    task = T.make_task("few_shot", resolution=RES, train_per_class=16, test_per_class=8)
    tables.identity.update(task=task.config(), steps=2, lr=0.05, batch_size=8, momentum=0.9,
                           weight_decay=0.0)
    (tmp_path / "t.json").write_text(json.dumps({"tables": tables.to_dict()}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "bench", "bench_scheme_search.py"), "--tables",
           str(tmp_path / "t.json"), "--pretrained", ckpt, "--budgets", "0.3,0.7", "--evaluations", "120",
           "--random-evaluations", "300", "--seeds", "0,1", "--finetune-seeds", "3", "--random-schemes", "2",
           "--coarse-ratios", "0.5,1", "--batch-size", "4", "--task-train-per-class", "16",
           "--task-test-per-class", "8", "--out-dir", str(tmp_path), "--name", "ss"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "ss_cpu.json").read_text())
    assert (tmp_path / "ss_cpu.png").exists()
    t = res["tasks"][0]
    assert t["task"] == "few_shot" and len(t["searches"]) == 2 and t["coarse_ratios"] == [0.5, 1.0]
    assert t["finetune"] == {"steps": 2, "lr": 0.05, "batch_size": 8, "momentum": 0.9, "weight_decay": 0.0}
    for cmp_, budget in zip(t["searches"], t["budgets"]):
        assert cmp_["random_evaluations"] == 300 and cmp_["evaluations"] == 120
        assert cmp_["coarse_optimum"]["score"] <= cmp_["optimum"]["score"] and cmp_["optimum"]["memory"] <= budget
    for share in ("0.3", "0.7"):
        row = t["searched_beats_last_k"][share]
        assert {"searched", "coarse", "bias_last_k", "full_last_k", "beats"} <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("searched", "coarse", "bias_last_k", "full_last_k"))
    assert 3 <= t["spearman_n"] <= len(t["schemes"])
    assert set(res["goals"]) == {"evolution_5x_fewer_evaluations", "searched_beats_last_k_everywhere",
                                 "spearman_rho"}
    bad = subprocess.run(cmd[:-4] + ["--task-test-per-class", "7", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "other data" in bad.stderr
