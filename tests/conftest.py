"""Test set-up. TRITON_INTERPRET must be set before any kernel module (or triton) is imported, so
that every Triton kernel runs through the interpreter on CPU tensors on machines without a GPU.
It defaults to 1 only where no CUDA device is present: on a GPU machine the `cuda-triton` cases
run the compiled kernels unless TRITON_INTERPRET=1 is set explicitly. With CUDA present TF32 is
turned off: the fp32 tests compare against float64 at 1e-4, which TF32 convolutions would miss."""
import os

import torch  # noqa: E402  (imports no triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("PYOPTIM_QUIET", "1")

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from torch.utils._triton import has_triton_package  # noqa: E402

import pyoptim  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: more threads only add synchronisation (and,
    on a loaded machine, OpenMP spin-waits that make a step 100x slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# PYOPTIM_TRITON_LAUNCHES=path: record every distinct Triton launch the run makes through the
# interpreter, written to path at the end, for `python -m pyoptim.triton_kernels.aot_check path`
# (compiles each for sm_90 without a GPU; `make test` does both)
_LAUNCHES = os.environ.get("PYOPTIM_TRITON_LAUNCHES")
if _LAUNCHES and INTERPRET and has_triton_package():
    from pyoptim.triton_kernels import aot_check
    aot_check.record_launches()
else:
    _LAUNCHES = None


def pytest_sessionfinish(session, exitstatus):
    if _LAUNCHES:
        aot_check.save_launches(_LAUNCHES)


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


def _run_ddp_script(script_text: str, tmp_path, args=(), timeout: float = 240):
    """Writes ``script_text`` to ``tmp_path`` and runs it as two independent processes, as
    ``torchrun`` would: ``RANK``, ``WORLD_SIZE`` in the environment, no fork (a fork of a process
    that has imported torch can inherit a lock held by one of its threads and hang). Each process
    has one intra-op thread and its own session; both are killed on timeout. Fails the test with
    the scripts' output when one fails. Returns the per-rank results the workers saved as
    ``rank{r}.pt`` in ``tmp_path``."""
    script = tmp_path / "ddp_script.py"
    script.write_text(script_text)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYOPTIM_QUIET="1", OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    deadline = time.monotonic() + timeout
    outs, timed_out = [], False
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            outs.append(proc.communicate()[0])
    for proc in procs[len(outs):]:
        outs.append(proc.communicate()[0])
    text = "".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-3000:]}\n"
                   for r, (p, o) in enumerate(zip(procs, outs)))
    if timed_out:
        pytest.fail("the DDP workers timed out:\n" + text)
    assert all(p.returncode == 0 for p in procs), text
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture
def run_ddp_script():
    """``run_ddp_script(script_text, tmp_path, args=(), timeout=240) -> [rank0, rank1]``: runs a
    script as two gloo worker processes (see :func:`_run_ddp_script`)."""
    return _run_ddp_script
