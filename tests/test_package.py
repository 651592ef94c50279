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
    for name in ("triton", "reference", "auto"):     # leaving a forced backend releases its kernels
        with pyoptim.use_backend(name):
            pass
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


def test_without_the_extension_the_pure_torch_path_still_works():
    """The source tree has no compiled _C: importing it there exercises the defensive load."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyoptim\n"
        "assert not pyoptim.backends()['cpp_cpu'], pyoptim.backends()\n"
        "assert any('compiled extension not loaded' in str(w.message) for w in caught)\n"
        "w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)\n"
        "p = pyoptim.group_lasso_penalty([w], 0.5)\n"
        "p.backward()\n"
        "g = torch.zeros_like(w)\n"
        "q = pyoptim.ops.group_lasso_grad_([w.detach()], [g], 0.5)\n"
        "torch.testing.assert_close(q, p.detach())\n"
        "torch.testing.assert_close(g, w.grad)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=repo, env=dict(os.environ, PYTHONPATH=repo, PYOPTIM_QUIET="1"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_ops_compose_with_torch_compile():
    """The fake kernels and autograd registrations let the ops trace with fullgraph=True."""
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)

    def penalty(a, b):
        return pyoptim.group_lasso_penalty([a, b], 0.3, [1, 4])

    compiled = torch.compile(penalty, backend="aot_eager", fullgraph=True)
    got = compiled(w, wd)
    got.backward()
    gw, gwd = w.grad.clone(), wd.grad.clone()
    w.grad = wd.grad = None
    want = penalty(w, wd)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gwd, wd.grad)

    def step(ws, gs):
        return torch.ops.pyoptim.group_lasso_grad_(ws, gs, 0.3, [1, 4])

    ws = [w.detach(), wd.detach()]
    gs1 = [torch.zeros_like(x) for x in ws]
    gs2 = [torch.zeros_like(x) for x in ws]
    p1 = torch.compile(step, backend="aot_eager", fullgraph=True)(ws, gs1)
    p2 = step(ws, gs2)
    torch.testing.assert_close(p1, p2)
    for a, b in zip(gs1, gs2):
        torch.testing.assert_close(a, b)
