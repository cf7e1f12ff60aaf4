"""moto's S3 server for the integration tests: a real S3 HTTP API on a free loopback port, with IAM authentication
on, and the environment that points boto3's credential chain at it (nobody's ~/.aws leaks in)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import boto3
import pytest

from serving import triton
from serving.s3_repository import S3Location

BUCKET = "models"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}:\n{triton.log_tail(log_path)}")
        if not triton.port_is_free(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on {port} within {timeout_s:.0f} s")


def _enable_authentication(endpoint: str) -> dict[str, str]:
    """An IAM user allowed s3:*, the bucket, then every later request must be signed with that user's key."""
    anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    anonymous |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **anonymous)
    iam.create_user(UserName="tes")
    iam.put_user_policy(UserName="tes", PolicyName="s3-all", PolicyDocument=json.dumps(ADMIN_POLICY))
    key = iam.create_access_key(UserName="tes")["AccessKey"]
    boto3.client("s3", **anonymous).create_bucket(Bucket=BUCKET)
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).read()
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextlib.contextmanager
def moto_store(folder: Path) -> Iterator[SimpleNamespace]:
    """moto's S3 server on a free loopback port with bucket `models`, its credentials in the environment; stopped
    after. Yields `endpoint`, `admin` (a boto3 client) and `location(prefix)` (an S3Location in the bucket)."""
    port, log_path = triton.free_port(), folder / "moto.log"
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, process, log_path)
        endpoint = f"http://127.0.0.1:{port}"
        credentials = _enable_authentication(endpoint)
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                env.delenv(name, raising=False)
            env.setenv("AWS_CONFIG_FILE", str(folder / "no-config"))  # no ~/.aws of whoever runs the tests
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-credentials"))
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            for name, value in credentials.items():
                env.setenv(name, value)
            yield SimpleNamespace(
                endpoint=endpoint,
                bucket=BUCKET,
                # a session of its own: boto3's default session keeps the credentials it first found
                admin=boto3.session.Session().client("s3", endpoint_url=endpoint),
                location=lambda prefix: S3Location.parse(f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint),
            )
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
