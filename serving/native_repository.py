"""The `native` repository flavour, for a stock Triton (NGC containers, GPU clusters) without the Python backend's
dependencies: `onnxruntime_onnx` models for ONNX Runtime variants, `backend: "openvino"` models (Triton's
openvino_backend, CPU instances) for OpenVINO variants, `tensorrt_plan` models for engines, with
`cc_model_filenames` mapping compute capabilities to engines when several were built, and the ensemble alias
`<model>` forwarding to the variant the run selected, so clients keep one model name.

    tes export-repository OUT --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0   # from the last run

Every engine is checked against the Triton that will run it (its TensorRT version and its GPUs' compute
capabilities) before it is written: an engine for another target is refused with `EngineMismatch` (or rebuilt,
when the caller passes a way to), never shipped. The bundled CPU Triton has only the Python backend, so these
configs are checked by parsing and by the invariants Triton and its backends enforce (`validate`, in
`serving/native_configs.py` with the configs themselves), not by loading.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tritonclient.grpc import model_config_pb2 as mc

from core.errors import EngineMismatch, RepositoryError
from core.files import sha256_file
from core.results import RunDir
from serving.native_configs import engine_problems, onnx_config, openvino_backend_config, plan_config, validate
from serving.repository import VERSION_MANIFEST, ServingConfig, VersionResult, publish_version, write_alias

ENGINE_MANIFEST, VERIFICATION = "engine.json", "verification.json"  # beside each engine (export/trt_engine.py)


@dataclass(frozen=True)
class EngineTarget:
    """The Triton that will run the engines: its TensorRT version (NGC release notes list it; e.g. 10.3.0.26) and
    the compute capabilities of its GPUs ("8.0" A100, "8.6" A10, "8.9" L4/L40, "9.0" H100)."""

    tensorrt_version: str
    compute_capabilities: tuple[str, ...]


@dataclass
class NativeExport:
    versions: list[VersionResult]
    left_out: list[str] = field(default_factory=list)  # variants and engines not exported, each with its reason
    server_args: list[str] = field(default_factory=list)  # tritonserver options these models need
    alias: VersionResult | None = None  # the ensemble `<model>`, forwarding to `alias_target`
    alias_target: str = ""
    notes: list[str] = field(default_factory=list)  # what differs from the run: a fallback alias, pinned precisions


# --- one version ----------------------------------------------------------------------------------------------------
def write_native_version(
    repository: Path, config: mc.ModelConfig, files: dict[str, Path], provenance: dict | None = None
) -> VersionResult:
    """Copy `files` (name in the version -> source) into the next version of `config.name`, validated before the
    staging folder is renamed into place (`serving.repository.publish_version`)."""

    def populate(staging: Path) -> None:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        validate(config, staging)

    return publish_version(repository, config.name, config, populate, provenance)


# --- a whole repository from a run ----------------------------------------------------------------------------------
Rebuild = Callable[[str, str], Path]  # (precision, compute capability) -> a new engine folder


def _run_onnx_hashes(run: RunDir, variants: list[dict]) -> set[str]:
    hashes = {v["sha256"] for v in variants if v.get("sha256")}
    exported = run.onnx
    return hashes | ({sha256_file(exported)} if exported.is_file() else set())


def _usable_engines(folders: list[Path], onnx_hashes: set[str]) -> tuple[dict[str, list[tuple[Path, dict]]], list[str]]:
    """Engines grouped by precision, keeping only those verified and accepted and built from this run's ONNX."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    left_out = []
    for folder in folders:
        manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
        verdict = json.loads((folder / VERIFICATION).read_text()) if (folder / VERIFICATION).is_file() else None
        if verdict is None or verdict.get("status") != "accepted":
            left_out.append(
                f"{folder}: "
                + (f"rejected by verification: {verdict.get('reason')}" if verdict else "never verified against FP32")
            )
        elif manifest["onnx_sha256"] not in onnx_hashes:
            left_out.append(
                f"{folder}: built from an ONNX file that is not this run's (sha256 {manifest['onnx_sha256'][:12]}...)"
            )
        else:
            groups.setdefault(manifest["precision"], []).append((folder, manifest))
    return groups, left_out


