"""The `pyoptim` command: a tiny PruneTrain run on the synthetic set writes report.json and
report.png, prunes, and `pyoptim report` redraws it."""
import json
import os

import pytest

from pyoptim import cli


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "resnet20", "--data", "synthetic", "--synthetic-samples", "128",
                   "--epochs", "2", "--interval", "1", "--threshold", "1e9", "--batch-size", "32",
                   "--out", str(out), "--log-every", "2", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2
    assert report["events"] and report["events"][0]["channels"][1] < report["events"][0]["channels"][0]
    assert report["final"]["train_flops_per_sample"] < report["train_flops_per_sample_initial"]
    assert report["history"][-1]["batch_size"] > 32          # the batch grew with the shrinking model
    png = out / "report.png"
    assert png.stat().st_size > 10_000
    os.remove(png)
    assert cli.main(["report", str(out)]) == 0
    assert png.exists()
    assert "test accuracy" in capsys.readouterr().out


def test_missing_data_set_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYOPTIM_DATA", str(tmp_path))
    rc = cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                   "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "cifar" in capsys.readouterr().err.lower()


def test_report_of_a_folder_without_a_run(tmp_path):
    assert cli.main(["report", str(tmp_path)]) == 2


def test_report_counts_training_flops_per_epoch(tmp_path):
    """train_flops_total sums, epoch by epoch, the FLOPs per sample of the model that epoch trained
    (the dense one first, then each reconfigured one) times the samples."""
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "resnet20", "--data", "synthetic", "--synthetic-samples", "96",
                     "--epochs", "3", "--interval", "1", "--threshold", "1e9", "--batch-size", "32",
                     "--out", str(out), "--log-every", "0", "--device", "cpu", "--width", "0.5"]) == 0
    r = json.loads((out / "report.json").read_text())
    per_epoch = [r["train_flops_per_sample_initial"]] + r["train_flops_per_sample"][:-1]
    assert r["train_flops_total"] == pytest.approx(sum(f * 96 for f in per_epoch))
    assert r["train_flops_total"] < r["train_flops_total_dense"] == pytest.approx(3 * 96 * per_epoch[0])
    assert r["inference_flops_per_sample"] < r["inference_flops_per_sample_initial"]
    assert r["layers_initial"]["stem.0"] == 8                 # width 0.5 of 16
    assert r["prunetrain_time_s"]["group_lasso"] > 0 and r["prunetrain_time_s"]["reconfigure"] > 0
    assert r["train_time_s"] <= r["wall_s"]


def test_report_counts_training_flops_exactly_across_reconfigurations_inside_an_epoch(tmp_path):
    """With reconfigurations every few steps, each stretch of samples is counted at the FLOPs of
    the model that trained it (from the events' sample counts), not at the epoch's first model."""
    from pyoptim.report import flops_between_events
    ev = [{"samples": 5, "train_flops_per_sample": [10.0, 4.0]},
          {"samples": 9, "train_flops_per_sample": [4.0, 2.0]}]
    assert flops_between_events(10.0, ev, 12) == 5 * 10 + 4 * 4 + 3 * 2
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "resnet20", "--data", "synthetic", "--synthetic-samples", "96",
                     "--epochs", "2", "--interval", "2", "--interval-unit", "step", "--threshold", "1e9",
                     "--batch-size", "16", "--no-grow-batch", "--out", str(out), "--log-every", "0",
                     "--device", "cpu", "--width", "0.5"]) == 0
    r = json.loads((out / "report.json").read_text())
    ev = r["events"]
    assert [e["samples"] for e in ev] == [32 * (k + 1) for k in range(len(ev))] and len(ev) == 6
    assert ev[0]["train_flops_per_sample"][1] < ev[0]["train_flops_per_sample"][0]
    want, done, cur = 0.0, 0, r["train_flops_per_sample_initial"]
    for e in ev:                                     # 32 samples per stretch, written out
        assert e["train_flops_per_sample"][0] == pytest.approx(cur)
        want, done, cur = want + 32 * cur, e["samples"], e["train_flops_per_sample"][1]
    want += (192 - done) * cur
    assert r["train_flops_total"] == pytest.approx(want)
    per_epoch = [r["train_flops_per_sample_initial"]] + r["train_flops_per_sample"][:-1]
    assert r["train_flops_total"] < sum(f * 96 for f in per_epoch)   # the per-epoch count is higher


