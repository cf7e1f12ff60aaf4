"""The long-running process `tes up` starts: a Prefect worker of the process work pool `tes-process`.

    python -m flows.runner          # what `tes up` runs, with PREFECT_API_URL pointing at the stack's server

It creates the pool if it is missing, registers the deployments `train-export-serve/default` and `benchmark/default`
on it (from this project folder: the same as `prefect deploy --all` with `prefect.yaml`), then becomes
`prefect worker start --pool tes-process` (the same process id, so `tes down` stops it). Each flow run is a fresh
subprocess of the worker, in its own run folder. Another machine joins with `prefect worker start --pool
tes-process` pointed at the same API (README, "Work pools"); two workers never clobber each other's runs (each run
claims its own folder, and repository versions are claimed atomically).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound

from flows.stack import DEPLOYMENT_NAME, WORK_POOL

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = ("flows/prefect_flow.py:train_export_serve", "flows/prefect_flow.py:benchmark_flow")


def ensure_pool(name: str = WORK_POOL) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", description="train-export-serve runs"))


def register(name: str = WORK_POOL) -> None:
    """Both deployments on the pool, their code taken from this project folder when a worker runs them."""
    from prefect import Flow

    for entrypoint in ENTRYPOINTS:
        flow = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=entrypoint)
        flow.deploy(DEPLOYMENT_NAME, work_pool_name=name, build=False, push=False, print_next_steps=False)


if __name__ == "__main__":
    ensure_pool()
    register()
    prefect = str(Path(sys.executable).parent / "prefect")
    sys.stdout.flush()
    os.execv(prefect, [prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"])
