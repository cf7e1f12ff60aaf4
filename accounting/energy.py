"""Energy counters, measured where the machine exposes them and estimated (and labelled so) where it does not.

- NVIDIA GPUs: NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver
  loaded; Volta and newer), read before and after a stage.
- CPUs: RAPL package domains under `/sys/class/powercap/intel-rapl:*/energy_uj` (microjoules, wrapping at
  `max_energy_range_uj`; root-only on most kernels since CVE-2020-8694).
- Otherwise an estimate from a declared model: watts per busy core x the cores the process kept busy. The default,
  8 W per core, is a server CPU's TDP over its core count (for example 280 W / 32 cores = 8.75 W); a VM cannot
  see its host's package, so the figure is declared, not derived.
Both readers take their root (a folder, an NVML module) as a parameter so tests can hand them fakes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

RAPL_ROOT = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 8.0  # declared assumption (see the module docstring); override in the ledger's prices


@dataclass
class Energy:
    kind: Literal["measured", "estimated", "unavailable"]
    joules: float | None
    method: str  # how it was obtained, or why it could not be

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        if self.kind == "measured":
            return f"{self.joules:.1f} J (measured: {self.method})"
        if self.kind == "estimated":
            return f"~{self.joules:.1f} J (ESTIMATED: {self.method})"
        return f"n/a ({self.method})"


class RaplReader:
    """Sum of the RAPL package domains; `None` from `read()` when there are none or they are not readable."""

    def __init__(self, root: Path = RAPL_ROOT):
        self.domains = (
            sorted(p for p in root.glob("intel-rapl:*") if ":" in p.name and p.name.count(":") == 1)
            if root.is_dir()
            else []
        )
        self.reason = "" if self.domains else f"no RAPL package domains under {root}"

    def _read_domain(self, domain: Path) -> tuple[int, int]:
        return int((domain / "energy_uj").read_text()), int((domain / "max_energy_range_uj").read_text())

    def read(self) -> dict[str, tuple[int, int]] | None:
        try:
            return {domain.name: self._read_domain(domain) for domain in self.domains} or None
        except (OSError, ValueError) as error:
            self.reason = f"RAPL not readable ({error.__class__.__name__}: {error}); it is root-only on most kernels"
            return None

    @staticmethod
    def joules_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
        total_uj = 0
        for name, (start, wrap) in before.items():
            end = after[name][0]
            total_uj += end - start if end >= start else wrap - start + end  # the counter wrapped once
        return total_uj / 1e6


class NvmlReader:
    """Total energy of every visible NVIDIA GPU; `nvml` is the `pynvml` module (or a stand-in in tests)."""

    def __init__(self, nvml: Any = None):
        self.reason, self.handles = "", []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self.nvml = nvml
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if not self.handles:
                self.reason = "NVML sees no GPU"
        except Exception as error:  # no library, no driver, no GPU
            self.reason = f"NVML unavailable ({error.__class__.__name__}: {error})"

    def read(self) -> int | None:
        """Millijoules since the driver loaded, summed over GPUs."""
        if not self.handles:
            return None
        try:
            return sum(int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles)
        except Exception as error:  # pre-Volta GPUs do not have the counter
            self.reason = f"NVML total-energy counter not readable ({error})"
            return None


def estimate(
    seconds: float, busy_cores: float, watts_per_core: float = DEFAULT_WATTS_PER_CORE, cores: int | None = None
) -> Energy:
    """Declared model: watts per busy core x busy cores (at most the cores there are) x wall time."""
    busy = min(max(0.0, busy_cores), cores or os.cpu_count() or 1)
    return Energy(
        "estimated",
        watts_per_core * busy * seconds,
        f"{watts_per_core:.1f} W per busy core (declared) x {busy:.2f} busy cores x {seconds:.1f} s",
    )


class EnergyMeter:
    """Reads every available counter at `start()` and `stop()`; falls back to the estimate, never raises."""

    def __init__(
        self,
        rapl_root: Path = RAPL_ROOT,
        nvml: Any = None,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        use_gpu: bool = True,
    ):
        self.rapl, self.nvml = RaplReader(rapl_root), (NvmlReader(nvml) if use_gpu else None)
        self.watts_per_core = watts_per_core
        self._rapl_start = self._nvml_start = None

    def start(self) -> None:
        self._rapl_start = self.rapl.read()
        self._nvml_start = self.nvml.read() if self.nvml else None

    def stop(self, seconds: float, busy_cores: float) -> dict[str, Energy]:
        readings: dict[str, Energy] = {}
        rapl_end = self.rapl.read() if self._rapl_start else None
        if self._rapl_start and rapl_end:
            readings["cpu"] = Energy(
                "measured", RaplReader.joules_between(self._rapl_start, rapl_end), "RAPL package energy counters"
            )
        else:
            readings["cpu"] = estimate(seconds, busy_cores, self.watts_per_core)
            readings["cpu"].method += f"; no measurement: {self.rapl.reason}"
        if self.nvml is not None and self.nvml.handles:  # no GPU: nothing to report for it
            end = self.nvml.read() if self._nvml_start is not None else None
            readings["gpu"] = (
                Energy("measured", (end - self._nvml_start) / 1e3, "NVML total-energy counter")
                if end is not None
                else Energy("unavailable", None, self.nvml.reason)
            )
        return readings
