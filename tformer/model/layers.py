"""The parts around attention: norms, positional encodings, embeddings and the feed-forward network."""

from __future__ import annotations

import contextlib
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
    Pretrained shapes add token-type (segment) embeddings and a norm of the sum (BERT, BART).
    `tokens=False` builds the positional part only, for an encoder that borrows the decoder's
    token embedding but has its own positions (BART).
    """

    def __init__(self, cfg: ModelConfig, tokens: bool = True):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model) if tokens else None
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.pos_encoding = cfg.pos_encoding
        self.pos_offset = cfg.pos_offset
        if cfg.pos_encoding == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len + cfg.pos_offset, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            # Derived from the config, so not saved with the weights.
            self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        if cfg.type_vocab_size:
            self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the derived (non-saved) sinusoidal table, e.g. after building on the meta device."""
        if self.pos_encoding == "sinusoidal":
            with torch.device(device) if device is not None else contextlib.nullcontext():
                self.pe = sinusoidal_table(self.pe.size(0), self.pe.size(1))

    def forward(
        self, idx: Tensor, positions: Tensor, token_type_ids: Tensor | None = None, tok: nn.Embedding | None = None
    ) -> Tensor:
        """idx: (B, T) token ids; positions: (T,) or (B, T) position of each token; token_type_ids: (B, T)
        segment ids (default 0 where the model has token types); tok: the token embedding to use when this
        module has none. Returns (B, T, d_model)."""
        x = (tok if tok is not None else self.tok)(idx)
        if self.scale != 1.0:
            x = x * self.scale
        if self.pos_encoding == "learned":
            x = x + self.pos(positions + self.pos_offset if self.pos_offset else positions)
        elif self.pos_encoding == "sinusoidal":
            x = x + self.pe[positions].to(x.dtype)
        if hasattr(self, "token_type"):
            x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al., 2021), the half-split convention of GPT-NeoX/Llama.

    Each pair (x_i, x_{i + d/2}) of a query or key is rotated by the angle pos * theta_i,
    theta_i = base^(-2i/d), with the frequencies optionally rescaled for long contexts (`rope_frequencies`).
    The tables are full width, cos = [cos, cos] and sin = [-sin, sin], so that a rotation is two products
    and a roll (`apply_rotary`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.base, self.scaling = head_dim, max_seq_len, base, scaling
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the derived cos/sin tables, not saved with the weights (on `device`, default: the
        current default device, so that building on the meta device allocates nothing)."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling)
            angles = torch.arange(self.max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (L, hd/2)
            cos, sin = angles.cos().float(), angles.sin().float()
            self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # (L, hd)
            self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin at `positions` ((T,) or (B, T)), shaped to broadcast over (B, n_heads, T, head_dim)."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hd) or (B, T, hd)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        return cos, sin


def rope_frequencies(head_dim: int, base: float, scaling: dict | None = None) -> Tensor:
    """theta_i = base^(-2i/head_dim), i < head_dim/2 (float64), rescaled as `scaling` says.

    "linear" divides every frequency by `factor` (position interpolation, Chen et al., 2023).
    "llama3" (Llama 3.1) divides only the low frequencies, whose wavelength exceeds the original
    context / low_freq_factor, keeps those shorter than context / high_freq_factor, and blends
    linearly (in context / wavelength) between the two.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    context, low, high = scaling["original_max_seq_len"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short waves
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, scaled)
    return torch.where(wavelength < context / high, inv_freq, scaled)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., head_dim) by the angles of RotaryEmbedding's tables: with x = [x1, x2], the result is
    [x1 cos - x2 sin, x2 cos + x1 sin] = x [cos, cos] + [x2, x1] [-sin, sin], the roll giving [x2, x1]."""
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.size(-1) // 2, dims=-1), sin).type_as(x)


class FeedForward(nn.Module):
    """Position-wise feed-forward network, eq. (2): FFN(x) = max(0, x W1 + b1) W2 + b2.

    With `activation="swiglu"` it is the gated variant of Shazeer (2020): (Swish(x W1) * x W3) W2.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        bias = cfg.bias_of("mlp")
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        if cfg.activation == "swiglu":
            self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
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
