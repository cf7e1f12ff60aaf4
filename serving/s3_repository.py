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

import functools
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import ChecksumError, ConfigError, RepositoryError
from core.files import atomic_write_text
from serving import client, repository
from serving.repository import VERSION_MANIFEST, check_model_name, config_text, parse_config

log = logging.getLogger(__name__)

CLAIM = ".claim"
REPOSITORY_MARKER = ".tes-repository"  # Triton refuses to start on an S3 path that holds no object
CONFIG = "config.pbtxt"
DEFAULT_LEASE_S = 3600.0  # a publish that takes longer must pass a longer lease_s
_BUCKET_CHARS = re.compile(r"^[0-9a-z.-]+$")  # Triton's S3 URL parser
_SEGMENT = re.compile(r"^[0-9A-Za-z._-]+$")  # Triton's S3 URL parser, for every path segment
_HOST = re.compile(r"^[0-9A-Za-z.-]+$")
_CONDITIONAL_WRITES_OK: set[tuple[str | None, str]] = set()  # (endpoint, bucket) pairs already probed


@dataclass(frozen=True)
class S3Location:
    """A repository root: `s3://bucket/prefix` on AWS (endpoint_url None) or on the store at `endpoint_url`."""

    bucket: str
    prefix: str = ""  # no leading or trailing '/'; "" is the bucket's root
    endpoint_url: str | None = None  # scheme://host:port

    @classmethod
    def parse(cls, url: str, endpoint_url: str | None = None) -> S3Location:
        """`s3://bucket/prefix`, or Triton's own `s3://host:port/bucket/prefix`. The endpoint comes from
        `endpoint_url`, else the URL, else boto3's `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`. Every broken rule
        is reported at once (ConfigError), before anything touches the store."""
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise ConfigError([f"url: expected s3://bucket/prefix, got {url!r}"], where="S3 repository location")
        rest, in_url, problems = url[len("s3://") :], None, []
        scheme, has_scheme = (
            ("https" if rest.startswith("https://") else "http"),
            rest.startswith(("http://", "https://")),
        )
        rest = rest.split("://", 1)[1] if has_scheme else rest
        first, _, tail = rest.partition("/")
        if ":" in first:  # Triton's form names the endpoint inside the URL
            in_url, (first, _, tail) = f"{scheme}://{first}", tail.partition("/")
        elif has_scheme:
            problems.append(f"endpoint in the URL: Triton needs an explicit port (s3://{scheme}://{first}:PORT/...)")
        if endpoint_url and in_url and endpoint_url.rstrip("/") != in_url:
            problems.append(f"endpoint: the URL names {in_url} but endpoint_url is {endpoint_url}; give one of them")
        endpoint = endpoint_url or in_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        endpoint = endpoint.rstrip("/") if endpoint else None
        prefix = tail[:-1] if tail.endswith("/") else tail
        problems += _bucket_problems(first) + _prefix_problems(prefix) + _endpoint_problems(endpoint)
        if problems:
            raise ConfigError(problems, where=f"S3 repository location {url!r}")
        return cls(first, prefix, endpoint)

    def key(self, *parts: object) -> str:
        return "/".join(str(part) for part in (self.prefix, *parts) if str(part))

    def triton_url(self) -> str:
        """What `tritonserver --model-repository=` takes: `s3://bucket/prefix` on AWS, `s3://host:port/bucket/
        prefix` (`s3://https://host:port/...` over TLS) for any other endpoint."""
        path = "/".join(part for part in (self.bucket, self.prefix) if part)
        if self.endpoint_url is None:
            return f"s3://{path}"
        parts = urlsplit(self.endpoint_url)
        return f"s3://{'https://' if parts.scheme == 'https' else ''}{parts.hostname}:{parts.port}/{path}"

    def __str__(self) -> str:
        where = f"s3://{'/'.join(part for part in (self.bucket, self.prefix) if part)}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


def _bucket_problems(bucket: str) -> list[str]:
    problems = []
    if not _BUCKET_CHARS.match(bucket or "-"):
        bad = sorted({char for char in bucket if not _BUCKET_CHARS.match(char)})
        problems.append(
            f"bucket {bucket!r}: Triton accepts only lowercase letters, digits, '.' and '-' ([0-9a-z.-]); "
            f"found {bad}; rename the bucket"
        )
    if not 3 <= len(bucket) <= 63 or not bucket[:1].isalnum() or not bucket[-1:].isalnum() or ".." in bucket:
        problems.append(
            f"bucket {bucket!r}: S3 bucket names have 3-63 characters, start and end with a letter or digit and "
            "hold no '..'; use a valid bucket name"
        )
    return problems


