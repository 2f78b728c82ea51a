"""`tformer inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from tformer.cli.common import (
    CHECKPOINT_HELP,
    app,
    console,
    err_console,
    print_note,
    user_errors,
)


# --- inspect ---
@app.command("inspect")
def inspect_command(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help=CHECKPOINT_HELP, show_default=False),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Run the model on this text and summarise its attention (the source, for an encoder-decoder).",
        show_default=False),
    layer: Optional[int] = typer.Option(None, help="Layer of the heatmap, 0-based (default: the last).",
                                        show_default=False),
    head: Optional[int] = typer.Option(None, help="Head of the heatmap, 0-based (default: the mean over heads).",
                                       show_default=False),
    stack: Optional[str] = typer.Option(
        None, help="Attention of the heatmap: encoder, decoder or cross (default: the model's own; cross for "
        "an encoder-decoder).", show_default=False),
    target: Optional[str] = typer.Option(
        None, help="Encoder-decoder: the target text for the cross-attention (default: decoded greedily).",
        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON document instead."),
    html: Optional[Path] = typer.Option(
        None, help="Write an interactive, self-contained page (works offline) to this file.", show_default=False),
    png: Optional[Path] = typer.Option(
        None, help="Write the heatmap(s) of the chosen layer to this PNG file (needs matplotlib).",
        show_default=False),
) -> None:
    """Show a checkpoint's anatomy and, with --prompt, what each attention head does on that text."""
    import json

    from tformer.inspection import export, render_terminal, report

    with user_errors():
        if png is not None:
            export.require_matplotlib()
        drawn = tuple(name for name, path in (("--html", html), ("--png", png)) if path is not None)
        result = report.inspect_checkpoint(checkpoint, prompt=prompt, target=target, stack=stack, layer=layer,
                                         head=head, needs_prompt=drawn)
        if result.note:
            print_note(result.note)
        if html is not None:
            export.write_html(result, html)
        if png is not None:
            export.write_png(result, png)
    if json_out:
        typer.echo(json.dumps(export.to_json(result), indent=1, ensure_ascii=False))
    else:
        for part in render_terminal.render(result):
            console.print(part)
            console.print()
    for name, path in (("page", html), ("image", png)):
        if path is not None:
            err_console.print(f"wrote {name} {escape(str(path))}", highlight=False)
