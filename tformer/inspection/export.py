"""Exports of an inspection: JSON, a PNG of the heatmaps, and a self-contained HTML page."""

from __future__ import annotations

import html as html_lib
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tformer.errors import TformerError
from tformer.files import atomic_write, atomic_write_text
from tformer.inspection.report import HTML_MAX_TOKENS, Inspection, heatmap
from tformer.inspection.stats import THRESHOLDS

# == exports =====================================================================================

def _clean(x: Any) -> Any:
    """JSON-ready: NaN and infinities become null, tensors lists, tuples lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, Tensor):
        return _clean(x.tolist())
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _round(m: Tensor, digits: int = 4) -> list:
    return (m * 10**digits).round().div(10**digits).tolist()


def to_json(ins: Inspection) -> dict[str, Any]:
    """Everything the terminal shows, as one JSON-ready document (statistics at full precision)."""
    doc: dict[str, Any] = {"anatomy": ins.anatomy, "thresholds": THRESHOLDS, "attention": None}
    report = ins.attention
    if report is not None:
        doc["attention"] = {
            "prompt": report.prompt,
            "ids": report.ids,
            "target": report.target,
            "target_from": report.target_from,
            "target_tokens": report.target_tokens or None,
            "target_note": report.target_note,
            "stacks": {name: {"causal": att.causal, "n_layers": att.n_layers, "n_heads": att.n_heads,
                              "queries": att.queries, "keys": att.keys, "layers": att.layers,
                              "heads": [asdict(h) for h in att.heads]}
                       for name, att in report.stacks.items()},
            "alignment": report.alignment,
            "alignment_of": report.alignment_of if report.alignment is not None else None,
        }
    if ins.heatmap is not None:
        hm = ins.heatmap
        doc["attention"]["heatmap"] = {"stack": hm.stack, "layer": hm.layer, "head": hm.head, "rows": hm.rows,
                                       "cols": hm.cols, "window": hm.window, "matrix": _round(hm.matrix)}
    return _clean(doc)


def require_matplotlib() -> None:
    """Raise a one-line error when matplotlib (the optional `plot` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TformerError("--png needs matplotlib, which is not installed: pip install 'tformer[plot]' "
                           "(or pip install matplotlib)") from None


def write_png(ins: Inspection, path: str | Path) -> None:
    """The chosen layer as a PNG: every head and their mean in a grid, or the one head asked for."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    hm = ins.heatmap
    if hm is None or ins.attention is None:
        raise TformerError("--png needs --prompt TEXT")
    att = ins.attention.stacks[hm.stack]
    heads = att.heads[hm.layer * att.n_heads: (hm.layer + 1) * att.n_heads]
    if hm.head is None:
        panels = [("mean over heads", hm.matrix)] + [
            (f"head {h.head}" + (f": {', '.join(h.labels)}" if h.labels else ""), heatmap(att, hm.layer, h.head).matrix)
            for h in heads]
    else:
        labels = heads[hm.head].labels
        panels = [(f"head {hm.head}" + (f": {', '.join(labels)}" if labels else ""), hm.matrix)]
    ncols = math.ceil(math.sqrt(len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    size = 4.2 if len(panels) > 1 else 8.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False,
                             layout="constrained")  # titles and tick labels do not overlap the next row
    vmax = max(float(m.max()) for _, m in panels) or 1.0
    ticks = len(hm.rows) <= 40 and len(hm.cols) <= 40
    for ax, (title, m) in zip(axes.flat, panels):
        image = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        if ticks:
            ax.set_xticks(range(len(hm.cols)), hm.cols, rotation=90, fontsize=6)
            ax.set_yticks(range(len(hm.rows)), hm.rows, fontsize=6)
        else:
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    title = f"{hm.title.rsplit(',', 1)[0]}  ({'/'.join(Path(ins.anatomy['checkpoint']).parts[-2:])})"
    fig.suptitle(title + (f"\n{hm.window}" if hm.window else ""), fontsize=11)
    try:
        _writing(path, "image", lambda: atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110)))
    finally:
        plt.close(fig)


def page_data(ins: Inspection, max_tokens: int = HTML_MAX_TOKENS) -> dict[str, Any]:
    """What the HTML page draws: every stack's weights (in thousandths, cut to `max_tokens`) and statistics."""
    report, a = ins.attention, ins.anatomy
    if report is None or ins.heatmap is None:
        raise TformerError("--html needs --prompt TEXT")
    stacks = {}
    for name, att in report.stacks.items():
        r, c = min(max_tokens, len(att.queries)), min(max_tokens, len(att.keys))
        w = (att.weights[:, :, :r, :c] * 1000).round().to(torch.int32)
        stacks[name] = {
            "causal": att.causal, "layers": att.n_layers, "heads": att.n_heads,
            "queries": att.queries[:r], "keys": att.keys[:c], "total_queries": len(att.queries),
            "total_keys": len(att.keys), "weights": w.tolist(),
            "stats": [[asdict(h) for h in att.heads[layer * att.n_heads:(layer + 1) * att.n_heads]]
                      for layer in range(att.n_layers)],
        }
    hm = ins.heatmap
    return _clean({
        "checkpoint": a["checkpoint"], "arch": a["arch"], "parameters": a["parameters"]["total"],
        "config": {k: a["config"][k] for k in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                                               "vocab_size", "max_seq_len", "pos_encoding")},
        "prompt": report.prompt, "target": report.target, "target_from": report.target_from,
        "target_tokens": report.target_tokens, "alignment": report.alignment, "alignment_of": report.alignment_of,
        "selected": {"stack": hm.stack, "layer": hm.layer, "head": hm.head},
        "thresholds": THRESHOLDS, "stacks": stacks,
    })


def render_html(ins: Inspection) -> str:
    """One self-contained page (inline CSS and JS, no network): pick an attention, layer and head;
    hover a token to see where it attends; hover the heatmap for exact weights."""
    data = json.dumps(page_data(ins), ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape < > & in the JSON.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html_lib.escape(f"tformer inspect: {Path(ins.anatomy['checkpoint']).name}")
    page = resources.files("tformer.inspection").joinpath("page.html").read_text(encoding="utf-8")
    return page.replace("__TITLE__", title).replace("__DATA__", data)


def write_html(ins: Inspection, path: str | Path) -> None:
    """Write the page atomically (a temporary file, then a rename)."""
    page = render_html(ins)
    _writing(path, "page", lambda: atomic_write_text(path, page))


def _writing(path: str | Path, what: str, write: Callable[[], None]) -> None:
    """Run `write`, turning a filesystem error (a missing permission, a directory in the way) into one line."""
    try:
        write()
    except OSError as e:
        raise TformerError(f"cannot write the {what} to '{path}': {e.strerror or e}") from None
