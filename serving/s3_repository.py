"""Publish Triton model versions to an S3 repository (AWS S3 or any S3-compatible store) so that a version Triton
can see is always complete.

    location = S3Location.parse("s3://models/repo", endpoint_url="http://127.0.0.1:9000")  # or AWS_ENDPOINT_URL
    version = publish_version(location, "digits", "model_repository/digits/3")  # a folder write_version wrote
    tritonserver --model-repository=<location.triton_url()> ...                # s3://127.0.0.1:9000/models/repo

S3 has no rename, and Triton with a `latest` version policy loads the highest numbered folder it finds: a folder
without manifest.json loads (the backend does not check it), and a folder holding only part of the files fails,
or hangs, its load (the Python backend waits for a model.py that is not there). So the commit point is not a
folder but the model's `config.pbtxt`, whose `version_policy { specific { versions: [N] } }` names the one
version Triton may load; one PutObject replaces it atomically. Publishing version N of `<model>`:

1. Check everything that can be checked without the store: URL rules, model and file names, the local version
   against its manifest. Then list `<model>/` (an unreachable store, refused credentials or a missing bucket fail
   here, before anything is written) and check once that the store honours conditional writes.
2. Clean up: a numbered folder with a `.claim` but no manifest.json whose lease ran out (server clock: the claim's
   Last-Modified against the listing's Date) is marked abandoned (compare-and-swap on the claim) and its files
   are deleted. Its number is never reused (TensorRT caches are keyed by version).
3. Claim N = highest number + 1 with `PutObject <model>/N/.claim If-None-Match: *`; a 412 means another publisher
   took N: try N + 1. The claim holds a lease, renewed (If-Match on its ETag) while uploading; a publisher that
   finds its claim taken over stops.
4. Upload every file, read each back (GET) and compare its sha256 with the local one; then renew the claim and
   write manifest.json last (If-None-Match: *).
5. Commit: replace `<model>/config.pbtxt` (If-Match on the ETag read, so racing publishers cannot lose an update)
   with the version's config naming N, unless it already names a newer version.

Until step 5 Triton never loads N: the config names an older version, and Triton ignores other numbered folders.
Triton does copy the whole model folder (every version) to local disk at each load. `load_verified` re-reads a
version against its manifest before asking Triton to load it, so a file changed after publishing is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import boto3
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import ChecksumError, RepositoryError, ServerError
from core.files import atomic_write_text
from serving import client, repository
from serving.repository import VERSION_MANIFEST, check_model_name, config_text, parse_config
from serving.s3_store import SEGMENT, S3Location, Store

log = logging.getLogger(__name__)

CLAIM = ".claim"
REPOSITORY_MARKER = ".tes-repository"  # Triton refuses to start on an S3 path that holds no object
CONFIG = "config.pbtxt"
DEFAULT_LEASE_S = 3600.0  # a publish that takes longer must pass a longer lease_s
_CONDITIONAL_WRITES_OK: set[tuple[str | None, str]] = set()  # (endpoint, bucket) pairs already probed

# --- claims -------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    """A version number reserved by one publisher, held while its lease runs."""

    location: S3Location
    model: str
    version: int
    token: str
    lease_s: float
    etag: str
    renewed_at: float  # time.monotonic() of the last write of the claim

    @property
    def key(self) -> str:
        return self.location.key(self.model, self.version, CLAIM)


def _claim_body(state: str, token: str, lease_s: float, note: str = "") -> bytes:
    return json.dumps(
        {"state": state, "token": token, "lease_s": lease_s, "host": socket.gethostname(), "pid": os.getpid()}
        | ({"note": note} if note else {}),
        sort_keys=True,
    ).encode()


def claim_version(location: S3Location, model: str, lease_s: float = DEFAULT_LEASE_S) -> Claim:
    """Reserve the next free version number of `model` (If-None-Match on `<model>/<N>/.claim`)."""
    store = Store(location)
    folders, _ = _scan(store, check_model_name(model))
    _require_conditional_writes(store, model)
    return _claim(store, model, lease_s, max(folders, default=0) + 1)


def _claim(store: Store, model: str, lease_s: float, first: int) -> Claim:
    token = uuid.uuid4().hex
    for version in range(first, first + 1000):
        key = store.location.key(model, version, CLAIM)
        etag = store.put(key, _claim_body("publishing", token, lease_s), if_none_match=True)
        if etag:
            return Claim(store.location, model, version, token, lease_s, etag, time.monotonic())
        log.debug("version %s of '%s' is taken by another publisher; trying %s", version, model, version + 1)
    raise RepositoryError(f"no free version number for '{model}' in {store.location} from {first} to {first + 999}")


def _renew(store: Store, claim: Claim, force: bool = False) -> None:
    if not force and time.monotonic() - claim.renewed_at < claim.lease_s / 3:
        return
    etag = store.put(claim.key, _claim_body("publishing", claim.token, claim.lease_s), if_match=claim.etag)
    if etag is None:
        raise RepositoryError(
            f"lost the claim on version {claim.version} of '{claim.model}' in {claim.location}: its lease of "
            f"{claim.lease_s:.0f} s ran out and another publisher marked it abandoned; nothing of it will be "
            "served. Publish again, with a longer lease_s if uploads take this long"
        )
    claim.etag, claim.renewed_at = etag, time.monotonic()


def _abandon(store: Store, model: str, version: int, names: list[str], etag: str, note: str) -> bool:
    """Mark a claim abandoned (only if nobody renewed it since `etag`) and delete its version's other files."""
    key = store.location.key(model, version, CLAIM)
    if store.put(key, _claim_body("abandoned", "", 0, note), if_match=etag) is None:
        return False
    store.delete([store.location.key(model, version, name) for name in names if name != CLAIM])
    return True


