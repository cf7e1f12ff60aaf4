"""Peak FLOP/s of the devices we run on, from published figures and from a short measurement on the machine.

Sources:
- NVIDIA datasheets (dense, without sparsity): H100 SXM5 "NVIDIA H100 Tensor Core GPU" datasheet; H200 SXM
  "NVIDIA H200 Tensor Core GPU" datasheet (same GH100 compute as H100 SXM); A100 SXM4 80GB datasheet.
- CPU per-cycle figures: Intel's "Accelerate AI Workloads with Intel AMX" (p.4), as quoted in PyTorch's recipe
  "Leverage Intel Advanced Matrix Extensions": AMX 1,024 BF16 FLOP/cycle and 2,048 INT8 op/cycle per core,
  AVX-512 VNNI 256 INT8 op/cycle, AVX-512 FP32 FMA 64 FLOP/cycle (two 512-bit FMA units). Cores with a single
  512-bit FMA unit (or AMD Zen 4, which runs AVX-512 as two 256-bit halves) reach half of the AVX-512 figures;
  we take the Intel figures as an upper bound and say so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

GPU_PEAK_TFLOPS = {  # dense TFLOP/s (INT8: TOP/s)
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "int8": 1978.9},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "int8": 1978.9},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "int8": 624.0},
}
CPU_PER_CYCLE = {  # per core per cycle, by the instruction set that runs the precision
    ("amx_bf16", "bf16"): 1024,
    ("amx_int8", "int8"): 2048,
    ("avx512_vnni", "int8"): 256,
    ("avx512_bf16", "bf16"): 128,
    ("avx512f", "fp32"): 64,
    ("avx2", "fp32"): 32,
}


def cpu_flags_and_clock(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[set[str], float | None]:
    """The CPU flags and the clock in GHz (`cpu MHz` of /proc/cpuinfo: the current, not the turbo, clock)."""
    flags, mhz = set(), None
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz" and mhz is None:
                mhz = float(value)
    return flags, (mhz / 1e3 if mhz else None)


def cpu_peak_flops(
    precision: str, cores: int | None = None, cpuinfo: Path = Path("/proc/cpuinfo")
) -> tuple[float | None, str]:
    """Peak FLOP/s of this CPU for `precision` (fp32, bf16, int8), with how it was derived."""
    flags, ghz = cpu_flags_and_clock(cpuinfo)
    cores = cores or os.cpu_count() or 1
    for (flag, kind), per_cycle in sorted(CPU_PER_CYCLE.items(), key=lambda item: -item[1]):
        if kind == precision and flag in flags and ghz:
            return (
                per_cycle * cores * ghz * 1e9,
                f"{flag}: {per_cycle} FLOP/cycle/core x {cores} cores x {ghz:.2f} GHz (upper bound)",
            )
    if precision != "fp32":
        return cpu_peak_flops("fp32", cores, cpuinfo)
    return None, "no clock or vector flags in /proc/cpuinfo"


def gpu_peak_flops(name: str, precision: str) -> tuple[float | None, str]:
    for model, table in GPU_PEAK_TFLOPS.items():
        if model in name.upper() and precision in table:
            return table[precision] * 1e12, f"{model} datasheet, dense {precision}"
    return None, f"no published peak for '{name}' in the table"


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """FP32 FLOP/s numpy's BLAS reaches on a square matmul here: what "peak" means in practice on this machine."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
