"""`python -m tformer` is the same as the `tformer` command (torchrun can launch it)."""

from tformer.cli import app

if __name__ == "__main__":
    app()
