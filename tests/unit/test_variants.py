from pathlib import Path

import numpy as np
import pytest
import torch

from core.runtimes import Speed, measure_speed, open_session, openvino_has_bf16
from export import variants
from export.gates import select, speed_gate
from export.onnx_export import ExportConfig, export_onnx
from export.quantize import ALL_VARIANTS, build_int8_static, quantized_nodes
from export.torch_variants import build_torch_variant
from export.variants import PrecisionConfig, PrecisionOutput, VariantReport, build_and_score
from flows.pipeline import _deployables
from recipes import build_recipe
from recipes.evaluation import load_trained
from tests.conftest import TINY_DIGITS, TINY_GPT
from training.loop import TrainingConfig, train

FAST = {"calibration_samples": 32, "score_samples": 128, "speed_repeats": 3}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A briefly trained tiny digits model and its verified FP32 export."""
    recipe, folder = build_recipe("digits-cnn", TINY_DIGITS), tmp_path_factory.mktemp("digits")
    trained = train(
        recipe,
        TrainingConfig(steps=60, learning_rate=1e-2, warmup_steps=5, eval_every=1000, eval_samples=64),
        folder / "train",
        progress=False,
    )
    exported = export_onnx(recipe, load_trained(recipe, trained.output.weights), folder, ExportConfig())
    return recipe, exported.output.onnx, folder, trained.output.weights


def test_every_variant_is_built_scored_and_compared_with_fp32(digits):
    recipe, onnx_path, folder, weights = digits
    reports = {
        r.name: r
        for r in build_and_score(
            recipe, onnx_path, folder / "all", PrecisionConfig(min_speedup=0, accuracy_budget=1, **FAST), weights
        )
    }
    assert list(reports) == list(ALL_VARIANTS)
    assert reports["fp32"].max_abs_diff == 0 and reports["fp32"].top1_agreement == 1
    assert (reports["openvino-bf16"].runtime, reports["openvino-bf16"].runtime_precision) == ("openvino", "bf16")
    built = ["int8-dynamic", "int8-static", "fp16", "openvino-int8", "openvino-nncf", "torch-compile", "torchao-int8"]
    if openvino_has_bf16():
        built.append("openvino-bf16")
    else:  # CPUs without AVX512_BF16 or AMX: skipped with the reason, never scored on emulated kernels
        assert reports["openvino-bf16"].status == "skipped" and "no bf16 support" in reports["openvino-bf16"].reason
        assert reports["openvino-int8"].runtime_precision == "f32"
    for name in built:
        report = reports[name]
        assert report.status == "accepted" and Path(report.path).is_file() and report.sha256, (name, report.reason)
        assert 0 < report.max_abs_diff < 5 and report.top1_agreement > 0.5
        assert report.metrics["accuracy"] > 0.3 and report.throughput_per_s > 0
    assert reports["int8-static"].bytes < reports["fp32"].bytes and reports["fp16"].bytes < reports["fp32"].bytes
    # NNCF writes OpenVINO IR: the graph and its weights beside it; the torch candidates are AOTInductor packages
    assert reports["openvino-nncf"].path.endswith(".xml") and [
        Path(f).suffix for f in reports["openvino-nncf"].files
    ] == [".bin"]
    assert reports["torch-compile"].runtime == "torch" and reports["torch-compile"].path.endswith(".pt2")
    assert reports["torch-compile"].max_abs_diff < 1e-3  # the same FP32 model, compiled
    # every variant that was timed says with which settings, and which it tried
    for report in reports.values():
        if report.throughput_per_s:
            assert any("throughput_per_s" in entry for entry in report.settings_tried)
    assert sum(r.serves_alias for r in reports.values()) == 1


def test_accuracy_gate_rejects_with_a_reason_naming_the_metric_and_both_values(digits):
    recipe, onnx_path, folder, _ = digits
    # an impossibly tight budget: the variant would have to be 50% more accurate than FP32
    config = PrecisionConfig(
        variants=("int8-static",), accuracy_budget=-0.5, min_speedup=0, exclusion_retries=1, nodes_per_retry=2, **FAST
    )
    fp32, static = build_and_score(recipe, onnx_path, folder / "tight", config)
    assert static.status == "rejected"
    assert f"accuracy {static.metrics['accuracy']:.4f} vs FP32 {fp32.metrics['accuracy']:.4f}" in static.reason
    assert "the budget allows down to +50.00%" in static.reason
    # the retry excluded the nodes that drifted most, and says which
    assert len(static.excluded_nodes) >= 1 and static.drift and all("local_sqnr_db" in d for d in static.drift)
    # what is excluded is what was quantized: the layers that read a drifting tensor through QDQ
    assert set(static.excluded_nodes) <= set(
        quantized_nodes(folder / "tight" / "preprocessed.onnx", ["MatMul", "Gemm", "Conv"])
    )
    assert fp32.serves_alias


def test_speed_gate_rejects_a_variant_that_is_not_faster(digits):
    recipe, onnx_path, folder, _ = digits
    fp32, dynamic = build_and_score(
        recipe,
        onnx_path,
        folder / "slow",
        PrecisionConfig(variants=("int8-dynamic",), accuracy_budget=1, min_speedup=100, **FAST),
    )
    assert dynamic.status == "rejected" and dynamic.reason.startswith("speed gate:")
    assert f"{dynamic.throughput_per_s:.1f} samples/s vs FP32 {fp32.throughput_per_s:.1f}" in dynamic.reason
    assert fp32.serves_alias


FP32_ROUNDS = [1.0] * 8  # seconds per batch in each interleaved round: given timings, nothing is timed here


def test_the_speed_gate_accepts_only_when_the_whole_interval_clears_the_threshold():
    fp32 = VariantReport(name="fp32", throughput_per_s=100.0)
    faster = VariantReport(name="int8-dynamic", throughput_per_s=200.0)
    assert speed_gate(faster, fp32, 1.05, ([0.5] * 8, FP32_ROUNDS)) is None
    assert faster.speedup_vs_fp32 == 2.0 and faster.speedup_interval == (2.0, 2.0)


def test_the_speed_gate_rejects_when_the_whole_interval_is_below_the_threshold():
    fp32, slower = VariantReport(name="fp32", throughput_per_s=100.0), VariantReport(name="fp16", throughput_per_s=90.0)
    reason = speed_gate(slower, fp32, 1.05, ([1.1, 1.12, 1.08, 1.1, 1.11, 1.09, 1.1, 1.1], FP32_ROUNDS))
    assert reason.startswith("speed gate: 90.0 samples/s vs FP32 100.0 (0.91x, 95% interval 0.89x..0.93x over 8 rounds")
    assert "not distinguishable" not in reason


def test_a_speed_up_that_noise_could_put_on_either_side_is_not_distinguishable_and_rejected():
    fp32, noisy = VariantReport(name="fp32", throughput_per_s=100.0), VariantReport(name="fp16", throughput_per_s=106.0)
    ratios = (0.9, 1.0, 1.1, 1.2, 0.95, 1.15, 1.05, 1.0)  # median 1.025, spread on both sides of 1.05
    reason = speed_gate(noisy, fp32, 1.05, ([1 / r for r in ratios], FP32_ROUNDS))
    assert reason.startswith("speed gate: not distinguishable from the threshold")
    assert "95% interval 0.90x..1.20x over 8 rounds; needs at least 1.05x" in reason
    noisy_but_above = VariantReport(name="fp16", throughput_per_s=110.0)
    ratios = (1.0, 1.1, 1.1, 1.12, 1.15, 1.1, 1.08, 1.2)  # median 1.1 > 1.05, but the interval reaches 1.0
    assert "not distinguishable" in speed_gate(noisy_but_above, fp32, 1.05, ([1 / r for r in ratios], FP32_ROUNDS))


def test_speed_is_measured_in_rounds_that_pair_up_across_sessions():
    class Instant:
        def run(self, _names, _feeds):
            return [sum(range(1000))]  # a little work, so that no timed call takes zero seconds

    speeds = measure_speed({"fp32": Instant(), "fp16": Instant()}, {"x": [0]}, {"x": [0, 0]}, repeats=12, rest_s=0)
    assert [len(speed.round_batch_s) for speed in speeds.values()] == [4, 4]  # 12 timed calls, 3 per round


class _Untouchable:
    """Stands in for the validation split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError("calibration read the validation split")

    def __len__(self):
        raise AssertionError("calibration read the validation split")

    def __getitem__(self, key):
        raise AssertionError("calibration read the validation split")


