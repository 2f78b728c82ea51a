"""Batches for the three training objectives, drawn from flat token arrays (memory-mapped token files).

- causal LM (decoder): random windows of context + 1 tokens; predict each next token.
- masked LM (encoder): 15% of positions chosen; of those 80% become <mask>, 10% a random token,
  10% stay (Devlin et al., 2019); predict the original token at the chosen positions.
- sequence to sequence (encoder-decoder): source/target pairs, or, from plain text, T5-style span
  corruption (Raffel et al., 2020) with <mask> as the sentinel for every dropped span.

Every random choice goes through one `torch.Generator` whose state is the data position: saving
and restoring it makes a resumed run draw exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tformer.data.tokenizer import SpecialIds
from tformer.data.tokens import PairTokens

IGNORE_INDEX = -100  # label of positions that carry no loss


def _window(tokens: np.ndarray, start: int, length: int) -> Tensor:
    return torch.from_numpy(tokens[start:start + length].astype(np.int64))


def _pad(rows: list[Tensor], value: int) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


# -- causal LM ------------------------------------------------------------------------------------

def causal_batch(tokens: np.ndarray, starts: Tensor, context: int) -> dict[str, Tensor]:
    """Inputs and next-token labels (B, context) from windows of context + 1 tokens at `starts`."""
    windows = torch.stack([_window(tokens, int(s), context + 1) for s in starts])
    return {"idx": windows[:, :-1], "labels": windows[:, 1:]}


# -- masked LM ------------------------------------------------------------------------------------

def mask_tokens(
    idx: Tensor, specials: SpecialIds, vocab_size: int, mask_prob: float, g: torch.Generator
) -> dict[str, Tensor]:
    """BERT's corruption of a (B, T) batch: returns the corrupted ids and labels (IGNORE_INDEX where unchosen)."""
    B, T = idx.shape
    chosen = torch.rand(B, T, generator=g) < mask_prob
    # at least one prediction per row, so the loss is always defined
    empty = ~chosen.any(dim=1)
    chosen[empty, torch.randint(T, (B,), generator=g)[empty]] = True
    labels = torch.where(chosen, idx, IGNORE_INDEX)
    roll = torch.rand(B, T, generator=g)
    random_ids = torch.randint(vocab_size, (B, T), generator=g)  # BERT draws from the whole vocabulary
    corrupted = torch.where(chosen & (roll < 0.8), specials.mask, idx)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return {"idx": corrupted, "labels": labels}


# -- sequence to sequence ----------------------------------------------------------------------

