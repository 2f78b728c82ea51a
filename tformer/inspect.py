"""Inspecting a checkpoint: its anatomy, and what its attention does on a prompt.

- `anatomy(ckpt)`: the config, parameter counts by component, size on disk and dtype, memory estimates
  for inference and training, the training state and the tokenizer, as one JSON-ready dict.
- `attention_report(ckpt, prompt)`: one forward pass on the explicit softmax path; for every layer x
  head of every attention (encoder self-, decoder self-, cross-) the statistics below, head labels,
  induction scores, a per-layer summary and, for an encoder-decoder, the cross-attention alignment.
- `heatmap(...)`, `render(...)`, `to_json(...)`, `write_html(...)`, `write_png(...)`: what to show.

Statistics of one head, over the query rows that see at least two keys (a row with one visible key
has no choice to make):
- entropy: -sum_j a_ij log a_ij / log n_i (n_i keys visible to row i), averaged; 1 = uniform, 0 = one key.
- distance: sum_j a_ij |i - j|, the mean distance in tokens between a query and what it attends to.
- max_weight: the largest single weight; top token: the key receiving the largest share of all attention.
- previous / first / current: the mean weight on key i-1, key 0 and key i, over rows i >= 2 (from row 2 on
  the previous and the first token are different tokens, so the two labels cannot be confused).
- induction: on a random token sequence repeated twice, the mean weight from the second copy of each
  token to the token after its first occurrence (Olsson et al., 2022, "In-context learning and
  induction heads"). A head that copies "what came next last time" scores near 1; chance is ~1/(1.5 n).
A label is given only when its score passes the named threshold below.
"""

from __future__ import annotations

import bisect
import html as html_lib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from safetensors import safe_open
from torch import Tensor, nn

from tformer.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    SHARD_INDEX_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    find_latest_checkpoint,
    load_checkpoint,
)
from tformer.config import ModelConfig
from tformer.errors import CheckpointError, TformerError
from tformer.files import atomic_write, atomic_write_text
from tformer.model.attention import MultiHeadAttention
from tformer.model.layers import Embedding, FeedForward
from tformer.model.transformer import MLMHead, Seq2Seq

# -- thresholds for head labels (scores are mean attention weights in [0, 1]) -------------------
PREVIOUS_TOKEN_MIN = 0.5  # "previous-token": over half of the attention goes to the token before
FIRST_TOKEN_MIN = 0.5  # "first-token" (an attention sink): over half goes to the first token
CURRENT_TOKEN_MIN = 0.5  # "current-token": over half stays on the query's own token
INDUCTION_MIN = 0.3  # "induction": about 15x chance on the repeated sequence (chance ~ 1/(1.5 n) = 0.02 at n = 32)
BROAD_MIN_ENTROPY = 0.8  # "broad": normalised entropy at least this (uniform attention is 1.0)
LOCAL_MAX_DISTANCE = 3.0  # "local": mean distance at most this many tokens ...
LOCAL_MAX_RATIO = 0.5  # ... and at most half the distance uniform attention would have on this input

INDUCTION_LENGTH = 32  # random tokens per copy (capped at max_seq_len // 2)
INDUCTION_BATCH = 4  # sequences averaged
INDUCTION_SEED = 0
HEATMAP_MAX_TOKENS = 64  # the terminal heatmap shows at most this many queries and keys
HTML_MAX_TOKENS = 128  # the HTML page keeps at most this many (its size grows with the square)
TARGET_MAX_TOKENS = 64  # greedy decoding of an encoder-decoder's target stops here, or at 2 x source + 8
ALIGN_TOP_K = 3  # source tokens listed per target token

THRESHOLDS = {
    "previous_token_min": PREVIOUS_TOKEN_MIN, "first_token_min": FIRST_TOKEN_MIN,
    "current_token_min": CURRENT_TOKEN_MIN, "induction_min": INDUCTION_MIN,
    "broad_min_entropy": BROAD_MIN_ENTROPY, "local_max_distance": LOCAL_MAX_DISTANCE,
    "local_max_ratio": LOCAL_MAX_RATIO,
}
COMPONENTS = ("embeddings", "attention", "feed-forward", "norms", "output head")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# == anatomy ====================================================================================

