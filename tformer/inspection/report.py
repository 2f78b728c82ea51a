"""Inspecting a checkpoint: its anatomy, and what its attention does on a prompt.

- `attention_report(ckpt, prompt)`: one forward pass on the explicit softmax path; for every layer x
  head of every attention (encoder self-, decoder self-, cross-) the statistics of `stats`, head labels,
  induction scores, a per-layer summary and, for an encoder-decoder, the cross-attention alignment.
- `heatmap(...)`: the weights of one layer and head to draw; `inspect_checkpoint(...)`: all of it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tformer.checkpoint import (
    Checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from tformer.config import ModelConfig
from tformer.data.tokenizer import SpecialIds, check_fits, is_byte_level, load_tokenizer
from tformer.data.tokens import open_tokens
from tformer.errors import TformerError
from tformer.generation.config import GenerateConfig
from tformer.generation.generate import generate
from tformer.inspection.anatomy import anatomy
from tformer.inspection.stats import (
    HeadStats,
    attention_weights,
    induction_scores,
    layer_summary,
    stack_heads,
)

HEATMAP_MAX_TOKENS = 64  # the terminal heatmap shows at most this many queries and keys
HTML_MAX_TOKENS = 128  # the HTML page keeps at most this many (its size grows with the square)
TARGET_MAX_TOKENS = 64  # greedy decoding of an encoder-decoder's target stops here, or at 2 x source + 8
ALIGN_TOP_K = 3  # source tokens listed per target token


# == running the model ===========================================================================

def _forward_weights(model: nn.Module, ids: Tensor, tgt: Tensor | None = None) -> dict[str, Tensor]:
    """The attention weights of one forward pass of (1, T) ids, per stack stacked to (L, H, T_q, T_k)."""
    attentions = attention_weights(model, ids, tgt)
    return {name: torch.stack([w[0] for w in ws]).float().cpu() for name, ws in attentions.items()}


# == tokens ======================================================================================

_SHOWN = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible(text: str) -> str:
    """Text with whitespace and control characters made visible: space ␣, newline \\n, tab \\t, others \\xNN."""
    out = []
    for ch in text:
        if ch in _SHOWN:
            out.append(_SHOWN[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "∅"


class TokenLabeler:
    """Readable labels for token ids: byte-level pieces are turned back into text (Ġ -> ␣, Ċ -> \\n);
    a piece that is only part of a UTF-8 character shows its bytes (\\xe2\\x80)."""

    def __init__(self, tok: Any):
        from tformer.data.tokenizer import byte_alphabet

        self.tok = tok
        self.byte_level = is_byte_level(tok)
        self.byte_of = {ch: b for b, ch in enumerate(byte_alphabet())}

    def __call__(self, token_id: int) -> str:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return f"#{token_id}"
        if self.byte_level and all(ch in self.byte_of for ch in piece):
            raw = bytes(self.byte_of[ch] for ch in piece)
            try:
                return visible(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return "".join(f"\\x{b:02x}" for b in raw)
        return visible(self.tok.decode([token_id], skip_special_tokens=False) or piece)


# == the report ==================================================================================

@dataclass
class StackAttention:
    """One kind of attention on the prompt: weights (L, H, T_q, T_k), token labels, per-head statistics."""

    name: str  # "encoder", "decoder" or "cross"
    weights: Tensor
    queries: list[str]
    keys: list[str]
    causal: bool
    heads: list[HeadStats]
    layers: list[dict[str, Any]]

    @property
    def n_layers(self) -> int:
        return self.weights.size(0)

    @property
    def n_heads(self) -> int:
        return self.weights.size(1)


@dataclass
class AttentionReport:
    """What the attention does on a prompt (and, for an encoder-decoder, on its target)."""

    prompt: str
    ids: dict[str, list[int]]  # the input of each stack: "encoder" and/or "decoder"
    stacks: dict[str, StackAttention]
    target: str | None = None  # encoder-decoder: the target text
    target_from: str | None = None  # "given" (--target) or "greedy"
    target_tokens: list[str] = field(default_factory=list)  # labels of the target tokens, one per decoder row
    target_note: str | None = None  # why a greedy target stopped short of <eos>
    alignment: list[dict[str, Any]] | None = None
    alignment_of: str = "the mean over all cross-attention layers and heads"


def stack_names(cfg: ModelConfig) -> list[str]:
    """The attentions a model has, in the order they run."""
    return {"encoder": ["encoder"], "decoder": ["decoder"], "encoder-decoder": ["encoder", "decoder", "cross"]}[cfg.arch]


def default_stack(cfg: ModelConfig) -> str:
    """What the heatmap shows unless told: the model's own attention; the cross-attention of an encoder-decoder."""
    return stack_names(cfg)[-1]


