"""tools/gpu_first_run.sh, dry-run on a CPU machine: it parses, finds what it runs (tools/gpu_smoke.py
parses its arguments), and lists every step with a timeout inside its total budget, the steps that
say the most first (the GPU session has minutes, not a retry)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_first_run.sh")


def dry_run(tmp_path, **extra):
    env = dict(os.environ, GPU_FIRST_RUN_DRY="1", OUT=str(tmp_path), GPU_RUN_BUDGET_S="470", PY=sys.executable)
    env.update(extra)
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)


def test_gpu_first_run_dry_run_lists_every_step_within_the_budget(tmp_path):
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    lines = {ln.split(":")[0]: ln for ln in summary if "(dry)" in ln}
    steps = list(lines)
    assert steps[:3] == ["build", "backends", "smoke"] and "gpu_tests" in steps and "memcheck" in steps
    assert {"bench_group_lasso", "bench_channel_union"} <= set(steps)
    assert sum(s.startswith("bad_input_") for s in steps) == 4
    limits = {s: int(re.search(r"timeout (\d+)", ln).group(1)) for s, ln in lines.items()}
    assert all(0 < t <= 470 for t in limits.values())
    assert "TORCH_CUDA_ARCH_LIST=9.0" in summary[0] and "TRITON_INTERPRET=0" in " ".join(summary)
    assert os.listdir(tmp_path) == ["summary.txt"]     # a dry run leaves only its summary
    # the smoke, full size, one process per backend, its JSON into $OUT
    assert re.search(r"tools/gpu_smoke\.py --size full --device cuda --isolate --child-timeout \d+ --out "
                     + re.escape(str(tmp_path)), lines["smoke"])
    # the small smoke under the sanitizers, racecheck of the C++ and of the Triton kernels apart
    for name, tool, backends in (("memcheck_smoke", "memcheck", "cpp,triton"), ("racecheck_cpp", "racecheck", "cpp"),
                                 ("racecheck_triton", "racecheck", "triton")):
        ln = lines[name]
        assert "compute-sanitizer --error-exitcode 3" in ln and f"--tool {tool}" in ln, ln
        assert "gpu_smoke.py --size small --device cuda" in ln and f"--backends {backends} " in ln, ln
        assert str(tmp_path) not in ln            # its JSON goes to the logs: $OUT brings back 8 files
    assert "kns=pyoptim" in lines["racecheck_cpp"] and "kns=^_(gl|cc|bn" in lines["racecheck_triton"]
    for name in ("memcheck_smoke", "memcheck"):   # no caching allocator: an overrun hits unmapped memory
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in lines[name]
    # correctness first, the benchmarks last: they run with what time is left
    order = [steps.index(s) for s in ("smoke", "gpu_tests", "memcheck_smoke", "racecheck_cpp", "racecheck_triton",
                                      "memcheck", "bench_group_lasso", "bench_channel_union", "bench_energy")]
    assert order == sorted(order)
    # every step up to the gpu tests gets its whole cap even if each before it runs to its own; the
    # later ones share what the earlier leave (step() cuts each cap to the time left)
    upto_tests = sum(t for s, t in limits.items() if steps.index(s) <= steps.index("gpu_tests"))
    assert upto_tests <= 470, upto_tests


def test_gpu_first_run_dry_run_fails_when_the_smoke_does_not_parse(tmp_path):
    proc = dry_run(tmp_path, PY="false")
    assert proc.returncode == 1 and "gpu_smoke.py --help failed" in proc.stderr
