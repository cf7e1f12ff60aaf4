"""Where an S3 location is and how it is talked to: `S3Location` (a bucket and prefix on AWS or any S3-compatible
endpoint, checked against Triton's URL rules) and `Store` (one S3 client bound to it, turning every failure into a
`RepositoryError` that names the bucket, the key and the fix). The model repository (`serving/s3_repository.py`)
and the run store (`flows/run_store.py`) are built on it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
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

from core.errors import ConfigError, RepositoryError

_BUCKET_CHARS = re.compile(r"^[0-9a-z.-]+$")  # Triton's S3 URL parser
SEGMENT = re.compile(r"^[0-9A-Za-z._-]+$")  # Triton's S3 URL parser, for every path segment
_HOST = re.compile(r"^[0-9A-Za-z.-]+$")


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
        if not SEGMENT.match(segment) or segment in (".", ".."):
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


class Store:
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
                answer = self.s3.delete_objects(Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True})
            failed = answer.get("Errors", [])  # DeleteObjects answers 200 and lists the keys it could not delete
            if failed:
                first = failed[0]
                raise RepositoryError(
                    f"deleting s3://{self.location.bucket}/{first.get('Key')}: {first.get('Code')}: "
                    f"{first.get('Message')} ({len(failed)} of {len(batch)} keys not deleted)"
                )

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
