"""Precision variants built on a Dask cluster (an existing scheduler on loopback, as a team's cluster would be):
the same files and verdicts as threads, built in the workers' processes; an unreachable scheduler is named."""

from __future__ import annotations

import socket

import pytest

from core.errors import ServerError
from export.dask_builds import dask_client, local_cluster_options
from export.onnx_export import ExportConfig, export_onnx
from export.variants import PrecisionConfig, build_and_score
from recipes import build_recipe
from tests.conftest import TINY_DIGITS

distributed = pytest.importorskip("distributed")

FAST = {"calibration_samples": 32, "score_samples": 128, "speed_repeats": 3, "min_speedup": 0, "accuracy_budget": 1}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(**local_cluster_options(2)) as running:
        yield running


def _built_prefixes(address: str) -> set[str]:
    with distributed.Client(address, set_as_default=False) as client:
        return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


def test_variants_built_on_a_dask_cluster_match_the_threaded_build(cluster, tmp_path):
    import torch

    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    torch.manual_seed(0)
    onnx_path = export_onnx(recipe, recipe.build_model().eval(), tmp_path, ExportConfig()).output.onnx
    names = ("int8-dynamic", "fp16")
    threads = build_and_score(recipe, onnx_path, tmp_path / "threads", PrecisionConfig(variants=names, **FAST))
    assert "build" not in _built_prefixes(cluster.scheduler_address)
    config = PrecisionConfig(variants=names, task_runner="dask", dask_address=cluster.scheduler_address, **FAST)
    dask = build_and_score(recipe, onnx_path, tmp_path / "dask", config)
    assert "build" in _built_prefixes(cluster.scheduler_address)  # the builds were the workers' tasks
    assert [r.name for r in dask] == ["fp32", *names]
    for ours, theirs in zip(dask[1:], threads[1:]):
        assert (ours.status, ours.sha256, ours.metrics) == (theirs.status, theirs.sha256, theirs.metrics)
        assert ours.path.startswith(str(tmp_path / "dask")) and ours.throughput_per_s > 0  # timed here, after


def test_an_unreachable_scheduler_is_named_with_the_fix():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the probe closes
    with pytest.raises(ServerError, match=r"precision\.dask_address: no Dask scheduler answered at .*dask scheduler"):
        with dask_client(address, 1, timeout_s=2):
            pass


def test_a_dask_address_without_the_dask_runner_is_refused():
    with pytest.raises(ValueError, match="set task_runner to 'dask'"):
        PrecisionConfig(dask_address="tcp://127.0.0.1:8786")
