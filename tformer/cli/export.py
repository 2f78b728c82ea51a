"""`tformer export`: a checkpoint as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tformer.cli.common import app, err_console, print_note, user_errors


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (ours or a Hugging Face one), a training run's "
                                     "directory (its newest checkpoint), or a Hub name."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (config.json, model.safetensors, "
                             "generation_config.json, tokenizer files)."),
) -> None:
    """Write a checkpoint as a Hugging Face directory that transformers loads (GPT-2, Llama, Qwen2, BERT, BART shapes)."""
    from tformer.checkpoint import resolve_checkpoint
    from tformer.hf.export import export_checkpoint

    with user_errors():
        path, note = resolve_checkpoint(checkpoint)
        if note:
            print_note(note)
        written, architecture = export_checkpoint(path, out)
    err_console.print(f"wrote {escape(str(written))} ({architecture})", highlight=False)
