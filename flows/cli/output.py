"""How `tes` prints: tables, markdown and plain lines on stdout through rich; errors as one `error: ...` line on
stderr. Piped into a file or another program, rich drops colours and keeps the text.

Nothing here reads run data: the commands pass rows and strings (`flows/cli/rundata.py` makes them).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich import box
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)  # stdout, looked up at each print (so tests capturing stdout see it)
PIPED_WIDTH = 240  # into a pipe or a file, tables keep their rows on one line up to this many characters


def say(text: str = "") -> None:
    """One plain line, never wrapped (commands in it stay pasteable) and never read as rich markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """`error: <message>` on stderr, without rich: it must stay one line whatever the terminal's width."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def markdown(text: str) -> None:
    """Rendered on a terminal; into a pipe or a file, the markdown itself (`tes report > report.md` keeps it)."""
    if console.is_terminal:
        console.print(Markdown(text))
    else:
        say(text.rstrip("\n"))


def table(
    columns: list[str], rows: list[list[str]], title: str | None = None, numeric: frozenset[int] = frozenset()
) -> None:
    """A table; `numeric` holds the indexes of right-aligned columns. Cells are plain text, never markup."""
    shown = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for index, column in enumerate(columns):
        shown.add_column(column, justify="right" if index in numeric else "left", overflow="fold")
    for row in rows:
        shown.add_row(*(Text(str(cell)) for cell in row))
    (console if console.is_terminal else Console(width=PIPED_WIDTH, highlight=False)).print(shown)


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[str], None]]:
    """A progress bar of `total` steps; yields `report(line)`, which prints `line` above the bar and counts a step
    for each line that starts with two spaces (a finished step, by the convention of `bench.stage`). Into a pipe or a
    file only the lines go."""
    if not console.is_terminal:
        yield say
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def report(line: str) -> None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            if line.startswith("  "):
                progress.advance(task)

        yield report
