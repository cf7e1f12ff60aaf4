"""Time limits and retries of pipeline stages (`PipelineParams.stages`), the same under `tes run` and in a Prefect
flow run: a watchdog stops a stage that runs past its limit where it is, in whatever thread runs it (training's
checkpoints are atomic, so a stopped run resumes cleanly)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from typing import Any, Callable, Iterator

from core.errors import ConfigError, InferenceError, RecipeError, ServerError, StageTimeout, TrainingError
from serving.rollout import RolloutError

log = logging.getLogger(__name__)

_NEVER_RETRIED = (ConfigError, RecipeError, TrainingError, StageTimeout)
_TRANSIENT = (ServerError, InferenceError, ConnectionError, TimeoutError)


def retryable(stage: str, error: BaseException) -> bool:
    """Whether trying `stage` again could help: deploy and the served check on failures to reach or load into
    Triton; training on anything but a configuration problem (it resumes from its last checkpoint). A rollout that a
    replica refused (a load that failed) is not tried again: it would fail the same way."""
    if not isinstance(error, Exception) or isinstance(error, (*_NEVER_RETRIED, RolloutError)):
        return False
    if stage in ("deploy", "served_check"):
        return isinstance(error, _TRANSIENT)
    return stage == "train"


def limited(stage: str, function: Callable[..., Any], timeout_s: float, retries: int, delay_s: float):
    """`function` run within `timeout_s`, tried again up to `retries` times (after `delay_s`, doubling) when the
    failure is `retryable`."""

    def run(*args: Any) -> Any:
        delay = delay_s
        for attempt in range(retries + 1):
            try:
                with deadline(stage, timeout_s):
                    return function(*args)
            except Exception as error:
                if attempt == retries or not retryable(stage, error):
                    raise
                log.warning(
                    "%s failed (%s: %s); trying again in %.0f s (retry %d of %d)",
                    stage,
                    type(error).__name__,
                    error,
                    delay,
                    attempt + 1,
                    retries,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    return run


@contextlib.contextmanager
def deadline(stage: str, seconds: float) -> Iterator[None]:
    """Raise `StageTimeout` in this thread once `seconds` have passed. A watchdog thread raises it asynchronously in
    this thread (`PyThreadState_SetAsyncExc`: it takes effect at the thread's next Python instruction, like a signal
    handler, but without a signal: an alarm signal interrupts system calls, and with ONNX Runtime, OpenVINO and gRPC
    threads running that crashed the process). Code inside a long native call is stopped when the call returns."""
    message = (
        f"stage '{stage}' ran past its time limit of {seconds:g} s (stages.{stage}.timeout_s) and was stopped; "
        f"raise it with --param stages.{stage}.timeout_s=SECONDS"
    )
    # an asynchronous exception is raised by class, without arguments: this subclass carries the message
    timeout = type("StageTimeout", (StageTimeout,), {"__init__": lambda self, *_: StageTimeout.__init__(self, message)})
    target, done = threading.get_ident(), threading.Lock()

    def fire() -> None:
        with done:  # never after the stage has left its limit
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(timeout))

    watchdog = threading.Timer(seconds, fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        with done:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)  # one that has not landed yet
