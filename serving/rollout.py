"""Rolling new versions over Triton replicas that read one repository: one replica at a time, each checked before
the next is touched, then the alias on every replica.

    replicas = roll_out(endpoint.every(), new_versions, alias, admin_key=endpoint.admin_key)

For each replica in turn: load every new variant version (Triton loads a new version before it unloads the old
one, so the replica keeps answering), wait until it reports exactly that version READY, and send each variant a
probe request whose answer must match the variant's model file run in this process. Only then the next replica.
When every replica serves the new variants, the alias is loaded on each.

A replica that cannot be reached, fails a load or fails its check stops the rollout with `RolloutError`, which
names the replica, the reason and where every replica stands: those not reached yet keep serving what they served,
and so does the failing one (Triton keeps a version whose successor failed to load); the alias is not moved. The
deploy stage then rolls back (`serving/deploy.py`): the repository names the old versions again and every replica
reloads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import triton_to_np_dtype

from core.errors import ServerError
from core.results import StageOutput
from core.runtimes import RuntimeSettings, open_session
from serving import client, repository
from serving.repository import ServingConfig
from serving.triton import Endpoint

PROBE_BATCH = 2
READY_TIMEOUT_S = 120.0
RELATIVE_TOLERANCE = 0.05  # of the largest |output|: dynamic INT8 rescales with whatever Triton batches alongside


class RolloutError(ServerError):
    """A rollout stopped at one replica; the message says which, why, and what every replica serves now."""


@dataclass(frozen=True)
class Probe:
    """A request for one model and the answer its model file gives in this process, by output name."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class NewVersion:
    model: str
    version: int
    probe: Probe | None = None  # None: only its READY version is checked (why in `unprobed`)
    unprobed: str = ""
    reused: bool = False  # already in the repository before this deploy: a replica serving it is left alone


class ReplicaRollout(StageOutput):
    replica: int  # its place in the rollout, from 1
    http: str
    grpc: str | None = None
    versions: dict[str, str] = {}  # model -> the version READY after the rollout
    checked: str = ""  # what its check compared
    seconds: float = 0.0  # from the start of the rollout until this replica served every new variant version


def probe(
    model_file: str | Path,
    runtime: str,
    runtime_precision: str,
    settings: dict,
    interface: str | Path,
    serving: ServingConfig,
) -> Probe:
    """A synthesized request and the answer of the model file in its own runtime. `ValueError` when an input's
    values cannot be guessed (integers without a value range in the serving config)."""
    batched = serving.max_batch_size > 0
    inputs, outputs = repository.io_from_onnx(Path(interface), batched=batched)
    rng, samples = np.random.default_rng(0), {}
    for tensor in inputs:
        largest = serving.max_dims.get(tensor.name, [])
        shape = [
            size if size != -1 else min(8, largest[axis] if axis < len(largest) else 8)
            for axis, size in enumerate(tensor.dims)
        ]  # dynamic axes short: a probe, not a benchmark
        shape = [min(PROBE_BATCH, serving.max_batch_size), *shape] if batched else shape
        dtype = np.dtype(triton_to_np_dtype(mc.DataType.Name(tensor.data_type).removeprefix("TYPE_")))
        samples[tensor.name] = _values(tensor.name, dtype, shape, serving.value_ranges.get(tensor.name), rng)
    session = open_session(model_file, runtime, runtime_precision or None, settings=RuntimeSettings(**settings))
    answers = session.run(None, samples)
    return Probe(samples, {tensor.name: answer for tensor, answer in zip(outputs, answers)})


def _values(name: str, dtype: np.dtype, shape: list[int], value_range, rng: np.random.Generator) -> np.ndarray:
    """Values the model accepts: within the input's range (floats: [-1, 1] without one); a mask of ones."""
    if dtype.kind == "b" or name == "attention_mask":
        return np.ones(shape, dtype)
    if dtype.kind in "iu":
        if value_range is None:
            raise ValueError(f"input '{name}' ({dtype}) has no value range to draw integers from")
        return rng.integers(int(value_range[0]), int(value_range[1]) + 1, size=shape).astype(dtype)
    low, high = value_range or (-1.0, 1.0)
    return rng.uniform(low, high, size=shape).astype(dtype)


def safe_probe(*args, **kwargs) -> tuple[Probe | None, str]:
    """`probe`, or (None, why) when the inputs cannot be synthesized."""
    try:
        return probe(*args, **kwargs), ""
    except ValueError as error:
        return None, f"no probe request: {error}"


def roll_out(
    replicas: tuple[Endpoint, ...],
    variants: list[NewVersion],
    alias: NewVersion,
    *,
    admin_key: str | None = None,
    check: bool = True,
) -> list[ReplicaRollout]:
    """Load `variants` replica by replica (each checked when `check`), then `alias` on every replica."""
    start, done = time.monotonic(), []
    for number, replica in enumerate(replicas, 1):
        try:
            versions = {new.model: load_version(replica, new, admin_key or replica.admin_key) for new in variants}
            checked = _check(replica, variants) if check else "not checked (one replica: the served check follows)"
        except Exception as error:
            raise RolloutError(_stopped(alias.model, number, replicas, variants, error, "")) from error
        done.append((versions, checked, time.monotonic() - start))
    for number, (replica, (versions, _, _)) in enumerate(zip(replicas, done), 1):
        try:
            versions[alias.model] = load_version(replica, alias, admin_key or replica.admin_key)
        except Exception as error:
            raise RolloutError(_stopped(alias.model, number, replicas, variants, error, "alias")) from error
    return [
        ReplicaRollout(
            replica=number, http=replica.http, grpc=replica.grpc, versions=versions, checked=checked, seconds=seconds
        )
        for number, (replica, (versions, checked, seconds)) in enumerate(zip(replicas, done), 1)
    ]


