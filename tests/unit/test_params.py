import ast
import inspect
from pathlib import Path

import pytest

from core.errors import ConfigError, TesError
from flows.cli import parse_param_args, prefect_param_args
from flows.params import PipelineParams, parse_params

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_stdlib_gpt_demo():
    params = parse_params({})
    assert params.recipe == "stdlib-gpt" and params.triton_model_name == "stdlib-gpt"
    assert params.build_recipe().options.n_layer == 4


def test_every_problem_is_reported_at_once_naming_the_field():
    with pytest.raises(ConfigError) as caught:
        parse_params({"training": {"steps": 0, "learning_rate": -1}, "serving": {"instance_count": 0}, "bogus": 1})
    text = str(caught.value)
    for field in ("training.steps", "training.learning_rate", "serving.instance_count", "bogus"):
        assert field in text
    assert len(caught.value.problems) == 4


def test_nested_cross_field_problems_come_with_the_others():
    with pytest.raises(ConfigError) as caught:
        parse_params({"stdlib_gpt": {"n_embd": 30, "n_head": 4}, "serving": {"instance_count": 0}})
    assert any(p.startswith("stdlib_gpt: n_embd (30)") for p in caught.value.problems)
    assert any(p.startswith("serving.instance_count") for p in caught.value.problems)


def test_batch_size_above_what_the_recipe_exports_is_refused():
    with pytest.raises(
        ConfigError, match=r"serving.max_batch_size: 999 is above what recipe 'stdlib-gpt' exports \(32\)"
    ):
        parse_params({"serving": {"max_batch_size": 999}})


def test_unknown_recipe_is_refused():
    with pytest.raises(ConfigError, match="recipe"):
        parse_params({"recipe": "../evil"})


def test_flow_parameters_are_the_pipeline_parameters():
    from flows.prefect_flow import train_export_serve

    flow_params = list(inspect.signature(train_export_serve.fn).parameters)
    assert flow_params == [*PipelineParams.model_fields, "resume_run"]  # the flow also takes a run to resume
    schema = train_export_serve.parameters.model_dump()
    assert schema["definitions"]["TrainingConfig"]["additionalProperties"] is False
    assert "pattern" in schema["properties"]["recipe"]


def test_cli_params_nest_dotted_keys_and_parse_json():
    assert parse_param_args(
        ["training.steps=5", "training.device=cpu", "recipe=digits-cnn", 'serving={"load": false}']
    ) == {"training": {"steps": 5, "device": "cpu"}, "recipe": "digits-cnn", "serving": {"load": False}}
    assert prefect_param_args({"recipe": "digits-cnn", "training": {"steps": 5}}) == [
        "--param",
        "recipe=digits-cnn",
        "--param",
        'training={"steps": 5}',
    ]
    with pytest.raises(TesError, match="key=value"):
        parse_param_args(["steps"])


PACKAGES = {"core", "recipes", "training", "export", "serving", "bench", "accounting", "flows"}
# What each package may import from the project: flows -> the stages -> recipes -> core. Among the stages, serving
# knows nothing of models (it takes files and sessions), bench measures what serving serves, and accounting
# prices what training, export and bench did. Nothing imports flows but flows.
MAY_IMPORT = {
    "core": set(),
    "recipes": {"core"},
    "training": {"recipes", "core"},
    "export": {"recipes", "core"},
    "serving": {"core"},
    "bench": {"serving", "recipes", "core"},
    "accounting": {"training", "export", "bench", "recipes", "core"},
    "flows": PACKAGES,
}


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_go_one_way(package):
    reaching = (_imports(package) & PACKAGES) - MAY_IMPORT[package] - {package}
    assert not reaching, f"{package} imports {sorted(reaching)}; it may import only {sorted(MAY_IMPORT[package])}"


def test_every_package_has_a_rule():
    found = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks", "model_repository"}
    assert found == PACKAGES