def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component (COMPONENTS, plus "other" if any) and "total"; a tied matrix counts once.

    A parameter belongs to the outermost module of a known kind that holds it, so the norm inside
    BERT's masked-LM head counts as output head, and a layer's norms as norms.
    """
    owners: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Embedding):
            owners[name] = "embeddings"
        elif isinstance(module, MultiHeadAttention):
            owners[name] = "attention"
        elif isinstance(module, FeedForward):
            owners[name] = "feed-forward"
        elif isinstance(module, MLMHead) or name == "lm_head":
            owners[name] = "output head"
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            owners[name] = "norms"
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # shared tensors are listed once
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        kind = next((owners[q] for q in prefixes if q in owners), "other")
        counts[kind] = counts.get(kind, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (one file, or the shards an index names)."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    index = json.loads((directory / SHARD_INDEX_FILE).read_text(encoding="utf-8"))
    return [directory / name for name in dict.fromkeys(index["weight_map"].values())]


def stored_dtypes(files: list[Path]) -> dict[str, int]:
    """Bytes of tensor data per stored dtype ("F32", "BF16", ...), read from the safetensors headers only."""
    sizes: Counter[str] = Counter()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                sizes[piece.get_dtype()] += math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 4)
    return dict(sizes)


def memory_estimate(cfg: ModelConfig, n_params: int, bytes_per_param: int, batch: int, context: int,
                    activation_bytes: int = 4) -> dict[str, Any]:
    """Bytes needed to run (inference) and to train the model on `batch` sequences of `context` tokens.

    inference = weights (n_params x bytes_per_param)
              + KV cache 2 x decoder layers x B x T x n_kv_heads x head_dim x bytes_per_param
                (x 2 for an encoder-decoder: the cross-attention keys/values of a source of T tokens)
              + one layer's activations B x T x (4 d_model + d_ff) x bytes_per_param (d_ff twice for SwiGLU)
              + logits B x T x vocab x 4
    training  = 16 bytes per parameter (fp32 weights 4 + gradients 4 + AdamW moments 8)
              + activations kept for the backward pass, per layer B x T x (18 d_model + 4 d_ff) bytes at
                16 bits (Korthikanti et al., 2022, with fused attention, which keeps no T x T scores;
                d_ff twice for SwiGLU; a cross-attention adds 13 d_model), x activation_bytes / 2
              + logits and their gradient 2 x B x T x vocab x 4
    These are estimates: allocator overhead, the CUDA context and temporary buffers come on top.
    """
    B, T, d = batch, context, cfg.d_model
    ffn = cfg.d_ff * (2 if cfg.activation == "swiglu" else 1)
    dec = cfg.n_decoder_layers if cfg.has_decoder else 0
    enc = cfg.n_encoder_layers if cfg.has_encoder else 0
    cross = dec if cfg.arch == "encoder-decoder" else 0
    kv_width = cfg.n_kv_heads * cfg.head_dim
    logits = B * T * cfg.vocab_size * 4
    inference = {
        "weights": n_params * bytes_per_param,
        "kv_cache": 2 * (dec + cross) * B * T * kv_width * bytes_per_param,
        "activations": B * T * (4 * d + ffn) * bytes_per_param,
        "logits": logits,
    }
    training = {
        "weights_gradients_optimizer": 16 * n_params,
        "activations": B * T * ((enc + dec) * (18 * d + 4 * ffn) + cross * 13 * d) * activation_bytes // 2,
        "logits": 2 * logits,
    }
    return {
        "batch": B, "context": T, "bytes_per_param": bytes_per_param, "activation_bytes": activation_bytes,
        "inference": {**inference, "total": sum(inference.values())},
        "training": {**training, "total": sum(training.values())},
        "inference_formula": "weights N·p + KV cache 2·layers·B·T·kv_heads·head_dim·p + one layer "
                             "B·T·(4·d_model + d_ff)·p + logits B·T·vocab·4  (p = bytes per parameter)",
        "training_formula": "16·N (fp32 weights, grads, AdamW m and v) + activations "
                            "layers·B·T·(18·d_model + 4·d_ff)·a/2 (fused attention, Korthikanti et al. 2022; "
                            "a = activation bytes) + logits 2·B·T·vocab·4",
    }


def training_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """What `tformer train` saved beside the weights (trainer_state.json and config.json's "train"), or None."""
    state_path = ckpt.path / TRAINER_STATE_FILE
    train = ckpt.extra.get("train")
    if not state_path.is_file() and not isinstance(train, dict):
        return None
    out: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            state = {}
            out["error"] = f"{TRAINER_STATE_FILE} is unreadable: {e}"
        for key in ("step", "total_steps", "tokens_seen", "best_val_loss", "val_loss", "train_loss", "lr",
                    "elapsed"):
            out[key] = state.get(key) if isinstance(state, dict) else None
    if isinstance(train, dict):
        out["train_config"] = {k: train.get(k) for k in ("batch_size", "grad_accum", "context", "steps", "lr",
                                                         "schedule", "dtype", "device")}
    optimizer = ckpt.path / OPTIMIZER_FILE
    out["optimizer_bytes"] = optimizer.stat().st_size if optimizer.is_file() else None
    return out


def _tokenizer_json(tok: Any) -> dict[str, Any]:
    return json.loads(tok.to_str())


def _is_byte_level(doc: dict[str, Any]) -> bool:
    """True when the tokenizer maps bytes to printable stand-ins (GPT-2's Ġ for a space, ...)."""
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(doc.get("pre_tokenizer")) or has(doc.get("decoder"))


def tokenizer_kind(doc: dict[str, Any]) -> str:
    """bpe (byte-level BPE), byte, char, or the tokenizers model type for other tokenizers."""
    model = doc.get("model") or {}
    kind = str(model.get("type", "unknown"))
    if kind != "BPE":
        return kind.lower()
    if not model.get("merges"):
        return "byte" if _is_byte_level(doc) else "char"
    return "bpe" if _is_byte_level(doc) else "bpe (not byte-level)"


def tokenizer_info(ckpt: Checkpoint) -> dict[str, Any] | None:
    """Kind, vocabulary size and special tokens of the checkpoint's tokenizer.json, or None without one."""
    from tformer.tokenize import load_tokenizer, special_ids

    if ckpt.tokenizer_path is None:
        return None
    tok = load_tokenizer(ckpt.tokenizer_path)
    data = ckpt.extra.get("data") if isinstance(ckpt.extra.get("data"), dict) else {}
    kind = data.get("kind") if data.get("kind") in ("bpe", "char", "byte") else tokenizer_kind(_tokenizer_json(tok))
    specials = {role: {"id": i, "token": tok.id_to_token(i)}
                for role, i in special_ids(tok).to_dict().items() if i is not None}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return {"kind": kind, "vocab_size": vocab, "special": specials, "file": str(ckpt.tokenizer_path),
            "matches_model": vocab <= ckpt.config.vocab_size}


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def anatomy(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything about a checkpoint that needs no input text, as JSON-ready values."""
    cfg = ckpt.config
    counts = parameter_counts(ckpt.model)
    files = weight_files(ckpt.path)
    dtypes = stored_dtypes(files)
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else "F32"
    train = training_state(ckpt)
    train_cfg = (train or {}).get("train_config") or {}
    if isinstance(train_cfg.get("batch_size"), int) and isinstance(train_cfg.get("context"), int):
        batch, context, assumed = train_cfg["batch_size"], train_cfg["context"], None
    else:
        batch, context = 1, cfg.max_seq_len
        assumed = "batch 1 and max_seq_len (the checkpoint has no tformer training config)"
    activation_bytes = 2 if train_cfg.get("dtype") in ("bf16", "fp16") else 4
    memory = memory_estimate(cfg, counts["total"], _DTYPE_BYTES.get(main_dtype, 4), batch, context,
                             activation_bytes)
    memory["assumed"] = assumed
    return {
        "checkpoint": str(ckpt.path),
        "source": ckpt.source,
        "arch": cfg.arch,
        "config": {**cfg.to_dict(), "head_dim": cfg.head_dim},
        "parameters": counts,
        "tied_embeddings": cfg.tie_embeddings,
        "size": {
            "weights_bytes": sum(p.stat().st_size for p in files),
            "directory_bytes": _dir_bytes(ckpt.path),
            "dtype": _DTYPE_NAMES.get(main_dtype, main_dtype.lower()),
            "bytes_by_dtype": {_DTYPE_NAMES.get(k, k.lower()): v for k, v in dtypes.items()},
        },
        "memory": memory,
        "training": train,
        "tokenizer": tokenizer_info(ckpt),
    }


# == attention statistics ========================================================================

@dataclass
class HeadStats:
    """The statistics of one attention head on one input (see the module docstring); None: not defined here."""

    layer: int
    head: int
    entropy: float | None
    distance: float | None  # tokens; None for cross-attention (queries and keys are different sequences)
    uniform_distance: float | None  # what uniform attention over the same visible keys would give
    max_weight: float | None
    top_key: int | None  # position of the key receiving the largest share of all attention
    top_token: str | None
    top_share: float | None
    previous: float | None
    first: float | None
    current: float | None
    induction: float | None = None
    labels: list[str] = field(default_factory=list)


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def head_statistics(weights: Tensor, causal: bool, positional: bool = True) -> dict[str, Tensor]:
    """Per-head statistics of attention weights (..., T_q, T_k) of one unpadded input.

    causal: row i sees keys 0..i (else every key). positional: queries and keys are the same sequence,
    so distances and previous/first/current-token scores mean something (False for cross-attention).
    Returns tensors of shape (...) (NaN where undefined: too few tokens), and "received" (..., T_k).
    """
    w = weights.double()
    T_q, T_k = w.shape[-2:]
    i = torch.arange(T_q)[:, None]
    j = torch.arange(T_k)[None, :]
    visible = (j <= i) if causal else torch.ones(T_q, T_k, dtype=torch.bool)
    n = visible.sum(-1)  # (T_q,) keys each query can see
    rows = n >= 2  # rows with a choice to make
    nan = torch.full(w.shape[:-2], float("nan"), dtype=torch.float64)

    def row_mean(x: Tensor, which: Tensor) -> Tensor:  # mean over the selected query rows
        return x[..., which].mean(-1) if which.any() else nan.clone()

    plogp = torch.where(w > 0, w * w.clamp_min(1e-300).log(), torch.zeros_like(w))
    entropy = -plogp.sum(-1) / n.clamp_min(2).double().log()  # (..., T_q), in [0, 1]
    stats = {"entropy": row_mean(entropy, rows)}
    rw = w[..., rows, :]
    stats["max_weight"] = rw.amax((-2, -1)) if rows.any() else nan.clone()
    received = rw.sum(-2) / max(int(rows.sum()), 1)  # (..., T_k) share of all attention each key receives
    stats["received"] = received
    stats["top_share"], stats["top_key"] = received.max(-1)
    if not rows.any():
        stats["top_share"] = nan.clone()  # nothing was chosen: no key "receives" attention
    if positional:
        dist = (i - j).abs().double()
        stats["distance"] = row_mean((w * dist).sum(-1), rows)
        uniform = (visible * dist).sum(-1) / n.clamp_min(1)  # (T_q,): the same for every head
        stats["uniform_distance"] = row_mean(uniform, rows).expand(w.shape[:-2])
        late = torch.arange(T_q) >= 2  # from row 2 on, the previous token is not the first one
        late_i = torch.arange(T_q)[late]
        for name, key in (("previous", late_i - 1), ("first", torch.zeros_like(late_i)), ("current", late_i)):
            stats[name] = w[..., late_i, key].mean(-1) if late.any() else nan.clone()
    return stats


def head_labels(s: HeadStats) -> list[str]:
    """The labels whose evidence passes its threshold (module constants)."""
    labels = []
    for name, value, low in (("previous-token", s.previous, PREVIOUS_TOKEN_MIN),
                             ("first-token", s.first, FIRST_TOKEN_MIN),
                             ("current-token", s.current, CURRENT_TOKEN_MIN),
                             ("induction", s.induction, INDUCTION_MIN)):
        if value is not None and value >= low:
            labels.append(name)
    if s.entropy is not None and s.entropy >= BROAD_MIN_ENTROPY:
        labels.append("broad")
    elif (s.distance is not None and s.uniform_distance is not None and s.distance <= LOCAL_MAX_DISTANCE
          and s.distance <= LOCAL_MAX_RATIO * s.uniform_distance):
        labels.append("local")
    return labels


def stack_heads(weights: Tensor, causal: bool, positional: bool, key_labels: list[str],
                induction: Tensor | None = None) -> list[HeadStats]:
    """HeadStats of every head of a stack's weights (L, H, T_q, T_k), layer-major."""
    stats = head_statistics(weights, causal, positional)
    L, H = weights.shape[:2]

    def get(name: str, layer: int, head: int) -> float | None:
        return _nan_to_none(float(stats[name][layer, head])) if name in stats else None

    heads = []
    for layer in range(L):
        for head in range(H):
            share = get("top_share", layer, head)
            top = int(stats["top_key"][layer, head]) if share is not None else None
            s = HeadStats(
                layer, head, get("entropy", layer, head), get("distance", layer, head),
                get("uniform_distance", layer, head), get("max_weight", layer, head), top,
                None if top is None else key_labels[top], share, get("previous", layer, head), get("first", layer, head),
                get("current", layer, head),
                None if induction is None else float(induction[layer, head]),
            )
            s.labels = head_labels(s)
            heads.append(s)
    return heads


def layer_summary(heads: list[HeadStats]) -> list[dict[str, Any]]:
    """Per layer: mean entropy and distance over its heads, and how many heads carry each label."""
    out = []
    for layer in sorted({h.layer for h in heads}):
        hs = [h for h in heads if h.layer == layer]

        def mean(name: str) -> float | None:
            values = [getattr(h, name) for h in hs if getattr(h, name) is not None]
            return sum(values) / len(values) if values else None

        labels = Counter(label for h in hs for label in h.labels)
        out.append({"layer": layer, "entropy": mean("entropy"), "distance": mean("distance"),
                    "induction_max": max((h.induction for h in hs if h.induction is not None), default=None),
                    "labels": dict(sorted(labels.items()))})
    return out


# == running the model ===========================================================================

def _forward_weights(model: nn.Module, ids: Tensor, tgt: Tensor | None = None) -> dict[str, Tensor]:
    """The attention weights of one forward pass of (1, T) ids, per stack stacked to (L, H, T_q, T_k)."""
    with torch.no_grad():
        out = model(ids, tgt, need_weights=True) if isinstance(model, Seq2Seq) else model(ids, need_weights=True)
    return {name: torch.stack([w[0] for w in ws]).float().cpu() for name, ws in out.attentions.items()}


def induction_scores(model: nn.Module, length: int = INDUCTION_LENGTH, batch: int = INDUCTION_BATCH,
                     seed: int = INDUCTION_SEED, exclude: set[int] | frozenset[int] = frozenset()) -> Tensor | None:
    """Induction score (L, H) of each head of the causal (decoder) self-attention, or None without one.

    A random sequence r_0..r_{n-1} of distinct tokens (not in `exclude`) is fed twice; the score is the
    mean attention from position n + k (the second r_k) to position k + 1 (what followed r_k before).
    """
    cfg: ModelConfig = model.cfg
    if not cfg.has_decoder:
        return None
    allowed = torch.tensor([t for t in range(cfg.vocab_size) if t not in exclude])
    n = min(length, cfg.max_seq_len // 2, len(allowed))
    if n < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:n]] for _ in range(batch)])
    seq = torch.cat([first, first], dim=1)  # (B, 2n)
    device = next(model.parameters()).device
    with torch.no_grad():
        seq = seq.to(device)
        out = model(seq, seq, need_weights=True) if isinstance(model, Seq2Seq) else model(seq, need_weights=True)
    q = torch.arange(n, 2 * n)
    w = torch.stack(out.attentions["decoder"]).float().cpu()  # (L, B, H, 2n, 2n)
    return w[..., q, q - n + 1].mean(dim=(1, -1))  # (L, H)


