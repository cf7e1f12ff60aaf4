"""The compute and energy ledger of a run: what every stage cost in time, memory, FLOPs, joules, money and CO2e.

    with Ledger(prices) as ledger, ledger.measure("train", device="cpu") as entry:
        ...                      # the stage
        entry.flops = 1.2e12     # what it computed, when known
    ledger.write(run_dir / "ledger.json")

A measured figure and an estimated one are never shown the same way (`Energy.label`), and a counter that cannot be
read is recorded as unavailable with the reason: the ledger never stops the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
from pydantic import BaseModel, ConfigDict, Field

from accounting.energy import DEFAULT_WATTS_PER_CORE, Energy, EnergyMeter
from core.files import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


class Prices(BaseModel):
    """What compute costs; every figure is written next to the result it produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd_per_device_hour: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.10, "cuda": 3.00}, description="rental price of the device the stage ran on"
    )
    usd_per_kwh: float = Field(0.15, ge=0)
    grid_g_co2e_per_kwh: float = Field(400.0, ge=0, description="carbon intensity of the electricity")
    cpu_watts_per_busy_core: float = Field(
        DEFAULT_WATTS_PER_CORE, gt=0, description="for the energy estimate where nothing is measured"
    )


@dataclass
class Entry:
    stage: str
    device: str = "cpu"
    device_count: int = 1
    wall_s: float = 0.0
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    busy_cores: float = 0.0
    flops: float | None = None
    flops_method: str = ""
    peak_flops_per_s: float | None = None
    peak_method: str = ""
    energy: dict[str, Energy] = field(default_factory=dict)
    cost_usd: float | None = None
    co2e_g: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # the prices and intensities the money and carbon came from
    notes: list[str] = field(default_factory=list)

    @property
    def achieved_flops_per_s(self) -> float | None:
        return self.flops / self.wall_s if self.flops and self.wall_s else None

    @property
    def utilization(self) -> float | None:
        achieved = self.achieved_flops_per_s
        return achieved / self.peak_flops_per_s if achieved and self.peak_flops_per_s else None

    @property
    def joules(self) -> float | None:
        known = [e.joules for e in self.energy.values() if e.joules is not None]
        return sum(known) if known else None

    @property
    def energy_kind(self) -> str:
        kinds = {e.kind for e in self.energy.values() if e.joules is not None}
        return "measured" if kinds == {"measured"} else "estimated" if kinds else "unavailable"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["energy"] = {name: e.to_dict() for name, e in self.energy.items()}
        data.update(
            achieved_flops_per_s=self.achieved_flops_per_s,
            utilization=self.utilization,
            joules=self.joules,
            energy_kind=self.energy_kind,
        )
        return data