def check_selection(cfg: ModelConfig, stack: str | None, layer: int | None, head: int | None) -> tuple[str, int]:
    """Validate a --stack/--layer/--head choice against the config; returns (stack, layer), layer defaulting to the last."""
    names = stack_names(cfg)
    stack = stack or default_stack(cfg)
    if stack not in names:
        raise TformerError(f"--stack {stack!r} is not an attention of this {cfg.arch} model; choose one of: "
                           + ", ".join(names))
    n_layers = cfg.n_encoder_layers if stack == "encoder" else cfg.n_decoder_layers
    if layer is None:
        layer = n_layers - 1
    if not 0 <= layer < n_layers:
        raise TformerError(f"--layer {layer} is out of range: the {stack} attention has {n_layers} layer"
                           f"{'s' if n_layers != 1 else ''}, 0-{n_layers - 1}")
    if head is not None and not 0 <= head < cfg.n_heads:
        raise TformerError(f"--head {head} is out of range: each layer has {cfg.n_heads} heads, 0-{cfg.n_heads - 1}")
    return stack, layer


def _encode(tok: Any, text: str, what: str, cfg: ModelConfig) -> list[int]:
    ids = tok.encode(text).ids  # with the tokenizer's template, as generate encodes
    if not ids:
        raise TformerError(f"{what} is empty after tokenization; give some text")
    if len(ids) > cfg.max_seq_len:
        raise TformerError(f"{what} is {len(ids)} tokens; this model takes at most {cfg.max_seq_len} (max_seq_len)")
    return ids


def greedy_target(model: nn.Module, tok: Any, source: str, specials: SpecialIds) -> tuple[list[int], str | None]:
    """The greedy target of an encoder-decoder for `source`, decoded by the generation engine up to <eos>
    (kept as the last id) or the context; with a note when the context cut it."""
    context = model.cfg.max_seq_len
    cfg = GenerateConfig(max_new_tokens=max(1, context - 1), temperature=0.0)
    completion = generate(model, tok, [source], cfg, specials=specials).completions[0]
    if completion.finish_reason == "eos" and specials.eos is not None:
        return completion.token_ids + [specials.eos], None
    return completion.token_ids, (f"the greedy target reached the context of {context:,} tokens before <eos>: "
                                  f"it is cut there")


