"""Packaging, backend discovery and backend forcing."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import pyoptim


def test_extension_is_loaded_from_the_installed_package():
    b = pyoptim.backends()
    assert b["cpp_cpu"], b["extension_error"]
    assert b["reference"] is True
    assert hasattr(torch.ops.pyoptim, "group_lasso_grad_")
    # CUDA is built from torch.version.cuda and the toolkit, so a CPU torch means no CUDA kernels
    if torch.version.cuda is None:
        assert b["cuda"] is False


def test_triton_kernels_live_inside_the_package():
    spec = importlib.util.find_spec("pyoptim.triton_kernels")
    assert spec is not None
    pkg_dir = os.path.dirname(pyoptim.__file__)
    assert os.path.dirname(os.path.dirname(spec.origin)) == pkg_dir
    # no top-level module of ours shadows Triton's own `triton_kernels` name
    top = importlib.util.find_spec("triton_kernels")
    assert top is None or not os.path.dirname(top.origin or "").startswith(os.path.dirname(pkg_dir) + os.sep + "triton_kernels")


def test_set_backend_validates_and_restores():
    with pytest.raises(ValueError, match="must be one of"):
        pyoptim.set_backend("fastest")
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    want = torch.ops.pyoptim.group_lasso_norms(w, 1)
    for name in ("reference", "triton", "cpp", "auto"):
        with pyoptim.use_backend(name):
            assert pyoptim.get_backend() == name
            got = torch.ops.pyoptim.group_lasso_norms(w, 1)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert pyoptim.get_backend() == "auto"


def test_forced_backend_really_changes_the_kernel(monkeypatch):
    calls = []
    from pyoptim.reference import group_lasso as ref
    original = ref.group_lasso_norms
    monkeypatch.setattr(ref, "group_lasso_norms", lambda *a: calls.append(1) or original(*a))
    w = torch.randn(4, 3, dtype=torch.float64)
    torch.ops.pyoptim.group_lasso_norms(w, 1)
    assert calls == []          # auto on CPU: the C++ kernel
    with pyoptim.use_backend("reference"):
        torch.ops.pyoptim.group_lasso_norms(w, 1)
    assert calls == [1]


def run_python(code, **env):
    e = dict(os.environ, **env)
    # run outside the source tree, so the installed package is imported
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(pyoptim.__file__)) + "/..")


def test_environment_variable_forces_backend_and_import_announces_once():
    r = run_python("import pyoptim, pyoptim.ops; import importlib; print(pyoptim.get_backend())",
                   PYOPTIM_BACKEND="reference", PYOPTIM_QUIET="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    assert r.stderr.count("pyoptim backends:") == 1
    assert "C++ CPU yes" in r.stderr


def test_bad_environment_backend_warns_and_falls_back():
    r = run_python("import pyoptim; print(pyoptim.get_backend())", PYOPTIM_BACKEND="bogus")
    assert r.returncode == 0 and r.stdout.strip() == "auto"
    assert "PYOPTIM_BACKEND='bogus' ignored" in r.stderr
