"""The `pyoptim` command: a tiny PruneTrain run on the synthetic set writes report.json and
report.png, prunes, and `pyoptim report` redraws it."""
import json
import os

import pytest
import torch

from pyoptim import cli


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
