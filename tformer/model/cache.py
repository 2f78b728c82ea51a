"""Caches for incremental decoding: static self-attention K/V buffers, and cross-attention K/V.

Buffers are allocated once at (B, n_kv_heads, max_len, head_dim) and written in place at the
slots the caller names: the cache never guesses how full it is. They are non-persistent, so
they are never saved with the weights, and a decode step sees the same tensor shapes every
time (which is what lets torch.compile / CUDA graphs capture it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one self-attention layer, for every slot 0..max_len-1."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, hd) at slots input_pos (T,); return the whole buffers (B, H_kv, max_len, hd)."""
        self.k.index_copy_(2, input_pos, k.detach().to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.detach().to(self.v.dtype))
        return self.k, self.v

    def select_rows(self, index: Tensor) -> None:
        """Keep batch rows `index` in that order (beam search reorders; finished rows are dropped)."""
        select_rows(self, index)


class CrossKV(nn.Module):
    """Cross-attention keys and values of one decoder layer, computed once per source sequence."""

    def __init__(self, k: Tensor, v: Tensor):
        super().__init__()
        # Own contiguous copies: the projections are views, and caches serve inference only.
        self.register_buffer("k", k.detach().clone(memory_format=torch.contiguous_format), persistent=False)
        self.register_buffer("v", v.detach().clone(memory_format=torch.contiguous_format), persistent=False)

    def select_rows(self, index: Tensor) -> None:
        select_rows(self, index)


def select_rows(cache: nn.Module, index: Tensor) -> None:
    """Reorder or drop batch rows of a cache's k and v buffers, in place when the batch size is unchanged."""
    index = index.to(cache.k.device)
    for name in ("k", "v"):
        buf = getattr(cache, name)
        picked = buf.index_select(0, index)
        if picked.shape == buf.shape:
            buf.copy_(picked)  # same storage: a compiled decode step keeps its static addresses
        else:
            setattr(cache, name, picked)
