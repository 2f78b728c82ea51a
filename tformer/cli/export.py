"""`tformer export`: a checkpoint as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from tformer.cli.common import app, err_console, print_note, user_errors


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (ours or a Hugging Face one), a training run's "
                                     "directory (its newest checkpoint), or a Hub name."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (config.json, model.safetensors, "
                             "generation_config.json, tokenizer files)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: write a tformer checkpoint instead, "
                                           "with int8 weights and float32 scales (model.safetensors) that "
                                           "`generate` and `eval` load as they are (CPU only; transformers does not "
                                           "read it).", show_default=False),
) -> None:
    """Write a checkpoint as a Hugging Face directory that transformers loads (GPT-2, Llama, Qwen2, BERT, BART
    shapes), or with --quantize int8 as a tformer checkpoint with int8 weights."""
    from tformer.checkpoint import resolve_checkpoint
    from tformer.hf.export import export_checkpoint

    with user_errors():
        if quantize is not None:
            written, architecture = export_quantized(checkpoint, out, quantize)
        else:
            path, note = resolve_checkpoint(checkpoint)
            if note:
                print_note(note)
            refuse_quantized(path, "transformers reads float weights only; export the float checkpoint")
            written, architecture = export_checkpoint(path, out)
    err_console.print(f"wrote {escape(str(written))} ({architecture})", highlight=False)


def export_quantized(checkpoint: str, out: Path, method: str) -> tuple[Path, str]:
    """`export --quantize`: the checkpoint's weights quantized, written as a tformer checkpoint directory."""
    from tformer.checkpoint import load_checkpoint, resolve_checkpoint
    from tformer.errors import TformerError
    from tformer.generation import quantize as q

    q.check_method(method)
    path, note = resolve_checkpoint(checkpoint)
    if note:
        print_note(note)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise TformerError(f"--out '{out}' exists and is not an empty directory or a checkpoint; give a new directory")
    refuse_quantized(path, "it is already quantized")
    ckpt = load_checkpoint(path, device="cpu", dtype=None)
    q.quantize_model(ckpt.model)
    written = q.save_quantized(ckpt.model, ckpt.config, ckpt.path, out, ckpt.extra)
    return written, f"{ckpt.config.arch}, {method} weights"


def refuse_quantized(path: Path, why: str) -> None:
    """One error line for a checkpoint `export --quantize` wrote (its weights are int8)."""
    from tformer.checkpoint import read_config
    from tformer.errors import TformerError

    if path.is_dir() and "quantization" in read_config(path)[2]:
        raise TformerError(f"checkpoint '{path}' has int8 weights: {why}")