def _scan(store: Store, model: str) -> tuple[dict[int, dict[str, datetime]], datetime]:
    """version -> {file name: last modified} for every numbered folder of `model`, and the store's clock."""
    base = store.location.key(model) + "/"
    objects, now = store.list(base)
    folders: dict[int, dict[str, datetime]] = {}
    for entry in objects:
        number, slash, name = entry["Key"][len(base) :].partition("/")
        if slash and name and number.isdigit() and str(int(number)) == number:
            folders.setdefault(int(number), {})[name] = entry["LastModified"]
    return folders, now


def clean_incomplete(location: S3Location, model: str) -> list[int]:
    """Abandon the versions of `model` whose claim's lease ran out before their manifest was written."""
    store = Store(location)
    return _clean(store, check_model_name(model), *_scan(store, model))


def _clean(store: Store, model: str, folders: dict[int, dict[str, datetime]], now: datetime) -> list[int]:
    cleaned = []
    for version, files in sorted(folders.items()):
        if VERSION_MANIFEST in files or CLAIM not in files:
            continue  # complete, or not ours
        found = store.get(store.location.key(model, version, CLAIM))
        if found is None:
            continue
        try:
            state = json.loads(found.body)
        except ValueError:
            state = {}
        leftovers = [name for name in files if name != CLAIM]
        if state.get("state") == "abandoned":
            store.delete([store.location.key(model, version, name) for name in leftovers])  # uploads that landed late
            continue
        if (now - found.modified).total_seconds() <= float(state.get("lease_s", DEFAULT_LEASE_S)):
            continue  # its publisher may still be uploading
        if _abandon(store, model, version, leftovers, found.etag, "lease ran out before the manifest was written"):
            log.warning("abandoned incomplete version %s of '%s' in %s", version, model, store.location)
            cleaned.append(version)
    return cleaned


