from pathlib import Path

import pytest

from accounting.energy import DEFAULT_WATTS_PER_CORE, Energy, EnergyMeter, RaplReader, estimate


def fake_rapl(root: Path, packages: dict[str, tuple[int, int]]) -> Path:
    """A sysfs tree shaped like /sys/class/powercap: intel-rapl:N/{energy_uj,max_energy_range_uj,name}, with a
    sub-domain that must not be double-counted."""
    for name, (energy, wrap) in packages.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "energy_uj").write_text(f"{energy}\n")
        (folder / "max_energy_range_uj").write_text(f"{wrap}\n")
        (folder / "name").write_text("package-0\n")
        sub = root / f"{name}:0"
        sub.mkdir(exist_ok=True)
        (sub / "energy_uj").write_text("5\n")
    return root


def test_rapl_sums_packages_and_survives_a_wrap(tmp_path: Path):
    root = fake_rapl(
        tmp_path, {"intel-rapl:0": (1_000_000, 262_143_328_850), "intel-rapl:1": (262_143_000_000, 262_143_328_850)}
    )
    reader = RaplReader(root)
    before = reader.read()
    fake_rapl(
        root, {"intel-rapl:0": (3_500_000, 262_143_328_850), "intel-rapl:1": (1_171_150, 262_143_328_850)}
    )  # package 1 wrapped
    joules = RaplReader.joules_between(before, reader.read())
    assert joules == pytest.approx(2.5 + (328_850 + 1_171_150) / 1e6)


def test_unreadable_rapl_falls_back_to_an_estimate_that_says_so(tmp_path: Path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": (1, 10)})
    (root / "intel-rapl:0" / "energy_uj").chmod(0)  # root-only, as on most kernels
    meter = EnergyMeter(rapl_root=root, use_gpu=False)
    meter.start()
    reading = meter.stop(seconds=2.0, busy_cores=1.0)["cpu"]
    if reading.kind == "measured":  # running as root reads it anyway: then it must be the real difference
        assert reading.joules == 0
    else:
        assert reading.kind == "estimated" and "ESTIMATED" in reading.label() and "per busy core" in reading.method


class FakeNvml:
    """Stands in for pynvml: two GPUs whose counters (millijoules) advance by 5 and 7 J per read."""

    def __init__(self):
        self.counters = [1_000_000, 2_000_000]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.counters[handle] += (5_000, 7_000)[handle]
        return self.counters[handle]


def test_nvml_energy_is_the_counter_difference_over_all_gpus(tmp_path: Path):
    meter = EnergyMeter(rapl_root=tmp_path / "none", nvml=FakeNvml())
    meter.start()
    readings = meter.stop(seconds=1.0, busy_cores=0.5)
    assert readings["gpu"] == Energy("measured", 12.0, "NVML total-energy counter")
    assert readings["cpu"].kind == "estimated"


def test_on_this_machine_each_counter_is_measured_or_says_why_it_is_estimated():
    meter = EnergyMeter()
    meter.start()
    readings = meter.stop(seconds=1.0, busy_cores=1.0)
    cpu = readings["cpu"]
    if meter.rapl.read() is None:  # these machines: no readable RAPL
        assert cpu.kind == "estimated" and "declared" in cpu.method and meter.rapl.reason in cpu.method
        assert cpu.joules == pytest.approx(DEFAULT_WATTS_PER_CORE * 1.0 * 1.0)
    else:  # a host whose RAPL counters this user can read
        assert cpu.kind == "measured" and cpu.joules >= 0 and "RAPL" in cpu.method
    gpu = readings.get("gpu")
    if meter.nvml is None or not meter.nvml.handles:  # no GPU: nothing is reported for it
        assert gpu is None and meter.nvml.reason
    else:
        assert gpu.kind == "measured" and gpu.joules >= 0 or gpu.kind == "unavailable" and gpu.method


def test_estimate_is_proportional_to_busy_cores_and_time():
    assert estimate(10, 1.5, watts_per_core=8, cores=4).joules == pytest.approx(120)
    assert estimate(10, 8.0, watts_per_core=8, cores=4).joules == pytest.approx(
        320
    )  # no more cores busy than there are
