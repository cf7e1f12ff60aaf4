"""The plain model name is an ensemble alias: it answers with the selected variant, and can be switched."""

import numpy as np
import pytest

from core.runtimes import open_session
from export.dynamic_quant import build_int8_dynamic
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, repository
from serving.repository import ServingConfig
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def variants(triton_server, tmp_path_factory):
    """FP32 and dynamic-INT8 digits models deployed as `digits-fp32` and `digits-int8-dynamic`."""
    recipe, folder = build_recipe("digits-cnn", TINY_DIGITS), tmp_path_factory.mktemp("alias")
    fp32 = export_onnx(recipe, recipe.build_model(), folder, ExportConfig()).output.onnx
    files = {"fp32": fp32, "int8-dynamic": str(build_int8_dynamic(fp32, folder))}
    for name, path in files.items():
        repository.write_version(triton_server.repository, f"digits-{name}", path, ServingConfig(max_batch_size=16))
        client.load_model(triton_server.http_url, f"digits-{name}")
    return recipe, files


def _point_alias_at(server, target: str) -> None:
    repository.write_alias(server.repository, "digits", target)
    client.load_model(server.http_url, "digits")


def test_alias_forwards_to_the_selected_variant_and_switches_without_a_new_url(triton_server, variants):
    recipe, files = variants
    batch = list(recipe.eval_batches(16, max_samples=16))[0].inputs
    expected = {name: open_session(path).run(None, batch)[0] for name, path in files.items()}
    assert not np.allclose(expected["fp32"], expected["int8-dynamic"], atol=1e-6)  # the switch is observable
    for target in ("int8-dynamic", "fp32", "int8-dynamic"):
        _point_alias_at(triton_server, f"digits-{target}")
        assert repository.alias_target(triton_server.repository, "digits") == f"digits-{target}"
        for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
            served = client.infer(url, "digits", batch, protocol)["logits"]
            np.testing.assert_allclose(served, expected[target], rtol=0, atol=1e-5)


def test_alias_config_mirrors_the_target_tensors(triton_server, variants):
    config = repository.read_config(triton_server.repository, "digits")
    target = repository.read_config(triton_server.repository, "digits-fp32")
    assert config.platform == "ensemble" and config.max_batch_size == target.max_batch_size
    assert list(config.input) == list(target.input) and list(config.output) == list(target.output)
