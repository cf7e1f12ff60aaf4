"""`tes`: the command line of train-export-serve.

    tes demo                      # tes up, then the default pipeline via `prefect deployment run --watch`
    tes up | tes down | tes status | tes env
    tes run --param recipe=digits-cnn --param training.steps=100      # in-process, no servers needed
    tes infer stdlib-gpt --text "def fib(n):" --protocol grpc
    tes complete "def fib(n):"
    tes report | tes variants | tes ledger
    tes bench stdlib-gpt --thorough
    tes --install-completion      # shell completion (bash, zsh, fish, PowerShell)

The commands only parse, call the packages and print: `stack_commands.py` (the stack and the pipeline),
`serve_commands.py` (requests and the benchmark), `run_commands.py` (what a run left). What they read from runs
is in `rundata.py`, how they print in `output.py`. Every error a user can cause ends in one `error: ...` on
stderr and a non-zero exit code (2; 1 for `status` and `env` with no stack up), never a traceback
(`TES_DEBUG=1 tes ...` raises it instead, with its traceback).
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from typing import Annotated, Callable

import typer
from pydantic import ValidationError
from typer._click.exceptions import NoArgsIsHelpError  # Typer 0.29 carries its own click as typer._click

from core.errors import TesError
from flows.cli import output, run_commands, serve_commands, stack_commands
from flows.cli.arguments import parse_param_args, prefect_param_args

__all__ = ["app", "main", "parse_param_args", "prefect_param_args"]

DISTRIBUTION = "train-export-serve"
USER_ERROR_EXIT = 2
COMMANDS: list[tuple[str, Callable]] = [
    ("up", stack_commands.up),
    ("down", stack_commands.down),
    ("status", stack_commands.status),
    ("env", stack_commands.env),
    ("run", stack_commands.run),
    ("demo", stack_commands.demo),
    ("infer", serve_commands.infer),
    ("complete", serve_commands.complete),
    ("bench", serve_commands.bench),
    ("report", run_commands.report),
    ("variants", run_commands.variants),
    ("ledger", run_commands.ledger),
    ("export-repository", run_commands.export_repository),
    ("scaling", run_commands.scaling),
]
# what a user can cause: the project's own errors, bad parameters, bad values handed to a client, a wrong path
USER_ERRORS = (TesError, ValidationError, ValueError, FileNotFoundError)

app = typer.Typer(name="tes", no_args_is_help=True, pretty_exceptions_enable=False)
for _name, _function in COMMANDS:
    app.command(_name)(_function)


def _print_version(value: bool) -> None:
    if value:
        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            version = "unknown (the project is not installed: pip install -e .)"
        output.say(f"tes ({DISTRIBUTION}) {version}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """train-export-serve: train a PyTorch model, export it to ONNX, serve it from Triton; orchestrated by Prefect."""


def main(argv: list[str] | None = None) -> int:
    """Run `tes` with `argv` (default: the process's arguments); returns the exit code."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="tes", standalone_mode=False)
    except NoArgsIsHelpError:  # `tes` alone: the help was printed
        return 0
    except typer.TyperException as error:  # an unknown option, a value of the wrong type, a missing argument
        output.error(_usage_message(error))
        return getattr(error, "exit_code", USER_ERROR_EXIT)
    except typer.Abort:
        output.error("aborted")
        return 1
    except USER_ERRORS as error:
        if os.environ.get("TES_DEBUG"):
            raise
        output.error(describe(error))
        return USER_ERROR_EXIT
    return result if isinstance(result, int) else 0


def _usage_message(error: typer.TyperException) -> str:
    message = error.format_message().replace("Value error, ", "")  # pydantic's prefix, from Typer's value coercion
    context = getattr(error, "ctx", None)
    return message + (f" (see `{context.command_path} --help`)" if context is not None else "")


def describe(error: Exception) -> str:
    """What went wrong, for a user: the project's errors say it themselves; others get their essentials."""
    if isinstance(error, ValidationError):
        from recipes import validation_problems

        return f"invalid {error.title}:\n" + "\n".join(f"  - {problem}" for problem in validation_problems(error))
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename} does not exist"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
    return str(error) or type(error).__name__
