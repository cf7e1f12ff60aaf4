"""What the `tes` commands accept: the options several commands share, and the parsers of values that are more
than one word (`--param key=value`, `--params JSON`, comma lists, `--input name=JSON`).

A value that cannot be parsed raises `typer.BadParameter` naming the option, which `tes` prints as one line.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from core.errors import TesError


class Protocol(str, Enum):
    http = "http"
    grpc = "grpc"


def option(help: str, metavar: str | None = None, show_default: bool | str = True, flag: str | None = None):
    """A Typer option with its help; `flag` names a boolean option that has no `--no-` twin."""
    return typer.Option(*([flag] if flag else []), metavar=metavar, show_default=show_default, help=help)


ParamPairs = Annotated[
    Optional[list[str]],
    typer.Option(
        "--param",
        metavar="KEY=VALUE",
        show_default=False,
        help="A pipeline parameter (repeatable); the value is JSON, else a string; dotted keys nest: "
        "training.steps=50.",
    ),
]
ParamsJson = Annotated[
    Optional[str],
    typer.Option(
        "--params",
        metavar="JSON",
        show_default=False,
        help="All parameters as one JSON object; --param values are applied on top.",
    ),
]
RunFolder = Annotated[
    Optional[str],
    typer.Argument(
        metavar="RUN",
        show_default=False,
        help="The run folder, e.g. runs/20260101-120000-stdlib-gpt; default: the last run.",
    ),
]
ProtocolOption = Annotated[Protocol, typer.Option(help="The KServe v2 protocol to send requests over.")]
UrlOption = Annotated[
    Optional[str],
    typer.Option(
        metavar="HOST:PORT",
        show_default=False,
        help="Triton's endpoint for that protocol; default: the stack's (tes up).",
    ),
]


def parse_param_args(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (value as JSON, else a string); dotted keys nest: `training.steps=50`."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise TesError(f"--param {pair!r}: expected key=value, for example --param training.steps=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise TesError(f"--param {pair!r}: {parent!r} is set both as a value and as a group")
        node[leaf] = value
    return params


def prefect_param_args(params: dict[str, Any]) -> list[str]:
    """The same parameters as `prefect deployment run` flags (one --param per top-level field)."""
    args = []
    for key, value in params.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


def pipeline_overrides(params_json: str | None, pairs: list[str] | None) -> dict[str, Any]:
    """`--params` (one JSON object) with the `--param` pairs merged into it, group by group."""
    base: Any = {}
    if params_json:
        try:
            base = json.loads(params_json)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(
                f"not JSON ({error.msg}, at character {error.pos}): {params_json!r}", param_hint="'--params'"
            ) from error
        if not isinstance(base, dict):
            raise typer.BadParameter(
                f'expected a JSON object such as \'{{"recipe": "digits-cnn"}}\', got {params_json!r}',
                param_hint="'--params'",
            )
    return _merge(base, parse_param_args(pairs or []))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        both_groups = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_groups else value
    return merged


def number_list(text: str | None, kind: type[int] | type[float], flag: str) -> tuple | None:
    """`"1,2,4"` -> (1, 2, 4), every number above 0; None (the option not given) stays None."""
    if text is None:
        return None
    example = "1,2,4,8" if kind is int else "50,100,200"
    try:
        numbers = tuple(kind(part) for part in text.split(","))
    except ValueError as error:
        raise typer.BadParameter(
            f"expected comma-separated {'whole numbers' if kind is int else 'numbers'} such as {example}, got {text!r}",
            param_hint=f"'{flag}'",
        ) from error
    if not all(number > 0 for number in numbers):
        raise typer.BadParameter(
            f"every number must be above 0, such as {example}; got {text!r}", param_hint=f"'{flag}'"
        )
    return numbers


def host_port(url: str | None, flag: str = "--url") -> str | None:
    """A `host:port` endpoint as given, checked before any client sees it; None stays None."""
    if url is None:
        return None
    host, sep, port = url.rpartition(":")
    if not (sep and host and "/" not in url and port.isdigit() and 0 < int(port) < 65536):
        raise typer.BadParameter(f"expected host:port such as 127.0.0.1:8000, got {url!r}", param_hint=f"'{flag}'")
    return url


def input_tensors(pairs: list[str], dtype: str) -> dict[str, Any]:
    """`--input name=JSON` pairs as numpy arrays of `dtype`."""
    import numpy as np

    tensors = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(
                f"{pair!r}: expected NAME=JSON, e.g. --input 'tokens=[[1, 2, 3]]'", param_hint="'--input'"
            )
        try:
            tensors[name] = np.asarray(json.loads(raw), dtype=dtype)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(
                f"{name}: not JSON ({error.msg}, at character {error.pos}): {raw!r}", param_hint="'--input'"
            ) from error
        except (TypeError, ValueError) as error:  # ragged lists, values that do not fit, an unknown --dtype
            raise typer.BadParameter(f"{name}: not an array of {dtype} ({error})", param_hint="'--input'") from error
    return tensors
