"""Shared benchmark helpers: timing (median with p20/p80) and the machine's copy bandwidth. The
JSON record every run writes to bench/results/ and the pictures come from pyoptim.report."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from pyoptim import report
from pyoptim._util import synchronize  # noqa: F401 - the benchmarks call bu.synchronize

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(device: torch.device) -> Dict[str, object]:
    """pyoptim.report.environment with this checkout's commit."""
    return report.environment(device, root=ROOT)


def write_result(family: str, device: torch.device, payload: Dict[str, object],
                 out_dir: Optional[str] = None) -> str:
    """pyoptim.report.write_result into bench/results/ unless ``out_dir`` is given."""
    return report.write_result(family, device, payload, out_dir or RESULTS_DIR)
