"""Inspection: a checkpoint's anatomy and what its attention does on a prompt.

- `anatomy`: config, parameters, size, memory, training state, tokenizer;
- `stats`: per-head statistics, labels and induction scores;
- `report`: the attention report, heatmaps, the whole inspection;
- `render_terminal`: drawing it with rich; `export`: JSON, PNG and the HTML page (`page.html`).
"""

from tformer.inspection.export import require_matplotlib, to_json, write_html, write_png
from tformer.inspection.render_terminal import render
from tformer.inspection.report import Inspection, inspect_checkpoint

__all__ = ["Inspection", "inspect_checkpoint", "render", "require_matplotlib", "to_json", "write_html", "write_png"]
