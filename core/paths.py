"""Where things live. Everything is relative to the project home: `$TES_HOME`, else the current folder."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TES_HOME") or os.getcwd()).resolve()


def resolve(path: str | Path) -> Path:
    """An absolute path; a relative one is taken from the project home."""
    path = Path(path)
    return path if path.is_absolute() else home() / path


def state_dir() -> Path:
    """`.tes/`: the running stack's state, logs and the Prefect home."""
    folder = home() / ".tes"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
