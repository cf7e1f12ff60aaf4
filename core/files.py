"""Atomic file writes and checksums: a reader never sees a half-written file. Also which files a model file needs
beside it (an OpenVINO IR's `.bin`, an ONNX graph's external data), so they are copied and checksummed with it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as synced:
            os.fsync(synced.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_with_companions(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(scratch_path)`, where `scratch_path` has `path`'s own name inside a fresh hidden folder beside it,
    so a writer that names extra files after the model (an ONNX graph's `<name>.onnx.data`, an IR's `.bin`) gives
    them their final names; then fsync every file written there and rename each beside `path`, the companions first
    and `path` itself last, so the model file never names a file that is not there yet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(scratch / path.name)
        written = sorted(p for p in scratch.iterdir() if p.is_file())
        if scratch / path.name not in written:
            raise FileNotFoundError(f"the writer left no {path.name} in {scratch}")
        for file in written:
            with open(file, "rb+") as synced:
                os.fsync(synced.fileno())
        for file in sorted(written, key=lambda p: p.name == path.name):  # the model file last
            os.replace(file, path.parent / file.name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def onnx_data_files(onnx_path: str | Path) -> list[Path]:
    """The external data files an ONNX graph names (initializers, tensor attributes, subgraphs), in graph order,
    resolved against the graph's folder as ONNX Runtime resolves them. Only the graph is read, never the data."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = [ExternalDataInfo(tensor).location for tensor in _tensors(model.graph) if uses_external_data(tensor)]
    return [onnx_path.parent / name for name in dict.fromkeys(names)]


def has_external_data(onnx_path: str | Path) -> bool:
    return bool(onnx_data_files(onnx_path))


def _tensors(graph) -> Iterator:
    """Every tensor of a graph and its subgraphs: initializers, sparse initializers' values, tensor attributes."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def model_companions(model_path: str | Path) -> list[Path]:
    """The files a model file needs beside it: an OpenVINO IR's `.bin` for an `.xml`, an ONNX graph's external
    data files for an `.onnx`; none for anything else (an AOTInductor `.pt2` is self-contained)."""
    model_path = Path(model_path)
    if model_path.suffix == ".xml":
        return [model_path.with_suffix(".bin")]
    if model_path.suffix == ".onnx":
        return onnx_data_files(model_path)
    return []
