"""Loading the compiled extension, and choosing which kernels serve ``torch.ops.pyoptim.*``.

Kernels per op and device, in the order ``auto`` picks them:

* CPU tensors:  the C++ kernel (``csrc/cpu``) -> the pure-torch reference.
* CUDA tensors: the CUDA kernel (``csrc/cuda``) -> Triton (``pyoptim.triton_kernels``) -> reference.

``set_backend("cpp" | "triton" | "reference")`` (or ``PYOPTIM_BACKEND=...`` before import) forces
one for every op on both devices, through the dispatcher, so ``torch.ops.pyoptim.*``,
``torch.compile`` and ``opcheck`` all see the forced kernel.

How: the schemas and the C++/CUDA kernels are registered by ``csrc`` (``TORCH_LIBRARY``); each op
family records its Python kernels with :func:`register_python_kernels`. ``set_backend`` registers
the kernels the backend needs over the compiled ones in a fresh ``torch.library.Library`` and
drops the previous one: a Library's registrations live as long as the object (its finalizer
removes them), so no private ``Library._destroy`` is needed. Under ``auto`` with CUDA kernels
built nothing is registered over them, and a call costs what the compiled kernel costs. (A
kept Python kernel that dispatches on the selection on every call, over the compiled kernel from
``torch.library.get_kernel``, was tried and dropped: it added about 5 us to every call of every
op, 17 -> 22-24 us on a small ``group_lasso_norms``.)

Why not ``torch.library.triton_op`` / ``wrap_triton`` for the Triton kernels (checked with torch
2.13, triton 3.8, ``TRITON_INTERPRET=1``):

* ``triton_op`` always defines a new operator (``custom_op`` with a schema inferred from the
  Python signature; its ``schema=`` argument is not used), so it cannot be the kernel of an op
  whose schema ``csrc/ops.cpp`` declares: ``triton_op("pyoptim::group_lasso_norms", ...)`` fails
  with "Tried to register an operator (pyoptim::group_lasso_norms(Tensor w, SymInt groups=1) ->
  (Tensor, Tensor)) with the same name and overload name multiple times".
* A separate op per launcher (``pyoptim::group_lasso_norms_triton``, ...) fails ``opcheck``
  under the interpreter, the only way the Triton kernels run in CI: ``triton_op`` registers the
  launcher itself as the op's fake kernel and as its functionalization decomposition, and
  ``wrap_triton`` hands an ``InterpretedFunction`` back unwrapped, so the interpreter gets
  FakeTensors. ``test_faketensor``: "Attempted to set the storage of a tensor on device "meta" to
  a storage on different device "cpu". This is no longer allowed; the devices must match.";
  ``test_aot_dispatch_dynamic`` (also with a hand-written ``register_fake``): "Attempted to access
  the data pointer on an invalid python storage." (``triton/runtime/interpreter.py`` ``_to_cpu``,
  called from ``functional_decomp`` in ``torch/_library/triton.py``). ``test_schema``,
  ``test_autograd_registration``, eager calls and the mutable list schema
  (``Tensor(a1!)[] grads``) were fine.
* Even on a GPU such ops would add eleven ``torch.ops.pyoptim`` ops that ``csrc/ops.cpp`` does
  not declare, and gain nothing: the public ops are opaque to ``torch.compile`` (it uses their
  fake kernels), so it never traces into a Triton kernel behind them; ``channel_compact``'s
  launcher also reads ``data_ptr()`` (word alignment), which a fake tensor has not.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

_C = None
_C_ERROR: Optional[str] = None
try:  # the extension links against torch's libraries: torch is imported above, first
    from . import _C as _C  # type: ignore[no-redef]
except Exception as exc:  # a broken build must not take the pure-torch path down with it
    _C = None
    _here = os.path.dirname(os.path.abspath(__file__))
    if not any(f.startswith("_C") and f.endswith((".so", ".pyd")) for f in os.listdir(_here)):
        _C_ERROR = (f"pyoptim._C is not built in {_here} (install the package with "
                    f"`pip install --no-build-isolation .`, or run `make test`)")
    else:
        _C_ERROR = f"{type(exc).__name__}: {exc}"


def _triton_package() -> bool:
    try:
        from torch.utils._triton import has_triton_package
        return bool(has_triton_package())
    except Exception:
        return False


HAS_CPP = _C is not None
HAS_CUDA_KERNELS = bool(HAS_CPP and _C.built_with_cuda())
HAS_TRITON = _triton_package()


def triton_interpreted() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# name -> {"triton": fn, "reference": fn}, filled by each op family (pyoptim/ops/<family>.py)
_PY_KERNELS: Dict[str, Dict[str, Callable]] = {}
_backend = "auto"
# the Library holding the Python kernels the selected backend needs; replacing it drops the
# previous registrations
_override_lib: Optional[torch.library.Library] = None


def _cpp_cuda_missing(op_name: str) -> Callable:
    def raiser(*args, **kwargs):
        raise RuntimeError(
            f"pyoptim::{op_name}: backend 'cpp' has no CUDA kernel: the extension was built "
            f"without CUDA (torch.version.cuda={torch.version.cuda!r}); use 'auto' or 'triton'")
    return raiser


def _triton_or_reference(kernels: Dict[str, Callable]) -> Callable:
    return kernels["triton"] if (HAS_TRITON and kernels["triton"] is not None) else kernels["reference"]


def register_python_kernels(op_name: str, triton: Optional[Callable], reference: Callable) -> None:
    """Records the Triton and reference kernels of ``pyoptim::op_name`` (registered in the
    dispatcher by :func:`set_backend` when a backend needs them)."""
    _PY_KERNELS[op_name] = {"triton": triton, "reference": reference}


def _install(backend: str) -> None:
    """Registers the Python kernels that ``backend`` needs over the compiled ones, in a new Library
    that replaces (and so releases) the previous one."""
    global _override_lib
    _override_lib = None         # its finalizer removes its registrations
    if not HAS_CPP:
        return  # no schemas: pyoptim.ops calls the Python kernels directly
    lib = torch.library.Library("pyoptim", "IMPL")
    with warnings.catch_warnings():
        # torch warns when a Python kernel overrides a C++ one: that is the point here
        warnings.simplefilter("ignore")
        for name, kernels in _PY_KERNELS.items():
            cpu = cuda = None
            if backend == "auto":
                cuda = None if HAS_CUDA_KERNELS else _triton_or_reference(kernels)
            elif backend == "cpp":
                cuda = None if HAS_CUDA_KERNELS else _cpp_cuda_missing(name)
            else:
                cpu = cuda = kernels[backend]
            if cpu is not None:
                lib.impl(name, cpu, "CPU")
            if cuda is not None:
                lib.impl(name, cuda, "CUDA")
    _override_lib = lib


def set_backend(name: str) -> None:
    """Forces the kernels behind every ``torch.ops.pyoptim`` op: ``auto``, ``cpp``, ``triton``,
    ``reference``. ``cpp`` means the compiled C++/CUDA kernels."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"pyoptim.set_backend: name must be one of {BACKENDS}, got {name!r}")
    if name == "cpp" and not HAS_CPP:
        raise RuntimeError(f"pyoptim.set_backend('cpp'): the compiled extension is not loaded ({_C_ERROR})")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("pyoptim.set_backend('triton'): the triton package is not installed")
    if name in ("triton", "reference"):
        for op_name, kernels in _PY_KERNELS.items():
            if kernels[name] is None:
                raise RuntimeError(f"pyoptim::{op_name} has no {name} kernel")
    _install(name)
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with pyoptim.use_backend("triton"): ...`` forces a backend inside the block."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def python_kernel(op_name: str, device: torch.device) -> Callable:
    """The kernel a call resolves to when the extension is not loaded (no dispatcher)."""
    kernels = _PY_KERNELS[op_name]
    if _backend in ("triton", "reference"):
        return kernels[_backend]
    if device.type == "cuda":
        return _triton_or_reference(kernels)
    return kernels["reference"]


