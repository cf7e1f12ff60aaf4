"""The whole pipeline in-process against a real Triton: served answers match ONNX Runtime and torch."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench.stage import BenchmarkOptions, run_benchmark
from core.errors import InferenceError
from core.results import RunDir
from core.runtimes import open_session
from export.quantize import ALL_VARIANTS
from flows.params import parse_params
from flows.pipeline import run_pipeline
from recipes.evaluation import load_trained, torch_predictor
from serving import client, repository
from tests.conftest import TINY_DIGITS, TINY_GPT

pytestmark = pytest.mark.integration

# digits-cnn goes through every precision variant with both gates opened wide (the gates have their own tests),
# so every variant is deployed and served; stdlib-gpt deploys FP32 only, so its alias must agree with torch exactly.
CASES = {
    "digits-cnn": {
        "recipe": "digits-cnn",
        "digits_cnn": TINY_DIGITS,
        "training": {"steps": 60, "learning_rate": 1e-2, "eval_every": 1000, "eval_samples": 128},
        "precision": {
            "accuracy_budget": 1.0,
            "min_speedup": 0.0,
            "calibration_samples": 32,
            "score_samples": 128,
            "speed_repeats": 3,
        },
        "benchmark": {"protocols": ["grpc", "http"], "concurrencies": [2], "samples": 16},
    },
    "stdlib-gpt": {
        "recipe": "stdlib-gpt",
        "stdlib_gpt": TINY_GPT,
        "training": {"steps": 20, "eval_every": 1000, "eval_samples": 64},
        "precision": {"variants": ["fp32"], "score_samples": 64, "speed_repeats": 3},
        "benchmark": {"enabled": False},
    },
}


@pytest.fixture(scope="module")
def runs(triton_server, tmp_path_factory):
    """Each recipe run once through the pipeline, deployed into the module's Triton."""
    results = {}
    for name, overrides in CASES.items():
        params = parse_params(
            {
                **overrides,
                "runs_dir": str(tmp_path_factory.mktemp("runs")),
                "repository": triton_server.repository,
                "serving": {"triton_url": triton_server.http_url, "triton_grpc_url": triton_server.grpc_url},
            }
        )
        results[name] = (params, run_pipeline(params))
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_deploys_a_ready_version_and_checks_it_over_both_protocols(runs, triton_server, name):
    _, summary = runs[name]
    assert [
        s.status.value for s in (summary.train, summary.export, summary.precision, summary.deploy, summary.served_check)
    ] == ["ok"] * 5
    assert summary.benchmark.status.value == ("ok" if name == "digits-cnn" else "skipped")
    deploy = summary.deploy.output
    assert deploy.loaded and deploy.ready_version == str(deploy.version)
    check = summary.served_check.output
    for protocol in ("http", "grpc"):
        assert check.protocols[protocol].max_abs_diff_vs_in_process <= 1e-5
        if deploy.selected == "fp32":
            assert check.protocols[protocol].top1_agreement_with_torch == 1.0
    assert set(check.variants) == set(deploy.variants)
    assert all(diff <= 1e-5 for diffs in check.variants.values() for diff in diffs.values())
    assert check.latency.served_p50_ms > 0 and (Path(summary.run_dir) / "report.md").is_file()


@pytest.mark.parametrize("name", list(CASES))
def test_served_outputs_match_onnxruntime_and_torch_top1(runs, triton_server, name):
    params, summary = runs[name]
    recipe = params.build_recipe()
    fp32 = summary.deploy.output.variants["fp32"]
    session = open_session(Path(fp32.path) / "model.onnx")
    predict = torch_predictor(load_trained(recipe, summary.train.output.weights), recipe)
    batch = list(recipe.eval_batches(16, max_samples=16))[0]
    expected = session.run(None, batch.inputs)[0]
    for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
        served = client.infer(url, fp32.model, batch.inputs, protocol)["logits"]
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
        assert np.array_equal(served.argmax(-1), predict(batch.inputs).argmax(-1))


