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


def test_make_demo_arguments_parse():
    """The Makefile's demo command line is a valid `pyoptim train` command on Fashion-MNIST."""
    import re
    import shlex
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "Makefile")).read().replace("\\\n", " ")
    demo = re.search(r"^DEMO_ARGS \?=(.*)$", text, re.M).group(1)
    args = cli.build_parser().parse_args(["train"] + shlex.split(demo))
    assert args.method == "prunetrain" and args.data == "fashion-mnist" and args.epochs >= 2


def test_bench_prunetrain_smoke(tmp_path):
    """bench/bench_prunetrain.py end to end on a tiny synthetic set: both runs, the JSON record
    with the ratios and goals, the picture (a smoke test, not a timing)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_prunetrain.py"), "--model", "resnet20",
                           "--data", "synthetic", "--train-subset", "128", "--epochs", "2", "--batch-size", "32",
                           "--threshold", "1e9", "--quiet", "--out-dir", str(tmp_path), "--runs-dir",
                           str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "prunetrain_cpu.json").read_text())
    assert {"device", "torch", "triton", "commit", "dense", "prunetrain", "ratios", "goals_met"} <= set(res)
    assert res["ratios"]["train_flops_saving"] > 0 and res["prunetrain"]["events"]
    assert len(res["dense"]["test_accuracy_per_epoch"]) == 2
    assert (tmp_path / "prunetrain_cpu.png").stat().st_size > 10_000


def test_bench_budget_smoke(tmp_path):
    """bench/bench_budget.py end to end on a tiny synthetic set: the full run, budgeted runs of a
    knob set joined by '+', the goals, the tagged JSON record and the picture (not a timing)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(root, "bench", "bench_budget.py"), "--model", "resnet20",
            "--data", "synthetic", "--synthetic-samples", "256", "--train-subset", "128", "--full-epochs", "1",
            "--batch-size", "32", "--fractions", "2", "--quiet", "--out-dir", str(tmp_path)]
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


@pytest.mark.parametrize("option, value, expected", [
    ("--lpr", "-0.5", "must be in (0, 1)"), ("--lpr", "1.0", "must be in (0, 1)"),
    ("--batch-size", "0", "must be >= 1"), ("--epochs", "2.5", "must be an integer"),
    ("--lr", "0", "must be > 0"), ("--width", "0", "positive"), ("--width", "wide", "'auto'"),
    ("--device", "gpu", "torch device"), ("--select-fraction", "0", "(0, 1]"),
    ("--warmup", "1", "[0, 1)"), ("--augment-until", "1.5", "[0, 1]"), ("--threshold", "-1", ">= 0"),
    ("--interval", "0", ">= 1"), ("--log-every", "-1", ">= 0"),
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
    with pytest.raises(SystemExit, match="unknown knob"):
        cli.main(["train", "--data", "synthetic", "--budget", "5s", "--knobs", "turbo"])
