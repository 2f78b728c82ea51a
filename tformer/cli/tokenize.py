"""`tformer tokenize`."""

from __future__ import annotations

import typer
from rich.markup import escape

from tformer.cli.common import app, console, err_console, user_errors


# --- tokenize ---
@app.command()
def tokenize(
    corpus: list[str] | None = typer.Argument(
        None, show_default=False,
        help="Text files, globs or directories (every *.txt below); .tsv files of source<TAB>target lines "
        "give pairs. Default: the built-in corpus (Python's pydoc help topics).",
    ),
    kind: str | None = typer.Option(None, help="bpe (byte-level BPE, the default), char or byte.", show_default=False),
    vocab_size: int | None = typer.Option(
        None, help="Largest vocabulary, special tokens included (BPE default 4096).", show_default=False
    ),
    tokenizer: str | None = typer.Option(
        None, help="Encode with this existing tokenizer.json instead of training one.", show_default=False
    ),
    out: str | None = typer.Option(
        None, help="Output directory. Default: data/<corpus name>-<kind>.", show_default=False
    ),
    val_fraction: float = typer.Option(0.1, help="Share of the corpus, at its end, kept for validation."),
    errors: str = typer.Option("strict", help="strict: stop at bytes that are not UTF-8; replace: use U+FFFD."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory once the new one is done."),
) -> None:
    """Train a tokenizer on a corpus and encode the corpus into token files for `tformer train`."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table

    from tformer.data.prepare import tokenize_corpus

    columns = (TextColumn("{task.description:<9}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    bars = Progress(*columns, console=err_console, transient=True)  # the table sums it up; errors stay one line
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if not tasks:
            bars.start()  # only once there is something to show: errors before that stay one line
        if phase not in tasks:
            tasks[phase] = bars.add_task("training" if phase == "train" else "encoding", total=total)
        bars.update(tasks[phase], completed=done)

    with user_errors():
        try:
            result = tokenize_corpus(
                corpus or [], out, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer,
                val_fraction=val_fraction, errors=errors, force=force, progress=progress,
            )
        finally:
            if tasks:  # stopping a display that never started still prints a blank line
                bars.stop()

    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    table = Table(title=f"{result.kind} tokenizer, {result.vocab_size:,} tokens → {escape(str(result.out_dir))}",
                  title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    split = f"train {result.tokens['train']:,} / val {result.tokens['val']:,}"
    if result.pairs is not None:
        split += f"; pairs {result.pairs['train']:,} / {result.pairs['val']:,}"
    used = result.vocab_used / result.vocab_size
    rows = {
        "files": f"{result.files:,}",
        "characters": f"{result.chars:,}",
        "bytes": f"{result.bytes:,}",
        "tokens": f"{result.total_tokens:,} ({split}; {result.dtype})",
        "characters per token": f"{result.chars_per_token:.2f}",
        "vocabulary used": f"{result.vocab_used:,} of {result.vocab_size:,} ({used:.0%})",
        "unknown-token rate": f"{result.unk_rate:.3%}",
        "time": f"{result.seconds:.2f} s (training {result.train_seconds:.2f}, encoding {result.encode_seconds:.2f})",
        "MB/s": f"{result.mb_per_s:.1f} (encoding)",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