def _require_conditional_writes(store: Store, model: str) -> None:
    """Claims and config updates need If-None-Match / If-Match on PutObject; a store that ignores them would let
    two publishers take the same number. Checked once per endpoint and bucket."""
    marker = (store.location.endpoint_url, store.location.bucket)
    if marker in _CONDITIONAL_WRITES_OK:
        return
    key = store.location.key(model, f".conditional-write-probe-{uuid.uuid4().hex[:12]}")  # a file: Triton ignores it
    try:
        store.put(key, b"probe", if_none_match=True)
        ignored = [
            header
            for header, honoured in (
                ("If-None-Match", store.put(key, b"probe", if_none_match=True) is None),
                ("If-Match", store.put(key, b"probe", if_match='"0"') is None),
            )
            if not honoured
        ]
    finally:
        store.delete([key])
    if ignored:
        raise RepositoryError(
            f"the store at {store.location.endpoint_url or 'AWS'} ignores {', '.join(ignored)} on PutObject, so two "
            "publishers could take the same version number; use a store with conditional writes (AWS S3, MinIO, "
            "moto) or publish from one place only"
        )
    _CONDITIONAL_WRITES_OK.add(marker)


# --- publishing ---------------------------------------------------------------------------------------------


def _local_version(
    version_dir: Path, config_path: Path | None, model: str
) -> tuple[dict[str, str], bytes, mc.ModelConfig]:
    """(file name -> sha256 without the manifest, the manifest's bytes, the model's config) of a local version,
    checked against its manifest; every name problem reported at once."""
    if not version_dir.is_dir():
        raise RepositoryError(f"local version folder {version_dir} does not exist; write it with write_version first")
    recorded = repository.verify_version(version_dir)  # ChecksumError when a local file changed
    problems = []
    for entry in sorted(version_dir.iterdir()):
        if entry.is_dir() and entry.name != "__pycache__":
            problems.append(f"{entry}: a folder; a version holds files only")
        elif entry.is_file() and entry.name not in recorded and entry.name != VERSION_MANIFEST:
            problems.append(f"{entry}: not in {VERSION_MANIFEST}; it would be served unchecked")
    for name in recorded:
        if not SEGMENT.match(name):
            problems.append(f"{name!r}: Triton reads only file names of [0-9a-zA-Z._-] from S3; rename it")
    config_path = config_path or version_dir.parent / CONFIG
    if not config_path.is_file():
        problems.append(f"{config_path}: missing; the model's config.pbtxt is published with the version")
    if problems:
        raise RepositoryError(f"cannot publish {version_dir}:\n  - " + "\n  - ".join(problems))
    config = parse_config(config_path.read_text(encoding="utf-8"))
    config.name = model
    return dict(sorted(recorded.items())), (version_dir / VERSION_MANIFEST).read_bytes(), config


