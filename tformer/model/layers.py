"""The parts around attention: norms, positional encodings, embeddings and the feed-forward network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (Ba et al., 2016) as in the paper, or RMSNorm (Zhang & Sennrich, 2019)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """The paper's positional encoding (section 3.5), shape (n_positions, d_model):

    PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d_model/2,)
    angles = pos * inv_freq  # (P, d_model/2)
    table = torch.empty(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class Embedding(nn.Module):
    """Token embedding (scaled by sqrt(d_model) in the paper's config), plus absolute positions, then dropout.

    With rotary positions nothing is added here: RoPE rotates queries and keys inside attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.pos_encoding = cfg.pos_encoding
        if cfg.pos_encoding == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            # Derived from the config, so not saved with the weights.
            self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: Tensor, positions: Tensor) -> Tensor:
        """idx: (B, T) token ids; positions: (T,) or (B, T) position of each token. Returns (B, T, d_model)."""
        x = self.tok(idx)
        if self.scale != 1.0:
            x = x * self.scale
        if self.pos_encoding == "learned":
            x = x + self.pos(positions)
        elif self.pos_encoding == "sinusoidal":
            x = x + self.pe[positions].to(x.dtype)
        return self.drop(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al., 2021), the half-split convention of GPT-NeoX/Llama.

    Each pair (x_i, x_{i + d/2}) of a query or key is rotated by the angle pos * base^(-2i/d).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (L, head_dim/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin at `positions` ((T,) or (B, T)), shaped to broadcast over (B, n_heads, T, head_dim/2)."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hd/2) or (B, T, hd/2)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, head_dim) by the angles whose cos/sin are given."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class FeedForward(nn.Module):
    """Position-wise feed-forward network, eq. (2): FFN(x) = max(0, x W1 + b1) W2 + b2.

    With `activation="swiglu"` it is the gated variant of Shazeer (2020): (Swish(x W1) * x W3) W2.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if cfg.activation == "swiglu":
            self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)  # (B, T, d_ff)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:  # swiglu
            h = F.silu(h) * self.w3(x)
        return self.w2(self.drop(h))  # (B, T, d_model)
