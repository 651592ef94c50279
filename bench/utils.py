"""Shared benchmark helpers: timing (median with p20/p80), the machine's copy bandwidth, and the
JSON record every run writes to bench/results/."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 15,
           min_time_s: float = 0.0) -> Dict[str, float]:
    """Median and p20/p80 wall time of ``fn`` in milliseconds (CUDA: events around each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_time_s:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` on a buffer far larger than cache."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        n = torch.cuda.get_device_name(device).lower()
        for k in ("h200", "h100", "a100", "l4", "a10"):
            if k in n:
                return f"cuda-{k}"
        return "cuda"
    return "cpu"


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> Dict[str, object]:
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except Exception:
        triton_version = None
    import pyoptim
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "pyoptim_backends": {k: v for k, v in pyoptim.backends().items() if k != "extension_error"},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def write_result(family: str, device: torch.device, payload: Dict[str, object],
                 out_dir: Optional[str] = None) -> str:
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{family}_{device_tag(device)}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    return path
