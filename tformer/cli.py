"""The `tformer` command line: parse, call the core, print with rich. No model or training logic here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tformer import __version__
from tformer.errors import TformerError

app = typer.Typer(
    name="tformer",
    help="Tokenize text, train Transformers on it, generate from them, and inspect their attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the core's TformerError into a one-line message instead of a traceback."""
    try:
        yield
    except TformerError as e:
        fail(str(e))


def _print_version(value: bool) -> None:
    if value:
        console.print(f"tformer {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Tokenize text, train Transformers on it, generate from them, and inspect their attention."""
