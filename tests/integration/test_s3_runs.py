"""Run folders in S3 (`runs_dir=s3://...`), on moto's S3 server: three "machines" (three project homes, each with
its own local copy) share one runs folder. A run that fails on the first is resumed on the second from what S3
holds; the third, changing only a precision setting, reuses train and export that the first made, found through
the store's stage cache. Every file is checked against its sha256 before it is reused."""

from __future__ import annotations

import json
import shutil

import pytest

from core.errors import ConfigError
from core.files import sha256_file
from flows import pipeline
from flows.params import parse_params
from flows.pipeline import resumable_run, run_pipeline
from tests.conftest import TINY_DIGITS_RUN

pytestmark = pytest.mark.integration

DIGITS = {**TINY_DIGITS_RUN, "precision": {**TINY_DIGITS_RUN["precision"], "variants": ["fp32", "int8-dynamic"]}}


def _objects(s3, prefix: str) -> dict[str, bytes]:
    listed = s3.admin.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :]: s3.admin.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_a_run_in_s3_is_resumed_on_another_machine_and_its_stages_are_cached_for_a_third(s3, tmp_path, monkeypatch):
    port = s3.endpoint.rsplit(":", 1)[1]
    runs_url = f"s3://127.0.0.1:{port}/{s3.bucket}/runs"  # Triton's form: the endpoint in the URL
    params = parse_params({**DIGITS, "runs_dir": runs_url, "repository": str(tmp_path / "repository")})

    monkeypatch.setenv("TES_HOME", str(tmp_path / "machine-a"))
    with monkeypatch.context() as failing:
        failing.setattr(pipeline, "precision_stage", lambda *_: (_ for _ in ()).throw(RuntimeError("power lost")))
        with pytest.raises(RuntimeError, match="power lost"):
            run_pipeline(params)
    (run_id,) = {key.split("/")[0] for key in _objects(s3, "runs/") if not key.startswith(".stage-cache")}
    in_s3 = _objects(s3, f"runs/{run_id}/")
    manifest = json.loads(in_s3["manifest.json"])
    assert manifest["status"] == "failed" and "power lost" in manifest["error"]
    assert set(manifest["stages"]) == {"train", "export"}  # what finished before the failure
    local_a = tmp_path / "machine-a" / ".tes" / "s3-runs" / s3.bucket / "runs" / run_id
    for name in ("train/model.pt", "export/model.onnx"):  # every file as written, read back against its sha256
        assert __import__("hashlib").sha256(in_s3[name]).hexdigest() == sha256_file(local_a / name)

    monkeypatch.setenv("TES_HOME", str(tmp_path / "machine-b"))
    stale = tmp_path / "machine-b" / ".tes" / "s3-runs" / s3.bucket / "runs" / run_id / "train" / "checkpoint.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(bytes(len(in_s3["train/checkpoint.pt"])))  # same size, other bytes: S3's copy must win
    resumed_params, folder = resumable_run(f"{runs_url}/{run_id}")
    assert stale.read_bytes() == in_s3["train/checkpoint.pt"]
    assert folder.path == tmp_path / "machine-b" / ".tes" / "s3-runs" / s3.bucket / "runs" / run_id
    resumed = run_pipeline(resumed_params, resume=folder)
    assert resumed.train.reason.startswith("resumed:") and resumed.export.reason.startswith("resumed:")
    assert resumed.precision.ok and not resumed.precision.reason
    assert str(folder.path) in resumed.export.output.onnx  # this machine's copy, checked before it was reused
    in_s3 = _objects(s3, f"runs/{run_id}/")
    assert json.loads(in_s3["manifest.json"])["status"] == "completed" and "report.md" in in_s3
    assert "precision/variants.json" in in_s3

    monkeypatch.setenv("TES_HOME", str(tmp_path / "machine-c"))
    changed = parse_params({**params.model_dump(), "precision": {**DIGITS["precision"], "per_channel": False}})
    third = run_pipeline(changed)
    assert third.train.reason == f"cached: same inputs, code and configuration as {run_id}"
    assert third.export.reason.startswith("cached:") and third.precision.ok and not third.precision.reason
    assert third.run_id != run_id and json.loads(_objects(s3, f"runs/{third.run_id}/")["manifest.json"])[
        "stage_folders"
    ]["train"].startswith(str(tmp_path / "machine-c"))
    # a native repository from the run machine B finished, exported on C: the variants' paths are C's copy
    from flows.run_store import RunStore
    from serving.native_repository import export_repository
    from serving.repository import ServingConfig

    shutil.rmtree(tmp_path / "machine-b")  # B is another machine: nothing of its copy is here
    finished = RunStore(runs_url).download(run_id)
    exported = export_repository(finished.path, tmp_path / "native", "digits", ServingConfig(), gpu=False)
    assert "digits-fp32" in {v.model_name for v in exported.versions}


def test_an_s3_runs_dir_breaking_the_url_rules_is_refused_before_a_run_starts():
    with pytest.raises(ConfigError, match=r"runs_dir.*bucket 'Runs_Bucket'"):
        parse_params({**DIGITS, "runs_dir": "s3://Runs_Bucket/runs"})


def test_a_run_resumed_on_another_machine_is_no_longer_written_by_the_first(s3, tmp_path, monkeypatch):
    from core.errors import TesError
    from flows.run_store import RunStore

    url = f"s3://127.0.0.1:{s3.endpoint.rsplit(':', 1)[1]}/{s3.bucket}/takeover"
    monkeypatch.setenv("TES_HOME", str(tmp_path / "machine-a"))
    first = RunStore(url)
    run = first.claim("m")
    run.update(status="running")  # mirrored: the first machine holds the claim
    monkeypatch.setenv("TES_HOME", str(tmp_path / "machine-b"))
    second = RunStore(url)
    second.download(run.run_id)
    second.take_over(run.run_id)
    with pytest.raises(TesError, match=f"run {run.run_id} .* is no longer this machine's to write"):
        run.update(status="failed")  # the first machine, still running, must not write over the resumed run
    assert json.loads(_objects(s3, f"takeover/{run.run_id}/")["manifest.json"])["status"] == "running"