def test_calibration_never_reads_validation_samples(tmp_path: Path):
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    train_bytes = recipe._splits["train"].tobytes()
    recipe.__dict__["_splits"] = {"train": recipe._splits["train"], "validation": _Untouchable()}
    monkey_eval = pytest.MonkeyPatch()
    monkey_eval.setattr(
        recipe, "eval_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("eval_batches used"))
    )
    try:
        calibration = recipe.calibration_inputs(16)
        assert sum(len(batch["tokens"]) for batch in calibration) >= 16
        for window in np.concatenate([batch["tokens"] for batch in calibration]):
            assert window.astype(np.uint8).tobytes() in train_bytes
        torch.manual_seed(0)
        model = build_recipe("stdlib-gpt", TINY_GPT).build_model().eval()
        onnx_path = export_onnx(build_recipe("stdlib-gpt", TINY_GPT), model, tmp_path, ExportConfig()).output.onnx
        assert build_int8_static(Path(onnx_path), tmp_path, calibration).is_file()
    finally:
        monkey_eval.undo()


def test_policy_picks_throughput_or_latency_among_accepted_only():
    reports = [
        VariantReport("fp32", latency_p50_ms=2.0, throughput_per_s=100),
        VariantReport("int8-dynamic", latency_p50_ms=1.0, throughput_per_s=150),
        VariantReport("int8-static", latency_p50_ms=1.5, throughput_per_s=300),
        VariantReport("fp16", latency_p50_ms=0.5, throughput_per_s=900, status="rejected"),
    ]
    assert select(reports, "max-throughput").name == "int8-static"
    assert select(reports, "min-latency").name == "int8-dynamic"


