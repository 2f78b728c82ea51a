"""The Typer app, its consoles and the one-line error handling shared by every command."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tformer import __version__
from tformer.errors import TformerError, fault_message

app = typer.Typer(
    name="tformer",
    help="Tokenize text, train Transformers on it, generate from them, and inspect their attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
THREADS_HELP = ("CPU threads for torch (default: one per core). On a machine busy with other work, fewer threads "
                "(often 1) run much faster: threads that wait for a core stall each other.")
CHECKPOINT_HELP = ("A checkpoint directory (ours, or a Hugging Face one), a training run's directory (its newest "
                   "checkpoint), or a directory of runs (the newest checkpoint below it). Default: the newest under "
                   "checkpoints/.")

class _Console(Console):
    """rich's Console, except that a closed output raises BrokenPipeError for the caller to handle (rich exits
    the process): a training run must save its checkpoint even when the reader of its output is gone."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        stream = sys.stderr if self.stderr else sys.stdout
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # later writes go nowhere, quietly
        except (OSError, ValueError):
            pass
        raise BrokenPipeError("the output was closed")


console = _Console()
err_console = _Console(stderr=True)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_note(message: str) -> None:
    """A note to stderr (how an input was understood, what was cut), never mixed into the output."""
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def set_threads(threads: int | None) -> None:
    """--threads: torch's intra-op threads for this run (None: what torch picks, one per core)."""
    if threads is None:
        return
    import torch

    if threads < 1:
        fail(f"--threads {threads} is not allowed; give a whole number >= 1 (at most the cores: {os.cpu_count()})", 2)
    torch.set_num_threads(threads)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print_error(message)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the core's TformerError, and the faults of the machine (a file that cannot be written, a full
    disk, memory), into a one-line message instead of a traceback."""
    try:
        yield
    except TformerError as e:
        fail(str(e))
    except (OSError, MemoryError, OverflowError) as e:
        message = fault_message(e)
        if message is None:
            raise
        fail(message)


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


def run(args: list[str] | None = None) -> NoReturn:
    """The `tformer` command: the Typer app, with its own usage errors (an unknown option, a value of the
    wrong type) on one line like every other error, instead of click's framed message."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        code = app(args=args or ["--help"], prog_name="tformer", standalone_mode=False)
    except typer.Abort:
        print_error("aborted")
        raise SystemExit(1) from None
    except BrokenPipeError:
        # The reader of our output has gone (`tformer generate | head -1`): what was asked is done or saved;
        # stop quietly, as command-line tools do, instead of a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except TformerError as e:  # raised outside a command's user_errors()
        print_error(str(e))
        raise SystemExit(1) from None
    except (OSError, MemoryError, OverflowError) as e:
        message = fault_message(e)
        if message is None:
            raise
        print_error(message)
        raise SystemExit(1) from None
    except Exception as e:
        # Click's usage errors (vendored by recent Typer versions, so matched by what they carry).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise  # anything else is a bug, and its traceback is wanted
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print_error(e.format_message() + hint)
        raise SystemExit(e.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
