"""tools/gpu_smoke.py, dry-run on CPU (issue 23): the GPU session's second command must work the
first time. End to end at ``--device cpu --size small`` (cpu-cpp, cpu-triton under the interpreter,
cpu-reference; the cuda-only cases reported skipped), its op table against csrc/ops.cpp, the
side-stream and sync-free harness emulated on CPU, and checks that do fail on a wrong result."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "tools", "gpu_smoke.py")
_spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
smoke._import("cpu")

NUMERIC = ("gl_tilings", "bn_mean1e3", "compact_wide")


def test_smoke_cpu_small_end_to_end(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYOPTIM_QUIET="1")
    # --isolate, as tools/gpu_first_run.sh runs it: one process per backend, one merged JSON
    proc = subprocess.run([sys.executable, SMOKE, "--device", "cpu", "--size", "small", "--isolate",
                           "--out", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_smoke_cpu_small.json").read_text())
    assert res["ok"] and res["failed"] == 0 and res["device"] == "cpu" and res["size"] == "small"
    recs = res["records"]
    assert not [r for r in recs if r["status"] == "error"]
    for name in ("cpu-cpp", "cpu-triton", "cpu-reference"):
        for case in NUMERIC:
            ran = [r for r in recs if r["backend"] == name and r["case"] == case]
            assert ran and all(r["status"] == "pass" for r in ran), (name, case)
        for case in ("side_stream", "sync_free"):
            skipped = [r for r in recs if r["backend"] == name and r["case"] == case]
            assert [r["status"] for r in skipped] == ["skip"] and "cuda only" in skipped[0]["note"]
    # the structure the small size must keep: 3 weights, 2 layouts, 3 wide tensors per backend
    per_backend = [r for r in recs if r["backend"] == "cpu-cpp"]
    assert sum(r["op"] == "group_lasso_norms_backward" for r in per_backend) == 3
    assert sum(r["op"] == "batch_norm_add_relu.invstd" for r in per_backend) == 2
    assert sum(r["op"].startswith("channel_compact[") for r in per_backend) == 3
    assert res["passed"] == sum(r["status"] == "pass" for r in recs) and res["skipped"] == 6
    # one printed line per check, and the summary line last
    assert proc.stdout.count(" ok") >= res["passed"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is True


def test_op_table_has_every_op_of_the_schema():
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', open(os.path.join(ROOT, "csrc", "ops.cpp")).read())
    names = [s["name"] for s in smoke.op_table("cpu", "small")]
    assert len(schemas) == 12 and sorted(names) == sorted(schemas)
    from importlib import util
    spec = util.spec_from_file_location("blind", os.path.join(ROOT, "tests", "test_gpu_blind_spots.py"))
    blind = util.module_from_spec(spec)
    spec.loader.exec_module(blind)
    assert sorted(blind.OPS) == sorted(schemas)


def test_side_stream_and_sync_free_harness_emulated(backend):
    """The cuda-only cases' code on CPU tensors, without streams or the sync debug mode: every op
    builds, runs, backpropagates where it has autograd, and equals itself."""
    device, name = backend
    if device == "cuda":
        pytest.skip("the real thing runs in tests/test_gpu_blind_spots.py")
    rec = smoke.Recorder(quiet=True)
    smoke.case_side_stream(rec, "cpu", f"cpu-{name}", "small", emulate=True)
    smoke.case_sync_free(rec, "cpu", f"cpu-{name}", "small", emulate=True)
    bad = [r for r in rec.records if not r["ok"]]
    assert not bad, bad
    assert sum(r["case"] == "side_stream" for r in rec.records) == 12
    assert sum(r["op"].endswith(".backward") for r in rec.records) == 5


def test_checks_fail_on_a_wrong_result(monkeypatch):
    """A reference off by 1e-4 relative (float32 norms hold 2e-6), or a variance from
    E[x^2] - E[x]^2 in float32, is reported as failing, and main() exits 1."""
    ref_norms, ref_bn = smoke.ref_gl.group_lasso_norms, smoke.ref_cu.batch_norm_add_relu

    def off_norms(w, groups=1):
        o, i = ref_norms(w, groups)
        return o * (1 + 1e-4), i

    def naive_bn(x, weight, bias, residual, eps, relu=True):
        out, mean, invstd = ref_bn(x, weight, bias, residual, eps, relu)
        x32 = x.float()
        var = (x32 * x32).mean((0, 2, 3)) - x32.mean((0, 2, 3)) ** 2
        return out, mean, torch.rsqrt(var.clamp_min(0) + eps).double()

    monkeypatch.setattr(smoke.ref_gl, "group_lasso_norms", off_norms)
    monkeypatch.setattr(smoke.ref_cu, "batch_norm_add_relu", naive_bn)
    # the C++ kernels: the reference backend would call the patched functions itself
    res = smoke.run("cpu", "small", ["gl_tilings", "bn_mean1e3"], ["cpp"], quiet=True)
    failed = {r["op"] for r in res["records"] if not r["ok"]}
    assert {"group_lasso_norms.out", "batch_norm_add_relu.invstd"} <= failed
    assert "group_lasso_norms.in" not in failed and "batch_norm_add_relu.mean" not in failed
    assert smoke.main(["--device", "cpu", "--size", "small", "--cases", "gl_tilings",
                       "--backends", "cpp", "--quiet"]) == 1


def test_isolated_backend_that_does_not_finish_is_an_error(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYOPTIM_QUIET="1")
    proc = subprocess.run([sys.executable, SMOKE, "--device", "cpu", "--size", "small", "--isolate", "--quiet",
                           "--backends", "reference,cpp", "--child-timeout", "0.01", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "gpu_smoke_cpu_small.json").read_text())
    assert [r["backend"] for r in res["records"]] == ["cpu-reference", "cpu-cpp"]
    assert all(r["status"] == "error" and "child-timeout" in r["note"] for r in res["records"])


def test_bad_arguments():
    proc = subprocess.run([sys.executable, SMOKE, "--cases", "gl_tilings,nope"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--cases" in proc.stderr and "nope" in proc.stderr