def greedy_target(model: Seq2Seq, src: Tensor, bos: int, eos: int | None,
                  max_tokens: int = TARGET_MAX_TOKENS) -> list[int]:
    """Greedy decoding of the target for `src` (1, S), until <eos> or max_tokens (at most twice the source
    plus 8: targets rarely run longer). Recomputes the decoder each step, which is fine for short outputs."""
    max_tokens = min(max_tokens, 2 * src.size(1) + 8, model.cfg.max_seq_len - 1)
    with torch.no_grad():
        memory, _ = model.encode(src)
        tgt = [bos]
        for _ in range(max_tokens):
            logits = model.decode(torch.tensor([tgt], device=src.device), memory).logits[0, -1]
            tgt.append(int(logits.argmax()))
            if tgt[-1] == eos:
                break
    return tgt[1:]


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
        from tformer.tokenize import byte_alphabet

        self.tok = tok
        self.byte_level = _is_byte_level(_tokenizer_json(tok))
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
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise TformerError(f"{what} is empty after tokenization; give some text")
    if len(ids) > cfg.max_seq_len:
        raise TformerError(f"{what} is {len(ids)} tokens; this model takes at most {cfg.max_seq_len} (max_seq_len)")
    if max(ids) >= cfg.vocab_size:
        raise TformerError(f"the tokenizer gives id {max(ids)} but the model's vocabulary has {cfg.vocab_size} "
                           "tokens; the checkpoint's tokenizer.json does not belong to its weights")
    return ids