def _prefix_problems(prefix: str) -> list[str]:
    problems = []
    for segment in prefix.split("/") if prefix else []:
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            problems.append(
                f"path segment {segment!r}: Triton accepts only [0-9a-zA-Z._-] in each path segment (no empty "
                "segment, no '//', no '.' or '..'); rename it"
            )
    return problems


def _endpoint_problems(endpoint: str | None) -> list[str]:
    if endpoint is None:
        return []
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not _HOST.match(parts.hostname or "") or parts.path not in ("", "/"):
        return [f"endpoint {endpoint!r}: expected http(s)://host:port with no path, e.g. http://127.0.0.1:9000"]
    if port is None:
        return [
            f"endpoint {endpoint!r}: Triton needs an explicit port for a custom endpoint "
            f"(expected {parts.scheme}://{parts.hostname}:PORT); add the port"
        ]
    return []


# what boto3's credential chain and region read from the environment: a change gives a new client
_CLIENT_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@functools.lru_cache(maxsize=16)
def _client(endpoint_url: str | None, *environment: str | None):
    """One session and S3 client per endpoint and credential environment: building one costs about 0.1 s, and a
    deploy makes dozens of requests. boto3 clients are thread-safe; refreshable credentials refresh themselves."""
    session = boto3.session.Session()
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"} if endpoint_url else None,  # what Triton uses
    )
    return session, session.client("s3", endpoint_url=endpoint_url, config=config)


@dataclass(frozen=True)
class _Object:
    body: bytes
    etag: str
    modified: datetime


