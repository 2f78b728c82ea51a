"""Drawing an inspection in the terminal with rich."""

from __future__ import annotations

import bisect
import math
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tformer.inspection.anatomy import COMPONENTS
from tformer.inspection.report import (
    ALIGN_TOP_K,
    AttentionReport,
    Heatmap,
    Inspection,
    StackAttention,
)
from tformer.inspection.stats import (
    BROAD_MIN_ENTROPY,
    FIRST_TOKEN_MIN,
    INDUCTION_MIN,
    PREVIOUS_TOKEN_MIN,
)

# == terminal rendering ==========================================================================

SHADES = " ░▒▓█"  # the heatmap's cells, so that it reads without colour too
SHADE_STEPS = (0.05, 0.2, 0.4, 0.7)  # where the next shade starts, as a share of the largest weight shown
MASKED = "·"  # a key the query cannot see (causal mask)
ROW_LABEL_CHARS = 12
COL_LABEL_CHARS = 6
# Viridis, sampled: dark for small weights, yellow for large ones; readable on dark and light terminals.
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour(x: float) -> str:
    """A rich colour for x in [0, 1] on the viridis scale."""
    x = min(max(float(x), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    k = min(int(x), len(_VIRIDIS) - 2)
    a, b, t = _VIRIDIS[k], _VIRIDIS[k + 1], x - k
    r, g, bl = (round(a[c] + (b[c] - a[c]) * t) for c in range(3))
    return f"rgb({r},{g},{bl})"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # not reached


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _score(x: float | None, threshold: float | None = None, digits: int = 2) -> Text:
    """A number in [0, 1] coloured on the scale (kept readable: the darkest quarter is skipped); bold past its threshold."""
    if x is None:
        return Text("-", style="dim")
    style = colour(0.25 + 0.75 * x)
    if threshold is not None and x >= threshold:
        style += " bold"
    return Text(f"{x:.{digits}f}", style=style)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _kv_table(title: str, rows: list[tuple[str, Any]], columns: int = 1) -> Table:
    """A borderless table of name/value pairs, `columns` pairs side by side."""
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None,
                  padding=(0, 2, 0, 0))
    for _ in range(columns):
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")
    per = math.ceil(len(rows) / columns)
    for r in range(per):
        cells: list[Any] = []
        for c in range(columns):
            k = c * per + r
            cells += [rows[k][0], rows[k][1]] if k < len(rows) else ["", ""]
        table.add_row(*cells)
    return table


def render_anatomy(a: dict[str, Any]) -> list[RenderableType]:
    """Tables for a checkpoint's config, parameters, size and memory, training state and tokenizer."""
    cfg, counts = a["config"], a["parameters"]
    total = counts["total"]
    out: list[RenderableType] = [Text.assemble(
        ("checkpoint ", "bold"), (a["checkpoint"], "cyan"),
        f"  {a['arch']}" + (" (Hugging Face GPT-2)" if a["source"] == "hf-gpt2" else "")
        + f", {human_count(total)} parameters")]
    skip = {"preset"} | ({"n_encoder_layers"} if a["arch"] == "decoder" else set()) \
        | ({"n_decoder_layers"} if a["arch"] == "encoder" else set()) \
        | (set() if cfg["pos_encoding"] == "rope" else {"rope_base"})
    rows = [(k, str(v)) for k, v in cfg.items() if k not in skip]
    if cfg.get("preset"):
        rows.insert(0, ("preset", cfg["preset"]))
    out.append(_kv_table("model", rows, columns=3))

    params = Table(title="parameters", title_justify="left", title_style="bold", box=None, padding=(0, 2, 0, 0))
    params.add_column("component", style="bold cyan")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    params.add_column("")
    for name in [*COMPONENTS, *(k for k in counts if k not in COMPONENTS and k != "total")]:
        share = counts[name] / total if total else 0.0
        note = "tied to the token embedding" if name == "output head" and a["tied_embeddings"] else ""
        bar = Text("█" * round(share * 30), style=colour(0.3 + 0.7 * share))
        params.add_row(name, f"{counts[name]:,}", f"{share:.1%}", bar if not note else Text(note, style="dim"))
    params.add_row("total", f"{total:,}", "", "", style="bold")
    out.append(params)

    size, mem = a["size"], a["memory"]
    at = f"batch {mem['batch']} x {mem['context']} tokens"
    at += f" (assumed: {mem['assumed']})" if mem["assumed"] else " (the saved training batch and context)"
    inf, tr = mem["inference"], mem["training"]
    out.append(_kv_table("size and memory", [
        ("weights on disk", f"{human_bytes(size['weights_bytes'])} ({size['dtype']})"
                            + (f", {size['bytes_by_dtype']}" if len(size["bytes_by_dtype"]) > 1 else "")),
        ("checkpoint directory", human_bytes(size["directory_bytes"])),
        ("estimates at", at),
        ("inference", f"{human_bytes(inf['total'])}  = weights {human_bytes(inf['weights'])} + KV cache "
                      f"{human_bytes(inf['kv_cache'])} + activations {human_bytes(inf['activations'])} + logits "
                      f"{human_bytes(inf['logits'])}"),
        ("training", f"{human_bytes(tr['total'])}  = weights, gradients, AdamW "
                     f"{human_bytes(tr['weights_gradients_optimizer'])} + activations "
                     f"{human_bytes(tr['activations'])} + logits {human_bytes(tr['logits'])}"),
        ("", Text(f"inference: {mem['inference_formula']}", style="dim")),
        ("", Text(f"training: {mem['training_formula']}", style="dim")),
    ]))

    train = a["training"]
    if train is None:
        out.append(_kv_table("training", [("state", "not trained with tformer (no trainer_state.json)")]))
    else:
        rows = []
        if train.get("error"):
            rows.append(("state", Text(train["error"], style="yellow")))
        if "step" in train:
            steps = f"{train['step']:,}" if isinstance(train.get("step"), int) else "-"
            if isinstance(train.get("total_steps"), int):
                steps += f" of {train['total_steps']:,}"
            rows += [("steps", steps),
                     ("tokens seen", f"{train['tokens_seen']:,}" if isinstance(train.get("tokens_seen"), int) else "-"),
                     ("best validation loss", _num(train.get("best_val_loss"), 4)),
                     ("last validation loss", _num(train.get("val_loss"), 4)),
                     ("last learning rate", "-" if train.get("lr") is None else f"{train['lr']:.3g}"),
                     ("training time", "-" if train.get("elapsed") is None else f"{train['elapsed']:.1f} s")]
        else:
            rows.append(("state", "no trainer_state.json"))
        tc = train.get("train_config")
        if tc:
            rows.append(("trained with", ", ".join(f"{k} {v}" for k, v in tc.items() if v is not None)))
        out.append(_kv_table("training", rows))

    tok = a["tokenizer"]
    if tok is None:
        out.append(_kv_table("tokenizer", [("tokenizer", "none (no tokenizer.json in the checkpoint)")]))
    else:
        roles: dict[tuple[int, str], list[str]] = {}
        for role, v in tok["special"].items():  # GPT-2's <|endoftext|> is both bos and eos: one entry
            roles.setdefault((v["id"], v["token"]), []).append(role)
        specials = ", ".join(f"{'/'.join(r)} {t}={i}" for (i, t), r in roles.items()) or "none"
        vocab = f"{tok['vocab_size']:,}"
        if not tok["matches_model"]:
            vocab += f" (more than the model's {cfg['vocab_size']:,}: not this model's tokenizer?)"
        out.append(_kv_table("tokenizer", [("kind", tok["kind"]), ("vocabulary", vocab), ("special tokens", specials)]))
    return out


def render_heads(att: StackAttention) -> Table:
    """One row per layer x head: statistics coloured on a scale, and the labels."""
    table = Table(title=f"{att.name} attention: {att.n_layers} layers (L) x {att.n_heads} heads (H)",
                  title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    positional = att.name != "cross"
    induction = any(h.induction is not None for h in att.heads)
    num = {"justify": "right", "no_wrap": True, "min_width": 4}
    for name, kw in (("L", num | {"min_width": 1}), ("H", num | {"min_width": 1}), ("entropy", num),
                     *((("dist", num),) if positional else ()), ("max", num), ("top key, share", {"no_wrap": True, "max_width": 15}),
                     *((("prev", num), ("first", num)) if positional else ()),
                     *((("induct", num),) if induction else ()), ("labels", {"min_width": 15})):
        table.add_column(name, **kw)
    for h in att.heads:
        row: list[Any] = [str(h.layer), str(h.head), _score(h.entropy, BROAD_MIN_ENTROPY)]
        if positional:
            row.append(_num(h.distance, 1))
        row.append(_score(h.max_weight))
        row.append(Text(f"{h.top_key} {_clip(h.top_token or '', 6)} {h.top_share:.2f}")
                   if h.top_share is not None else "-")
        if positional:
            row += [_score(h.previous, PREVIOUS_TOKEN_MIN), _score(h.first, FIRST_TOKEN_MIN)]
        if induction:
            row.append(_score(h.induction, INDUCTION_MIN))
        row.append(Text(", ".join(h.labels), style="bold green"))
        table.add_row(*row, end_section=h.head == att.n_heads - 1 and h.layer < att.n_layers - 1)
    table.caption = head_legend(positional, induction)
    table.caption_justify = "left"
    return table


def head_legend(positional: bool, induction: bool) -> str:
    """What the columns of the per-head table mean (weights are shares of a query's attention, 0 to 1)."""
    parts = ["entropy: spread over the visible keys (1 uniform, 0 one key)"]
    if positional:
        parts.append("dist: mean distance to the keys attended, in tokens")
    parts += ["max: largest single weight", "top key, share: the key receiving most attention overall"]
    if positional:
        parts += ["prev: weight on the previous token", "first: weight on the first token (a sink)"]
    if induction:
        parts.append("induct: attention to what followed the same token before, on a repeated random sequence "
                     "(1 copies it; chance is near 0)")
    return "; ".join(parts) + ". Coloured scores pass the threshold of the label they give."


def render_layers(report: AttentionReport) -> Table:
    """The per-layer summary of every attention."""
    table = Table(title="per layer (means over heads)", title_justify="left", title_style="bold",
                  box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    for name in ("attention", "layer", "entropy", "distance", "best induction", "heads labelled"):
        table.add_column(name, justify="left" if name in ("attention", "heads labelled") else "right")
    for att in report.stacks.values():
        for s in att.layers:
            labels = ", ".join(f"{n} x{c}" for n, c in s["labels"].items()) or "-"
            table.add_row(att.name, str(s["layer"]), _score(s["entropy"]), _num(s["distance"], 1),
                          _score(s["induction_max"], INDUCTION_MIN), labels)
    return table


def render_heatmap(hm: Heatmap) -> Text:
    """The matrix as coloured shade characters, query tokens as row labels, key tokens written downwards on top."""
    from rich.cells import cell_len

    cell = 2 if len(hm.cols) <= 32 else 1  # square-ish cells while they fit in 80 columns
    width = len(str(len(hm.rows) - 1))
    rows = [f"{i:>{width}} {_clip(lab, ROW_LABEL_CHARS)}" for i, lab in enumerate(hm.rows)]
    label_w = max(cell_len(r) for r in rows)
    cols = [_clip(lab, COL_LABEL_CHARS) for lab in hm.cols]
    text = Text()
    text.append(hm.title + "\n", style="bold")
    if hm.window:
        text.append(hm.window + "\n", style="yellow")
    for r in range(max(len(c) for c in cols)):
        text.append(" " * (label_w + 1))
        for c in cols:
            ch = c[r] if r < len(c) else " "
            text.append((ch if cell_len(ch) == 1 else "?").ljust(cell), style="cyan")
        text.append("\n")
    top = float(hm.matrix.max()) or 1.0  # shades and colours are relative to the largest weight shown
    for i, label in enumerate(rows):
        text.append(label + " " * (label_w - cell_len(label) + 1), style="cyan")
        for j in range(len(cols)):
            if hm.causal and j > i:
                text.append(MASKED.ljust(cell), style="grey35")
            else:
                v = float(hm.matrix[i, j]) / top
                text.append(SHADES[bisect.bisect_right(SHADE_STEPS, v)] * cell, style=colour(v))
        text.append("\n")
    text.append("rows: queries (attending), columns: keys (attended to); shades relative to the largest weight "
                f"shown, {top:.3f}: ", style="dim")
    legend = [f"'{SHADES[0]}' <{SHADE_STEPS[0]:.0%}"] + [
        f"{SHADES[k + 1]} >={SHADE_STEPS[k]:.0%}" for k in range(len(SHADE_STEPS))]
    text.append("  ".join(legend) + (f"  {MASKED} masked" if hm.causal else ""), style="dim")
    return text


def render_alignment(report: AttentionReport) -> Group:
    """For each target token, the source tokens it attends to most."""
    how = "decoded greedily" if report.target_from == "greedy" else "given by --target"
    title = Text.assemble(("cross-attention alignment", "bold"), f" ({report.alignment_of}): for each target token, "
                          f"the source tokens it attends to most, as position token (weight); target {how}: "
                          f"{report.target!r}")
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    table.add_column("#", justify="right")
    table.add_column("target token")
    for k in range(ALIGN_TOP_K):
        table.add_column(f"source {k + 1}")
    for row in report.alignment or []:
        cells = [Text(f"{s['position']} {s['token']} ({s['weight']:.2f})",
                      style=colour(0.25 + 0.75 * s["weight"])) for s in row["sources"]]
        table.add_row(str(row["position"]), row["target"], *cells)
    return Group(title, table)


def render(ins: Inspection) -> list[RenderableType]:
    """Everything `tformer inspect` prints, in order."""
    out = render_anatomy(ins.anatomy)
    report = ins.attention
    if report is None:
        out.append(Text("Give --prompt TEXT (or -p) to see what each attention head does on it.", style="dim"))
        return out
    if ins.prompt_note:
        out.append(Text(ins.prompt_note, style="dim"))
    seq2seq = "cross" in report.stacks
    inputs = [("source", "encoder"), ("decoder input", "decoder")] if seq2seq else [("input", next(iter(report.stacks)))]
    for what, name in inputs:
        labels = report.stacks[name].queries
        out.append(Text.assemble((f"{what}: ", "bold"), f"{len(labels)} token{'s' if len(labels) != 1 else ''}  ",
                                 (" ".join(labels), "cyan")))
    if report.target_note:
        out.append(Text(f"note: {report.target_note}", style="yellow"))
    out += [render_heads(att) for att in report.stacks.values()]
    out.append(render_layers(report))
    if report.alignment is not None:
        out.append(render_alignment(report))
    if ins.heatmap is not None:
        out.append(render_heatmap(ins.heatmap))
    return out
