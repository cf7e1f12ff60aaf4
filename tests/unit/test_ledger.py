import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accounting.energy import Energy
from accounting.ledger import Entry, Ledger, Prices, payback_inferences, plot_costs, render_markdown


class StubMeter:
    """An energy meter with a fixed answer, to check the ledger's arithmetic."""

    def start(self):
        pass

    def stop(self, seconds, busy_cores):
        return {"cpu": Energy("estimated", 3_600.0, "stub")}


def test_a_stage_entry_records_time_memory_flops_money_and_carbon(tmp_path: Path):
    prices = Prices(usd_per_device_hour={"cpu": 3.6}, usd_per_kwh=0.5, grid_g_co2e_per_kwh=1000)
    ledger = Ledger(prices, energy_meter_factory=StubMeter)
    with ledger.measure("train") as entry:
        blob = bytearray(50_000_000)  # 50 MB the memory sampler should notice
        time.sleep(0.3)
        entry.flops, entry.peak_flops_per_s = 3e9, 1e11
        del blob
    e = ledger.entries[0]
    assert 0.3 <= e.wall_s < 5 and e.peak_host_mb > 40
    assert e.achieved_flops_per_s == pytest.approx(3e9 / e.wall_s) and e.utilization == pytest.approx(
        e.achieved_flops_per_s / 1e11
    )
    kwh = 3_600 / 3.6e6
    assert e.co2e_g == pytest.approx(kwh * 1000)
    assert e.cost_usd == pytest.approx(3.6 * e.wall_s / 3600 + kwh * 0.5)
    assert e.inputs == {
        "usd_per_device_hour": 3.6,
        "usd_per_kwh": 0.5,
        "grid_g_co2e_per_kwh": 1000,
        "energy_kind": "estimated",
    }
    path = ledger.write(tmp_path / "ledger.json")
    data = json.loads(path.read_text())
    assert data["entries"][0]["energy"]["cpu"]["kind"] == "estimated" and data["prices"]["usd_per_kwh"] == 0.5
    assert "~3600.0 J (ESTIMATED: stub)" in render_markdown(data)
    assert plot_costs(tmp_path / "ledger.png", data).stat().st_size > 1000


def test_a_failing_counter_is_recorded_not_raised():
    class Broken:
        def start(self):
            raise PermissionError("no access")

    ledger = Ledger(energy_meter_factory=Broken)
    with ledger.measure("export"):
        pass
    entry = ledger.entries[0]
    assert entry.energy_kind == "unavailable" and "no access" in entry.notes[0]


def test_measured_and_estimated_are_never_shown_alike():
    assert Energy("measured", 5.0, "NVML").label() == "5.0 J (measured: NVML)"
    assert Energy("estimated", 5.0, "TDP").label().startswith("~5.0 J (ESTIMATED")
    mixed = Entry("x", energy={"cpu": Energy("estimated", 1.0, "TDP"), "gpu": Energy("measured", 2.0, "NVML")})
    assert mixed.energy_kind == "estimated" and mixed.joules == 3.0


def test_payback_counts_inferences_until_the_build_energy_is_repaid():
    assert payback_inferences(
        build_joules=100.0, baseline_j_per_inference=0.5, variant_j_per_inference=0.3
    ) == pytest.approx(500)
    assert payback_inferences(100.0, 0.3, 0.5) is None  # a variant that costs more per inference never pays back


def test_a_stage_counts_the_cpu_time_of_the_processes_it_started_and_theirs():
    """torchrun's ranks are grandchildren of the pipeline: their CPU time reaches the train entry once reaped."""
    busy = "import time\nx = 0\nfor i in range(3_000_000): x += i\nprint(time.process_time())"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"
    with Ledger().measure("train") as entry:
        out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout
    grandchild_cpu_s = float(out)
    assert entry.busy_cores * entry.wall_s >= grandchild_cpu_s
