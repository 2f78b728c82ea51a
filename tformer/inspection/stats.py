"""Statistics and labels of attention heads, and induction scores.

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

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tformer.config import ModelConfig

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


THRESHOLDS = {
    "previous_token_min": PREVIOUS_TOKEN_MIN, "first_token_min": FIRST_TOKEN_MIN,
    "current_token_min": CURRENT_TOKEN_MIN, "induction_min": INDUCTION_MIN,
    "broad_min_entropy": BROAD_MIN_ENTROPY, "local_max_distance": LOCAL_MAX_DISTANCE,
    "local_max_ratio": LOCAL_MAX_RATIO,
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


@torch.no_grad()
def attention_weights(model: nn.Module, ids: Tensor, target: Tensor | None = None) -> dict[str, list[Tensor]]:
    """Every attention's weights in one forward pass on the explicit softmax path: per stack a list over
    layers of (B, H, T_q, T_k). An encoder-decoder reads `ids` as the source and `target` (default: the same
    ids) as the decoder input."""
    if model.cfg.has_encoder and model.cfg.has_decoder:
        return model(ids, ids if target is None else target, need_weights=True).attentions
    return model(ids, need_weights=True).attentions


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
    attentions = attention_weights(model, seq.to(device))
    q = torch.arange(n, 2 * n)
    w = torch.stack(attentions["decoder"]).float().cpu()  # (L, B, H, 2n, 2n)
    return w[..., q, q - n + 1].mean(dim=(1, -1))  # (L, H)
