"""Compile the Triton kernels for a GPU on a machine without one: the launches a test run makes
through the interpreter are recorded, then each distinct one is compiled ahead of time, to a cubin,
for an NVIDIA target (sm_90 by default) with Triton's own compiler and ptxas.

Why: ``TRITON_INTERPRET=1`` runs a kernel's Python on CPU tensors and accepts code the compiler
refuses -- e.g. a runtime ``if`` whose branches give one name two types (two accumulator shapes:
the group-lasso finish kernel did, and only this check caught it on CPU). The interpreter
proves the arithmetic; this proves that what it ran also compiles, with the same argument types,
constexprs and ``num_warps`` as the launch. It proves nothing about a device's behaviour.

Record (in the process that runs the kernels under ``TRITON_INTERPRET=1``)::

    from pyoptim.triton_kernels import aot_check
    aot_check.record_launches()          # wraps the interpreter's launch; cheap
    ...                                  # run the ops through the Triton backend
    aot_check.save_launches("launches.json")

Compile (in a process *without* ``TRITON_INTERPRET``, so the kernels are ``JITFunction`` objects)::

    python -m pyoptim.triton_kernels.aot_check launches.json [--arch 90]

prints one line a distinct launch that fails, with the compiler's message, and exits 1 if any did.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

_RECORDS: Dict[str, Dict[str, Any]] = {}
#: torch dtype name -> Triton pointer element type
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
           "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
#: launch options Triton takes beside the kernel's own arguments
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _scalar_type(value: Any) -> str:
    """Triton's type of a scalar argument that is no constexpr (as its launcher would pick)."""
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else ("i64" if value < 2 ** 63 else "u64")
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"aot_check: cannot record a launch argument of type {type(value).__name__}")


def _describe(value: Any, constexpr: bool) -> List[Any]:
    """A launch argument in JSON: a tensor by its element type, a constexpr by its value, any other
    scalar by its type (its value does not change the compiled code)."""
    import torch
    if isinstance(value, torch.Tensor):
        return ["ptr", _DTYPES[str(value.dtype).replace("torch.", "")]]
    if value is None:
        return ["const", None]
    if constexpr:
        if hasattr(value, "primitive_bitwidth"):   # a tl.dtype
            return ["tl_dtype", str(value)]
        return ["const", value]
    return ["scalar", _scalar_type(value)]


def _constexpr_names(fn) -> set:
    import inspect
    out = set()
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in str(getattr(ann, "__name__", ann)):
            out.add(name)
    return out


def record_launches() -> None:
    """Wraps the Triton interpreter's kernel launch so that every launch (kernel, argument types,
    constexpr values, launch options) is recorded, once per distinct launch, before it runs."""
    from triton.runtime.interpreter import InterpretedFunction
    if getattr(InterpretedFunction.run, "_aot_recording", False):
        return
    original = InterpretedFunction.run
    constexprs: Dict[Any, set] = {}

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn not in constexprs:
            constexprs[fn] = _constexpr_names(fn)
        named = dict(zip(self.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        rec = {"module": fn.__module__, "kernel": fn.__name__,
               "args": {k: _describe(v, k in constexprs[fn]) for k, v in named.items()},
               "options": {k: kwargs[k] for k in _OPTIONS if k in kwargs}}
        _RECORDS.setdefault(json.dumps(rec, sort_keys=True), rec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._aot_recording = True
    InterpretedFunction.run = run


def recorded() -> List[Dict[str, Any]]:
    return list(_RECORDS.values())


def save_launches(path: str, prefix: str = "pyoptim.") -> int:
    """Writes the distinct launches recorded so far of the kernels whose module starts with
    ``prefix`` (this package's own), merged with those already in ``path``."""
    records = {}
    try:
        with open(path) as f:
            records = {json.dumps(r, sort_keys=True): r for r in json.load(f)}
    except (OSError, ValueError):
        pass
    records.update({k: r for k, r in _RECORDS.items() if r["module"].startswith(prefix)})
    with open(path, "w") as f:
        json.dump(list(records.values()), f, indent=0)
    return len(records)


def _signature(fn, args: Dict[str, List[Any]]) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Triton's ``signature`` and ``constexprs`` of a recorded launch of the JITFunction ``fn``."""
    import triton.language as tl
    sig, const = {}, {}
    for name in fn.arg_names:
        if name not in args:
            continue   # a defaulted argument: the compiler takes the default
        kind, value = args[name]
        if kind == "ptr":
            sig[name] = "*" + value
        elif kind == "scalar":
            sig[name] = value
        else:
            sig[name] = "constexpr"
            const[name] = getattr(tl, value.replace("tl.", "")) if kind == "tl_dtype" else value
    return sig, const


def compile_launch(rec: Dict[str, Any], arch: int = 90) -> Optional[str]:
    """Compiles one recorded launch to a cubin for ``sm_{arch}``; ``None`` on success, else the
    compiler's message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("aot_check: the kernels are not JITFunctions: unset TRITON_INTERPRET to compile")
    try:
        sig, const = _signature(fn, rec["args"])
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(rec["options"]))
        if "cubin" not in kernel.asm:
            return "no cubin produced"
    except Exception as e:   # the compiler's own error, reported per launch
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:400]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Compile recorded Triton launches for an NVIDIA GPU, without one.")
    ap.add_argument("launches", help="JSON written by save_launches (a test run under TRITON_INTERPRET=1)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    a = ap.parse_args(argv)
    with open(a.launches) as f:
        records = json.load(f)
    if not records:
        print(f"triton aot: {a.launches} holds no launch (was the test run made with the recorder?)")
        return 1
    failed = 0
    for rec in records:
        err = compile_launch(rec, a.arch)
        if err is not None:
            failed += 1
            consts = {k: v[1] for k, v in rec["args"].items() if v[0] == "const"}
            dtypes = sorted({v[1] for v in rec["args"].values() if v[0] == "ptr"})
            print(f"triton aot: FAILED {rec['module']}.{rec['kernel']} {dtypes} {consts} {rec['options']}: {err}")
    kernels = len({(r["module"], r["kernel"]) for r in records})
    print(f"triton aot: {len(records) - failed} of {len(records)} distinct launches of {kernels} kernels "
          f"compiled for sm_{a.arch}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