def _engines_for_target(
    engines: list[tuple[Path, dict]], target: EngineTarget, precision: str, rebuild: Rebuild | None
) -> dict[str, tuple[Path, dict]]:
    """For every target compute capability, an engine that runs there (rebuilt if allowed), else EngineMismatch."""
    chosen, problems = {}, []
    for capability in target.compute_capabilities:
        found = next(((f, m) for f, m in engines if not engine_problems(m, capability, target.tensorrt_version)), None)
        if found is None and rebuild is not None:
            folder = rebuild(precision, capability)
            found = (folder, json.loads((folder / ENGINE_MANIFEST).read_text()))
            if engine_problems(found[1], capability, target.tensorrt_version):
                found = None
        if found is None:
            problems += [
                f"{capability}: {f / m['engine']}: "
                + "; ".join(engine_problems(m, capability, target.tensorrt_version))
                for f, m in engines
            ]
        else:
            chosen[capability] = found
    if problems:
        raise EngineMismatch(
            f"no {precision} engine runs on every target GPU (TensorRT {target.tensorrt_version}):\n  - "
            + "\n  - ".join(problems)
            + "\nRebuild on a GPU of each missing compute capability with the target's "
            "TensorRT (reproduce.sh beside each engine), or build with hardware/version compatibility."
        )
    return chosen


def _engine_version(
    out: Path, name: str, chosen: dict[str, tuple[Path, dict]], serving: ServingConfig, run: str
) -> VersionResult:
    files, engines = {}, {}
    for capability, (folder, manifest) in chosen.items():
        stem = f"model-sm{manifest['compute_capability'].replace('.', '')}" + (
            "-ampere-plus" if manifest.get("hardware_compatibility") == "ampere_plus" else ""
        )
        files[f"{stem}.plan"], files[f"{stem}.json"] = folder / manifest["engine"], folder / ENGINE_MANIFEST
        engines[capability] = f"{stem}.plan"
    config = plan_config(name, next(iter(chosen.values()))[1], engines, serving)
    return write_native_version(
        out, config, files, {"run": run, "engines": {cc: str(f) for cc, (f, _) in chosen.items()}}
    )


def _engine_plan(
    run: RunDir, variants: list[dict], folders: list[Path], target: EngineTarget | None, rebuild: Rebuild | None
) -> tuple[dict[str, dict[str, tuple[Path, dict]]], list[str]]:
    """Per precision, the engine for every target compute capability; decided before anything is written."""
    if target is None:
        raise RepositoryError(
            f"run {run.run_id} has TensorRT engines: say which Triton will run them (its TensorRT "
            "version and GPUs' compute capabilities: --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0), "
            "or leave them out (--no-engines)"
        )
    hashes = _run_onnx_hashes(run, variants)
    groups, left_out = _usable_engines(folders, hashes)

    def checked_rebuild(precision: str, capability: str) -> Path:  # a rebuilt engine passes the same checks
        folder = rebuild(precision, capability)
        refused = _usable_engines([folder], hashes)[1]
        if refused:
            raise EngineMismatch(
                f"the {precision} engine rebuilt for compute capability {capability} is not usable: {refused[0]}"
            )
        return folder

    plan = {
        precision: _engines_for_target(engines, target, precision, checked_rebuild if rebuild else None)
        for precision, engines in sorted(groups.items())
    }
    return plan, left_out


def _variant_files(variant: dict) -> dict[str, Path]:
    """A variant's files by their name in the version: the model file as the backend expects it (model.onnx; an IR as
    model.xml with model.bin), an ONNX graph's external data under the names its `location` fields give."""
    path, companions = Path(variant["path"]), [Path(p) for p in variant.get("files") or []]
    if path.suffix == ".xml":
        weights = next((c for c in companions if c.suffix == ".bin"), path.with_suffix(".bin"))
        names, sources = ["model.xml", "model.bin"], [path, weights]
    else:
        names, sources = ["model.onnx", *(c.name for c in companions)], [path, *companions]
    missing = [str(source) for source in sources if not source.is_file()]
    if missing:
        raise RepositoryError(f"variant {variant['name']}: {missing} do not exist; run the precision stage again")
    if len(set(names)) != len(names) or VERSION_MANIFEST in names:
        raise RepositoryError(
            f"variant {variant['name']}: its files would share a name in the version folder ({names}, beside "
            f"{VERSION_MANIFEST}); rename the external data file"
        )
    return dict(zip(names, sources))


def _variant_version(
    out: Path, model: str, variant: dict, run: RunDir, serving: ServingConfig, gpu: bool
) -> VersionResult:
    files, name = _variant_files(variant), f"{model}-{variant['name']}"
    if variant["runtime"] == "onnxruntime":
        config = onnx_config(name, files["model.onnx"], serving, gpu)
    else:  # an IR takes the tensors of the ONNX graph it was converted from: the run's export
        model_file = "model.xml" if "model.xml" in files else "model.onnx"
        interface = files.get("model.onnx", run.onnx)
        if not interface.is_file():
            raise RepositoryError(f"variant {variant['name']}: the run's ONNX export {interface} (its tensors) is gone")
        settings = variant.get("settings") or {}
        config = openvino_backend_config(
            name, model_file, interface, serving, variant.get("runtime_precision"), settings
        )
    return write_native_version(out, config, files, {"run": run.run_id, "variant": variant["name"]})


