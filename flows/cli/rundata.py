"""Everything `tes` reads from a run and from stage results, in one place: the run's `RunSummary` (`summary.json`),
its manifest, the precision variants, the ledger, and what the benchmark and the scaling sweep return.

The shape of that data belongs to the pipeline (`flows/pipeline.py`, `core/results.py`, `accounting/`); the
commands get plain strings and rows from here, so a change of that shape is adapted in this file only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import TesError
from core.results import RunDir, find_run
from export.gates import table_header, table_rows


@dataclass(frozen=True)
class TableView:
    columns: list[str]
    rows: list[list[str]]
    title: str | None = None
    numeric: frozenset[int] = frozenset()  # right-aligned columns


@dataclass(frozen=True)
class LedgerView:
    stages: TableView
    serving: TableView | None
    payback: TableView | None
    notes: list[str] = field(default_factory=list)


# --- runs -------------------------------------------------------------------------------------------------------------
def summary(run: str | None = None):
    """The `RunSummary` of the run in folder `run`, or of the last run of this project home."""
    from pydantic import ValidationError

    from flows.pipeline import load_summary

    try:
        return load_summary(run)
    except ValidationError as error:
        raise TesError(
            f"the run's summary.json was written by an older version of train-export-serve ({error.error_count()} "
            "fields differ); `tes report` still prints its report, or run the pipeline again"
        ) from error


def report_markdown(run: str | None = None) -> str:
    return find_run(run).report.read_text(encoding="utf-8")


def report_of(run_summary) -> str:
    """The report of a run whose summary is at hand (`tes run` has the one `run_pipeline` returned)."""
    return RunDir(run_summary.run_dir, create=False).report.read_text(encoding="utf-8")


def run_folder(run_summary) -> str:
    return str(run_summary.run_dir)


def deployed_model(run_summary) -> tuple[str, str]:
    """(model name, version Triton serves) of the run's deployment."""
    deployed = run_summary.deploy.output
    return deployed.model, str(deployed.ready_version or deployed.version)


def run_parameters(run: str | None = None):
    """(run folder, the `PipelineParams` the run was made with)."""
    from flows.params import parse_params

    found = find_run(run)
    return found.path, parse_params(found.read_manifest()["params"])


# --- precision variants -------------------------------------------------------------------------------------------
def variants_view(run: str | None = None) -> TableView:
    """Every precision variant of a run, one row each, as `export.gates.render_table` has them in markdown."""
    run_summary = summary(run)
    precision = run_summary.precision
    if not precision.ok or precision.output is None:
        raise TesError(
            f"run {run_summary.run_id} has no precision variants: its precision stage is {precision.status.value}"
        )
    out = precision.output
    columns = table_header(out.primary_metric)
    title = f"run {run_summary.run_id}: policy {out.policy}; {out.selected} serves the plain model name"
    return TableView(
        columns,
        table_rows(list(out.variants), out.primary_metric, alias_mark=" (serves the plain name)"),
        title,
        numeric=frozenset(range(1, 9)),
    )


# --- the ledger -----------------------------------------------------------------------------------------------------
def ledger_view(run: str | None = None) -> LedgerView:
    """A run's compute and energy ledger: one row per stage, serving energy, variant pay-back, and the notes."""
    run_summary = summary(run)
    if not run_summary.ledger:
        raise TesError(f"run {run_summary.run_id} has no ledger")
    data = json.loads(Path(run_summary.ledger["json"]).read_text(encoding="utf-8"))
    stages = TableView(
        ["stage", "device", "wall", "peak host mem", "FLOPs", "utilization", "energy", "cost", "CO2e"],
        [_ledger_cells(entry) for entry in data["entries"]],
        f"run {run_summary.run_id}: compute and energy",
        numeric=frozenset(range(2, 9)),
    )
    prices = data["prices"]
    per_device_hour = prices["usd_per_device_hour"]
    if isinstance(per_device_hour, dict):  # per device kind
        per_device_hour = ", ".join(f"{usd} ({kind})" for kind, usd in per_device_hour.items())
    notes = [
        f"Prices: {per_device_hour} USD per device-hour, {prices['usd_per_kwh']} USD/kWh, "
        f"{prices['grid_g_co2e_per_kwh']} g CO2e/kWh; estimated energy assumes {prices['cpu_watts_per_busy_core']} W "
        "per busy CPU core and comes from a declared model, not a meter.",
        f"Inference: {data['inference_flops_per_sample']:.3g} FLOPs per sample; this machine's numpy FP32 matmul "
        f"reaches {data['matmul_fp32_flops_per_s_measured'] / 1e9:.1f} GFLOP/s.",
    ]
    notes += [f"{entry['stage']}: {note}" for entry in data["entries"] for note in entry["notes"]]
    notes.append(f"plot: {run_summary.ledger['plot']}")
    return LedgerView(stages, _serving_table(data.get("serving", [])), _payback_table(data.get("payback", [])), notes)


def _ledger_cells(entry: dict[str, Any]) -> list[str]:
    energy = f"{entry['joules']:.1f} J ({entry['energy_kind']})" if entry["joules"] is not None else "n/a"
    utilization = f"{100 * entry['utilization']:.2f}%" if entry["utilization"] else "-"
    co2e = f"{entry['co2e_g']:.3f} g" if entry["co2e_g"] is not None else "-"
    return [
        entry["stage"],
        f"{entry['device']} x{entry['device_count']}",
        f"{entry['wall_s']:.1f} s",
        f"{entry['peak_host_mb']:.0f} MB",
        f"{entry['flops']:.3g}" if entry["flops"] else "-",
        utilization,
        energy,
        f"${entry['cost_usd']:.5f}",
        co2e,
    ]


def _serving_table(rows: list[dict[str, Any]]) -> TableView | None:
    if not rows:
        return None
    return TableView(
        ["protocol", "mode", "load", "J / inference", "inferences / J", "p50 ms / GFLOP", "method"],
        [
            [
                r["protocol"],
                r["mode"],
                f"{r['load']:.0f}",
                f"{r['joules_per_inference']:.4f}",
                f"{r['inferences_per_joule']:.1f}",
                f"{r['p50_ms_per_gflop']:.3f}",
                r["method"],
            ]
            for r in rows
        ],
        "serving energy",
        numeric=frozenset(range(2, 6)),
    )


NEVER = "never (not cheaper per inference)"


def _payback_table(rows: list[dict[str, Any]]) -> TableView | None:
    if not rows:
        return None
    return TableView(
        ["variant", "pays back its build after", "energy", "build"],
        [
            [
                r["variant"],
                f"{r['payback_inferences']:.3g} inferences" if r["payback_inferences"] else NEVER,
                r["energy_kind"],
                f"{r['build_joules']:.1f} J",
            ]
            for r in rows
        ],
        "energy pay-back of each variant",
        numeric=frozenset({3}),
    )


# --- results the commands get back ----------------------------------------------------------------------------------
def benchmark_outputs(result) -> tuple[str, list[str]]:
    """(the benchmark's markdown report, every file it wrote) from its `BenchmarkOutput`."""
    files = result.outputs
    return Path(files["markdown"]).read_text(encoding="utf-8"), [str(path) for path in files.values()]


def scaling_outputs(result: dict[str, Any]) -> tuple[str, str]:
    """(plot, data) files of a scaling sweep."""
    return str(result["plot"]), str(result["json"])