def publish_version(
    location: S3Location,
    model_name: str,
    local_version_dir: str | Path,
    *,
    config_path: str | Path | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> int:
    """Publish a local version folder (and its model's config.pbtxt, beside it unless `config_path`) as the next
    version of `model_name`; returns its number. See the module docstring for the protocol."""
    model, version_dir = check_model_name(model_name), Path(local_version_dir)
    files, manifest, config = _local_version(version_dir, Path(config_path) if config_path else None, model)
    store = Store(location)
    folders, now = _scan(store, model)  # the first request: nothing is written if the store refuses it
    _require_conditional_writes(store, model)
    _clean(store, model, folders, now)
    claim = _claim(store, model, lease_s, max(folders, default=0) + 1)
    uploaded: list[str] = []
    try:
        for name, sha256 in files.items():
            key = store.location.key(model, claim.version, name)
            uploaded.append(name)
            store.upload(key, version_dir / name)
            _renew(store, claim)  # before the read-back: a claim taken over explains a missing object
            _check_object(store, key, sha256, version_dir / name)
        _renew(store, claim, force=True)  # the lease now outlasts the manifest write
        manifest_key = store.location.key(model, claim.version, VERSION_MANIFEST)
        if store.put(manifest_key, manifest, if_none_match=True) is None:
            raise RepositoryError(f"s3://{location.bucket}/{manifest_key} appeared while this publisher held the claim")
        uploaded.append(VERSION_MANIFEST)
        _check_object(store, manifest_key, hashlib.sha256(manifest).hexdigest(), version_dir / VERSION_MANIFEST)
    except BaseException as error:
        _give_up(store, claim, uploaded, error)
        raise
    if not _commit(store, model, claim.version, config):
        log.warning("version %s of '%s' is published; a newer one is already served", claim.version, model)
    return claim.version


def _check_object(store: Store, key: str, expected: str, path: Path) -> None:
    got = store.sha256(key)
    if got != expected:
        raise ChecksumError(
            f"s3://{store.location.bucket}/{key} reads back with sha256 {got[:16]}..., expected {expected[:16]}... "
            f"(the local {path}); the upload was damaged or something else wrote the object. Nothing was "
            f"published: publish again, and make sure nothing else writes under {store.location}"
        )


def _give_up(store: Store, claim: Claim, uploaded: list[str], error: BaseException) -> None:
    """A failed publish abandons its own claim at once rather than leaving it to the lease."""
    try:
        _abandon(store, claim.model, claim.version, uploaded, claim.etag, f"publish failed: {error}"[:500])
    except Exception as cleanup_error:  # the original error matters more; the next publish cleans up
        log.warning("could not abandon version %s of '%s': %s", claim.version, claim.model, cleanup_error)


def served_by(config: mc.ModelConfig) -> int | None:
    versions = config.version_policy.specific.versions if config.version_policy.HasField("specific") else []
    return max(versions) if versions else None


def wait_past_newest_write(store: Store, model: str, timeout_s: float = 5.0) -> None:
    """Until the store's clock has left the second of the newest object under `<model>/`. Triton stamps a loaded
    model with the newest Last-Modified in its folder (whole seconds on S3) and answers a load whose stamp did not
    grow with success, loading nothing: a config written within that second would never be loaded."""
    prefix = store.location.key(model) + "/"
    objects, now = store.list(prefix)
    newest = max((entry["LastModified"] for entry in objects), default=None)
    deadline = time.monotonic() + timeout_s
    while newest is not None and now <= newest and time.monotonic() < deadline:
        time.sleep(0.1)
        _, now = store.list(prefix)


def _commit(store: Store, model: str, version: int, config: mc.ModelConfig) -> bool:
    """Point `<model>/config.pbtxt` at `version` unless it names a newer one; False when it does. Written in a later
    second than anything else of the model (`wait_past_newest_write`), so Triton sees the change."""
    serving = mc.ModelConfig()
    serving.CopyFrom(config)
    serving.version_policy.Clear()
    serving.version_policy.specific.versions.append(version)
    text, key = config_text(serving).encode(), store.location.key(model, CONFIG)
    for _ in range(50):
        wait_past_newest_write(store, model)
        current = store.get(key)
        if current is None:
            etag = store.put(key, text, if_none_match=True)
        elif (served_by(parse_config(current.body.decode("utf-8"))) or 0) >= version:
            return False
        else:
            etag = store.put(key, text, if_match=current.etag)
        if etag:
            return True  # None: another publisher changed it between our read and write; read it again
    raise RepositoryError(f"s3://{store.location.bucket}/{key} kept changing; version {version} is not served")


def delete_versions(location: S3Location, model: str, numbers: list[int]) -> None:
    """Delete whole versions of `model`, each manifest first and its claim last: a version caught half deleted has a
    claim but no manifest, so it is incomplete (never loaded; cleaned up by a later publish, its lease run out)."""
    store = Store(location)
    for number in numbers:
        prefix = location.key(check_model_name(model), number) + "/"
        objects, _ = store.list(prefix)
        keys = [entry["Key"] for entry in objects]
        manifest, claim = prefix + VERSION_MANIFEST, prefix + CLAIM
        if manifest in keys:
            store.delete([manifest])
        store.delete([key for key in keys if key not in (manifest, claim)])
        if claim in keys:
            store.delete([claim])


def restore_config(location: S3Location, model: str, text: str, ours: int) -> None:
    """Put back `<model>/config.pbtxt` as it was before a deploy (`text`, naming the version served then) after its
    rollout failed, only while the config still names `ours`, the version that deploy committed (If-Match on it): a
    deploy that committed since is not undone. The version gone back to must still be complete."""
    store = Store(location)
    key = location.key(check_model_name(model), CONFIG)
    old = served_by(parse_config(text))
    if old is not None and store.get(location.key(model, old, VERSION_MANIFEST)) is None:
        raise RepositoryError(f"version {old} of '{model}' is gone from {location} (pruned?); nothing to go back to")
    current = store.get(key)
    if current is None or served_by(parse_config(current.body.decode("utf-8"))) != ours:
        raise RepositoryError(
            f"s3://{location.bucket}/{key} no longer names version {ours} (another deploy committed since); "
            "it was left as it is"
        )
    wait_past_newest_write(store, model)  # else Triton may take the restored config for no change
    if store.put(key, text.encode("utf-8"), if_match=current.etag) is None:
        raise RepositoryError(f"s3://{location.bucket}/{key} changed while rolling back (another deploy?); left as is")


def ensure_repository(location: S3Location) -> None:
    """Make `location` a path Triton starts on before any model is published: Triton refuses an S3 path with no
    object under it ("repository path is not a valid directory"). A file at the root: Triton lists no model."""
    body = json.dumps({"what": "a Triton model repository written by train-export-serve"}).encode()
    Store(location).put(location.key(REPOSITORY_MARKER), body, if_none_match=True)


# --- reading ------------------------------------------------------------------------------------------------


def list_versions(location: S3Location, model: str) -> list[int]:
    """The complete versions of `model` (those with a manifest.json), oldest first."""
    folders, _ = _scan(Store(location), check_model_name(model))
    return sorted(number for number, files in folders.items() if VERSION_MANIFEST in files)


def config_if_any(location: S3Location, model: str) -> mc.ModelConfig | None:
    found = Store(location).get(location.key(check_model_name(model), CONFIG))
    return parse_config(found.body.decode("utf-8")) if found is not None else None


def read_config(location: S3Location, model: str) -> mc.ModelConfig:
    config = config_if_any(location, model)
    if config is None:
        raise RepositoryError(f"model '{model}' has no {CONFIG} in {location}; publish a version first")
    return config


def served_version(location: S3Location, model: str) -> int | None:
    """The version `<model>/config.pbtxt` lets Triton load, or None when the model has no config."""
    found = Store(location).get(location.key(check_model_name(model), CONFIG))
    return served_by(parse_config(found.body.decode("utf-8"))) if found else None


def read_manifest(location: S3Location, model: str, version: int) -> dict:
    found = Store(location).get(location.key(check_model_name(model), version, VERSION_MANIFEST))
    if found is None:
        raise RepositoryError(
            f"version {version} of '{model}' in {location} has no {VERSION_MANIFEST}: it is incomplete or does not "
            f"exist (complete versions: {list_versions(location, model)})"
        )
    return json.loads(found.body)


def verify_version(location: S3Location, model: str, version: int | None = None) -> dict[str, str]:
    """Re-read every file of a version (default: the served one) against its manifest; ChecksumError lists every
    difference."""
    version = version if version is not None else served_version(location, model)
    if version is None:
        raise RepositoryError(f"model '{model}' has no served version in {location}; publish one first")
    recorded = read_manifest(location, model, version)["files"]
    store, problems = Store(location), []
    for name, expected in sorted(recorded.items()):
        key = location.key(model, version, name)
        got = store.sha256(key)
        if got != expected:
            problems.append(f"s3://{location.bucket}/{key}: sha256 {got[:16]}..., expected {expected[:16]}...")
    if problems:
        raise ChecksumError(
            f"version {version} of '{model}' changed since it was published:\n  - "
            + "\n  - ".join(problems)
            + "\nPublish a fresh version; never overwrite objects inside a version folder."
        )
    return recorded


def list_models(location: S3Location) -> list[str]:
    """The models of the repository that have a config.pbtxt (what a freshly started Triton can load), by name."""
    base = location.key() + "/" if location.prefix else ""
    objects, _ = Store(location).list(base)
    configs = [entry["Key"][len(base) : -len(CONFIG) - 1] for entry in objects if entry["Key"].endswith("/" + CONFIG)]
    return sorted(name for name in configs if name and "/" not in name)  # `<model>/config.pbtxt`, nothing deeper


def fetch_version(location: S3Location, model: str, destination: str | Path, version: int | None = None) -> Path:
    """Download a version (default: the served one) into `destination/<model>/<version>/`, with the model's
    config.pbtxt beside it, every file checked against the manifest (ChecksumError on a difference); returns the
    version folder. The local copy is what `repository` functions read (the benchmark's in-process baselines)."""
    version = version if version is not None else served_version(location, model)
    if version is None:
        raise RepositoryError(f"model '{model}' has no served version in {location}; deploy it first")
    manifest, store = read_manifest(location, model, version), Store(location)
    folder = Path(destination) / check_model_name(model) / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        if not SEGMENT.match(name):
            raise RepositoryError(f"version {version} of '{model}' in {location} lists a file named {name!r}")
        store.download(location.key(model, version, name), folder / name)
    atomic_write_text(folder / VERSION_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    atomic_write_text(folder.parent / CONFIG, config_text(read_config(location, model)))
    repository.verify_version(folder)
    return folder


def delete_model(location: S3Location, model: str) -> int:
    """Delete every object of `model` (a scratch model nobody serves); returns how many there were."""
    store = Store(location)
    objects, _ = store.list(location.key(check_model_name(model)) + "/")
    store.delete([entry["Key"] for entry in objects])
    return len(objects)


def load_verified(
    location: S3Location, model: str, server_url: str, admin_key: str | None = None, timeout_s: float = 120.0
) -> str:
    """Verify the served version of `model` against its manifest, then ask Triton to load it; returns the
    version Triton reports. A version that fails the check is never loaded: what Triton serves stays."""
    verify_version(location, model)
    version = served_version(location, model)
    client.load_model(server_url, model, timeout_s=timeout_s, admin_key=admin_key)
    deadline, ready = time.monotonic() + 10, []
    while time.monotonic() < deadline:  # the old version may still be listed while it unloads
        states = client.model_states(server_url, admin_key)
        ready = [str(s.get("version")) for s in states if s.get("name") == model and s.get("state") == "READY"]
        if str(version) in ready:
            return str(version)
        time.sleep(0.1)
    raise ServerError(
        f"Triton at {server_url} serves version(s) {', '.join(ready) or 'none'} of '{model}' after the load, though "
        f"{CONFIG} names {version}: Triton saw no change under s3://{location.bucket}/{location.key(model)}/ since "
        "its last load (S3's Last-Modified counts whole seconds); load it again"
    )


def write_alias(
    location: S3Location, alias: str, target: str, provenance: dict | None = None, lease_s: float = DEFAULT_LEASE_S
) -> int:
    """The same ensemble alias `repository.write_alias` writes (a config forwarding to `target`, a version
    holding only manifest.json), published as the next version of `alias`."""
    target_config = read_config(location, target)
    with tempfile.TemporaryDirectory(prefix="tes-alias-") as folder:
        atomic_write_text(Path(folder) / target / CONFIG, config_text(target_config))
        local = repository.write_alias(folder, alias, target, provenance)
        return publish_version(location, alias, local.path, lease_s=lease_s)


def server_environment(location: S3Location) -> dict[str, str]:
    """AWS_* variables that let a Triton child process read `location` with the credentials boto3's chain finds
    here (environment, profile, instance role). Temporary credentials are frozen: restart Triton before they
    expire, or give Triton its own profile."""
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise RepositoryError(
            f"no AWS credentials found for {location}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    frozen = credentials.get_frozen_credentials()
    env = {
        "AWS_ACCESS_KEY_ID": frozen.access_key,
        "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
        "AWS_DEFAULT_REGION": session.region_name or "us-east-1",
    }
    return env | ({"AWS_SESSION_TOKEN": frozen.token} if frozen.token else {})
