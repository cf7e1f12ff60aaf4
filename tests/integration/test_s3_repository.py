"""The S3 repository publisher against a real S3 HTTP API (moto_server, with IAM authentication on) and a real
Triton reading `s3://127.0.0.1:PORT/models/repo`: a version Triton can see is always complete."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="moto[server] provides the S3 store these tests run against")

from core.errors import ChecksumError, ConfigError, RepositoryError, ServerError  # noqa: E402
from core.runtimes import open_session  # noqa: E402
from serving import client, repository, s3_repository, triton  # noqa: E402
from serving.repository import ServingConfig  # noqa: E402
from serving.s3_repository import S3Location  # noqa: E402
from serving.s3_store import Store  # noqa: E402
from tests.conftest import TINY_DIGITS  # noqa: E402
from tests.integration import s3_store  # noqa: E402

pytestmark = pytest.mark.integration

BUCKET = s3_store.BUCKET


def _keys(admin, prefix: str = "") -> set[str]:
    pages = admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {entry["Key"] for page in pages for entry in page.get("Contents", [])}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny digits-cnn written by the local repository writer: its version folder, ONNX and a batch."""
    from export.onnx_export import ExportConfig, export_onnx
    from recipes import build_recipe

    folder = tmp_path_factory.mktemp("tiny")
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    onnx_path = export_onnx(recipe, recipe.build_model(), folder / "export", ExportConfig()).output.onnx
    written = repository.write_version(folder / "repo", "digits", onnx_path, ServingConfig(max_batch_size=16))
    batch = list(recipe.eval_batches(8, max_samples=8))[0].inputs
    expected = open_session(onnx_path).run(None, batch)[0]
    return SimpleNamespace(version_dir=written.path, batch=batch, expected=expected)


@pytest.fixture(scope="module")
def served(s3, tmp_path_factory):
    """A real Triton whose model repository is `s3://127.0.0.1:PORT/models/repo`; (server, location)."""
    location, work_dir = s3.location("repo"), tmp_path_factory.mktemp("triton-s3")
    s3_repository.ensure_repository(location)
    server = triton.start(location.triton_url(), work_dir, env=s3_repository.server_environment(location))
    assert server.repository == location.triton_url()  # as written: Path() would fold its '//'
    try:
        yield server, location
    finally:
        triton.stop(server.pid)


def _ready_versions(server, model: str, settle_s: float = 10.0) -> list[str]:
    """The READY versions of `model` once no other version of it is still unloading."""
    deadline = time.monotonic() + settle_s
    while True:
        states = [entry for entry in client.model_states(server.http_url) if entry["name"] == model]
        if time.monotonic() > deadline or not any(entry.get("state") == "UNLOADING" for entry in states):
            return [entry["version"] for entry in states if entry.get("state") == "READY"]
        time.sleep(0.1)


def _assert_answers(server, model: str, tiny) -> None:
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        logits = client.infer(url, model, tiny.batch, protocol)["logits"]
        np.testing.assert_allclose(logits, tiny.expected, rtol=0, atol=1e-5)


def test_published_version_is_served_over_http_and_grpc_and_through_an_alias(served, tiny):
    server, location = served
    assert s3_repository.publish_version(location, "digits", tiny.version_dir) == 1
    assert s3_repository.list_versions(location, "digits") == [1]
    assert s3_repository.served_version(location, "digits") == 1
    local_manifest = json.loads((tiny.version_dir / "manifest.json").read_text())
    assert s3_repository.read_manifest(location, "digits", 1) == local_manifest
    assert s3_repository.load_verified(location, "digits", server.http_url) == "1"
    _assert_answers(server, "digits", tiny)

    assert s3_repository.write_alias(location, "digits-latest", "digits") == 1
    assert s3_repository.read_config(location, "digits-latest").platform == "ensemble"
    assert s3_repository.read_manifest(location, "digits-latest", 1)["provenance"] == {"alias_of": "digits"}
    s3_repository.load_verified(location, "digits-latest", server.http_url)
    _assert_answers(server, "digits-latest", tiny)


def test_files_go_up_first_then_the_manifest_then_the_config(s3, tiny, monkeypatch):
    writes: list[str] = []
    put, upload = Store.put, Store.upload

    def recorded_put(self, key: str, *args, **kwargs):
        writes.append(key)
        return put(self, key, *args, **kwargs)

    def recorded_upload(self, key: str, path: Path) -> None:
        writes.append(key)
        upload(self, key, path)

    monkeypatch.setattr(Store, "put", recorded_put)
    monkeypatch.setattr(Store, "upload", recorded_upload)
    assert s3_repository.publish_version(s3.location("order"), "digits", tiny.version_dir) == 1
    version_writes = [key.removeprefix("order/digits/1/") for key in writes if key.startswith("order/digits/1/")]
    # the claim, the files, the claim renewed (its lease now outlasts the manifest write), the manifest
    assert version_writes == [".claim", "model.onnx", "model.py", ".claim", "manifest.json"]
    assert writes[-1] == "order/digits/config.pbtxt"


