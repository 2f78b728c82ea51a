"""The `tformer` command line: one thin module per command over the core package."""

from tformer.cli import eval, export, generate, inspect, tokenize, train  # noqa: F401  (each registers its command)
from tformer.cli.common import (
    app,
    console,
    err_console,
    fail,
    print_error,
    run,
    user_errors,
)

__all__ = ["app", "console", "err_console", "fail", "print_error", "run", "user_errors"]