def attention_report(ckpt: Checkpoint, prompt: str, target: str | None = None) -> AttentionReport:
    """Run the model once on `prompt` (the source, for an encoder-decoder) and summarise every attention head."""
    from tformer.tokenize import decode, load_tokenizer, special_ids

    cfg, model = ckpt.config, ckpt.model
    if not prompt.strip():
        raise TformerError("--prompt is empty; give the text whose attention to inspect")
    if target is not None and cfg.arch != "encoder-decoder":
        raise TformerError(f"--target is for encoder-decoder checkpoints; this one is a {cfg.arch}")
    if ckpt.tokenizer_path is None:
        raise TformerError(f"'{ckpt.path}' has no tokenizer.json, which --prompt needs to turn text into tokens")
    tok = load_tokenizer(ckpt.tokenizer_path)
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
            produced = greedy_target(model, x, bos, specials.eos) or [bos]
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

def checkpoint_path(directory: str | Path | None) -> Path:
    """The checkpoint to inspect: `directory` itself, the newest checkpoint inside a run directory (one that
    holds latest/ and best/), or without a directory the newest under checkpoints/."""
    if directory is None:
        return find_latest_checkpoint()
    path = Path(directory)
    if path.is_dir() and not (path / CONFIG_FILE).exists():
        try:
            return find_latest_checkpoint(path)
        except CheckpointError:
            pass  # nothing inside either: loading says what is missing
    return path