def attention_report(ckpt: Checkpoint, prompt: str, target: str | None = None) -> AttentionReport:
    """Run the model once on `prompt` (the source, for an encoder-decoder) and summarise every attention head."""
    from tformer.data.tokenizer import decode, load_tokenizer, special_ids

    cfg, model = ckpt.config, ckpt.model
    if not prompt.strip():
        raise TformerError("--prompt is empty; give the text whose attention to inspect")
    if target is not None and cfg.arch != "encoder-decoder":
        raise TformerError(f"--target is for encoder-decoder checkpoints; this one is a {cfg.arch}")
    if ckpt.tokenizer_path is None:
        raise TformerError(f"'{ckpt.path}' has no tokenizer.json, which --prompt needs to turn text into tokens")
    tok = load_tokenizer(ckpt.tokenizer_path)
    check_fits(tok, cfg.vocab_size, ckpt.tokenizer_path)
    label = TokenLabeler(tok)
    specials = special_ids(tok)
    device = next(model.parameters()).device
    ids = _encode(tok, prompt, "--prompt", cfg)
    exclude = {i for i in specials.to_dict().values() if i is not None}
    induction = induction_scores(model, exclude=exclude)
    x = torch.tensor([ids], device=device)
    report = AttentionReport(prompt, {}, {})
    if cfg.arch == "encoder-decoder":
        bos = next((i for i in (specials.bos, specials.eos, specials.pad) if i is not None), 0)
        if target is not None:
            if not target.strip():
                raise TformerError("--target is empty; give the target text, or leave --target out to decode one")
            produced = _encode(tok, target, "--target", cfg)
            report.target_from = "given"
        else:
            produced, report.target_note = greedy_target(model, tok, prompt, specials)
            produced = produced or [bos]
            report.target_from = "greedy"
        report.target = decode(tok, produced)  # special tokens kept: they are what the model produced
        # Row k of the decoder reads <bos> + produced[:k] and predicts produced[k].
        tgt_in = [bos] + produced[:-1]
        weights = _forward_weights(model, x, torch.tensor([tgt_in], device=device))
        report.ids = {"encoder": ids, "decoder": tgt_in, "produced": produced}
        src_labels, tgt_labels = [label(i) for i in ids], [label(i) for i in tgt_in]
        tokens = {"encoder": (src_labels, src_labels, False), "decoder": (tgt_labels, tgt_labels, True),
                  "cross": (tgt_labels, src_labels, False)}
    else:
        weights = _forward_weights(model, x)
        name = stack_names(cfg)[0]
        labels = [label(i) for i in ids]
        report.ids = {name: ids}
        tokens = {name: (labels, labels, name == "decoder")}
    for name, w in weights.items():
        queries, keys, causal = tokens[name]
        heads = stack_heads(w, causal, name != "cross", keys, induction if name == "decoder" else None)
        report.stacks[name] = StackAttention(name, w, queries, keys, causal, heads, layer_summary(heads))
    if cfg.arch == "encoder-decoder":
        report.target_tokens = [label(i) for i in produced]
        report.alignment = alignment(report.stacks["cross"].weights, report.target_tokens, src_labels)
    return report


def alignment(cross: Tensor, targets: list[str], sources: list[str], layer: int | None = None,
              head: int | None = None, top_k: int = ALIGN_TOP_K) -> list[dict[str, Any]]:
    """For each target token (row k of the cross-attention (L, H, T, S)), the source tokens it attends to most.

    Averaged over all layers and heads unless a layer (and head) is given.
    """
    w = cross if layer is None else cross[layer : layer + 1]
    w = w if head is None else w[:, head : head + 1]
    mean = w.mean(dim=(0, 1))  # (T, S)
    top = mean.topk(min(top_k, mean.size(-1)), dim=-1)
    return [{"position": k, "target": targets[k],
             "sources": [{"position": int(j), "token": sources[int(j)], "weight": float(v)}
                         for v, j in zip(top.values[k], top.indices[k])]}
            for k in range(mean.size(0))]


# == heatmap =====================================================================================

@dataclass
class Heatmap:
    """The weights of one layer and head (or the mean over heads), cut to at most `max_tokens` queries and keys."""

    stack: str
    layer: int
    head: int | None  # None: the mean over heads
    matrix: Tensor  # (rows, cols)
    rows: list[str]
    cols: list[str]
    causal: bool
    total_rows: int
    total_cols: int

    @property
    def cut(self) -> bool:
        return len(self.rows) < self.total_rows or len(self.cols) < self.total_cols

    @property
    def title(self) -> str:
        which = "mean over heads" if self.head is None else f"head {self.head}"
        return f"{self.stack} attention, layer {self.layer}, {which}"

    @property
    def window(self) -> str | None:
        """The window shown, in words, when the input was cut."""
        if not self.cut:
            return None
        return (f"showing queries 0-{len(self.rows) - 1} of {self.total_rows} and keys 0-{len(self.cols) - 1} of "
                f"{self.total_cols}: the first {max(len(self.rows), len(self.cols))} tokens")


def heatmap(att: StackAttention, layer: int, head: int | None = None, max_tokens: int = HEATMAP_MAX_TOKENS) -> Heatmap:
    """The heatmap of one layer/head of a stack. Cut to the first `max_tokens` tokens: for causal attention
    those rows are then complete (they see no later key)."""
    w = att.weights[layer]
    m = w.mean(0) if head is None else w[head]
    r, c = min(max_tokens, m.size(0)), min(max_tokens, m.size(1))
    return Heatmap(att.name, layer, head, m[:r, :c], att.queries[:r], att.keys[:c], att.causal, m.size(0), m.size(1))


