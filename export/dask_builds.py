"""Precision variants built on a Dask cluster, outside a Prefect flow run (`tes run`); a flow run uses
prefect-dask's `DaskTaskRunner` instead (flows/prefect_flow.py), so each build is also a Prefect task.

A Dask worker runs `build` in its own process: it must have this project's environment, and the run folder must be
at the same path there (a shared file system); a temporary local cluster has both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from core.errors import ConfigError, ServerError


def local_cluster_options(workers: int) -> dict[str, Any]:
    """A temporary cluster on loopback: one single-threaded process per build, no dashboard, and no memory limit
    (Dask's default, RAM / workers, would kill a worker quantizing a large model)."""
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "memory_limit": 0,
    }


def require_distributed() -> Any:
    try:
        import distributed
    except ImportError as error:
        raise ConfigError(
            [
                f"precision.task_runner: 'dask' needs Dask's distributed and prefect-dask ({error}); "
                "install them with `pip install '.[dask]'`, or use task_runner 'threads'"
            ]
        ) from error
    return distributed


@contextlib.contextmanager
def dask_client(address: str | None, workers: int, timeout_s: float = 30) -> Iterator[Any]:
    """A client of the cluster at `address`, or of a temporary local one that is shut down afterwards."""
    distributed = require_distributed()
    with contextlib.ExitStack() as stack:
        if address is None:
            cluster = stack.enter_context(distributed.LocalCluster(**local_cluster_options(workers)))
            address = cluster.scheduler_address
        try:
            client = stack.enter_context(distributed.Client(address, timeout=timeout_s, set_as_default=False))
        except OSError as error:
            raise ServerError(
                f"precision.dask_address: no Dask scheduler answered at {address} within {timeout_s:.0f} s ({error}); "
                "start one (`dask scheduler`, then `dask worker <address>` on each machine) or leave dask_address "
                "unset for a temporary local cluster"
            ) from error
        yield client


def dask_builds(build: Callable[[str], Any], names: list[str], address: str | None = None, workers: int = 1) -> list:
    """`build` for every name on Dask workers, in order; the first failure is raised here."""
    if not names:
        return []
    with dask_client(address, workers) as client:
        futures = client.map(build, names, pure=False)
        try:
            return client.gather(futures)
        except BaseException:  # the other builds stop too: a retry of the stage must not race them
            client.cancel(futures, force=True)
            raise
