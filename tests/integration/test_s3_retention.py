"""Old versions leave an S3 repository (moto) after a deploy: Triton downloads every version folder of a model at
each load, so only the newest `keep_versions` and the served one stay; each goes manifest first."""

from __future__ import annotations

import pytest
import torch

from core.errors import RepositoryError
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import s3_repository
from serving.deploy import Deployable, deploy
from serving.repository import ServingConfig
from serving.targets import S3Target
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.integration


def test_a_deploy_to_s3_keeps_the_newest_versions_and_the_served_one(s3, tmp_path):
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    torch.manual_seed(0)
    onnx = export_onnx(recipe, recipe.build_model().eval(), tmp_path, ExportConfig()).output.onnx
    location = s3.location("retention")
    url, fp32 = location.triton_url(), [Deployable("fp32", str(onnx))]
    for count in (1, 2, 3, 4):
        deployed = deploy(url, "d", fp32, "fp32", ServingConfig(instance_count=count), {}, None, keep_versions=2)
    assert s3_repository.list_versions(location, "d-fp32") == [3, 4] and deployed.output.pruned == {"d-fp32": [2]}
    listed = s3.admin.list_objects_v2(Bucket=s3.bucket, Prefix="retention/d-fp32/").get("Contents", [])
    assert {o["Key"].split("/")[2] for o in listed} == {"3", "4", "config.pbtxt"}  # nothing of 1 or 2 is left
    s3_repository.verify_version(location, "d-fp32", 4)  # the served version is whole
    target = S3Target(location)
    before = target.pointer("d-fp32")
    deploy(url, "d", fp32, "fp32", ServingConfig(instance_count=5), {}, None)  # v5, kept: keep_versions 0
    with pytest.raises(RepositoryError, match="no longer names version 9"):  # another deploy's commit stays
        target.restore(before, 9)
    target.restore(before, 5)  # as after a failed rollout: v4 is served again
    assert target.prune("d-fp32", 1) == [3] and s3_repository.list_versions(location, "d-fp32") == [4, 5]
