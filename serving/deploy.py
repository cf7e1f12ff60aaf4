"""The deploy stage: each variant as its own Triton model `<model>-<variant>`, and `<model>` as an ensemble alias
of the selected one, so clients keep one URL; every version checksummed, then loaded into the running Triton.

The repository is a local folder or an S3 URL (`serving/targets.py`). With several Triton replicas over it, the
new versions roll over them one replica at a time, each checked before the next (`serving/rollout.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from core.results import StageOutput, StageResult, Status, timed
from serving import rollout
from serving.repository import ServingConfig
from serving.rollout import NewVersion, ReplicaRollout
from serving.targets import Pointer, Target, open_target
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
    files: tuple[str, ...] = ()  # beside the model file: an OpenVINO IR's .bin, an ONNX graph's external data


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
    repository: str = ""  # the folder or the s3:// URL the versions went to
    replicas: list[ReplicaRollout] = []  # each replica, in rollout order: what it serves, how it was checked
    pruned: dict[str, list[int]] = {}  # model -> versions deleted after the deploy (serving.keep_versions)
    prune_problems: list[str] = []  # housekeeping that failed (the deploy itself succeeded)


def deploy(
    repository_path: str | Path,
    model: str,
    deployables: list[Deployable],
    selected: str,
    serving: ServingConfig,
    provenance: dict,
    endpoint: Endpoint | None,
    load_skipped: str = "",
    keep_versions: int = 0,
) -> StageResult[DeployOutput]:
    """Write every deployable and the alias into the repository (a folder, relative to the project home, or an
    `s3://` URL); load them into `endpoint` and its replicas when there is one (else `load_skipped` says why not).
    Then, with `keep_versions`, delete all but the newest that many versions of each (and the served one)."""
    with timed() as clock:
        target = open_target(repository_path)
        if endpoint is not None:
            _require_same_repository(target, endpoint)
        # what the repository serves now, put back if the rollout fails (a deploy that fails changes nothing)
        before = [target.pointer(name) for name in (*(f"{model}-{d.name}" for d in deployables), model)]
        deployed = {}
        # the tensors of every variant are FP32's: read from its ONNX file for models that are not ONNX (IR, .pt2)
        interface = next((d.onnx_path for d in deployables if d.onnx_path.endswith(".onnx")), None)
        for item in deployables:
            version = target.write_version(
                f"{model}-{item.name}",
                item.onnx_path,
                _config_of(item, serving),
                provenance={**provenance, "variant": item.name},
                companions=item.files,
                interface=interface,
            )
            deployed[item.name] = DeployedVersion(
                model=version.model, version=version.version, path=version.path, reused=version.reused
            )
        alias = target.write_alias(model, deployed[selected].model, provenance={**provenance, "variant": selected})
        output = DeployOutput(
            model=model,
            version=alias.version,
            path=alias.path,
            selected=selected,
            variants=deployed,
            reused=alias.reused,
            loaded=False,
            load_skipped=load_skipped,
            repository=target.url,
        )
        if endpoint is not None:
            try:
                output = _load(output, endpoint, target, deployables, serving, interface)
            except Exception as error:  # a rollout stopped, or a version that failed its check before any load
                note = _roll_back(target, before, output, endpoint)
                if isinstance(error, rollout.RolloutError):
                    raise rollout.RolloutError(f"{error}\n{note}") from error
                error.add_note(note)
                raise
        if keep_versions:
            output = _prune(target, output, keep_versions)
    return StageResult(stage="deploy", status=Status.OK, seconds=clock["seconds"], output=output)


def _config_of(item: Deployable, serving: ServingConfig) -> ServingConfig:
    return dataclasses.replace(
        serving,
        runtime=item.runtime,
        runtime_precision=item.runtime_precision,
        runtime_settings=dict(item.settings),
        precision=item.name,  # GPU instances: the TensorRT execution provider's fp16 / int8 switches
    )


def _require_same_repository(target: Target, endpoint: Endpoint) -> None:
    """Refuse, before writing anything, to deploy into one repository and load from a Triton reading another."""
    for replica in endpoint.every():
        if replica.repository and not target.same_as(replica.repository):
            raise ConfigError(  # a configuration mistake: retrying the stage cannot help
                [
                    f"repository: Triton at {replica.http} serves the repository {replica.repository}, but this "
                    f"deploy writes to {target.url}; deploy to the server's repository (--param "
                    f"repository={replica.repository}) or point serving.triton_url at a Triton that reads this one"
                ],
                where="deploy",
            )


def _load(
    output: DeployOutput,
    endpoint: Endpoint,
    target: Target,
    deployables: list[Deployable],
    serving: ServingConfig,
    interface: str | None,
) -> DeployOutput:
    """Every variant, then the alias (which needs its target loaded), replica by replica; with several replicas
    each is checked with a probe request before the next is touched."""
    replicas = endpoint.every()
    for entry in [*output.variants.values(), output]:
        target.verify(entry.model, entry.version)  # once, before any replica reads it
    variants = []
    for item in deployables:
        entry = output.variants[item.name]
        found, why = (None, "one replica" if len(replicas) == 1 else "no ONNX file gives its tensors")
        if len(replicas) > 1 and interface:
            found, why = rollout.safe_probe(
                item.onnx_path,
                item.runtime,
                item.runtime_precision,
                item.settings,
                interface,
                _config_of(item, serving),
            )
        variants.append(NewVersion(entry.model, entry.version, found, why, entry.reused))
    rolled = rollout.roll_out(
        replicas,
        variants,
        NewVersion(output.model, output.version, reused=output.reused),
        admin_key=endpoint.admin_key,
        check=len(replicas) > 1,
    )
    first = rolled[0].versions
    return output.model_copy(
        update={
            "variants": {
                name: entry.model_copy(update={"ready_version": first[entry.model]})
                for name, entry in output.variants.items()
            },
            "ready_version": first[output.model],
            "loaded": True,
            "load_skipped": "",
            "triton_http": endpoint.http,
            "triton_grpc": endpoint.grpc,
            "replicas": rolled,
        }
    )


def _prune(target: Target, output: DeployOutput, keep: int) -> DeployOutput:
    pruned, problems = {}, []
    for model in [*(entry.model for entry in output.variants.values()), output.model]:
        try:
            deleted = target.prune(model, keep)
        except Exception as error:  # housekeeping: the deploy itself is done
            problems.append(f"old versions of '{model}' were not deleted: {error}")
            continue
        if deleted:
            pruned[model] = deleted
    return output.model_copy(update={"pruned": pruned, "prune_problems": problems})


def _roll_back(target: Target, before: list[Pointer], output: DeployOutput, endpoint: Endpoint) -> str:
    """After a failed rollout: the repository names the versions it served before the deploy again, and every
    replica is asked to load them, so replicas that took the new version go back and a replica that restarts later
    loads the old one too. Returns what was done, for the error message; a failure here is reported, not raised
    over the rollout's own error."""
    new = {entry.model: entry.version for entry in [*output.variants.values(), output]}
    changed = [p for p in before if p.version is not None and new.get(p.model) != p.version]
    fresh = [p.model for p in before if p.version is None]
    problems: list[str] = []
    restored = []
    for pointer in changed:
        try:
            target.restore(pointer, new[pointer.model])
        except Exception as error:
            problems.append(f"the repository's config of '{pointer.model}' was not restored: {error}")
        else:
            restored.append(pointer)
    for replica in endpoint.every():
        for pointer in restored:
            old = rollout.NewVersion(pointer.model, pointer.version or 0)
            try:  # until exactly the old version is READY there (the new one may still be listed while it unloads)
                rollout.load_version(replica, old, endpoint.admin_key or replica.admin_key)
            except Exception as error:
                problems.append(f"{replica.http} did not reload '{pointer.model}': {str(error).strip()}")
    named = ", ".join(f"{p.model} v{p.version}" for p in restored) or "nothing"
    text = f"Rolled back: the repository serves {named} again, and every replica was asked to load it"
    if fresh:
        text += f"; new models ({', '.join(fresh)}) stay in the repository, with nothing older to go back to"
    return text + (". Not done: " + "; ".join(problems) + "." if problems else ".")
