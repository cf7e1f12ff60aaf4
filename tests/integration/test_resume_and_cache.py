"""Per-stage caching, resuming a killed run, and stage time limits, on tiny models (no Triton: serving.load false).

- A second run that changes only a precision setting reuses train and export and rebuilds precision; through the
  Prefect flow (a real Prefect API server from `prefect_test_harness`), Prefect reports the reused tasks Cached,
  and the variants, built on a Dask cluster with prefect-dask, are Prefect tasks still.
- A `tes run` killed with SIGKILL during training, then `tes run --resume last`, ends with the same weights as an
  uninterrupted run, and its report says which stages were reused.
- A stage that runs past its limit fails naming the stage and the limit.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import StageTimeout
from flows.params import parse_params
from flows.pipeline import run_pipeline
from tests.conftest import TINY_DIGITS_RUN, TINY_GPT

pytestmark = pytest.mark.integration

DIGITS = TINY_DIGITS_RUN


def _params(tmp_path: Path, **changes):
    data = {**DIGITS, "runs_dir": str(tmp_path / "runs"), "repository": str(tmp_path / "repository")}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        data[section] = {**data[section], field: value}
    return parse_params(data)


def test_changing_only_a_precision_setting_reuses_train_and_export(tes_home, tmp_path):
    first = run_pipeline(_params(tmp_path))
    second = run_pipeline(_params(tmp_path, **{"precision.calibration_method": "percentile"}))
    assert second.train.reason.startswith("cached:") and second.export.reason.startswith("cached:")
    assert not second.precision.reason and second.precision.seconds > 0  # rebuilt
    assert second.export.output.onnx == first.export.output.onnx  # the first run's file, checked, not copied
    third = run_pipeline(_params(tmp_path, **{"training.steps": 31}))  # a training change: everything after it
    assert not any(s.reason.startswith("cached") for s in (third.train, third.export, third.precision))


def test_prefect_reports_reused_stages_as_cached(tes_home, tmp_path):
    from distributed import Client, LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from export.dask_builds import local_cluster_options
    from flows.prefect_flow import train_export_serve

    flow_arguments = {k: v for k, v in _params(tmp_path).model_dump().items()}
    with prefect_test_harness(), LocalCluster(**local_cluster_options(1)) as cluster:
        train_export_serve(**flow_arguments)
        # the second run builds its variants on a Dask cluster (prefect-dask), still one Prefect task each
        dask = {"calibration_method": "entropy", "task_runner": "dask", "dask_address": cluster.scheduler_address}
        changed = {**flow_arguments, "precision": {**flow_arguments["precision"], **dask}}
        state = train_export_serve(**changed, return_state=True)
        with Client(cluster.scheduler_address, set_as_default=False) as dask_client:
            ran_on_dask = dask_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
    states = {run.name: run.state.name for run in task_runs}
    by_stage = {name.rsplit("-", 1)[0]: state for name, state in states.items() if ":" not in name}
    assert by_stage["train"] == "Cached" and by_stage["export"] == "Cached", states
    assert by_stage["precision"] == "Completed", states
    assert states.get("precision:int8-static") == "Completed", states  # each variant built as its own task
    assert ran_on_dask == ["build"], ran_on_dask  # a fresh cluster: its only tasks were the variant builds


def _tes(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TES_HOME": str(home)}
    return subprocess.Popen([str(Path(sys.executable).parent / "tes"), *args], env=env, **kwargs)


GPT = [
    "--param",
    "recipe=stdlib-gpt",
    "--param",
    f"stdlib_gpt={TINY_GPT}".replace("'", '"'),
    "--param",
    'training={"steps": 400, "checkpoint_every": 20, "eval_every": 10000, "eval_samples": 32, "batch_size": 8}',
    "--param",
    'precision={"variants": ["fp32"], "score_samples": 32, "speed_repeats": 3}',
    "--param",
    'benchmark={"enabled": false}',
    "--param",
    'serving={"load": false}',
]


def test_a_killed_run_resumes_in_its_folder_and_ends_with_the_uninterrupted_weights(tmp_path):
    whole = _tes(tmp_path / "whole", "run", *GPT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert whole.wait(timeout=600) == 0
    (expected,) = (tmp_path / "whole" / "runs").glob("*/train/model.pt")

    home = tmp_path / "killed"
    killed = _tes(home, "run", *GPT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(home.glob("runs/*/train/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)  # mid-training, after at least one checkpoint
    killed.wait(timeout=30)
    (run_dir,) = (home / "runs").glob("*")
    assert not (run_dir / "train" / "model.pt").exists()  # it really stopped during training

    resumed = _tes(home, "run", "--resume", "last", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert [p.name for p in (home / "runs").iterdir()] == [run_dir.name]  # the same folder, no new run
    got, want = torch.load(run_dir / "train" / "model.pt"), torch.load(expected)
    assert all(torch.equal(got[name], want[name]) for name in want)
    report = (run_dir / "report.md").read_text()
    assert "resumed: completed in this run" not in report  # train was not complete: it continued, not reused
    again = _tes(home, "run", "--resume", str(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = again.communicate(timeout=120)
    assert again.returncode != 0 and "completed; there is nothing to resume" in out


def test_resuming_reuses_the_stages_that_completed(tes_home, tmp_path):
    params = _params(tmp_path)
    with pytest.raises(StageTimeout):  # stopped in the precision stage: train and export completed
        run_pipeline(
            params.model_copy(update={"stages": parse_params({"stages": {"precision": {"timeout_s": 1e-3}}}).stages})
        )
    (run_dir,) = (tmp_path / "runs").glob("*")
    from flows.pipeline import resumable_run

    resumed_params, folder = resumable_run(run_dir)
    summary = run_pipeline(resumed_params.model_copy(update={"stages": params.stages}), resume=folder)
    assert summary.train.reason.startswith("resumed:") and summary.export.reason.startswith("resumed:")
    assert summary.precision.status.value == "ok" and not summary.precision.reason
    report = (run_dir / "report.md").read_text()
    assert report.count("resumed: completed in this run before it stopped") == 2


def test_a_stage_past_its_time_limit_fails_naming_the_stage_and_the_limit(tes_home, tmp_path):
    params = _params(tmp_path, **{"training.steps": 100000})
    params = params.model_copy(update={"stages": parse_params({"stages": {"train": {"timeout_s": 2}}}).stages})
    started = time.monotonic()
    with pytest.raises(StageTimeout, match=r"stage 'train' ran past its time limit of 2 s \(stages.train.timeout_s\)"):
        run_pipeline(params)
    assert time.monotonic() - started < 60