def test_unknown_variant_is_refused_and_fp32_always_comes_first():
    assert PrecisionConfig(variants=("int8-dynamic",)).variants == ("fp32", "int8-dynamic")
    with pytest.raises(ValueError, match="int4"):
        PrecisionConfig(variants=("int4",))


def test_static_int8_quantizes_weights_not_attention_products(tmp_path):
    """By default only layers with a constant weight get QDQ; attention's activation-by-activation MatMuls stay
    float (quantizing them cost the demo model 1.4% accuracy). With weights_only off they are quantized too."""
    import onnx

    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    onnx_path = Path(export_onnx(recipe, recipe.build_model().eval(), tmp_path, ExportConfig()).output.onnx)
    calibration = recipe.calibration_inputs(8)

    def dequantized_inputs(path: Path) -> dict[str, int]:
        graph = onnx.load(str(path)).graph
        dq_outputs = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        return {node.name: sum(i in dq_outputs for i in node.input) for node in graph.node if node.op_type == "MatMul"}

    weights = dequantized_inputs(build_int8_static(onnx_path, tmp_path, calibration, name="weights"))
    everything = dequantized_inputs(build_int8_static(onnx_path, tmp_path, calibration, name="all", weights_only=False))
    with_weights = set(quantized_nodes(onnx_path, ["MatMul"]))
    products = [name for name in everything if name not in with_weights]  # both inputs are activations
    assert products and with_weights, "the tiny GPT has weight MatMuls and attention's activation-by-activation MatMuls"
    assert all(weights[name] == 0 and everything[name] == 2 for name in products)
    assert all(weights[name] == 2 for name in with_weights)  # weight and activation both through QDQ


