import os
import shutil
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import ChecksumError, RepositoryError
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import repository
from serving.repository import ServingConfig, parse_config, verify_version, write_version
from tests.conftest import TINY_DIGITS, TINY_GPT


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    files = {}
    for name, options in (("stdlib-gpt", TINY_GPT), ("digits-cnn", TINY_DIGITS)):
        recipe = build_recipe(name, options)
        files[name] = export_onnx(
            recipe, recipe.build_model(), tmp_path_factory.mktemp(name), ExportConfig()
        ).output.onnx
    return files


def test_config_comes_from_the_onnx_graph_and_parses_as_model_config(tmp_path: Path, onnx_files):
    result = write_version(
        tmp_path, "stdlib-gpt", onnx_files["stdlib-gpt"], ServingConfig(max_batch_size=8, instance_count=2)
    )
    config = parse_config(result.config_path.read_text())
    assert config.name == "stdlib-gpt" and config.backend == "python" and config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("tokens", mc.TYPE_INT64, [-1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("logits", mc.TYPE_FP32, [256])]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 0


def test_no_dynamic_batching_block_when_disabled(tmp_path: Path, onnx_files):
    result = write_version(tmp_path, "d", onnx_files["digits-cnn"], ServingConfig(dynamic_batching=False))
    assert not parse_config(result.config_path.read_text()).HasField("dynamic_batching")


def test_versions_count_up_with_checksummed_files(tmp_path: Path, onnx_files):
    first = write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    second = write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig(instance_count=2))
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in second.path.iterdir()) == ["manifest.json", "model.onnx", "model.py"]
    assert verify_version(second.path) == second.files


def test_identical_content_reuses_the_newest_version(tmp_path: Path, onnx_files):
    first = write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    again = write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    assert again.reused and again.version == first.version == 1
    assert repository.versions(tmp_path / "digits-cnn") == [1]
    other = write_version(tmp_path, "digits-cnn", onnx_files["stdlib-gpt"], ServingConfig())
    assert not other.reused and other.version == 2


def test_a_write_killed_midway_leaves_no_version_and_is_cleaned_next_time(tmp_path: Path, onnx_files, monkeypatch):
    write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    real_copy = shutil.copyfile

    def die_on_backend_copy(source, target):
        if str(target).endswith("model.py"):
            raise KeyboardInterrupt("killed")
        return real_copy(source, target)

    monkeypatch.setattr(repository.shutil, "copyfile", die_on_backend_copy)
    with pytest.raises(KeyboardInterrupt):
        write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig(instance_count=2))
    assert repository.versions(tmp_path / "digits-cnn") == [1]
    # a hard kill skips the cleanup: leave a staging folder behind by hand, the next write removes it
    (tmp_path / "digits-cnn" / ".staging-deadbeef").mkdir()
    monkeypatch.setattr(repository.shutil, "copyfile", real_copy)
    assert write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig(instance_count=2)).version == 2
    assert not list((tmp_path / "digits-cnn").glob(".staging-*"))


def test_tampered_artifact_fails_its_checksum(tmp_path: Path, onnx_files):
    result = write_version(tmp_path, "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    onnx_path = result.path / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="model.onnx"):
        verify_version(result.path)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", " ", "..", ".hidden", "x" * 200])
def test_names_that_could_escape_the_repository_are_refused(tmp_path: Path, onnx_files, name):
    with pytest.raises(RepositoryError, match="not allowed"):
        write_version(tmp_path, name, onnx_files["digits-cnn"], ServingConfig())


def test_symlinked_model_folder_pointing_outside_is_refused(tmp_path: Path, onnx_files):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "repo").mkdir()
    os.symlink(outside, tmp_path / "repo" / "digits-cnn")
    with pytest.raises(RepositoryError, match="symlink"):
        write_version(tmp_path / "repo", "digits-cnn", onnx_files["digits-cnn"], ServingConfig())
    assert not any(outside.iterdir())


def test_batched_config_needs_a_dynamic_batch_axis(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(RepositoryError, match="tensor 'x'.*dynamic batch axis"):
        write_version(tmp_path / "repo", "fixed", path, ServingConfig(max_batch_size=4))
    result = write_version(tmp_path / "repo", "fixed", path, ServingConfig(max_batch_size=0))
    assert list(parse_config(result.config_path.read_text()).input[0].dims) == [4, 3]


def test_a_deploy_keeps_the_newest_versions_and_the_served_one(tmp_path: Path, onnx_files):
    from serving.deploy import Deployable, deploy
    from serving.targets import LocalTarget, Pointer

    onnx = [Deployable("fp32", onnx_files["digits-cnn"])]
    for count in (1, 2, 3, 4):  # a config unlike the last: a new version each time
        deployed = deploy(tmp_path, "d", onnx, "fp32", ServingConfig(instance_count=count), {}, None, keep_versions=2)
    assert repository.versions(tmp_path / "d-fp32") == [3, 4] and deployed.output.pruned == {"d-fp32": [2]}
    assert not list((tmp_path / "d-fp32").glob(".staging-*"))
    target = LocalTarget(tmp_path)
    before = Pointer("d-fp32", 3, (tmp_path / "d-fp32" / "config.pbtxt").read_text())
    with pytest.raises(RepositoryError, match="no longer serves version 9"):  # another deploy's commit stays
        target.restore(before, 9)
    target.restore(before, 4)  # as after a rollback of v4
    assert target.provenance("d")[1] == str(tmp_path / "d-fp32" / "3")  # what `tes infer` reads: the served one
    assert target.prune("d-fp32", 1) == [] and repository.versions(tmp_path / "d-fp32") == [3, 4]  # 3 is served
    deploy(tmp_path, "d", onnx, "fp32", ServingConfig(instance_count=5), {}, None, keep_versions=1)
    assert repository.versions(tmp_path / "d-fp32") == [5]  # the new config serves the newest again