def _segment(total: int, n: int, g: torch.Generator) -> list[int]:
    """`total` split into `n` positive parts at random (needs total >= n)."""
    if n <= 1:
        return [total]
    cuts = (torch.randperm(total - 1, generator=g)[: n - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corrupt(
    tokens: Tensor, specials: SpecialIds, density: float, mean_span: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """T5-style span corruption of one sequence: about `density` of the tokens, in spans of mean length
    `mean_span`, are dropped from the source (each span replaced by <mask>) and become the target
    (<mask> span1 <mask> span2 ... <eos>)."""
    n = len(tokens)
    n_noise = min(max(1, round(n * density)), n - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n_noise, n - n_noise))
    noise, keep = _segment(n_noise, n_spans, g), _segment(n - n_noise, n_spans, g)
    src, tgt, pos = [], [], 0
    for k, s in zip(keep, noise):  # kept text first, then a dropped span, alternately
        src.append(tokens[pos:pos + k])
        pos += k
        src.append(torch.tensor([specials.mask]))
        tgt.extend([torch.tensor([specials.mask]), tokens[pos:pos + s]])
        pos += s
    src.append(torch.tensor([specials.eos]))
    tgt.append(torch.tensor([specials.eos]))
    return torch.cat(src), torch.cat(tgt)


def seq2seq_batch(sources: list[Tensor], targets: list[Tensor], specials: SpecialIds) -> dict[str, Tensor]:
    """Pad a batch of (source, target) sequences. The decoder reads <bos> + target and predicts target + <eos>,
    unless the target already ends in <eos>."""
    tgt_in, tgt_out = [], []
    for t in targets:
        out = t if len(t) and int(t[-1]) == specials.eos else torch.cat([t, torch.tensor([specials.eos])])
        tgt_out.append(out)
        tgt_in.append(torch.cat([torch.tensor([specials.bos]), out[:-1]]))
    src = _pad(sources, specials.pad)
    src_mask = _pad([torch.ones(len(s), dtype=torch.bool) for s in sources], False)
    tgt_mask = _pad([torch.ones(len(t), dtype=torch.bool) for t in tgt_in], False)
    return {
        "src": src, "src_mask": src_mask,
        "tgt": _pad(tgt_in, specials.pad), "tgt_mask": tgt_mask,
        "labels": _pad(tgt_out, IGNORE_INDEX),
    }


# -- samplers ---------------------------------------------------------------------------------------

OBJECTIVE_NAMES = ("causal", "masked", "span", "pairs")


@dataclass
class Objective:
    """One training objective on one split of the data: flat `tokens`, or `pairs` for "pairs"."""

    name: str  # causal, masked, span or pairs
    tokens: np.ndarray | None = None
    pairs: PairTokens | None = None
    specials: SpecialIds | None = None
    vocab_size: int = 0
    mask_prob: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVE_NAMES:
            raise ValueError(f"unknown objective {self.name!r}; choose one of {OBJECTIVE_NAMES}")

    def window_length(self, context: int) -> int:
        """Tokens read per row: context + 1 for the causal objective (inputs and shifted labels)."""
        return context + 1 if self.name == "causal" else context

    def batch_at(self, starts: Tensor, context: int, g: torch.Generator) -> dict[str, Tensor]:
        """The batch of the windows that start at `starts` (flat-token objectives)."""
        if self.name == "causal":
            return causal_batch(self.tokens, starts, context)
        windows = torch.stack([_window(self.tokens, int(s), context) for s in starts])
        if self.name == "masked":
            return mask_tokens(windows, self.specials, self.vocab_size, self.mask_prob, g)
        pieces = [span_corrupt(w, self.specials, self.mask_prob, self.mean_span, g) for w in windows]
        return seq2seq_batch([src for src, _ in pieces], [tgt for _, tgt in pieces], self.specials)


class Batches:
    """Random training batches of an objective. `state()`/`load_state()` save and restore the data position.

    Distributed (tformer/distributed.py): `batch_size` is the global micro-batch. Every rank draws the
    same global batch from the same generator and keeps its rows [rank * b, (rank + 1) * b), where
    b = batch_size / world_size, so N ranks see exactly the batches of one process and the data
    position is the same on every rank.
    """

    def __init__(self, objective: Objective, context: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.objective, self.context, self.batch_size = objective, context, batch_size
        self.g = torch.Generator().manual_seed(seed)
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)  # this rank's rows of each global batch

    def state(self) -> Tensor:
        return self.g.get_state()

    def load_state(self, state: Tensor) -> None:
        self.g.set_state(state)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        obj, g = self.objective, self.g
        if obj.name == "pairs":
            rows = torch.randint(len(obj.pairs), (self.batch_size,), generator=g).tolist()
            return pair_rows(obj.pairs, rows[self.rows], self.context, obj.specials)
        span = obj.window_length(self.context)
        starts = torch.randint(len(obj.tokens) - span + 1, (self.batch_size,), generator=g)
        if obj.name == "causal":  # a rank reads only its own windows
            return obj.batch_at(starts[self.rows], self.context, g)
        # masking and span corruption draw for the whole batch; a rank keeps its rows of the result
        return {k: v[self.rows] for k, v in obj.batch_at(starts, self.context, g).items()}


def pair_rows(pairs: PairTokens, rows: list[int], context: int, specials: SpecialIds) -> dict[str, Tensor]:
    """A padded batch of the pairs at `rows`, each side cut to fit `context` tokens."""
    sources, targets = [], []
    for i in rows:
        src, tgt = pairs[i]
        sources.append(torch.from_numpy(src[:context].astype(np.int64)))
        targets.append(torch.from_numpy(tgt[: context - 1].astype(np.int64)))
    return seq2seq_batch(sources, targets, specials)


def eval_batches(
    objective: Objective, context: int, batch_size: int, n_batches: int, seed: int
) -> Iterator[dict[str, Tensor]]:
    """Validation batches, the same at every evaluation. n_batches = 0 covers the whole split once:
    consecutive non-overlapping windows (or every pair); otherwise n_batches random batches. Either
    way a generator of its own is used, so evaluating never disturbs the training randomness."""
    if n_batches > 0:
        sampler = Batches(objective, context, batch_size, seed)
        for _ in range(n_batches):
            yield next(sampler)
        return
    if objective.name == "pairs":
        n = len(objective.pairs)
        for first in range(0, n, batch_size):
            yield pair_rows(objective.pairs, list(range(first, min(first + batch_size, n))), context,
                            objective.specials)
        return
    g = torch.Generator().manual_seed(seed)
    # causal windows overlap by one token (the last label of one is the first input of the next),
    # so every token of the split is predicted exactly once
    n_windows = max(0, (len(objective.tokens) - objective.window_length(context)) // context + 1)
    starts = torch.arange(n_windows) * context
    for first in range(0, n_windows, batch_size):
        yield objective.batch_at(starts[first:first + batch_size], context, g)


def steps_per_epoch(objective: str, n_train: int, context: int, tokens_per_step: int, batch_rows: int) -> int:
    """Optimizer steps for one pass over the training data (windows of `context` tokens, or pairs)."""
    if objective == "pairs":
        return max(1, math.ceil(n_train / batch_rows))
    return max(1, math.ceil(n_train / tokens_per_step))
