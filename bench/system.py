"""A description of the system a benchmark ran on: CPU (model, cores, the flags that matter), GPU, memory, OS,
and the versions of the software in the measured path."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import psutil

from serving.client import connect

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def _cpu() -> dict:
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "logical_cores": os.cpu_count(), "flags": [f for f in FLAGS_OF_INTEREST if f in flags]}


def _gpus() -> list[dict]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library, no GPU: all mean "none here"
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [
            {"name": pynvml.nvmlDeviceGetName(h), "memory_gb": pynvml.nvmlDeviceGetMemoryInfo(h).total / 1e9}
            for h in handles
        ]
    finally:
        pynvml.nvmlShutdown()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(triton_url: str | None = None) -> dict:
    """Everything a reader needs to judge a benchmark figure; `triton_url` (HTTP) adds the server's version."""
    info = {
        "cpu": _cpu(),
        "gpus": _gpus(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("train-export-serve", "torch", "onnxruntime", "openvino", "tritonclient", "nvidia-pytriton")
        },
    }
    if triton_url:
        client = connect(triton_url, "http", 10)
        try:
            info["versions"]["triton_server"] = client.get_server_metadata().get("version")
        finally:
            client.close()
    return info
