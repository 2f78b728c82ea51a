"""`python -m tformer` is the same as the `tformer` command (torchrun can launch it)."""

from tformer.cli.common import run

if __name__ == "__main__":
    run()