def test_a_changed_run_rolls_the_model_to_the_next_version(runs, triton_server):
    params, first = runs["digits-cnn"]
    changed = params.model_dump(mode="json")
    changed["training"]["seed"] += 1
    second = run_pipeline(parse_params(changed))
    before, after = first.deploy.output, second.deploy.output
    assert after.variants["fp32"].version == before.variants["fp32"].version + 1
    states = {(e["name"], e["version"]): e["state"] for e in client.model_states(triton_server.http_url)}
    assert states[("digits-cnn-fp32", "2")] == "READY" and states[("digits-cnn-fp32", "1")] != "READY"
    # the alias gets a new version only when it points somewhere else; either way it is READY
    assert after.version == before.version + (after.selected != before.selected)
    assert states[("digits-cnn", str(after.version))] == "READY"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tokens": np.zeros((1, 8), np.int32)}, "INT32"),  # wrong dtype: Triton itself refuses
        ({"tokens": np.full((1, 8), 256, np.int64)}, "expected values in [0, 255]"),
        ({"tokens": np.full((1, 8), -1, np.int64)}, "expected values in [0, 255]"),
        ({"tokens": np.zeros((1, 33), np.int64)}, "expected at most [32] per sample"),
        ({"tokens": np.zeros((1, 4, 2), np.int64)}, "tokens"),  # wrong rank
    ],
)
def test_bad_requests_are_refused_naming_the_tensor_and_the_server_stays_healthy(
    runs, triton_server, protocol, bad, message
):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with pytest.raises(InferenceError) as caught:
        client.infer(url, "stdlib-gpt", bad, protocol)
    assert message in str(caught.value)
    good = client.infer(url, "stdlib-gpt", {"tokens": np.arange(8, dtype=np.int64)[None]}, protocol)
    assert good["logits"].shape == (1, 256)


def test_a_rerun_with_the_same_inputs_repeats_no_work(runs, triton_server):
    params, first = runs["stdlib-gpt"]
    again = run_pipeline(params)
    for stage, earlier in (
        (again.train, first.train),
        (again.export, first.export),
        (again.precision, first.precision),
    ):
        assert stage.reason.startswith("cached:") and stage.seconds == 0.0
        assert stage.artifacts == earlier.artifacts  # the same files, checksummed
        assert stage.output == earlier.output
    assert not (Path(again.run_dir) / "train").exists()  # nothing was trained into the new run folder
    reused, original = RunDir(again.run_dir, create=False), RunDir(first.run_dir, create=False)
    assert (reused.weights, reused.onnx, reused.variants) == (original.weights, original.onnx, original.variants)
    assert reused.onnx.is_file() and reused.variants.is_file()  # what tes export-repository reads of the new run
    assert RunDir(run_pipeline(params).run_dir, create=False).onnx == original.onnx  # a reuse of a reuse, too
    deploy, first_deploy = again.deploy.output, first.deploy.output
    assert deploy.variants["fp32"].reused and deploy.reused
    assert deploy.variants["fp32"].version == first_deploy.variants["fp32"].version
    # a different configuration is a cache miss
    changed = parse_params({**params.model_dump(mode="json"), "training": {**params.training.model_dump(), "seed": 7}})
    assert run_pipeline(changed).train.reason == ""


def test_the_benchmark_stage_writes_every_output(runs):
    _, summary = runs["digits-cnn"]
    bench = summary.benchmark.output
    assert {Path(path).suffix for path in bench.outputs.values()} == {".json", ".csv", ".md", ".png"}
    assert all(Path(path).stat().st_size > 0 for path in bench.outputs.values())
    assert {(p.protocol, p.load) for p in bench.points} == {("grpc", 2.0), ("http", 2.0)}
    assert {b.runtime for b in bench.baselines} >= {"torch eager fp32"}
    data = json.loads(Path(bench.outputs["json"]).read_text())
    assert data["system"]["cpu"]["logical_cores"] >= 1 and data["system"]["versions"]["triton_server"]
    assert Path(bench.outputs["csv"]).read_text().splitlines()[0].startswith("model,protocol,mode,load")


