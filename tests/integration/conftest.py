"""Fixtures of the integration tests that start servers beyond Triton."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server (tests/integration/s3_store.py) for one test module; stopped after it."""
    pytest.importorskip("moto.server", reason="moto[server] provides the S3 store these tests run against")
    from tests.integration.s3_store import moto_store

    with moto_store(tmp_path_factory.mktemp("moto")) as store:
        yield store
