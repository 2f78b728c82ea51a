import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from tformer import __version__
from tformer.cli import app, user_errors
from tformer.errors import CheckpointError

runner = CliRunner()


def test_help_lists_only_registered_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Usage: tformer" in result.output
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    panel = result.output.split("Commands")[1] if "Commands" in result.output else ""
    listed = set(re.findall(r"^│ (\S+) ", panel, flags=re.M))
    assert listed == registered
    assert registered <= {"tokenize", "train", "generate", "inspect"}


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "tformer", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tformer {__version__}"


def test_user_errors_become_one_line_and_exit_1():
    demo = typer.Typer()

    @demo.command()
    def broken() -> None:
        with user_errors():
            raise CheckpointError("checkpoint directory 'x' does not exist [see --help]")

    result = runner.invoke(demo, [])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: checkpoint directory 'x' does not exist [see --help]"]