class _PeakMemory:
    """Samples the RSS of this process and its children ten times a second."""

    def __init__(self) -> None:
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        with contextlib.suppress(psutil.Error):
            rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
            self.peak_mb = max(self.peak_mb, rss / 1e6)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def __enter__(self) -> "_PeakMemory":
        self.sample()  # a stage shorter than one period still gets a figure
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Ledger:
    def __init__(self, prices: Prices | None = None, energy_meter_factory=None):
        self.prices = prices or Prices()
        self.entries: list[Entry] = []
        self._meter = energy_meter_factory or (lambda: EnergyMeter(watts_per_core=self.prices.cpu_watts_per_busy_core))

    @contextlib.contextmanager
    def measure(self, stage: str, device: str = "cpu", device_count: int = 1) -> Iterator[Entry]:
        """Time, memory and energy around a stage; the stage may fill in FLOPs and notes on the entry."""
        entry = Entry(stage=stage, device=device, device_count=device_count)
        try:
            meter = self._meter()
            meter.start()
        except Exception as error:  # the ledger never blocks the pipeline
            meter, entry.notes = None, [f"energy counters failed to start: {error}"]
        me, cpu_before, start = psutil.Process(), sum(psutil.Process().cpu_times()[:4]), time.perf_counter()
        with _PeakMemory() as memory:
            try:
                yield entry
            finally:
                entry.wall_s = time.perf_counter() - start
                entry.peak_host_mb = memory.peak_mb
                entry.busy_cores = (sum(me.cpu_times()[:4]) - cpu_before) / entry.wall_s if entry.wall_s else 0.0
                if meter is not None:
                    try:
                        entry.energy = meter.stop(entry.wall_s, entry.busy_cores)
                    except Exception as error:
                        entry.energy = {"cpu": Energy("unavailable", None, f"energy counters failed: {error}")}
                self._price(entry)
                self.entries.append(entry)

    def _price(self, entry: Entry) -> None:
        rate = self.prices.usd_per_device_hour.get(entry.device.split(":")[0])
        joules = entry.joules
        entry.inputs = {
            "usd_per_device_hour": rate,
            "usd_per_kwh": self.prices.usd_per_kwh,
            "grid_g_co2e_per_kwh": self.prices.grid_g_co2e_per_kwh,
            "energy_kind": entry.energy_kind,
        }
        device_cost = rate * entry.device_count * entry.wall_s / 3600 if rate is not None else 0.0
        energy_kwh = joules / 3.6e6 if joules is not None else None
        entry.cost_usd = device_cost + (energy_kwh * self.prices.usd_per_kwh if energy_kwh is not None else 0.0)
        entry.co2e_g = energy_kwh * self.prices.grid_g_co2e_per_kwh if energy_kwh is not None else None

    def add(self, entry: Entry) -> Entry:
        """An entry measured elsewhere (a stage that was skipped, or serving figures from the benchmark)."""
        self._price(entry)
        self.entries.append(entry)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {"prices": self.prices.model_dump(), "entries": [e.to_dict() for e in self.entries]}

    def write(self, path: Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def payback_inferences(
    build_joules: float, baseline_j_per_inference: float, variant_j_per_inference: float
) -> float | None:
    """How many served inferences repay the energy spent building a cheaper variant; None if it saves nothing."""
    saving = baseline_j_per_inference - variant_j_per_inference
    return build_joules / saving if saving > 0 else None


def render_markdown(data: dict[str, Any]) -> str:
    lines = [
        "| stage | device | wall | peak host mem | FLOPs | achieved | utilization | energy | cost | CO2e |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in data["entries"]:
        energy = "; ".join(Energy(**v).label() for v in e["energy"].values()) or "n/a"
        flops = f"{e['flops']:.3g}" if e["flops"] else "-"
        achieved = f"{e['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s" if e["achieved_flops_per_s"] else "-"
        utilization = (
            f"{100 * e['utilization']:.2f}% of {e['peak_flops_per_s'] / 1e9:.0f} GFLOP/s" if e["utilization"] else "-"
        )
        co2 = (
            f"{e['co2e_g']:.3f} g" + (" (est.)" if e["energy_kind"] == "estimated" else "")
            if e["co2e_g"] is not None
            else "-"
        )
        lines.append(
            f"| {e['stage']} | {e['device']} x{e['device_count']} | {e['wall_s']:.1f} s | {e['peak_host_mb']:.0f} MB "
            f"| {flops} | "
            f"{achieved} | {utilization} | {energy} | ${e['cost_usd']:.5f} | {co2} |"
        )
    prices = data["prices"]
    lines += [
        "",
        f"Prices: {prices['usd_per_device_hour']} USD per device-hour, {prices['usd_per_kwh']} USD/kWh, "
        f"{prices['grid_g_co2e_per_kwh']} g CO2e/kWh; estimates assume {prices['cpu_watts_per_busy_core']} W per "
        "busy CPU core. "
        "ESTIMATED energy comes from a declared model, not a meter.",
    ]
    for e in data["entries"]:
        lines += [f"- {e['stage']}: {note}" for note in e["notes"]]
    return "\n".join(lines) + "\n"


def plot_costs(path: Path, data: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    entries = data["entries"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [e["stage"] for e in entries]
    left.bar(names, [e["wall_s"] for e in entries], color="#4c72b0")
    left.set(ylabel="wall time (s)", title="time per stage")
    colors = ["#55a868" if e["energy_kind"] == "measured" else "#c44e52" for e in entries]
    right.bar(names, [e["joules"] or 0 for e in entries], color=colors)
    right.set(ylabel="energy (J)", title="energy per stage (red: estimated, green: measured)")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return path