def _activation_zero_points(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return {
        node.input[0]: constants[node.input[2]]
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants
    }


def test_symmetric_activations_keep_u8_for_tensors_that_are_almost_all_positive(digits, tmp_path):
    """OpenVINO's int8 variant takes S8 activations with zero point 0, except where a tensor is almost all
    positive (a ReLU's or GELU's output): there half of S8 would go unused, so U8 with a zero point."""
    from export.quantize import activation_ranges

    recipe, onnx_path, _, _ = digits
    calibration = recipe.calibration_inputs(16)
    import onnx

    zero_points = _activation_zero_points(
        build_int8_static(Path(onnx_path), tmp_path, calibration, name="ov", symmetric_activations=True)
    )
    graph = onnx.load(str(tmp_path / "preprocessed.onnx")).graph
    produced = {output for node in graph.node for output in node.output} | {i.name for i in graph.input}
    zero_points = {name: zp for name, zp in zero_points.items() if name in produced}  # not QDQ's own renamed outputs
    ranges = activation_ranges(tmp_path / "preprocessed.onnx", list(zero_points), calibration)
    assert any(low >= 0 for low, _ in ranges.values())  # ReLU outputs feed the later layers
    for name, zero_point in zero_points.items():
        low, high = ranges[name]
        assert zero_point.dtype == (np.uint8 if low >= -0.25 * high else np.int8), (name, low, high)
        assert zero_point.dtype == np.uint8 or not zero_point.any()
    # a transformer's LayerNorm outputs are not skewed: S8, zero point 0
    gpt = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    gpt_onnx = Path(export_onnx(gpt, gpt.build_model().eval(), tmp_path / "gpt", ExportConfig()).output.onnx)
    gpt_points = _activation_zero_points(
        build_int8_static(gpt_onnx, tmp_path / "gpt", gpt.calibration_inputs(8), symmetric_activations=True)
    )
    norms = [zp for name, zp in gpt_points.items() if name.startswith("layer_norm")]
    assert norms and all(zp.dtype == np.int8 and not zp.any() for zp in norms)


def _fake_measure(seconds_per_batch):
    """A timing source for `build_and_score`: each session's batch time from `seconds_per_batch(session)`, eight
    identical rounds; nothing is timed."""

    def measure(sessions, single, batch, repeats):
        speeds = {}
        for key, session in sessions.items():
            seconds = seconds_per_batch(session)
            speeds[key] = Speed(seconds * 1e3 / 8, len(next(iter(batch.values()))) / seconds, (seconds,) * 8)
        return speeds

    return measure


@pytest.mark.parametrize("faster", ["f32", "bf16"])
def test_float_layers_run_in_the_precision_that_measured_faster(digits, monkeypatch, faster):
    """OpenVINO's INT8 variant is timed with its float layers in f32 and in bf16 (where the CPU has bf16) and keeps
    the faster; the served config records it. Timings come from a fake source, so the choice is the test's."""
    monkeypatch.setattr("core.runtimes.openvino_has_bf16", lambda: True)
    recipe, onnx_path, folder, _ = digits

    def seconds(session) -> float:
        precision = getattr(session, "precision", None)
        if precision is None:
            return 0.010  # FP32 in ONNX Runtime, every setting alike
        hint = session.settings.performance_hint
        return (0.002 if precision == faster else 0.004) + (0.001 if hint == "THROUGHPUT" else 0)

    config = PrecisionConfig(variants=("openvino-int8",), accuracy_budget=1, min_speedup=1.05, **FAST)
    fp32, int8 = build_and_score(recipe, onnx_path, folder / f"fake-{faster}", config, measure=_fake_measure(seconds))
    assert int8.status == "accepted" and int8.runtime_precision == faster and int8.settings == {}
    timed_ = {(entry["precision"], entry["settings"]): entry["throughput_per_s"] for entry in int8.settings_tried}
    # (and one thread per logical CPU, on machines with more logical CPUs than cores)
    assert {("f32", "default"), ("bf16", "default"), ("f32", "performance_hint=THROUGHPUT")} <= set(timed_)
    assert int8.throughput_per_s == max(timed_.values()) and int8.speedup_vs_fp32 == 5.0
    deployable = _deployables(
        PrecisionOutput(
            variants=(fp32, int8), selected="openvino-int8", policy="max-throughput", primary_metric="accuracy"
        )
    )
    assert [(d.name, d.runtime_precision) for d in deployable] == [("fp32", ""), ("openvino-int8", faster)]


def test_a_faster_setting_that_costs_accuracy_is_not_kept(digits, monkeypatch):
    """bf16 float layers that would be faster but fall outside the accuracy budget are dropped, with the reason."""
    monkeypatch.setattr("core.runtimes.openvino_has_bf16", lambda: True)
    recipe, onnx_path, folder, _ = digits
    real_score = variants.score

    def score(recipe, report, session, batches, reference):
        real_score(recipe, report, session, batches, reference)
        if getattr(session, "precision", None) == "bf16":
            report.metrics = {**report.metrics, "accuracy": 0.0}  # as if bf16 broke the model

    monkeypatch.setattr(variants, "score", score)
    config = PrecisionConfig(variants=("openvino-int8",), accuracy_budget=0.5, min_speedup=0, **FAST)
    _, int8 = build_and_score(
        recipe,
        onnx_path,
        folder / "fake-lossy",
        config,
        measure=_fake_measure(lambda s: 0.001 if getattr(s, "precision", None) == "bf16" else 0.004),
    )
    assert int8.status == "accepted" and int8.runtime_precision == "f32"
    dropped = [entry for entry in int8.settings_tried if "dropped" in entry]
    assert [entry["precision"] for entry in dropped] == ["bf16"] and "accuracy gate" in dropped[0]["dropped"]


def test_torch_compiled_gpt_matches_fp32_at_other_batch_sizes_and_lengths(tmp_path):
    """The AOTInductor package of a byte GPT answers like the ONNX FP32 file at shapes other than the one it was
    compiled with (it is compiled for the example's strides: the byte recipe's inputs are views into wider windows)."""
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    model = recipe.build_model().eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    onnx_path = export_onnx(recipe, model, tmp_path, ExportConfig()).output.onnx
    package = build_torch_variant(recipe, tmp_path / "model.pt", tmp_path, "torch-compile")
    compiled, reference = open_session(package, "torch"), open_session(onnx_path)
    tokens = next(iter(recipe.eval_batches(5))).inputs["tokens"]  # a strided view, as the recipe hands it out
    for feeds in ({"tokens": tokens}, {"tokens": tokens[:1, :7]}, {"tokens": tokens[:3, 2:]}):
        np.testing.assert_allclose(compiled.run(None, feeds)[0], reference.run(None, feeds)[0], rtol=1e-4, atol=1e-4)


def test_variants_built_in_parallel_come_back_in_order_and_are_timed_after(digits):
    recipe, onnx_path, folder, _ = digits
    built: list[str] = []

    def record(build, names):
        reports = variants.threaded_builds(build, names, workers=2)
        built.extend(r.name for r in reports)
        return reports

    config = PrecisionConfig(variants=("int8-dynamic", "fp16"), accuracy_budget=1, min_speedup=0, **FAST)
    reports = build_and_score(recipe, onnx_path, folder / "parallel", config, map_builds=record)
    assert [r.name for r in reports] == ["fp32", "int8-dynamic", "fp16"] and built == ["int8-dynamic", "fp16"]
    assert all(r.throughput_per_s > 0 for r in reports)  # timed once every build was done