def test_racing_publishers_take_distinct_versions(s3, tiny):
    location = s3.location("race")
    start, results, errors = threading.Barrier(8), [], []

    def run(work) -> None:
        start.wait()
        try:
            results.append(work())
        except Exception as error:  # reported below: an assert inside a thread would be lost
            errors.append(error)

    publishes = [lambda: ("published", s3_repository.publish_version(location, "digits", tiny.version_dir))] * 2
    claims = [lambda: ("claimed", s3_repository.claim_version(location, "digits").version)] * 6
    threads = [threading.Thread(target=run, args=(work,)) for work in publishes + claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    numbers = [number for _, number in results]
    assert len(numbers) == 8 and len(set(numbers)) == 8, results
    published = sorted(number for kind, number in results if kind == "published")
    assert s3_repository.list_versions(location, "digits") == published
    assert s3_repository.served_version(location, "digits") == published[-1]
    assert s3_repository.verify_version(location, "digits")
    # a claimer with a stale view of the folder (it starts at 1) gets 412 on every taken number, never a taken one
    stale = s3_repository._claim(Store(location), "digits", 60.0, first=1)
    assert stale.version == max(numbers) + 1
    numbers.append(stale.version)
    # the claims are still within their lease: the next publish leaves them alone and takes a new number
    claimed = sorted(number for kind, number in results if kind == "claimed") + [stale.version]
    assert s3_repository.publish_version(location, "digits", tiny.version_dir) == max(numbers) + 1
    assert all(_keys(s3.admin, f"race/digits/{number}/") == {f"race/digits/{number}/.claim"} for number in claimed)


@pytest.mark.parametrize(
    ("url", "endpoint", "rule"),
    [
        ("s3://Models/repo", None, "[0-9a-z.-]"),
        ("s3://my_models/repo", None, "[0-9a-z.-]"),
        ("s3://models/my repo", None, "[0-9a-zA-Z._-]"),
        ("s3://models/repo/v@1", None, "[0-9a-zA-Z._-]"),
        ("s3://models//repo", None, "no empty segment"),
        ("s3://models/repo", "http://127.0.0.1", "explicit port"),
        ("s3://https://store.example/models", None, "explicit port"),
        ("gs://models/repo", None, "expected s3://bucket/prefix"),
    ],
)
def test_url_rules_are_checked_before_anything_is_written(s3, url, endpoint, rule):
    before = _keys(s3.admin)
    with pytest.raises(ConfigError, match=re.escape(rule)):
        S3Location.parse(url, endpoint_url=endpoint)
    assert _keys(s3.admin) == before


def test_every_broken_rule_is_reported_at_once_and_bad_model_names_are_refused(s3, tiny):
    with pytest.raises(ConfigError) as caught:
        S3Location.parse("s3://Bad_Bucket/ok/b@d", endpoint_url="http://localhost")
    assert len(caught.value.problems) == 3, caught.value.problems
    before = _keys(s3.admin)
    with pytest.raises(RepositoryError, match="model name 'digits v2' is not allowed"):
        s3_repository.publish_version(s3.location("names"), "digits v2", tiny.version_dir)
    assert _keys(s3.admin) == before


def test_triton_urls_name_the_endpoint_with_its_port(s3):
    location = S3Location.parse("s3://models/a/b", endpoint_url="http://127.0.0.1:9000")
    assert location.triton_url() == "s3://127.0.0.1:9000/models/a/b"
    assert S3Location.parse(location.triton_url()) == location
    assert S3Location.parse("s3://models/a/").triton_url() == "s3://models/a"  # AWS: no endpoint in the URL
    secure = S3Location.parse("s3://https://store.example:9443/models")
    assert (secure.endpoint_url, secure.prefix, secure.triton_url()) == (
        "https://store.example:9443",
        "",
        "s3://https://store.example:9443/models",
    )


def test_missing_bucket_refused_endpoint_and_wrong_credentials_fail_clearly_and_write_nothing(s3, tiny, monkeypatch):
    before, buckets = _keys(s3.admin), s3.admin.list_buckets()["Buckets"]
    missing = S3Location.parse("s3://no-such-bucket/repo", endpoint_url=s3.endpoint)
    with pytest.raises(RepositoryError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        s3_repository.publish_version(missing, "digits", tiny.version_dir)
    refused = S3Location.parse(f"s3://{BUCKET}/repo", endpoint_url=f"http://127.0.0.1:{triton.free_port()}")
    with pytest.raises(RepositoryError, match="cannot reach the S3 endpoint http://127.0.0.1"):
        s3_repository.publish_version(refused, "digits", tiny.version_dir)
    with monkeypatch.context() as env:
        env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(RepositoryError, match="the secret key does not match access key id"):
            s3_repository.publish_version(s3.location("creds"), "digits", tiny.version_dir)
    with monkeypatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODYKNOWS")
        with pytest.raises(RepositoryError, match="does not know access key id AKIA"):
            s3_repository.publish_version(s3.location("creds"), "digits", tiny.version_dir)
    assert _keys(s3.admin) == before and s3.admin.list_buckets()["Buckets"] == buckets


def test_corrupted_object_is_refused_at_load_and_the_old_version_keeps_serving(served, tiny, s3):
    server, location = served
    assert s3_repository.publish_version(location, "digits-corrupt", tiny.version_dir) == 1
    assert s3_repository.load_verified(location, "digits-corrupt", server.http_url) == "1"
    assert s3_repository.publish_version(location, "digits-corrupt", tiny.version_dir) == 2
    s3.admin.put_object(Bucket=BUCKET, Key="repo/digits-corrupt/2/model.onnx", Body=b"not an ONNX model")

    with pytest.raises(
        ChecksumError, match=r"s3://models/repo/digits-corrupt/2/model.onnx: sha256 \w+\.\.\., expected"
    ):
        s3_repository.load_verified(location, "digits-corrupt", server.http_url)
    assert _ready_versions(server, "digits-corrupt") == ["1"]
    _assert_answers(server, "digits-corrupt", tiny)


def test_triton_asked_directly_refuses_a_corrupted_object_and_keeps_serving(served, tiny, s3):
    server, location = served
    assert s3_repository.publish_version(location, "digits-direct", tiny.version_dir) == 1
    assert s3_repository.load_verified(location, "digits-direct", server.http_url) == "1"
    # the commit of version 2 lands in a later second than version 1's files (s3_repository.wait_past_newest_write):
    # else Triton, whose stamp of a model is its newest Last-Modified, would answer the load below with success and
    # load nothing
    assert s3_repository.publish_version(location, "digits-direct", tiny.version_dir) == 2
    s3.admin.put_object(Bucket=BUCKET, Key="repo/digits-direct/2/model.onnx", Body=b"not an ONNX model")
    with pytest.raises(ServerError, match="failed to load model 'digits-direct'"):
        client.load_model(server.http_url, "digits-direct", timeout_s=60)
    assert _ready_versions(server, "digits-direct") == ["1"]
    _assert_answers(server, "digits-direct", tiny)


def test_incomplete_upload_is_never_loaded_and_is_cleaned_by_the_next_publish(served, tiny, s3):
    server, location = served
    assert s3_repository.publish_version(location, "digits-partial", tiny.version_dir) == 1
    # a publisher that dies after its claim and half the files
    claim = s3_repository.claim_version(location, "digits-partial", lease_s=0.5)
    s3.admin.upload_file(
        str(tiny.version_dir / "model.onnx"), BUCKET, f"repo/digits-partial/{claim.version}/model.onnx"
    )
    assert claim.version == 2 and s3_repository.list_versions(location, "digits-partial") == [1]
    assert s3_repository.served_version(location, "digits-partial") == 1
    assert client.load_model(server.http_url, "digits-partial") == "1"
    assert _ready_versions(server, "digits-partial") == ["1"]

    time.sleep(1.1)  # the store's clock has 1 s steps: past the 0.5 s lease for sure
    assert s3_repository.publish_version(location, "digits-partial", tiny.version_dir) == 3  # 2 is never reused
    assert _keys(s3.admin, "repo/digits-partial/2/") == {"repo/digits-partial/2/.claim"}
    claim_state = s3.admin.get_object(Bucket=BUCKET, Key="repo/digits-partial/2/.claim")["Body"].read()
    assert json.loads(claim_state)["state"] == "abandoned"
    assert s3_repository.list_versions(location, "digits-partial") == [1, 3]
    assert s3_repository.load_verified(location, "digits-partial", server.http_url) == "3"
    assert _ready_versions(server, "digits-partial") == ["3"]
    _assert_answers(server, "digits-partial", tiny)


def test_a_damaged_upload_aborts_the_publish_and_cleans_up_after_itself(s3, tiny, monkeypatch):
    location = s3.location("damaged")
    upload = Store.upload

    def damaging_upload(self, key: str, path: Path) -> None:
        if key.endswith("model.onnx"):
            self.s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes()[:-1])  # one byte short
        else:
            upload(self, key, path)

    monkeypatch.setattr(Store, "upload", damaging_upload)
    with pytest.raises(
        ChecksumError, match=r"s3://models/damaged/digits/1/model.onnx reads back with sha256 .*expected"
    ):
        s3_repository.publish_version(location, "digits", tiny.version_dir)
    assert _keys(s3.admin, "damaged/") == {"damaged/digits/1/.claim"}
    assert s3_repository.list_versions(location, "digits") == []
    assert s3_repository.served_version(location, "digits") is None


def test_a_publisher_that_outlived_its_lease_stops_before_its_manifest(s3, tiny, monkeypatch):
    location = s3.location("slow")
    upload = Store.upload

    def slow_upload(self, key: str, path: Path) -> None:
        upload(self, key, path)
        if key.endswith("model.onnx"):  # another publisher comes by after the lease ran out
            time.sleep(1.1)
            s3_repository.clean_incomplete(location, "digits")

    monkeypatch.setattr(Store, "upload", slow_upload)
    with pytest.raises(RepositoryError, match="lost the claim on version 1 of 'digits'"):
        s3_repository.publish_version(location, "digits", tiny.version_dir, lease_s=0.5)
    assert _keys(s3.admin, "slow/") == {"slow/digits/1/.claim"}  # abandoned by the other publisher, files gone
