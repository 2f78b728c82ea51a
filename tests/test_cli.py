import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from tformer import __version__
from tformer.cli import app
from tformer.cli.common import run, user_errors
from tformer.errors import CheckpointError

runner = CliRunner()


def test_help_lists_only_registered_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Usage: tformer" in result.output
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    panel = result.output.split("Commands")[1] if "Commands" in result.output else ""
    listed = set(re.findall(r"^│ (\S+) ", panel, flags=re.M))
    assert listed == registered
    assert registered <= {"tokenize", "train", "generate", "inspect", "export", "eval"}


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


def test_usage_errors_of_the_command_are_one_line_with_exit_2():
    """Click's own errors (unknown option or command, a value of the wrong type) come out like ours,
    from the `tformer` entry point and from `python -m tformer`."""
    cases = [(["generate", "--max-new-tokens", "abc"], "Invalid value for '--max-new-tokens'"),
             (["generate", "--no-such-option"], "No such option: --no-such-option"),
             (["no-such-command"], "No such command 'no-such-command'")]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "tformer", *args], capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == "", args
        assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "--help" in out.stderr


def test_entry_point_exit_codes(capsys):
    for args, code in (([], 0), (["--version"], 0), (["generate", "--help"], 0),
                       (["generate", "--prompt", "x", "--checkpoint", "no/such/dir"], 1)):
        try:
            run(args)
        except SystemExit as e:
            assert e.code == code, args
        else:
            raise AssertionError("run() always exits")
    err = capsys.readouterr().err
    assert err.strip() == "error: checkpoint directory 'no/such/dir' does not exist"
