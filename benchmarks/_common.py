"""Measurement helpers shared by the benchmarks (see ../shared/BENCHMARKS.md): machine line, GEMM ceiling,
alternating A/B timing with per-pair ratios."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def machine_info() -> dict:
    """The machine line: CPU model and its relevant x86 flags (AVX2 / AVX-512 / VNNI / AMX), PyTorch's CPU kernel
    level, ONNX Runtime's INT8 kernel path, cores, threads, versions (:func:`vision_moe.machine.machine_info`)."""
    from vision_moe.machine import machine_info as info

    return info()


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n^3 matmul at the current thread count (the reference ceiling)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def time_alternating(fns: dict[str, Callable[[], object]], baseline: str, rounds: int = 9, warmup: int = 2) -> dict:
    """Run the candidates in turn (A B C A B C ...) after warm-up; report median ms and the median of the
    per-round ratios against ``baseline``."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    return {
        n: dict(
            ms=statistics.median(ts) * 1e3,
            ratio=statistics.median(a / b for a, b in zip(ts, times[baseline])),
            times=ts,
        )
        for n, ts in times.items()
    }


def paired_ratio(res: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b), from a :func:`time_alternating` result."""
    return statistics.median(x / y for x, y in zip(res[a]["times"], res[b]["times"]))
