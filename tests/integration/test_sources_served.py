"""Models the user brings, through the whole pipeline into a real Triton: a tiny transformers model of each task
family (`hf:<dir>`), an ONNX file exported elsewhere (`onnx:<path>`) and a user's own module with its checkpoint
(`torch:<module>:<factory>`). Each skips training (and `onnx:` export), gates its variants on agreement with FP32,
deploys, and passes the served check over HTTP and gRPC."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.params import parse_params
from flows.pipeline import run_pipeline
from recipes.requests import sample_inputs
from serving import client
from tests.unit.test_sources import SMALL, TORCH_INPUTS, USER_MODELS, model_dirs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

PRECISION = {"variants": ["fp32", "int8-dynamic"], "accuracy_budget": 0.5, "min_speedup": 0.0, "speed_repeats": 3}


def _run(triton_server, tmp_path: Path, recipe: str, options: dict):
    params = parse_params(
        {
            "recipe": recipe,
            "recipe_options": options,
            "precision": PRECISION,
            "benchmark": {"enabled": False},
            "runs_dir": str(tmp_path / "runs"),
            "repository": triton_server.repository,
            "serving": {"triton_url": triton_server.http_url, "triton_grpc_url": triton_server.grpc_url},
        }
    )
    return params, run_pipeline(params)


def _served_as_checked(summary, metric: str) -> None:
    assert summary.train.status.value == "skipped" and "brought" in summary.train.reason
    assert [s.status.value for s in (summary.export, summary.precision, summary.deploy, summary.served_check)] == [
        "ok"
    ] * 4
    assert summary.precision.output.primary_metric == metric
    fp32 = summary.precision.output.variant("fp32")
    assert fp32.metrics[metric] == pytest.approx(1.0)  # FP32 agrees with itself
    check, deploy = summary.served_check.output, summary.deploy.output
    assert deploy.loaded and deploy.ready_version == str(deploy.version)
    for protocol in ("http", "grpc"):
        assert check.protocols[protocol].max_abs_diff_vs_in_process <= 1e-4
    report = (Path(summary.run_dir) / "report.md").read_text()
    assert "was brought as it is: not trained" in report and "agreement with the FP32 model" in report


@pytest.mark.parametrize(
    "family, task, metric",
    [
        ("bert", "text-classification", "top1_agreement"),
        ("bert", "feature-extraction", "cosine_similarity"),
        ("gpt2", "causal-lm", "top1_agreement"),
        ("vit", "image-classification", "top1_agreement"),
    ],
)
def test_hf_model_of_each_task_family_is_served(triton_server, model_dirs, tmp_path, family, task, metric):  # noqa: F811
    params, summary = _run(triton_server, tmp_path, f"hf:{model_dirs[family]}", {"task": task, **SMALL})
    _served_as_checked(summary, metric)
    assert params.triton_model_name == family
    assert "synthetic inputs" in (Path(summary.run_dir) / "report.md").read_text()


def test_text_goes_through_the_models_own_tokenizer_to_the_served_model(triton_server, model_dirs, tmp_path):  # noqa: F811
    params, summary = _run(
        triton_server, tmp_path, f"hf:{model_dirs['bert']}", {"task": "text-classification", **SMALL}
    )
    recipe = params.build_recipe()
    inputs = sample_inputs(recipe, text="the cat sat on the mat")
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"} and inputs["input_ids"].shape[0] == 1
    fp32_model = summary.deploy.output.variants["fp32"].model  # the alias may serve int8-dynamic, by its speed
    served = client.infer(triton_server.http_url, fp32_model, inputs)["logits"]
    with torch.no_grad():
        expected = recipe.build_model()(*(torch.from_numpy(inputs[s.name]) for s in recipe.inputs)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


def test_onnx_file_made_elsewhere_is_adopted_and_served(triton_server, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "made-elsewhere.onnx"
    torch.onnx.export(
        _Classifier().eval(),
        (torch.randn(2, 6),),
        str(path),
        input_names=["features"],
        output_names=["scores"],
        dynamic_axes={"features": {0: "batch"}, "scores": {0: "batch"}},
        dynamo=False,
    )
    params, summary = _run(triton_server, tmp_path, f"onnx:{path}", {"eval_samples": 64})
    _served_as_checked(summary, "top1_agreement")
    export = summary.export.output
    assert export.adopted_from == str(path) and "adopted" in summary.export.reason
    assert params.triton_model_name == "made-elsewhere"


def test_torch_module_with_its_checkpoint_is_served(triton_server, tmp_path, monkeypatch):
    (tmp_path / "tes_served_user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tes_served_user_models

    torch.manual_seed(3)
    torch.save(tes_served_user_models.make().state_dict(), tmp_path / "weights.pt")
    options = {"weights": str(tmp_path / "weights.pt"), "inputs": TORCH_INPUTS, "eval_samples": 64}
    _, summary = _run(triton_server, tmp_path, "torch:tes_served_user_models:make", options)
    _served_as_checked(summary, "top1_agreement")


def test_onnx_file_with_external_data_is_adopted_with_its_data(tmp_path):
    """The data file the graph names comes along into the run, before the graph, and both are artifacts."""
    import onnx

    from export.adopt import adopt_stage
    from export.onnx_export import ExportConfig
    from recipes import build_recipe

    torch.manual_seed(0)
    exported = tmp_path / "inline.onnx"
    torch.onnx.export(
        _Classifier().eval(),
        (torch.randn(2, 6),),
        str(exported),
        input_names=["features"],
        output_names=["scores"],
        dynamic_axes={"features": {0: "batch"}, "scores": {0: "batch"}},
        dynamo=False,
    )
    source = tmp_path / "source" / "split.onnx"
    source.parent.mkdir()
    onnx.save_model(
        onnx.load(str(exported)), str(source), save_as_external_data=True, location="split.weights", size_threshold=0
    )
    recipe = build_recipe(f"onnx:{source}", {"eval_samples": 16})
    result = adopt_stage(recipe, tmp_path / "run" / "export", ExportConfig(verify_samples=8), 16)
    names = sorted(Path(a.path).name for a in result.artifacts)
    assert names == ["model.onnx", "split.weights"] and all(a.intact() for a in result.artifacts)
    assert result.output.verification.cases > 0 and result.output.adopted_from == str(source)