def test_configuration_sweep_finds_and_applies_the_best(runs, triton_server, tmp_path):
    params, summary = runs["digits-cnn"]
    options = BenchmarkOptions(protocols=("grpc",), concurrencies=(1,), samples=16, sweep_configs=True, apply_best=True)
    result = run_benchmark(
        "digits-cnn",
        options,
        triton_server.endpoint(),
        repository_path=triton_server.repository,
        out_dir=tmp_path,
        progress=lambda _: None,
    )
    sweep = result.config_sweep
    assert len(sweep) == 5 and sweep[0]["throughput"] == max(r["throughput"] for r in sweep)
    applied = result.applied
    config = repository.read_config(triton_server.repository, applied["model"])
    assert config.HasField("dynamic_batching") == applied["dynamic_batching"]
    assert config.instance_group[0].count == applied["instance_count"]
    states = {(e["name"], e["version"]): e["state"] for e in client.model_states(triton_server.http_url)}
    assert states[(applied["model"], str(applied["version"]))] == "READY"
    assert not (Path(triton_server.repository) / "digits-cnn-sweep").exists()  # the scratch model is gone
    provenance, _ = repository.newest_provenance(triton_server.repository, applied["model"])
    assert provenance["recipe"] == "digits-cnn" and provenance["run_id"]  # kept from the version it was tuned from


def test_the_ledger_has_an_entry_per_stage_with_flops_energy_and_reasons(runs):
    _, summary = runs["stdlib-gpt"]
    ledger = json.loads(Path(summary.ledger["json"]).read_text())
    entries = {entry["stage"]: entry for entry in ledger["entries"]}
    assert list(entries) == [
        "train",
        "export",
        "precision",
        "tensorrt",
        "deploy",
        "served_check",
        "benchmark",
        "precision:fp32",
    ]
    assert entries["tensorrt"]["notes"][0].startswith("skipped: ")  # no TensorRT, no GPU here
    assert entries["benchmark"]["notes"] == ["skipped: benchmark.enabled is false"]
    train = entries["train"]
    assert (
        train["flops"] > 0 and "FlopCounterMode" in train["flops_method"] and any("6·N·D" in n for n in train["notes"])
    )
    assert train["achieved_flops_per_s"] > 0 and train["peak_flops_per_s"] and 0 < train["utilization"] < 1
    for entry in entries.values():
        assert entry["wall_s"] >= 0 and entry["peak_host_mb"] > 0 and entry["cost_usd"] >= 0
        assert entry["energy"]["cpu"]["kind"] in ("measured", "estimated")  # estimated here: no RAPL on these machines
        assert entry["inputs"]["usd_per_kwh"] == ledger["prices"]["usd_per_kwh"]
    assert ledger["inference_flops_per_sample"] > 0 and Path(summary.ledger["plot"]).stat().st_size > 1000


def test_the_ledger_splits_precision_per_variant_and_prices_serving(runs):
    _, summary = runs["digits-cnn"]
    ledger = json.loads(Path(summary.ledger["json"]).read_text())
    entries = {entry["stage"]: entry for entry in ledger["entries"]}
    variants = [name for name in entries if name.startswith("precision:")]
    assert len(variants) == len(ALL_VARIANTS) and all(entries[v]["wall_s"] > 0 for v in variants)
    split = sum(entries[v]["joules"] for v in variants)
    assert split == pytest.approx(entries["precision"]["joules"], rel=1e-6)  # the stage's energy, shared out
    assert {(row["protocol"], row["load"]) for row in ledger["serving"]} == {("grpc", 2.0), ("http", 2.0)}
    assert all(row["energy_kind"] == "estimated" and row["joules_per_inference"] > 0 for row in ledger["serving"])
    measured = {v.name for v in summary.precision.output.variants if v.throughput_per_s > 0}
    assert {
        "int8-dynamic",
        "int8-static",
        "fp16",
        "openvino-int8",
        "openvino-nncf",
        "torch-compile",
        "torchao-int8",
    } <= measured  # openvino-bf16 only where the CPU has bf16
    assert {row["variant"] for row in ledger["payback"]} == measured - {"fp32"}
