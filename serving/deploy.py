"""The deploy stage: each variant as its own Triton model `<model>-<variant>`, and `<model>` as an ensemble alias
of the selected one, so clients keep one URL; every version checksummed, then loaded into the running Triton.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from core.results import StageOutput, StageResult, Status, timed
from serving import client, repository
from serving.repository import ServingConfig
from serving.triton import Endpoint


@dataclass(frozen=True)
class Deployable:
    """One model to serve: the variant's name, its model file (ONNX, OpenVINO IR `.xml`, AOTInductor `.pt2`), the
    files it needs beside it, and the runtime, precision and settings the backend runs it with."""

    name: str
    onnx_path: str  # the model file, whatever its format
    runtime: str = "onnxruntime"
    runtime_precision: str = ""
    settings: dict = field(default_factory=dict)  # core.runtimes.RuntimeSettings fields that differ from defaults
    files: tuple[str, ...] = ()  # beside the model file: an OpenVINO IR's .bin


class DeployedVersion(StageOutput):
    model: str
    version: int
    path: str
    reused: bool  # the newest version already held exactly these files and this config
    ready_version: str | None = None  # what Triton reported READY after loading it


class DeployOutput(StageOutput):
    model: str  # the alias clients call
    version: int
    path: str
    selected: str  # the variant the alias forwards to
    variants: dict[str, DeployedVersion]
    reused: bool
    loaded: bool
    load_skipped: str = ""  # why nothing was loaded, when nothing was
    ready_version: str | None = None
    triton_http: str | None = None
    triton_grpc: str | None = None


def deploy(
    repository_path: str | Path,
    model: str,
    deployables: list[Deployable],
    selected: str,
    serving: ServingConfig,
    provenance: dict,
    endpoint: Endpoint | None,
    load_skipped: str = "",
) -> StageResult[DeployOutput]:
    """Write every deployable and the alias into the repository; load them into `endpoint` when there is one
    (else `load_skipped` says why not)."""
    with timed() as clock:
        deployed = {}
        # the tensors of every variant are FP32's: read from its ONNX file for models that are not ONNX (IR, .pt2)
        interface = next((d.onnx_path for d in deployables if d.onnx_path.endswith(".onnx")), None)
        for item in deployables:
            config = dataclasses.replace(
                serving,
                runtime=item.runtime,
                runtime_precision=item.runtime_precision,
                runtime_settings=dict(item.settings),
            )
            version = repository.write_version(
                repository_path,
                f"{model}-{item.name}",
                item.onnx_path,
                config,
                provenance={**provenance, "variant": item.name},
                companions=item.files,
                interface=interface,
            )
            repository.verify_version(version.path)
            deployed[item.name] = DeployedVersion(
                model=version.model_name, version=version.version, path=str(version.path), reused=version.reused
            )
        alias = repository.write_alias(
            repository_path, model, deployed[selected].model, provenance={**provenance, "variant": selected}
        )
        output = DeployOutput(
            model=model,
            version=alias.version,
            path=str(alias.path),
            selected=selected,
            variants=deployed,
            reused=alias.reused,
            loaded=False,
            load_skipped=load_skipped,
        )
        if endpoint is not None:
            output = _load(output, endpoint)
    return StageResult(stage="deploy", status=Status.OK, seconds=clock["seconds"], output=output)


def _load(output: DeployOutput, endpoint: Endpoint) -> DeployOutput:
    """Load every variant, then the alias (which needs its target loaded)."""
    variants = {
        name: entry.model_copy(
            update={"ready_version": client.load_model(endpoint.http, entry.model, admin_key=endpoint.admin_key)}
        )
        for name, entry in output.variants.items()
    }
    ready = client.load_model(endpoint.http, output.model, admin_key=endpoint.admin_key)
    return output.model_copy(
        update={
            "variants": variants,
            "ready_version": ready,
            "loaded": True,
            "load_skipped": "",
            "triton_http": endpoint.http,
            "triton_grpc": endpoint.grpc,
        }
    )