class _Store:
    """One S3 client bound to a location; every failure becomes a RepositoryError naming the bucket and key."""

    def __init__(self, location: S3Location):
        self.location = location
        self.session, self.s3 = _client(location.endpoint_url, *(os.environ.get(name) for name in _CLIENT_ENV))

    def list(self, prefix: str) -> tuple[list[dict], datetime]:
        """Every object under `prefix`, and the store's clock (the first page's Date header)."""
        objects, now = [], None
        with self._errors("listing", prefix):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix):
                now = now or parsedate_to_datetime(page["ResponseMetadata"]["HTTPHeaders"]["date"])
                objects.extend(page.get("Contents", []))
        return objects, now

    def get(self, key: str) -> _Object | None:
        with self._errors("reading", key):
            try:
                found = self.s3.get_object(Bucket=self.location.bucket, Key=key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return _Object(found["Body"].read(), found["ETag"], found["LastModified"])

    def put(self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """The new object's ETag, or None when the condition did not hold (412)."""
        conditions = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._errors("writing", key):
            try:
                return self.s3.put_object(Bucket=self.location.bucket, Key=key, Body=body, **conditions)["ETag"]
            except ClientError as error:
                if conditions and error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    return None
                raise

    def upload(self, key: str, path: Path) -> None:
        with self._errors("uploading", key):
            self.s3.upload_file(str(path), self.location.bucket, key)  # multipart beyond 8 MB

    def download(self, key: str, path: Path) -> None:
        with self._errors("downloading", key):
            self.s3.download_file(self.location.bucket, key, str(path))

    def sha256(self, key: str) -> str:
        """The sha256 of the object as the store serves it now, or "missing"."""
        digest = hashlib.sha256()
        with self._errors("reading back", key):
            try:
                body = self.s3.get_object(Bucket=self.location.bucket, Key=key)["Body"]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return "missing"
                raise
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._errors("deleting", batch[0]["Key"]):
                self.s3.delete_objects(Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True})

    @contextmanager
    def _errors(self, doing: str, key: str):
        where = f"s3://{self.location.bucket}/{key}"
        try:
            yield
        except S3UploadFailedError as error:
            if isinstance(error.__cause__, ClientError):
                raise self._explain(doing, where, error.__cause__) from error
            raise RepositoryError(f"{doing} {where}: {error}") from error
        except ClientError as error:
            raise self._explain(doing, where, error) from error
        except NoCredentialsError as error:
            raise RepositoryError(
                f"{doing} {where}: no AWS credentials found in boto3's chain; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), as for the aws command"
            ) from error
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as error:
            raise RepositoryError(
                f"{doing} {where}: cannot reach the S3 endpoint {self.location.endpoint_url or '(AWS)'} ({error}); "
                "is the store running, and are endpoint_url / AWS_ENDPOINT_URL right?"
            ) from error
        except BotoCoreError as error:
            raise RepositoryError(
                f"{doing} {where} at {self.location.endpoint_url or 'AWS'} failed: {error}; "
                "check that the endpoint is an S3 store and reachable"
            ) from error

    def _explain(self, doing: str, where: str, error: ClientError) -> RepositoryError:
        code = error.response.get("Error", {}).get("Code", "")
        endpoint = self.location.endpoint_url or "AWS"
        credentials = self.session.get_credentials()
        key_id = f"{credentials.access_key[:4]}..." if credentials else "(none)"
        fixes = {
            "NoSuchBucket": f"bucket '{self.location.bucket}' does not exist at {endpoint}; create it first "
            f"(aws s3 mb s3://{self.location.bucket}) or fix the repository URL",
            "InvalidAccessKeyId": f"{endpoint} does not know access key id {key_id}; check AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE",
            "SignatureDoesNotMatch": f"the secret key does not match access key id {key_id} at {endpoint}; check "
            "AWS_SECRET_ACCESS_KEY",
            "AccessDenied": f"access key id {key_id} may not do this; it needs s3:ListBucket, s3:GetObject, "
            "s3:PutObject and s3:DeleteObject on the repository prefix",
            "NotImplemented": f"{endpoint} does not implement this request (conditional writes need a store that "
            "supports If-None-Match / If-Match on PutObject)",
        }
        fix = fixes.get(code) or f"the store answered {code}: {error.response.get('Error', {}).get('Message', '')}"
        return RepositoryError(f"{doing} {where}: {fix}")


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
    store = _Store(location)
    folders, _ = _scan(store, check_model_name(model))
    _require_conditional_writes(store, model)
    return _claim(store, model, lease_s, max(folders, default=0) + 1)


def _claim(store: _Store, model: str, lease_s: float, first: int) -> Claim:
    token = uuid.uuid4().hex
    for version in range(first, first + 1000):
        key = store.location.key(model, version, CLAIM)
        etag = store.put(key, _claim_body("publishing", token, lease_s), if_none_match=True)
        if etag:
            return Claim(store.location, model, version, token, lease_s, etag, time.monotonic())
        log.debug("version %s of '%s' is taken by another publisher; trying %s", version, model, version + 1)
    raise RepositoryError(f"no free version number for '{model}' in {store.location} from {first} to {first + 999}")


def _renew(store: _Store, claim: Claim, force: bool = False) -> None:
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


def _abandon(store: _Store, model: str, version: int, names: list[str], etag: str, note: str) -> bool:
    """Mark a claim abandoned (only if nobody renewed it since `etag`) and delete its version's other files."""
    key = store.location.key(model, version, CLAIM)
    if store.put(key, _claim_body("abandoned", "", 0, note), if_match=etag) is None:
        return False
    store.delete([store.location.key(model, version, name) for name in names if name != CLAIM])
    return True


def _scan(store: _Store, model: str) -> tuple[dict[int, dict[str, datetime]], datetime]:
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
    store = _Store(location)
    return _clean(store, check_model_name(model), *_scan(store, model))


def _clean(store: _Store, model: str, folders: dict[int, dict[str, datetime]], now: datetime) -> list[int]:
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


def _require_conditional_writes(store: _Store, model: str) -> None:
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
        if not _SEGMENT.match(name):
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
    store = _Store(location)
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


def _check_object(store: _Store, key: str, expected: str, path: Path) -> None:
    got = store.sha256(key)
    if got != expected:
        raise ChecksumError(
            f"s3://{store.location.bucket}/{key} reads back with sha256 {got[:16]}..., expected {expected[:16]}... "
            f"(the local {path}); the upload was damaged or something else wrote the object. Nothing was "
            f"published: publish again, and make sure nothing else writes under {store.location}"
        )


def _give_up(store: _Store, claim: Claim, uploaded: list[str], error: BaseException) -> None:
    """A failed publish abandons its own claim at once rather than leaving it to the lease."""
    try:
        _abandon(store, claim.model, claim.version, uploaded, claim.etag, f"publish failed: {error}"[:500])
    except Exception as cleanup_error:  # the original error matters more; the next publish cleans up
        log.warning("could not abandon version %s of '%s': %s", claim.version, claim.model, cleanup_error)


def _served_by(config: mc.ModelConfig) -> int | None:
    versions = config.version_policy.specific.versions if config.version_policy.HasField("specific") else []
    return max(versions) if versions else None


def _commit(store: _Store, model: str, version: int, config: mc.ModelConfig) -> bool:
    """Point `<model>/config.pbtxt` at `version` unless it names a newer one; False when it does."""
    serving = mc.ModelConfig()
    serving.CopyFrom(config)
    serving.version_policy.Clear()
    serving.version_policy.specific.versions.append(version)
    text, key = config_text(serving).encode(), store.location.key(model, CONFIG)
    for _ in range(50):
        current = store.get(key)
        if current is None:
            etag = store.put(key, text, if_none_match=True)
        elif (_served_by(parse_config(current.body.decode("utf-8"))) or 0) >= version:
            return False
        else:
            etag = store.put(key, text, if_match=current.etag)
        if etag:
            return True  # None: another publisher changed it between our read and write; read it again
    raise RepositoryError(f"s3://{store.location.bucket}/{key} kept changing; version {version} is not served")


def ensure_repository(location: S3Location) -> None:
    """Make `location` a path Triton starts on before any model is published: Triton refuses an S3 path with no
    object under it ("repository path is not a valid directory"). A file at the root: Triton lists no model."""
    body = json.dumps({"what": "a Triton model repository written by train-export-serve"}).encode()
    _Store(location).put(location.key(REPOSITORY_MARKER), body, if_none_match=True)


# --- reading ------------------------------------------------------------------------------------------------


def list_versions(location: S3Location, model: str) -> list[int]:
    """The complete versions of `model` (those with a manifest.json), oldest first."""
    folders, _ = _scan(_Store(location), check_model_name(model))
    return sorted(number for number, files in folders.items() if VERSION_MANIFEST in files)


def read_config(location: S3Location, model: str) -> mc.ModelConfig:
    store = _Store(location)
    found = store.get(location.key(check_model_name(model), CONFIG))
    if found is None:
        raise RepositoryError(f"model '{model}' has no {CONFIG} in {location}; publish a version first")
    return parse_config(found.body.decode("utf-8"))


def served_version(location: S3Location, model: str) -> int | None:
    """The version `<model>/config.pbtxt` lets Triton load, or None when the model has no config."""
    found = _Store(location).get(location.key(check_model_name(model), CONFIG))
    return _served_by(parse_config(found.body.decode("utf-8"))) if found else None


def read_manifest(location: S3Location, model: str, version: int) -> dict:
    found = _Store(location).get(location.key(check_model_name(model), version, VERSION_MANIFEST))
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
    store, problems = _Store(location), []
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
    objects, _ = _Store(location).list(base)
    configs = [entry["Key"][len(base) : -len(CONFIG) - 1] for entry in objects if entry["Key"].endswith("/" + CONFIG)]
    return sorted(name for name in configs if name and "/" not in name)  # `<model>/config.pbtxt`, nothing deeper


def fetch_version(location: S3Location, model: str, destination: str | Path, version: int | None = None) -> Path:
    """Download a version (default: the served one) into `destination/<model>/<version>/`, with the model's
    config.pbtxt beside it, every file checked against the manifest (ChecksumError on a difference); returns the
    version folder. The local copy is what `repository` functions read (the benchmark's in-process baselines)."""
    version = version if version is not None else served_version(location, model)
    if version is None:
        raise RepositoryError(f"model '{model}' has no served version in {location}; deploy it first")
    manifest, store = read_manifest(location, model, version), _Store(location)
    folder = Path(destination) / check_model_name(model) / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        if not _SEGMENT.match(name):
            raise RepositoryError(f"version {version} of '{model}' in {location} lists a file named {name!r}")
        store.download(location.key(model, version, name), folder / name)
    atomic_write_text(folder / VERSION_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    atomic_write_text(folder.parent / CONFIG, config_text(read_config(location, model)))
    repository.verify_version(folder)
    return folder


def delete_model(location: S3Location, model: str) -> int:
    """Delete every object of `model` (a scratch model nobody serves); returns how many there were."""
    store = _Store(location)
    objects, _ = store.list(location.key(check_model_name(model)) + "/")
    store.delete([entry["Key"] for entry in objects])
    return len(objects)


def load_verified(
    location: S3Location, model: str, server_url: str, admin_key: str | None = None, timeout_s: float = 120.0
) -> str:
    """Verify the served version of `model` against its manifest, then ask Triton to load it; returns the
    version Triton reports. A version that fails the check is never loaded: what Triton serves stays."""
    verify_version(location, model)
    return client.load_model(server_url, model, timeout_s=timeout_s, admin_key=admin_key)


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