# == the whole inspection =======================================================================

@dataclass
class Inspection:
    """A checkpoint's anatomy and, with a prompt, its attention report and the chosen heatmap."""

    checkpoint: Checkpoint
    anatomy: dict[str, Any]
    attention: AttentionReport | None = None
    heatmap: Heatmap | None = None
    note: str | None = None  # how the checkpoint was chosen, when the user did not name it exactly
    prompt_note: str | None = None  # where the prompt came from when none was given


DEFAULT_PROMPT_TOKENS = 32  # tokens of the validation text shown when no prompt is given


def default_prompt(ckpt: Checkpoint, tokens: int = DEFAULT_PROMPT_TOKENS) -> str | None:
    """The start of the validation split the checkpoint was trained on (its first source, for pairs), as text;
    None when the checkpoint does not name its data or the data is gone."""
    data = ckpt.extra.get("data") if isinstance(ckpt.extra.get("data"), dict) else {}
    directory = data.get("directory")
    if not isinstance(directory, str) or ckpt.tokenizer_path is None:
        return None
    try:
        found = open_tokens(resolve_data_dir(directory, ckpt.path))
        tok = load_tokenizer(ckpt.tokenizer_path)
        ids = found.pairs("val")[0][0] if found.is_pairs else found.tokens("val")[:tokens * 4]
        text = tok.decode([int(i) for i in ids], skip_special_tokens=True)
    except (TformerError, OSError, ValueError, IndexError, KeyError):
        return None
    ids = tok.encode(text).ids[:min(tokens, ckpt.config.max_seq_len)]
    text = tok.decode(ids, skip_special_tokens=True)
    return text if text.strip() else None


def resolve_data_dir(directory: str, checkpoint: Path) -> Path:
    """A run's data directory as recorded: absolute, relative to the run (the checkpoint's parent), or to the
    directory the run was started from."""
    path = Path(directory)
    if path.is_absolute():
        return path
    beside = checkpoint.parent / path
    return beside if beside.exists() else path


def inspect_checkpoint(
    directory: str | Path | None = None,
    prompt: str | None = None,
    target: str | None = None,
    stack: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    needs_prompt: tuple[str, ...] = (),
) -> Inspection:
    """Load a checkpoint (default: the newest under checkpoints/) on the CPU and inspect it.

    `needs_prompt` names the options asked for that draw attention (e.g. "--html"); each needs `prompt`.
    """
    asked = [n for n, v in (("--layer", layer), ("--head", head), ("--stack", stack), ("--target", target)) if v is not None]
    asked += list(needs_prompt)
    if prompt is None and asked:
        raise TformerError(f"{asked[0]} shows attention on a text, so it needs --prompt TEXT")
    if prompt is not None and not prompt.strip():
        raise TformerError("--prompt is empty; give the text whose attention to inspect")
    path, note = resolve_checkpoint(directory)
    ckpt = load_checkpoint(path, device="cpu")
    result = Inspection(ckpt, anatomy(ckpt), note=note)
    if prompt is None:
        prompt = default_prompt(ckpt)
        if prompt is not None:
            result.prompt_note = ("attention on the start of the model's own validation text (choose the text with "
                                  "--prompt)")
    if prompt is not None:
        stack, shown_layer = check_selection(ckpt.config, stack, layer, head)
        report = attention_report(ckpt, prompt, target)
        result.attention = report
        result.heatmap = heatmap(report.stacks[stack], shown_layer, head)
        if report.alignment is not None and stack == "cross" and (layer is not None or head is not None):
            # The alignment follows an explicit choice of cross-attention layer (and head).
            report.alignment = alignment(report.stacks["cross"].weights, report.target_tokens,
                                         report.stacks["cross"].keys, shown_layer, head)
            report.alignment_of = f"layer {shown_layer}, " + ("the mean over heads" if head is None else f"head {head}")
    return result
