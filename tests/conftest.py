"""Test set-up. TRITON_INTERPRET must be set before any kernel module (or triton) is imported, so
that every Triton kernel runs through the interpreter on CPU tensors on machines without a GPU.
On a GPU machine, run with TRITON_INTERPRET=0 to test the compiled Triton kernels on the device."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYOPTIM_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._triton import has_triton_package  # noqa: E402

import pyoptim  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _backend_params():
    params = []
    for device in ("cpu", "cuda"):
        for name in ("cpp", "triton", "reference"):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param((device, name), id=f"{device}-{name}", marks=marks))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """(device, backend name), with the backend forced for every torch.ops.pyoptim op."""
    device, name = request.param
    if name == "triton":
        # never a silent skip on the CPU machines: CI installs triton, so its absence is a failure
        assert has_triton_package(), "the triton package is required for the Triton tests"
        if device == "cpu" and not INTERPRET:
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    with pyoptim.use_backend(name):
        yield device, name


def make_rng(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
