"""What this machine's CPU can do: its model, the x86 extensions that change numerics or speed here, PyTorch's
kernel level, and which integer GEMM ONNX Runtime's x86 kernels (MLAS) run for INT8.

Why it matters: figures measured on a CPU with AVX-512 / VNNI do not carry over to one with AVX2 only, and INT8
models behave differently. On x86 without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds each two neighbouring products into a *saturating* 16-bit integer before the 32-bit
accumulation; with VNNI (``vpdpbusd``) the products go straight into 32 bits. (ONNX Runtime's quantisation docs
say the same of its U8S8 kernels on x86-64 with AVX2 and AVX-512: VPMADDUBSW can saturate.) :func:`int8_kernels`
names the path this CPU takes; :mod:`vision_moe.deploy.quantize` writes files that cannot saturate on either path.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

__all__ = ["cpu_flags", "cpu_id", "cpu_model", "machine_info", "int8_kernels", "simd_datapath", "RELEVANT_FLAGS"]

# the extensions that change which kernels PyTorch, oneDNN and ONNX Runtime run on x86
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
)
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple[tuple[str, str], ...] | None:
    """``/proc/cpuinfo`` as (key, value) pairs in file order, read once; None where it is not readable (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return tuple((key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in f))
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine() or "unknown", frozenset()
    for key, value in _proc_cpuinfo() or ():  # not Linux: the model name from platform, no flags
        if key == "model name" and model in ("unknown", platform.processor(), platform.machine()):
            model = value
        elif key in ("flags", "Features") and not flags:  # x86 / arm64
            flags = frozenset(value.split())
    return model, flags


def _cpu_signature() -> tuple[str, int, int, int] | None:
    """(vendor, family, model, stepping) of the first CPU in ``/proc/cpuinfo``; None where not readable (or not x86)."""
    fields: dict[str, str] = {}
    for key, value in _proc_cpuinfo() or ():
        fields.setdefault(key, value)  # the first processor's values
    try:
        return fields["vendor_id"], int(fields["cpu family"]), int(fields["model"]), int(fields.get("stepping", "0"))
    except (KeyError, ValueError):
        return None


def cpu_id() -> str:
    """Vendor, family, model and stepping, e.g. ``AuthenticAMD family 23 model 1 stepping 2``: the model name alone
    ("AMD EPYC" on many cloud machines) does not say which microarchitecture runs the kernels. Empty if unknown."""
    sig = _cpu_signature()
    return "" if sig is None else "{} family {} model {} stepping {}".format(*sig)


def simd_datapath(signature: tuple[str, int, int, int] | None = None) -> str | None:
    """A note where the CPU executes 256-bit AVX2 instructions as two 128-bit halves, else None.

    AMD family 17h models 00h-2Fh (Zen, Zen+; AMD's Software Optimization Guide for family 17h: four 128-bit FP
    pipes, each 256-bit AVX operation split into two) and the earlier families 15h/16h have half the per-cycle FP32
    FMA throughput of AVX2 CPUs with 256-bit units (Intel since Haswell, AMD since Zen 2): the same AVX2 kernels
    run up to 2x slower per clock there, which matters for any time figure measured on one and quoted for the other.
    """
    sig = _cpu_signature() if signature is None else signature
    if sig is None:
        return None
    vendor, family, model, _ = sig
    if vendor == "AuthenticAMD" and (family in (0x15, 0x16) or (family == 0x17 and model < 0x30)):
        return "128-bit FP datapath: 256-bit AVX2 operations run as two halves"
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The :data:`RELEVANT_FLAGS` this CPU has (empty where ``/proc/cpuinfo`` is not readable)."""
    flags = _cpuinfo()[1]
    return [f for f in RELEVANT_FLAGS if f in flags]


def int8_kernels() -> dict[str, Any]:
    """Which integer GEMM ONNX Runtime's CPU kernels run for uint8 x int8 on this CPU, and whether it saturates.

    ``saturates``: True on x86 without VNNI (16-bit saturating pair sums), False with VNNI, None where not known
    (not x86, or no ``/proc/cpuinfo``)."""
    machine = platform.machine().lower()
    flags = _cpuinfo()[1]
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return dict(path=f"{machine}: not x86 (no vpmaddubsw path)", saturates=None)
    if not flags:
        return dict(path="x86, CPU flags unreadable", saturates=None)
    vnni = [f for f in _VNNI if f in flags]
    if vnni:
        return dict(path=f"VNNI ({vnni[0]}: vpdpbusd, u8 x s8 products summed in 32 bits)", saturates=False)
    isa = "AVX-512BW" if "avx512bw" in flags else "AVX2" if "avx2" in flags else "SSE4.1"
    return dict(
        path=f"{isa} without VNNI (vpmaddubsw: each two u8 x s8 products summed into a saturating int16)",
        saturates=True,
    )


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The machine line every benchmark and export report prints: CPU model and relevant flags, PyTorch's CPU
    kernel level, ONNX Runtime's INT8 kernel path, cores, threads and versions."""
    import torch

    info: dict[str, Any] = dict(
        cpu=cpu_model(),
        cpu_id=cpu_id(),
        cpu_flags=cpu_flags(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count(),
        threads=threads if threads is not None else torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    datapath = simd_datapath()
    if datapath:
        info["simd_datapath"] = datapath
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["ort_int8_kernels"] = int8_kernels()["path"]
    except ImportError:
        pass
    return info