@dataclass
class Inspection:
    """A checkpoint's anatomy and, with a prompt, its attention report and the chosen heatmap."""

    checkpoint: Checkpoint
    anatomy: dict[str, Any]
    attention: AttentionReport | None = None
    heatmap: Heatmap | None = None


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
    ckpt = load_checkpoint(checkpoint_path(directory), device="cpu")
    result = Inspection(ckpt, anatomy(ckpt))
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
    return table


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
        return out
    seq2seq = "cross" in report.stacks
    inputs = [("source", "encoder"), ("decoder input", "decoder")] if seq2seq else [("input", next(iter(report.stacks)))]
    for what, name in inputs:
        labels = report.stacks[name].queries
        out.append(Text.assemble((f"{what}: ", "bold"), f"{len(labels)} token{'s' if len(labels) != 1 else ''}  ",
                                 (" ".join(labels), "cyan")))
    out += [render_heads(att) for att in report.stacks.values()]
    out.append(render_layers(report))
    if report.alignment is not None:
        out.append(render_alignment(report))
    if ins.heatmap is not None:
        out.append(render_heatmap(ins.heatmap))
    return out


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
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", data)


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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1d1d24; background: #fafafa; }
  h1 { font-size: 1.25rem; margin: 0 0 .25rem; }
  .meta { color: #555; margin: 0 0 1rem; }
  .controls { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin-bottom: 1rem; }
  .controls label { font-weight: 600; }
  select { font: inherit; padding: .15rem .3rem; }
  .panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; margin-bottom: 1rem; }
  .panel h2 { font-size: 1rem; margin: 0 0 .5rem; }
  .hint { color: #666; font-size: .9em; }
  .tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: .35rem 0; align-items: center; }
  .tokens .side { font-weight: 600; width: 7.5rem; color: #555; }
  .tok { font-family: ui-monospace, "DejaVu Sans Mono", monospace; padding: 1px 4px; border: 1px solid #ccc;
         border-radius: 3px; cursor: default; white-space: pre; background: #fff; }
  .tok.focus { outline: 2px solid #e4572e; }
  #wrap { position: relative; overflow: auto; }
  canvas { display: block; }
  #tip { position: absolute; pointer-events: none; background: #222; color: #fff; padding: 2px 6px;
         border-radius: 3px; font-size: 12px; display: none; white-space: pre; }
  table { border-collapse: collapse; font-size: 13px; }
  th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
  th { background: #f3f3f3; } td.l, th.l { text-align: left; }
  tr.sel td { background: #fff1c9; }
  tr.pick { cursor: pointer; } tr.pick:hover td { background: #f0f6ff; }
  .lab { color: #17803d; font-weight: 600; }
  .scale { white-space: nowrap; }
  .bar { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border: 1px solid #ccc;
         background: linear-gradient(to right, rgb(68,1,84), rgb(59,82,139), rgb(33,145,140), rgb(94,201,98), rgb(253,231,37)); }
</style>
</head>
<body>
<h1 id="title"></h1>
<p class="meta" id="meta"></p>
<div class="controls">
  <label for="stack">attention</label> <select id="stack"></select>
  <label for="layer">layer</label> <select id="layer"></select>
  <label for="head">head</label> <select id="head"></select>
</div>
<div class="panel">
  <h2>tokens</h2>
  <div class="hint">Hover a token: the tokens it attends to are shaded by weight (hover a key to see who attends to it).</div>
  <div id="tokens"></div>
  <div class="hint" id="cut"></div>
</div>
<div class="panel">
  <h2 id="maptitle">heatmap</h2>
  <div class="hint">Rows: queries (attending); columns: keys (attended to). Hover a cell for its weight.
    Colours run from 0 to the largest weight shown: <span class="scale">0 <span class="bar"></span> <span id="vmax"></span></span></div>
  <div id="wrap"><canvas id="heatmap" width="10" height="10"></canvas><div id="tip"></div></div>
</div>
<div class="panel">
  <h2 id="statstitle">heads</h2>
  <div class="hint">Click a row to show that head.</div>
  <table id="stats"></table>
</div>
<div class="panel" id="alignpanel" style="display:none">
  <h2>cross-attention alignment</h2>
  <div class="hint" id="aligninfo"></div>
  <table id="align"></table>
</div>
<p class="hint" id="thresholds"></p>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function viridis(x) {
  x = Math.min(Math.max(x, 0), 1) * (VIRIDIS.length - 1);
  const k = Math.min(Math.floor(x), VIRIDIS.length - 2), t = x - k, a = VIRIDIS[k], b = VIRIDIS[k + 1];
  return "rgb(" + [0, 1, 2].map((c) => Math.round(a[c] + (b[c] - a[c]) * t)).join(",") + ")";
}
function fmt(x, d) { return x === null || x === undefined ? "-" : x.toFixed(d); }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const state = { stack: DATA.selected.stack, layer: DATA.selected.layer, head: DATA.selected.head === null ? "mean" : String(DATA.selected.head) };

function matrix() {  // the selected layer's weights, one head or the mean over heads, in [0, 1]
  const s = DATA.stacks[state.stack], heads = s.weights[state.layer];
  if (state.head !== "mean") return heads[Number(state.head)].map((row) => row.map((v) => v / 1000));
  return heads[0].map((row, i) => row.map((_, j) => heads.reduce((sum, h) => sum + h[i][j], 0) / heads.length / 1000));
}

function fillSelect(sel, options, value) {
  sel.innerHTML = "";
  for (const [v, text] of options) sel.appendChild(el("option", { value: v }, text));
  sel.value = String(value);
}

function setupControls() {
  fillSelect($("stack"), Object.keys(DATA.stacks).map((n) => [n, n]), state.stack);
  const s = DATA.stacks[state.stack];
  if (state.layer >= s.layers) state.layer = s.layers - 1;
  fillSelect($("layer"), [...Array(s.layers).keys()].map((l) => [l, "layer " + l]), state.layer);
  fillSelect($("head"), [["mean", "mean over heads"], ...[...Array(s.heads).keys()].map((h) => [h, "head " + h])], state.head);
}

let M = [];
function drawTokens() {
  const s = DATA.stacks[state.stack], box = $("tokens");
  box.innerHTML = "";
  const same = state.stack !== "cross";
  const rows = same ? [["tokens", s.queries, "q"]] : [["decoder input", s.queries, "q"], ["source", s.keys, "k"]];
  for (const [name, labels, side] of rows) {
    const line = el("div", { class: "tokens" });
    line.appendChild(el("span", { class: "side" }, name));
    labels.forEach((t, i) => {
      const span = el("span", { class: "tok", "data-side": side, "data-i": i }, t);
      span.addEventListener("mouseenter", () => focusToken(side, i));
      span.addEventListener("mouseleave", clearFocus);
      line.appendChild(span);
    });
    box.appendChild(line);
  }
  const cut = [];
  if (s.total_queries > s.queries.length) cut.push("the first " + s.queries.length + " of " + s.total_queries + " queries");
  if (s.total_keys > s.keys.length) cut.push("the first " + s.keys.length + " of " + s.total_keys + " keys");
  $("cut").textContent = cut.length ? "This page keeps " + cut.join(" and ") + "." : "";
}

function shade(span, w, top) {  // relative to the largest weight of the hovered row or column
  const x = top > 0 ? w / top : 0;
  span.style.background = x > 0.02 ? viridis(x) : "#fff";
  span.style.color = x > 0.55 ? "#000" : (x > 0.02 ? "#fff" : "");
  span.title = "weight " + w.toFixed(3);
}
function focusToken(side, i) {
  clearFocus();
  const same = state.stack !== "cross";
  // Hovering a query shades the keys it attends to; hovering a key shades the queries attending to it.
  const targets = same ? document.querySelectorAll(".tok") : document.querySelectorAll('.tok[data-side="' + (side === "q" ? "k" : "q") + '"]');
  const weight = (j) => { const w = side === "q" ? (M[i] ? M[i][j] : 0) : (M[j] ? M[j][i] : 0); return w === undefined ? 0 : w; };
  const top = Math.max(...[...targets].map((span) => weight(Number(span.dataset.i))));
  targets.forEach((span) => shade(span, weight(Number(span.dataset.i)), top));
  const me = document.querySelector('.tok[data-side="' + (same ? "q" : side) + '"][data-i="' + i + '"]');
  if (me) me.classList.add("focus");
}
function clearFocus() {
  document.querySelectorAll(".tok").forEach((s) => { s.style.background = ""; s.style.color = ""; s.title = ""; s.classList.remove("focus"); });
}

const GEOM = { cell: 10, left: 0, top: 0 };
function drawHeatmap() {
  const s = DATA.stacks[state.stack], canvas = $("heatmap"), ctx = canvas.getContext("2d");
  const n = Math.max(s.queries.length, s.keys.length);
  const cell = Math.max(4, Math.min(26, Math.floor(640 / n)));
  const font = Math.min(12, Math.max(7, cell - 2));
  ctx.font = font + "px monospace";
  const showLabels = cell >= 7;
  const width = (labels) => showLabels ? Math.min(120, Math.max(...labels.map((t) => ctx.measureText(t).width))) + 12 : 24;
  const left = width(s.queries), top = width(s.keys);
  const dpr = window.devicePixelRatio || 1;
  const W = left + cell * s.keys.length + 4, H = top + cell * s.queries.length + 4;
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.width = W + "px"; canvas.style.height = H + "px";
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  ctx.font = font + "px monospace"; ctx.fillStyle = "#333"; ctx.textBaseline = "middle";
  if (showLabels) {
    ctx.textAlign = "right";
    s.queries.forEach((t, i) => ctx.fillText(t, left - 4, top + cell * (i + 0.5), left - 8));
    ctx.save(); ctx.textAlign = "left";
    s.keys.forEach((t, j) => {
      ctx.save(); ctx.translate(left + cell * (j + 0.5), top - 4); ctx.rotate(-Math.PI / 2);
      ctx.fillText(t, 0, 0, top - 8); ctx.restore();
    });
    ctx.restore();
  }
  const vmax = Math.max(...M.map((row) => Math.max(...row))) || 1;
  $("vmax").textContent = vmax.toFixed(3);
  for (let i = 0; i < s.queries.length; i++) {
    for (let j = 0; j < s.keys.length; j++) {
      const masked = s.causal && j > i;
      ctx.fillStyle = masked ? "#eee" : viridis(M[i][j] / vmax);
      ctx.fillRect(left + cell * j, top + cell * i, cell - (cell > 6 ? 1 : 0), cell - (cell > 6 ? 1 : 0));
    }
  }
  Object.assign(GEOM, { cell, left, top });
  const head = state.head === "mean" ? "mean over heads" : "head " + state.head;
  $("maptitle").textContent = state.stack + " attention, layer " + state.layer + ", " + head;
}

function heatmapHover(ev) {
  const s = DATA.stacks[state.stack], tip = $("tip"), r = $("heatmap").getBoundingClientRect();
  const x = ev.clientX - r.left, y = ev.clientY - r.top;
  const j = Math.floor((x - GEOM.left) / GEOM.cell), i = Math.floor((y - GEOM.top) / GEOM.cell);
  if (i < 0 || j < 0 || i >= s.queries.length || j >= s.keys.length) { tip.style.display = "none"; return; }
  const masked = s.causal && j > i;
  tip.textContent = i + " " + s.queries[i] + "  \\u2192  " + j + " " + s.keys[j] + "\\n" + (masked ? "masked (future token)" : "weight " + M[i][j].toFixed(3));
  tip.style.left = (x + 14) + "px"; tip.style.top = (y + 10) + "px"; tip.style.display = "block";
  focusToken("q", i);
}

function drawStats() {
  const s = DATA.stacks[state.stack], table = $("stats"), pos = state.stack !== "cross";
  const heads = s.stats[state.layer], induction = heads.some((h) => h.induction !== null);
  table.innerHTML = "";
  const cols = ["head", "entropy"].concat(pos ? ["distance"] : [], ["max", "most attended"], pos ? ["prev", "first", "current"] : [], induction ? ["induction"] : [], ["labels"]);
  const tr = el("tr");
  cols.forEach((c) => tr.appendChild(el("th", { class: c === "labels" || c === "most attended" ? "l" : "" }, c)));
  table.appendChild(tr);
  heads.forEach((h) => {
    const row = el("tr", { class: "pick" + (String(h.head) === state.head ? " sel" : "") });
    const cells = [String(h.head), fmt(h.entropy, 2)].concat(pos ? [fmt(h.distance, 1)] : [], [fmt(h.max_weight, 2),
      h.top_token === null ? "-" : h.top_key + " " + h.top_token + " (" + fmt(h.top_share, 2) + ")"],
      pos ? [fmt(h.previous, 2), fmt(h.first, 2), fmt(h.current, 2)] : [], induction ? [fmt(h.induction, 2)] : []);
    cells.forEach((c, k) => row.appendChild(el("td", { class: cols[k] === "most attended" ? "l" : "" }, c)));
    row.appendChild(el("td", { class: "l lab" }, h.labels.join(", ")));
    row.addEventListener("click", () => { state.head = String(h.head); setupControls(); redraw(); });
    table.appendChild(row);
  });
  $("statstitle").textContent = state.stack + " attention, layer " + state.layer + ": heads";
}

function drawAlignment() {
  if (!DATA.alignment) return;
  $("alignpanel").style.display = "";
  $("aligninfo").textContent = "Target " + (DATA.target_from === "greedy" ? "decoded greedily" : "given") + ": " +
    JSON.stringify(DATA.target) + ". For each target token, the source tokens it attends to most (" + DATA.alignment_of + ").";
  const table = $("align");
  table.innerHTML = "";
  const tr = el("tr");
  ["#", "target token", "source tokens"].forEach((c) => tr.appendChild(el("th", { class: c === "#" ? "" : "l" }, c)));
  table.appendChild(tr);
  DATA.alignment.forEach((a) => {
    const row = el("tr");
    row.appendChild(el("td", {}, String(a.position)));
    row.appendChild(el("td", { class: "l" }, a.target));
    row.appendChild(el("td", { class: "l" }, a.sources.map((s) => s.position + " " + s.token + " (" + s.weight.toFixed(2) + ")").join("   ")));
    table.appendChild(row);
  });
}

function redraw() { M = matrix(); drawTokens(); drawHeatmap(); drawStats(); }

function init() {
  $("title").textContent = "tformer inspect: " + DATA.checkpoint;
  const c = DATA.config;
  $("meta").textContent = DATA.arch + ", " + DATA.parameters.toLocaleString("en") + " parameters, d_model " + c.d_model +
    ", " + c.n_heads + " heads, " + c.pos_encoding + " positions.  Prompt: " + JSON.stringify(DATA.prompt);
  const t = DATA.thresholds;
  $("thresholds").textContent = "Labels: previous-token, first-token, current-token when the mean weight there is at least " +
    t.previous_token_min + ", " + t.first_token_min + ", " + t.current_token_min + "; induction at least " + t.induction_min +
    "; broad when the normalised entropy is at least " + t.broad_min_entropy + "; local when the mean distance is at most " +
    t.local_max_distance + " tokens and " + t.local_max_ratio + " of uniform attention's.";
  $("stack").addEventListener("change", (e) => { state.stack = e.target.value; setupControls(); redraw(); });
  $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); redraw(); });
  $("head").addEventListener("change", (e) => { state.head = e.target.value; redraw(); });
  $("heatmap").addEventListener("mousemove", heatmapHover);
  $("heatmap").addEventListener("mouseleave", () => { $("tip").style.display = "none"; clearFocus(); });
  setupControls(); drawAlignment(); redraw();
}
init();
</script>
</body>
</html>
"""
