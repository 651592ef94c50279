"""The ahead-of-time Triton check (pyoptim.triton_kernels.aot_check): launches recorded under the
interpreter compile for sm_90 without a GPU, and a kernel the interpreter runs but the compiler
refuses (a runtime `if` giving one name two shapes) is reported, naming the kernel."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._triton import has_triton_package

pytestmark = pytest.mark.skipif(not has_triton_package() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="records launches through the Triton interpreter")

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def good_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)

    @triton.jit
    def two_shapes_kernel(x_ptr, y_ptr, n, split, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if pid < split:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            acc += tl.load(x_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < n, other=0.0)
            tl.store(y_ptr + pid, tl.sum(acc, axis=0))
        else:
            acc = tl.zeros([2, BLOCK], dtype=tl.float32)
            tl.store(y_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
''')


def test_recorded_launches_compile_and_a_compiler_only_error_is_reported(tmp_path):
    from pyoptim.triton_kernels import aot_check
    (tmp_path / "aot_kernels_under_test.py").write_text(KERNELS)
    sys.path.insert(0, str(tmp_path))
    try:
        import aot_kernels_under_test as k
        aot_check.record_launches()
        x = torch.randn(37, dtype=torch.float64)
        y = torch.empty_like(x)
        k.good_kernel[(3,)](x, y, x.numel(), BLOCK=16)
        torch.testing.assert_close(y, 2 * x)          # the interpreter ran it
        out = torch.zeros(2)
        k.two_shapes_kernel[(2,)](x.float(), out, 37, 1, BLOCK=64)   # fine in the interpreter
        torch.testing.assert_close(out[0], x.float().sum())
    finally:
        sys.path.remove(str(tmp_path))
    mine = [r for r in aot_check.recorded() if r["module"] == "aot_kernels_under_test"]
    assert {r["kernel"] for r in mine} == {"good_kernel", "two_shapes_kernel"}
    good = next(r for r in mine if r["kernel"] == "good_kernel")
    assert good["args"]["x_ptr"] == ["ptr", "fp64"] and good["args"]["n"] == ["scalar", "i32"]
    assert good["args"]["BLOCK"] == ["const", 16]
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(mine))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "pyoptim.triton_kernels.aot_check", str(path)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [ln for ln in lines if "FAILED" in ln]
    assert len(failed) == 1 and "two_shapes_kernel" in failed[0] and "good_kernel" not in failed[0], lines
    assert lines[-1].startswith("triton aot: 1 of 2 distinct launches of 2 kernels compiled for sm_90"), lines
    # the suite's own record (make test) keeps only this package's kernels
    saved = tmp_path / "saved.json"
    aot_check.save_launches(str(saved))
    assert all(r["module"].startswith("pyoptim.") for r in json.loads(saved.read_text()))