def test_make_demo_arguments_parse(monkeypatch):
    """The Makefile's demo command line is a valid `pyoptim train` command on Fashion-MNIST."""
    import re
    import shlex
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "Makefile")).read().replace("\\\n", " ")
    var = {m.group(1): m.group(2).strip() for m in re.finditer(r"^(DEMO_\w+)\s*\?=(.*)$", text, re.M)}
    demo = re.sub(r"\$\((\w+)\)", lambda m: var[m.group(1)], var["DEMO_ARGS"])
    monkeypatch.chdir(root)    # --compare-to reads the stored dense report (a repository file)
    args = cli.build_parser().parse_args(["train"] + shlex.split(demo))
    assert args.method == "prunetrain" and args.data == "fashion-mnist" and args.epochs >= 2
    assert args.compare_to["config"]["method"] == "dense"
    from pyoptim.cli.train import check_same_recipe
    check_same_recipe(args, args.compare_to)   # the stored dense run has the demo's recipe


def test_bench_prunetrain_smoke(tmp_path):
    """bench/bench_prunetrain.py end to end on a tiny synthetic set: dense and the main variant at
    two seeds, a lever variant at the first, the JSON record with per-seed and mean ratios and the
    goals, the picture, and --reuse taking the runs back (a smoke test, not a timing)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(root, "bench", "bench_prunetrain.py"), "--model", "resnet20",
           "--data", "synthetic", "--train-subset", "128", "--epochs", "2", "--batch-size", "32", "--width", "0.25",
           "--threshold", "1e9", "--precise-bn", "1", "--seeds", "0", "1", "--variant", "plain=",
           "--variant", "prox=--proximal --bn-scale", "--dense-variant", "narrow=--width 0.125",
           "--note", "plain=made by the smoke test", "--quiet", "--out-dir", str(tmp_path),
           "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "prunetrain_cpu.json").read_text())
    assert {"device", "torch", "triton", "commit", "runs", "ratios", "ratios_per_seed", "goals_met"} <= set(res)
    assert res["config"]["main"] == "prox"
    assert set(res["runs"]["dense"]) == set(res["runs"]["prox"]) == {"0", "1"} and set(res["runs"]["plain"]) == {"0"}
    assert res["ratios"]["prox"]["train_flops_saving"]["n"] == 2 and res["ratios"]["plain"]["accuracy_delta"]["n"] == 1
    assert res["ratios"]["plain"]["train_flops_saving"]["mean"] > 0
    # the dense reference point: a narrower dense network, first seed, no PruneTrain flags
    assert set(res["runs"]["narrow"]) == {"0"} and res["dense_variants"] == {"narrow": "--width 0.125"}
    assert res["notes"] == {"plain": "made by the smoke test"}
    assert res["ratios"]["narrow"]["train_flops_saving"]["mean"] > 0.5
    narrow = json.loads((tmp_path / "runs" / "narrow_seed0" / "report.json").read_text())["argv"]
    assert "--width 0.125" in " ".join(narrow) and "--method dense" in " ".join(narrow) and "--lpr" not in narrow
    assert len(res["runs"]["dense"]["0"]["test_accuracy_per_epoch"]) == 2
    assert (tmp_path / "prunetrain_cpu.png").stat().st_size > 10_000
    again = subprocess.run(cmd + ["--reuse"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("reused") == 6, again.stderr[-2000:]
    assert json.loads((tmp_path / "prunetrain_cpu.json").read_text())["runs"] == res["runs"]
    one = subprocess.run(cmd + ["--only", "prox:3"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and (tmp_path / "runs" / "prox_seed3" / "report.json").exists()
    assert "--seed 3" in " ".join(json.loads((tmp_path / "runs" / "prox_seed3" / "report.json").read_text())["argv"])
    bad = subprocess.run(cmd + ["--only", "turbo:1"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--only 'turbo:1'" in bad.stderr


def test_schedule_and_lever_options_reach_the_run(tmp_path):
    import torch
    from pyoptim.cli.run import build_run, lr_schedule
    args = cli.build_parser().parse_args(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "8",
                                          "--synthetic-samples", "64", "--schedule", "step", "--proximal",
                                          "--bn-scale", "--interval", "50", "--interval-unit", "step",
                                          "--lasso-epochs", "4", "--min-keep", "0.25", "--out", str(tmp_path)])
    run = build_run(args, progress=False)
    assert isinstance(run.trainer.scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(run.trainer.scheduler.milestones) == [4, 6]
    assert run.prune.proximal and run.prune.bn_scale
    assert run.prune.interval == 50 and run.prune.interval_unit == "step" and run.prune.lasso_epochs == 4
    assert run.prune.min_keep == 0.25 and run.prune.lasso_steps is None
    args = cli.build_parser().parse_args(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "2",
                                          "--synthetic-samples", "64", "--lasso-steps", "300", "--restore-norms",
                                          "--out", str(tmp_path)])
    run = build_run(args, progress=False)
    assert run.prune.lasso_steps == 300 and run.prune.lasso_epochs is None and run.prune.restore_norms
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    assert sorted(lr_schedule(opt, "step", 2).milestones) == [1, 2]    # two distinct milestones
    with pytest.raises(ValueError, match="kind"):
        lr_schedule(opt, "linear", 4)


def test_bench_budget_smoke(tmp_path):
    """bench/bench_budget.py end to end on a tiny synthetic set: the full run, budgeted runs of a
    knob set joined by '+', the goals, the tagged JSON record and the picture (not a timing)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(root, "bench", "bench_budget.py"), "--model", "resnet20",
            "--data", "synthetic", "--synthetic-samples", "256", "--train-subset", "128", "--full-epochs", "1",
            "--batch-size", "32", "--fractions", "0.5", "--quiet", "--out-dir", str(tmp_path)]
    # budgets of twice the tiny full run (~3 s): half of it would be spent by the set-up alone
    proc = subprocess.run(base + ["--configs", "none,schedule,schedule+selective", "--tag", "smoke",
                                  "--runs-dir", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "budget_resnet20_smoke_cpu.json").read_text())
    assert {"device", "torch", "triton", "commit", "full", "runs", "goals_met"} <= set(res)
    assert [r["knobs"] for r in res["runs"]] == ["none", "schedule", "schedule+selective"]
    assert "pending" not in res          # written after every run; complete at the end
    combo = res["runs"][2]
    assert combo["selector"].startswith("selective backprop") and "schedule" in combo["knobs_used"]
    assert all(r["end_s"] <= r["budget_s"] + 1.0 for r in res["runs"])
    assert "schedule+selective beats schedule (uniform batches) at every budget" in res["goals_met"]
    assert (tmp_path / "budget_resnet20_smoke_cpu.png").stat().st_size > 10_000
    # a rerun merged into that table: the schedule run replaced (the old one kept), the rest as it was
    path = tmp_path / "budget_resnet20_smoke_cpu.json"
    proc = subprocess.run(base + ["--configs", "schedule", "--merge", str(path), "--runs-dir", str(tmp_path / "re")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    merged = json.loads(path.read_text())
    assert [r["knobs"] for r in merged["runs"]] == ["none", "schedule", "schedule+selective"]
    assert merged["runs"][0] == res["runs"][0] and "rerun_at_commit" in merged["runs"][1]
    assert merged["superseded"] == [res["runs"][1]] and merged["full"] == res["full"]
    assert len(merged["config"]["reruns"]) == 1 and merged["config"]["configs"] == res["config"]["configs"]
    other = subprocess.run(base + ["--configs", "none", "--lr", "0.2", "--merge", str(path)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "its lr is 0.1" in other.stderr
    bad = subprocess.run(base + ["--configs", "schedule+fast"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown config 'schedule+fast'" in bad.stderr
    bad = subprocess.run(base + ["--fractions", "2,0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--fractions must be > 0" in bad.stderr
    # PruneTrain inside a budget (a given 10 s full run, so the 5 s budget spans many 4-step epochs)
    proc = subprocess.run(base + ["--configs", "schedule+prunetrain", "--full-seconds", "10", "--full-accuracy", "0.5",
                                  "--fractions", "2",
                                  "--tag", "prune", "--prune-flags", "--interval 1 --threshold 1e9 --bn-scale",
                                  "--runs-dir", str(tmp_path / "prune")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pruned = json.loads((tmp_path / "budget_resnet20_prune_cpu.json").read_text())["runs"][0]
    assert pruned["reconfigurations"] >= 1 and pruned["end_s"] <= pruned["budget_s"]
    assert pruned["train_flops_per_sample"][1] < pruned["train_flops_per_sample"][0]


@pytest.mark.parametrize("option, value, expected", [
    ("--lpr", "-0.5", "must be in (0, 1)"), ("--lpr", "1.0", "must be in (0, 1)"),
    ("--batch-size", "0", "must be >= 1"), ("--epochs", "2.5", "must be an integer"),
    ("--lr", "0", "must be > 0"), ("--width", "0", "positive"), ("--width", "wide", "'auto'"),
    ("--device", "gpu", "torch device"), ("--select-fraction", "0", "(0, 1]"),
    ("--warmup", "1", "[0, 1)"), ("--augment-until", "1.5", "[0, 1]"), ("--threshold", "-1", ">= 0"),
    ("--interval", "0", ">= 1"), ("--log-every", "-1", ">= 0"), ("--schedule", "linear", "invalid choice"),
    ("--interval-unit", "hour", "invalid choice"), ("--lasso-epochs", "-1", ">= 0"),
    ("--lasso-steps", "-5", ">= 0"), ("--min-keep", "1.5", "[0, 1]"), ("--min-keep", "-0.1", "[0, 1]"),
    ("--eval-share", "0", "(0, 1]"), ("--eval-share", "1.5", "(0, 1]"), ("--threads", "0", ">= 1"),
])
def test_bad_options_are_refused_when_parsed_in_one_line(option, value, expected, capsys, monkeypatch):
    """Refused by the parser, before any data is loaded or model built: one line naming the
    option, no traceback."""
    import pyoptim.cli.run as run
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "synthetic", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyoptim train: error: argument {option}"), err
    assert expected in err[0] and "Traceback" not in err[0]


def test_contradicting_options_are_refused_before_the_data_is_loaded(monkeypatch):
    import pyoptim.cli.run as run
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit, match="--budget"):
        cli.main(["train", "--data", "synthetic", "--width", "auto"])
    with pytest.raises(SystemExit, match="--eval-share is a share of the budget"):
        cli.main(["train", "--data", "synthetic", "--eval-share", "0.2"])
    with pytest.raises(SystemExit, match="unknown knob"):
        cli.main(["train", "--data", "synthetic", "--budget", "5s", "--knobs", "turbo"])
    with pytest.raises(SystemExit, match="--lasso-epochs 5 is more than --epochs 4"):
        cli.main(["train", "--data", "synthetic", "--epochs", "4", "--lasso-epochs", "5"])
    with pytest.raises(SystemExit, match="not both"):
        cli.main(["train", "--data", "synthetic", "--lasso-epochs", "1", "--lasso-steps", "100"])


def test_compare_to_a_dense_run_of_the_same_recipe(tmp_path, capsys, monkeypatch):
    """--compare-to: the summary prints the dense run's figures and the savings beside this run's,
    the report keeps them and the picture draws them; a different recipe, a PruneTrain report or a
    file that is no report is refused in one line before any data is loaded."""
    base = ["train", "--model", "resnet20", "--data", "synthetic", "--synthetic-samples", "64",
            "--train-subset", "64", "--epochs", "2", "--batch-size", "32", "--width", "0.25", "--log-every", "0"]
    assert cli.main(base + ["--method", "dense", "--out", str(tmp_path / "dense")]) == 0
    dense_path = str(tmp_path / "dense" / "report.json")
    capsys.readouterr()
    assert cli.main(base + ["--method", "prunetrain", "--threshold", "1e9", "--interval", "1", "--out", str(tmp_path / "pt"),
                            "--compare-to", dense_path]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "pt" / "report.json").read_text())
    d = rep["dense_reference"]
    dense = json.loads(open(dense_path).read())
    assert d["train_flops_saving"] == pytest.approx(1 - rep["train_flops_total"] / dense["train_flops_total"])
    assert d["train_flops_saving"] > 0 and rep["config"]["compare_to"] == dense_path
    assert d["accuracy_delta"] == pytest.approx(rep["final"]["test_accuracy"] - dense["final"]["test_accuracy"])
    assert "dense, same recipe: test accuracy" in out and f"{-100 * d['train_flops_saving']:+.1f}%" in out
    import pyoptim.cli.run as run
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit, match="--epochs is 2, this run's is 3"):
        cli.main(base[:-6] + ["--epochs", "3", "--batch-size", "32", "--width", "0.25", "--compare-to", dense_path])
    for bad, why in ((str(tmp_path / "pt" / "report.json"), "not a dense run"),
                     (str(tmp_path / "nothing.json"), "cannot read the report")):
        with pytest.raises(SystemExit):
            cli.main(base + ["--compare-to", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--compare-to" in err[0] and why in err[0], err


def test_probe_lasso_threshold_smoke(tmp_path):
    """bench/probe_lasso_threshold.py on synthetic data: a threshold above every group norm leaves
    the --min-keep floor, one of 0 keeps everything (a smoke test)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1")
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "probe_lasso_threshold.py"), "--data",
                           "synthetic", "--steps", "2", "--thresholds", "0,1000", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["step"] == 2 and row["flops_kept"]["0.0"] == 1.0
    assert 0.25 < row["flops_kept"]["1000.0"] < 1.0      # the min-keep 0.5 floor with rounding to 16