def load_version(replica: Endpoint, new: NewVersion, admin_key: str | None) -> str:
    """Load `new` on `replica` (unless it is reused and READY there already) and wait until that exact version is
    READY there."""
    if new.reused and str(new.version) in _ready_versions(replica, new.model, admin_key):
        return str(new.version)
    try:
        client.load_model(replica.http, new.model, admin_key=admin_key)
    except ServerError:
        raise
    except Exception as error:  # a replica that is gone: refused or reset connections, in several types
        raise ServerError(f"Triton at {replica.http} is not answering ({type(error).__name__}: {error})") from error
    deadline, wanted = time.monotonic() + READY_TIMEOUT_S, str(new.version)
    while True:
        ready = _ready_versions(replica, new.model, admin_key)
        if wanted in ready:
            return wanted
        if time.monotonic() > deadline:
            raise ServerError(
                f"'{new.model}': version {wanted} is not READY on {replica.http} after {READY_TIMEOUT_S:.0f} s "
                f"(READY: {', '.join(ready) or 'none'})"
            )
        time.sleep(0.1)


def _ready_versions(replica: Endpoint, model: str, admin_key: str | None) -> list[str]:
    states = client.model_states(replica.http, admin_key)
    return sorted(str(s.get("version")) for s in states if s.get("name") == model and s.get("state") == "READY")


def _check(replica: Endpoint, variants: list[NewVersion]) -> str:
    """Each probed variant over each protocol of `replica` against its model file here; what was compared."""
    worst, compared = 0.0, 0
    for new in variants:
        if new.probe is None:
            continue
        for protocol, url in replica.urls.items():
            served = client.infer(url, new.model, new.probe.inputs, protocol)  # type: ignore[arg-type]
            worst = max(worst, _difference(new, served, url, protocol))
            compared += 1
    skipped = [f"{new.model} ({new.unprobed})" for new in variants if new.probe is None]
    summary = f"{compared} answers matched their model files (max |diff| {worst:.2g})"
    return summary + (f"; READY version only: {', '.join(skipped)}" if skipped else "")


def _difference(new: NewVersion, served: dict[str, np.ndarray], url: str, protocol: str) -> float:
    expected = new.probe.expected
    if set(served) != set(expected):
        raise ServerError(
            f"'{new.model}' at {url} over {protocol}: outputs {sorted(served)}, expected {sorted(expected)}"
        )
    worst = 0.0
    for name, want in expected.items():
        got = np.asarray(served[name])
        if got.shape != want.shape or not np.all(np.isfinite(got)):
            raise ServerError(
                f"'{new.model}' version {new.version} at {url} over {protocol}: output '{name}' has shape "
                f"{list(got.shape)}{' and non-finite values' if got.shape == want.shape else ''}, expected "
                f"{list(want.shape)}, finite"
            )
        diff = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
        allowed = 1e-4 + RELATIVE_TOLERANCE * float(np.abs(want).max(initial=0.0))
        if diff > allowed:
            raise ServerError(
                f"'{new.model}' version {new.version} at {url} over {protocol}: output '{name}' differs from its "
                f"model file run here by {diff:.3g} (allowed {allowed:.3g}): the replica serves something else"
            )
        worst = max(worst, diff)
    return worst


def _stopped(
    alias: str,
    number: int,
    replicas: tuple[Endpoint, ...],
    variants: list[NewVersion],
    error: Exception,
    stage: str,
) -> str:
    """Which replica stopped the rollout, why, and what every replica serves now."""
    new = ", ".join(f"{v.model} v{v.version}" for v in variants)
    where = f"replica {number} of {len(replicas)} ({replicas[number - 1].http})"
    if stage == "alias":
        state = (
            f"Every replica serves the new variants ({new}); the alias '{alias}' moved on replicas before "
            f"{number} only."
        )
    else:
        moved = ", ".join(f"{n} ({r.http})" for n, r in enumerate(replicas[: number - 1], 1))
        state = (
            (f"Replicas {moved} serve the new variants ({new}); " if moved else f"No replica serves {new}; ")
            + f"replica {number} and those after it still serve what they served before; the alias "
            f"'{alias}' was not moved."
        )
    reason = str(error).strip().rstrip(";").strip()  # Triton's load errors end in ";\n"
    return (
        f"rollout of '{alias}' stopped at {where}"
        + (" while moving the alias" if stage else "")
        + f": {reason}\n{state} Fix the cause and deploy again (`tes status` shows each replica's versions; "
        "`tes up` restarts a replica that is gone)."
    )
