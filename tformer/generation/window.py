"""The token window a batch decodes in: left-padded rows, per-row positions, and sliding at the context.

Two windows feed it to the model: `engine.CachedWindow` (the static KV cache: a prefill, then one token
per step) and `recompute.RecomputeWindow` (the whole window again at every step: the oracle the cached
path is tested against). Both slide at the same moments, so they see the same tokens: the window holds at
most `size` tokens, and a token arriving when it is full keeps the last `keep` tokens (the new one
included) at the front, with positions counted afresh.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Head = Callable[..., Tensor]
"""What is done with each step's logits (B, V): a sampler's choice (returns tokens), or nothing (beam search)."""


def logits_only(logits: Tensor, *args: Tensor) -> Tensor:
    return logits


def row_positions(real: Tensor) -> Tensor:
    """Per-row positions (B, T) for a left-padded window: 0 at the first real token (as HF's position_ids)."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids (B, P) and real-token mask (B, P) of prompts left-padded to the longest, P."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    real = torch.zeros(len(prompts), P, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
        real[r, P - len(p):] = True
    return ids.to(device), real.to(device)


class Window:
    """The tokens of each row (`ids`, `real`: False for left padding) and how many there are (`n`, a
    host-side count, never read back from the device). Subclasses say how the model sees them."""

    def __init__(self, model: nn.Module, batch: int, size: int, keep: int, head: Head = logits_only):
        device = next(model.parameters()).device
        self.model, self.size, self.keep, self.head = model, size, keep, head
        self.ids = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.real = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.n = 0
        self.slides = 0

    def prefill(self, ids: Tensor, real: Tensor, *head_args: Tensor) -> Tensor:
        """Start the window with ids (B, T); returns the head's output for the next position."""
        T = ids.size(1)
        self.ids[:, :T], self.real[:, :T], self.n = ids, real, T
        return self.run_window(*head_args)

    def step(self, token: Tensor, *head_args: Tensor) -> Tensor:
        """Append token (B,) to every row; returns the head's output for the next position."""
        if self.n == self.size:  # full: slide
            kept = self.keep - 1
            self.ids[:, :kept] = self.ids[:, self.n - kept:self.n].clone()
            self.real[:, :kept] = self.real[:, self.n - kept:self.n].clone()
            self.n = kept
            self.slides += 1
            self._append(token)
            return self.run_window(*head_args)
        self._append(token)
        return self.advance(*head_args)

    def _append(self, token: Tensor) -> None:
        self.ids[:, self.n], self.real[:, self.n] = token, True
        self.n += 1

    def select_rows(self, index: Tensor) -> None:
        """Keep rows `index` in that order (beam search)."""
        self.ids, self.real = self.ids.index_select(0, index), self.real.index_select(0, index)

    def run_window(self, *head_args: Tensor) -> Tensor:
        """The model on the whole window (a prefill)."""
        raise NotImplementedError

    def advance(self, *head_args: Tensor) -> Tensor:
        """The model on the token just appended."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the window set up on the model."""