def _alias_choice(variants: list[dict], written: dict[str, str], unwritten: dict[str, str], policy: str):
    """(the variant the alias forwards to, a note when it is not the one the run selected): the run's selection
    when this flavour wrote it, else the best written variant by the run's policy."""
    selected = next((v["name"] for v in variants if v.get("serves_alias")), None)
    if selected in written:
        return selected, ""
    candidates = [v for v in variants if v["name"] in written]
    if policy == "min-latency":
        best = min(candidates, key=lambda v: v.get("latency_p50_ms") or float("inf"))
        measured = f"p50 {best.get('latency_p50_ms') or 0:.2f} ms at batch 1"
    else:
        best = max(candidates, key=lambda v: v.get("throughput_per_s") or 0.0)
        measured = f"{best.get('throughput_per_s') or 0:.0f} samples/s"
    why = (
        f"the run serves {selected} under the plain name, which this flavour does not write "
        f"({unwritten.get(selected, 'it was not accepted')})"
        if selected
        else "the run recorded no selected variant"
    )
    note = f"{why}; the alias forwards to {best['name']} instead, the best it wrote by {policy} ({measured})"
    return best["name"], note


def export_repository(
    run_dir: Path,
    out: Path,
    model: str,
    serving: ServingConfig,
    gpu: bool = True,
    target: EngineTarget | None = None,
    include_engines: bool = True,
    rebuild: Rebuild | None = None,
    engine_dirs: list[Path] | None = None,
    policy: str = "max-throughput",
) -> NativeExport:
    """A native repository for another Triton from a finished run: an `onnxruntime_onnx` model per accepted ONNX
    Runtime variant and a `backend: "openvino"` model per accepted OpenVINO variant (`<model>-<variant>`), a
    `tensorrt_plan` model per engine precision (`<model>-tensorrt-<precision>`) whose engines cover every target
    compute capability, and the ensemble alias `<model>` forwarding to the variant the run selected (or, when this
    flavour cannot write that one, the best it wrote by `policy`, the run's). `engine_dirs` adds engine folders built
    elsewhere for this run. Engines are checked (and rebuilt, if `rebuild` is given) before any model is written."""
    run, out = RunDir(run_dir, create=False), Path(out)
    variants = run.precision_variants()
    folders = sorted(p.parent for p in run.engines.rglob(ENGINE_MANIFEST)) + list(engine_dirs or [])
    plan, left_out = _engine_plan(run, variants, folders, target, rebuild) if folders and include_engines else ({}, [])
    result = NativeExport(versions=[], left_out=left_out)
    written, unwritten = {}, {}
    for variant in (v for v in variants if v["status"] == "accepted"):
        if variant["runtime"] not in ("onnxruntime", "openvino"):
            unwritten[variant["name"]] = f"it runs in {variant['runtime']}"
            result.left_out.append(
                f"{variant['name']}: runs in {variant['runtime']}, which this flavour does not write "
                "(onnxruntime_onnx, openvino and tensorrt_plan only); the Python-backend repository of `tes run` "
                "serves it"
            )
            continue
        version = _variant_version(out, model, variant, run, serving, gpu)
        result.versions.append(version)
        written[variant["name"]] = version.model_name
        if variant["runtime"] == "openvino" and variant.get("runtime_precision") != "bf16":
            result.notes.append(
                f"{version.model_name}: measured best with f32 float layers, but the openvino backend has no "
                "parameter that pins f32 (only HINT_BF16): on a CPU with bf16 kernels (AVX512_BF16, AMX) OpenVINO "
                "defaults to bf16, which the precision stage may have rejected (the Python-backend repository of "
                "`tes run` pins f32)"
            )
    for precision, chosen in plan.items():
        result.versions.append(_engine_version(out, f"{model}-tensorrt-{precision}", chosen, serving, run.run_id))
        if any(manifest.get("version_compatible") for _, manifest in chosen.values()):
            result.server_args = ["--backend-config=tensorrt,version-compatible=true"]
    if not result.versions:
        raise RepositoryError(
            f"run {run.path} has no accepted ONNX Runtime or OpenVINO variant and no usable engine to export"
            + "".join(f"\n  - {line}" for line in result.left_out)
        )
    if written:
        chosen_variant, note = _alias_choice(variants, written, unwritten, policy)
        result.alias_target = written[chosen_variant]
        result.alias = write_alias(out, model, result.alias_target, {"run": run.run_id, "variant": chosen_variant})
        result.notes += [note] if note else []
    return result
