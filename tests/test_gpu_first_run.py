"""tools/gpu_first_run.sh, dry-run on a CPU machine: it parses, finds what it runs, and lists every
step with a timeout inside its total budget (the GPU session has minutes, not a retry)."""
import os
import re
import subprocess


def test_gpu_first_run_dry_run_lists_every_step_within_the_budget(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GPU_FIRST_RUN_DRY="1", OUT=str(tmp_path), GPU_RUN_BUDGET_S="470")
    proc = subprocess.run(["bash", os.path.join(root, "tools", "gpu_first_run.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = [ln.split(":")[0] for ln in summary if "(dry)" in ln]
    assert steps[:2] == ["build", "backends"] and "gpu_tests" in steps and "memcheck" in steps
    assert {"bench_group_lasso", "bench_channel_union"} <= set(steps)
    assert sum(s.startswith("bad_input_") for s in steps) == 4
    limits = [int(re.search(r"timeout (\d+)", ln).group(1)) for ln in summary if "(dry)" in ln]
    assert all(0 < t <= 470 for t in limits)
    assert "TORCH_CUDA_ARCH_LIST=9.0" in summary[0] and "TRITON_INTERPRET=0" in " ".join(summary)
    assert os.listdir(tmp_path) == ["summary.txt"]     # a dry run leaves only its summary
