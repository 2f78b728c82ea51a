"""Scaled dot-product attention, multi-head attention (self and cross), and attention masks.

Masks are boolean and broadcast to (B, n_heads, T_q, T_k); True means "may attend", as in
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ModelConfig
from tformer.model.cache import CrossKV, KVCache
from tformer.model.layers import apply_rotary


def attention_mask(
    q_pos: Tensor, k_len: int, causal: bool, key_padding_mask: Tensor | None = None
) -> Tensor | None:
    """Boolean mask (B or 1, 1, T_q, T_k) for queries at slots `q_pos` (T_q,) over key slots 0..k_len-1.

    Causal: a query at slot i sees key slots j <= i. This works for any chunk of queries at any
    offset into a cache, unlike `is_causal=True`, which assumes T_q == T_k (it aligns top-left).
    key_padding_mask: (B, k_len), True for real tokens. A query that would see no key at all
    (a left-padding position) is allowed to see itself so that softmax stays finite.
    """
    mask = None
    k_pos = torch.arange(k_len, device=q_pos.device)
    if causal:
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T_q, T_k)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, T_k)
        mask = pad if mask is None else mask & pad
        if causal:
            own_slot = (k_pos[None, :] == q_pos[:, None])[None, None]
            mask = mask | (own_slot & ~mask.any(dim=-1, keepdim=True))
    return mask


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, eq. (1) of the paper.

    q: (B, H, T_q, d_k); k, v: (B, H_kv, T_k, d_k) with H a multiple of H_kv (grouped-query attention).
    The fast path is PyTorch's fused kernel (flash / memory-efficient on GPUs); with `need_weights`
    the same equation runs explicitly and also returns the weights (B, H, T_q, T_k).
    """
    n_rep = q.size(1) // k.size(1)
    if not need_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=n_rep > 1
        )
        return out, None
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T_q, T_k)
    if is_causal:
        T_q, T_k = scores.shape[-2:]
        mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, p=dropout_p) @ v  # (B, H, T_q, d_k)
    return out, weights


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention projects Q, K and V from one input with one fused matrix; cross-attention
    projects Q from the decoder and K, V from the encoder output ("memory"). With
    n_kv_heads < n_heads, groups of query heads share one key/value head (GQA, Ainslie et al., 2023).
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cross = cross
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv_bias = cfg.bias_of("qkv")
        if cross:
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
            self.kv_proj = nn.Linear(cfg.d_model, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv_proj = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias_of("out"))
        self.dropout = cfg.dropout
        # Set by the model's setup_cache() for incremental decoding; not part of the weights.
        self.cache: KVCache | CrossKV | None = None

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, head_dim)

    def _rotated_heads(self, qk: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, T, (H + H_kv) * hd) rotated by RoPE, as (B, H, T, hd) and (B, H_kv, T, hd)."""
        B, T, _ = qk.shape
        cos, sin = rope  # shaped for (B, H, T, hd): (T, hd) or (B, 1, T, hd); here heads come after T
        cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 2 else (cos.transpose(1, 2), sin.transpose(1, 2))
        qk = apply_rotary(qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the encoder output for cross-attention, each (B, n_kv_heads, S, head_dim)."""
        k, v = self.kv_proj(memory).split(self.n_kv_heads * self.head_dim, dim=-1)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        input_pos: Tensor | None = None,
        memory: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, d_model). Returns the output (B, T, d_model) and, with need_weights, (B, H, T, T_k).

        Self-attention with a KVCache writes this chunk's keys/values at slots `input_pos` and
        attends over the whole cache (the mask hides unwritten and future slots). Cross-attention
        uses `memory` (B, S, d_model), or the keys/values cached from it once per source sequence.
        """
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, T, hd)
            if isinstance(self.cache, CrossKV) and memory is None:
                k, v = self.cache.k, self.cache.v
            else:
                if memory is None:
                    raise ValueError("cross-attention needs the encoder output (memory) or a filled cross cache")
                k, v = self.project_kv(memory)  # (B, H_kv, S, hd)
        else:
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qk, v = self.qkv_proj(x).split([q_dim + kv_dim, kv_dim], dim=-1)
            if rope is not None:  # queries and keys rotated together, before the heads move ahead of T
                q, k = self._rotated_heads(qk, rope)
            else:
                q, k = qk.split([q_dim, kv_dim], dim=-1)
                q, k = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads)
            v = self._heads(v, self.n_kv_heads)
            if self.cache is not None:
                if input_pos is None:
                    raise ValueError("a cached forward pass needs input_pos, the cache slots of the new tokens")
                k, v = self.cache.update(input_pos, k, v)  # (B, H_kv, max_len, hd)
        dropout_p = self.dropout if self.training else 0.0
        y, weights = scaled_dot_product_attention(q, k, v, mask, is_causal, dropout_p, need_weights)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # concatenate the heads
        return self.out_proj(y), weights
