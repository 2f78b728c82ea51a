"""`tformer eval`: loss, perplexity and bits per byte of a decoder on any text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tformer.cli.common import CHECKPOINT_HELP, THREADS_HELP, app, console, err_console, print_note, set_threads, \
    user_errors
from tformer.errors import TformerError

# What the other architectures would need instead of next-token perplexity: one line, exit 1.
NOT_A_DECODER = {
    "encoder": "is an encoder (masked LM): it has no left-to-right likelihood to turn into perplexity; "
               "`tformer train --arch encoder` reports its masked-token loss and accuracy on its validation split",
    "encoder-decoder": "is an encoder-decoder: its loss is of a target given a source, not of plain text; "
                       "`tformer train` reports it (and BLEU) on the validation pairs",
}


def checkpoint_context(extra: dict, max_seq_len: int) -> int:
    """The context a checkpoint was trained with (what its validation used), else the model's maximum."""
    train = extra.get("train") if isinstance(extra.get("train"), dict) else {}
    context = train.get("context")
    return min(int(context), max_seq_len) if isinstance(context, int) and context > 0 else max_seq_len


@app.command("eval")
def eval_command(
    files: List[Path] = typer.Argument(..., help="Text files, directories (every *.txt below) or globs, scored "
                                       "as one stream.", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=CHECKPOINT_HELP, show_default=False),
    context: Optional[int] = typer.Option(None, help="Input tokens per window. Default: the context the checkpoint "
                                          "was trained with (else the model's maximum).", show_default=False),
    stride: Optional[int] = typer.Option(None, help="Tokens between window starts: each window scores only the "
                                         "tokens no earlier window scored, with at least context - stride tokens "
                                         "before them. Default: half the context; = context: non-overlapping "
                                         "windows, as train's validation.", show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16 (or "
                              "float32, bfloat16, float16)."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP, show_default=False),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: score the model with int8 weights, as "
                                           "`generate --quantize int8` decodes with them (CPU only).",
                                           show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Score a decoder's next-token prediction on any text: loss (nats per token), perplexity, bits per byte
    (comparable across tokenizers), tokens/s and the token count. The text is streamed in bounded pieces."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    set_threads(threads)
    # On stderr, so --json's stdout stays one document; shown from the first second (loading included).
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=err_console, transient=True,
                   disable=not err_console.is_terminal)
    with user_errors(), bar:
        task = bar.add_task("loading", total=None, stats="")
        from tformer.checkpoint import read_config
        from tformer.evaluation import evaluate_text
        from tformer.generation.load import load

        loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
        if loaded.note:
            print_note(loaded.note)
        arch = loaded.config.arch
        if arch != "decoder":
            raise TformerError(f"checkpoint '{loaded.path}' {NOT_A_DECODER.get(arch, f'is a {arch}')}; "
                               "eval scores decoders")
        _, _, extra = read_config(loaded.path)
        window = context or checkpoint_context(extra, loaded.config.max_seq_len)
        if window > loaded.config.max_seq_len:
            raise TformerError(f"--context {window} exceeds the model's maximum of {loaded.config.max_seq_len} tokens")
        bar.update(task, description="scoring")

        def progress(done: int, total: int, scored: int) -> None:
            bar.update(task, completed=done, total=total, stats=f"{scored:,} tokens")

        result = evaluate_text(loaded.model, loaded.tokenizer, files, window, stride, batch_size, loaded.device,
                               progress)
    report = {"checkpoint": str(loaded.path), "files": [str(f) for f in files], **result.to_dict(),
              "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}
    if json_out:
        print(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"eval of {loaded.path}", show_header=False, title_justify="left")
    for name, value in (
        ("loss (nats/token)", f"{result.loss:.4f}"), ("perplexity", f"{result.perplexity:.3f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f}"),
        ("tokens scored", f"{result.tokens:,} (of {result.text_tokens:,}; {result.bytes:,} bytes)"),
        ("windows", f"{result.windows:,} of {result.context} tokens, stride {result.stride}"),
        ("speed", f"{result.tokens_per_s:,.0f} tokens/s ({result.seconds:.1f} s, {report['device']} "
                  f"{report['dtype']})"),
    ):
        table.add_row(name, value)
    console.print(table)