def backends() -> Dict[str, object]:
    """Which kernels are live, as data."""
    return {
        "cpp_cpu": HAS_CPP,
        "cuda": HAS_CUDA_KERNELS,
        "cuda_version": getattr(_C, "cuda_version", None) if HAS_CPP else None,
        "triton": HAS_TRITON,
        "triton_interpreter": HAS_TRITON and triton_interpreted(),
        "reference": True,
        "selected": _backend,
        "extension_error": _C_ERROR,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.is_available(),
    }


def describe() -> str:
    b = backends()
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    cpp = yes(b["cpp_cpu"]) if b["cpp_cpu"] else f"no ({b['extension_error']})"
    cuda = f"yes (CUDA {b['cuda_version']})" if b["cuda"] else "no (extension built without CUDA)"
    tri = yes(b["triton"]) + (" (interpreter on CPU)" if b["triton_interpreter"] else "")
    return f"pyoptim backends: C++ CPU {cpp}; CUDA {cuda}; Triton {tri}; selected '{b['selected']}'"


_announced = False


def announce() -> None:
    """Says once per process which backends are live (``PYOPTIM_QUIET=1`` silences it)."""
    global _announced
    if _announced:
        return
    _announced = True
    if not HAS_CPP:
        warnings.warn(f"pyoptim: compiled extension not loaded, using Triton/pure-torch kernels: "
                      f"{_C_ERROR}", RuntimeWarning, stacklevel=3)
    if os.environ.get("PYOPTIM_QUIET", "0") in ("", "0"):
        print(describe(), file=sys.stderr)
