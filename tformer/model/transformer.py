"""Encoder and decoder layers, their stacks, and the three models built from them.

- `EncoderModel`: a bidirectional encoder with a masked-LM head (BERT-style).
- `DecoderLM`:    a causal decoder with a language-model head (GPT-style).
- `Seq2Seq`:      the paper's encoder-decoder, whose decoder layers add cross-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ModelConfig
from tformer.model.attention import MultiHeadAttention, attention_mask
from tformer.model.cache import CrossKV, KVCache
from tformer.model.layers import Embedding, FeedForward, RotaryEmbedding, make_norm


@dataclass
class ModelOutput:
    """What a model's forward pass returns."""

    logits: Tensor  # (B, T, vocab_size)
    hidden: Tensor  # (B, T, d_model), the last layer's output (after the final norm, if any)
    # With need_weights: per layer, (B, n_heads, T_q, T_k), under "encoder", "decoder" and "cross".
    attentions: dict[str, list[Tensor]] | None = None


class Block(nn.Module):
    """One layer: self-attention, cross-attention (decoder of the encoder-decoder only), feed-forward.

    Each sub-layer is wrapped in a residual connection and a norm, placed as in the paper
    ("post": x = Norm(x + Dropout(Sublayer(x))), section 3.1 and 5.4) or before the sub-layer
    ("pre": x = x + Dropout(Sublayer(Norm(x))), as in GPT-2). Encoder and decoder layers differ
    only in what they add: a causal mask (given by the stack) and cross-attention.
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.self_attn = MultiHeadAttention(cfg)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = MultiHeadAttention(cfg, cross=True) if cross else None
        self.cross_attn_norm = make_norm(cfg) if cross else None
        self.ffn = FeedForward(cfg)
        self.ffn_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _sublayer_in(self, x: Tensor, norm: nn.Module) -> Tensor:
        return norm(x) if self.pre_norm else x

    def _residual(self, x: Tensor, sublayer_out: Tensor, norm: nn.Module) -> Tensor:
        x = x + self.drop(sublayer_out)
        return x if self.pre_norm else norm(x)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        input_pos: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: (B, T, d_model). Returns x, and the self- and cross-attention weights when asked."""
        h = self._sublayer_in(x, self.self_attn_norm)
        a, self_w = self.self_attn(h, mask, is_causal, rope, input_pos, need_weights=need_weights)
        x = self._residual(x, a, self.self_attn_norm)
        cross_w = None
        if self.cross_attn is not None:
            h = self._sublayer_in(x, self.cross_attn_norm)
            a, cross_w = self.cross_attn(h, memory_mask, memory=memory, need_weights=need_weights)
            x = self._residual(x, a, self.cross_attn_norm)
        x = self._residual(x, self.ffn(self._sublayer_in(x, self.ffn_norm)), self.ffn_norm)
        return x, self_w, cross_w


class TransformerStack(nn.Module):
    """N identical layers: the paper's encoder (bidirectional) or decoder (causal, optionally with
    cross-attention). Pre-norm stacks end with a final norm; post-norm layers already end with one.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool = False):
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(Block(cfg, cross) for _ in range(n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        self.rope = (
            RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, cfg.rope_scaling)
            if cfg.pos_encoding == "rope" else None
        )
        self.cfg = cfg

    # -- incremental decoding ---------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate a static KVCache of `max_len` slots in every self-attention layer."""
        if not self.causal:
            raise ValueError("only a causal (decoder) stack can be decoded incrementally")
        if not 0 < max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} must be in 1..max_seq_len={self.cfg.max_seq_len}")
        for layer in self.layers:
            layer.self_attn.cache = KVCache(
                batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype=dtype, device=device
            )

    def set_memory(self, memory: Tensor) -> None:
        """Project the encoder output into every layer's cross-attention keys/values, once."""
        for layer in self.layers:
            layer.cross_attn.cache = CrossKV(*layer.cross_attn.project_kv(memory))

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None
            if layer.cross_attn is not None:
                layer.cross_attn.cache = None

    def select_cache_rows(self, index: Tensor) -> None:
        """Reorder or drop batch rows of every cache (beam search)."""
        for layer in self.layers:
            for attn in (layer.self_attn, layer.cross_attn):
                if attn is not None and attn.cache is not None:
                    attn.cache.select_rows(index)

    @property
    def cache_len(self) -> int | None:
        cache = self.layers[0].self_attn.cache
        return None if cache is None else cache.max_len

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        key_padding_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, dict[str, list[Tensor]] | None]:
        """x: (B, T, d_model) embedded inputs; positions: (T,) or (B, T) for rotary encodings.

        key_padding_mask: (B, T_k), True for real tokens; T_k is the cache length when cached.
        input_pos: (T,) cache slots of these tokens; required when a cache is set up.
        memory, memory_padding_mask: the encoder output (B, S, d_model) and its (B, S) mask.
        """
        T = x.size(1)
        cache_len = self.cache_len
        if cache_len is not None:
            if input_pos is None:
                raise ValueError("a cache is set up: pass input_pos, the cache slots of these tokens")
            mask, is_causal = attention_mask(input_pos, cache_len, self.causal, key_padding_mask), False
        elif self.causal and key_padding_mask is None:
            mask, is_causal = None, True  # lets the fused kernels use their causal fast path
        else:
            q_pos = torch.arange(T, device=x.device)
            mask, is_causal = attention_mask(q_pos, T, self.causal, key_padding_mask), False
        memory_mask = None if memory_padding_mask is None else memory_padding_mask[:, None, None, :].bool()
        rope = self.rope(positions) if self.rope is not None else None

        self_ws: list[Tensor] = []
        cross_ws: list[Tensor] = []
        for layer in self.layers:
            x, self_w, cross_w = layer(x, mask, is_causal, rope, input_pos, memory, memory_mask, need_weights)
            if need_weights:
                self_ws.append(self_w)
                if cross_w is not None:
                    cross_ws.append(cross_w)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not need_weights:
            return x, None
        return x, {"self": self_ws, "cross": cross_ws}


def _positions(T: int, input_pos: Tensor | None, positions: Tensor | None, device: torch.device) -> Tensor:
    """Positions for the positional encoding: given, else the cache slots, else 0..T-1."""
    if positions is not None:
        return positions
    if input_pos is not None:
        return input_pos
    return torch.arange(T, device=device)


def _check_length(T: int, cfg: ModelConfig) -> None:
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={cfg.max_seq_len}")


class _LMBase(nn.Module):
    """What the three models share: the output projection (tied to the embedding or not) and init."""

    cfg: ModelConfig
    embed: Embedding

    def output_logits(self, h: Tensor) -> Tensor:
        """The pre-softmax linear transformation; with tie_embeddings it reuses the embedding matrix
        (section 3.4 of the paper), so the weight is stored once."""
        if self.lm_head is None:
            return F.linear(h, self.embed.tok.weight)
        return self.lm_head(h)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith(("tok.weight", "pos.weight")))
        return n

    def _init_weights(self) -> None:
        """Paper-style (Xavier uniform, as torch.nn.Transformer) or GPT-2-style (N(0, 0.02), with the
        residual projections scaled by 1/sqrt(2 * n_layers), Radford et al., 2019)."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "paper":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # Paper: the sqrt(d_model) scaling then gives inputs of unit variance.
                std = cfg.d_model**-0.5 if cfg.init == "paper" else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
        if cfg.init == "gpt2":
            for stack in (m for m in self.modules() if isinstance(m, TransformerStack)):
                std = 0.02 / math.sqrt(2 * len(stack.layers))
                for block in stack.layers:
                    for proj in (block.self_attn.out_proj, block.ffn.w2) + (
                        (block.cross_attn.out_proj,) if block.cross_attn is not None else ()
                    ):
                        nn.init.normal_(proj.weight, mean=0.0, std=std)


class _IncrementalDecoding(_LMBase):
    """The decoding interface shared by the two models with a causal decoder stack (`self.decoder`).

    Generation never asks which model it holds: it calls `setup_cache` (with the encoder output as
    `memory` for the encoder-decoder), then `next_token_logits` for the prefill and each decode step,
    `select_cache_rows` for beam search, and `clear_cache`. Without a cache, `next_token_logits`
    recomputes the whole window (given `memory` again for the encoder-decoder).
    """

    decoder: TransformerStack

    def setup_cache(
        self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
    ) -> None:
        """Allocate static KV caches of `max_len` slots (default max_seq_len) for `batch_size` rows; for the
        encoder-decoder also store the cross-attention keys/values of `memory` (B, S, d_model), computed once,
        and its padding mask (B, S), True for real source tokens."""
        p = self.embed.tok.weight
        self.decoder.setup_cache(batch_size, max_len or self.cfg.max_seq_len, dtype or p.dtype, device or p.device)
        self._set_source(memory, memory_padding_mask)

    def _set_source(self, memory: Tensor | None, memory_padding_mask: Tensor | None) -> None:
        if memory is not None:
            raise ValueError(f"{type(self).__name__} has no encoder: it takes no memory")

    def clear_cache(self) -> None:
        """Drop the caches; the next forward pass processes whole sequences again."""
        self.decoder.clear_cache()

    def select_cache_rows(self, index: Tensor) -> None:
        """Reorder or drop batch rows of every cache (beam search), e.g. index = tensor([2, 0, 0])."""
        self.decoder.select_cache_rows(index)

    def next_token_logits(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, positions: Tensor | None = None,
        input_pos: Tensor | None = None, memory: Tensor | None = None, memory_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, vocab_size) of the token after idx (B, T): with a cache, idx takes slots `input_pos`;
        without one, idx is the whole window (and `memory` the encoder output, for the encoder-decoder)."""
        raise NotImplementedError


class DecoderLM(_IncrementalDecoding):
    """Decoder-only causal language model (GPT-style): embedding -> causal stack -> LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "decoder":
            raise ValueError(f"DecoderLM needs arch='decoder', got {cfg.arch!r}")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.decoder = TransformerStack(cfg, cfg.n_decoder_layers, causal=True)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def forward(
        self,
        idx: Tensor,
        key_padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        input_pos: Tensor | None = None,
        need_weights: bool = False,
        last_only: bool = False,
    ) -> ModelOutput:
        """idx: (B, T) token ids. With last_only, logits (B, 1, vocab_size) of the last position only
        (generation needs no others, and the output projection is the largest matrix product).

        Without a cache, the whole sequence is processed (training, or recomputing everything).
        With a cache (setup_cache), `input_pos` (T,) names the slots these tokens take: a prefill
        writes 0..T-1, each decode step one slot; key_padding_mask then covers all cache slots.
        positions: (B, T) per-row positions for left-padded batches (default: input_pos or 0..T-1).
        """
        B, T = idx.shape
        _check_length(T, self.cfg)
        positions = _positions(T, input_pos, positions, idx.device)
        x = self.embed(idx, positions)  # (B, T, d_model)
        h, attn = self.decoder(x, positions, key_padding_mask, input_pos, need_weights=need_weights)
        attentions = None if attn is None else {"decoder": attn["self"]}
        return ModelOutput(self.output_logits(h[:, -1:] if last_only else h), h, attentions)

    def next_token_logits(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, positions: Tensor | None = None,
        input_pos: Tensor | None = None, memory: Tensor | None = None, memory_padding_mask: Tensor | None = None,
    ) -> Tensor:
        if memory is not None:
            raise ValueError("DecoderLM has no encoder: it takes no memory")
        return self(idx, key_padding_mask, positions, input_pos, last_only=True).logits[:, -1]


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> norm -> projection to the vocabulary (+ bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h)))


class EncoderModel(_LMBase):
    """Encoder-only model (BERT-style): embedding -> bidirectional stack -> masked-LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "encoder":
            raise ValueError(f"EncoderModel needs arch='encoder', got {cfg.arch!r}")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.encoder = TransformerStack(cfg, cfg.n_encoder_layers, causal=False)
        self.mlm_head = MLMHead(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def forward(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False,
        token_type_ids: Tensor | None = None,
    ) -> ModelOutput:
        """idx: (B, T); key_padding_mask: (B, T), True for real tokens. Logits predict every position's token.
        token_type_ids: (B, T) segment ids for a model with token types (type_vocab_size > 0; default 0)."""
        B, T = idx.shape
        _check_length(T, self.cfg)
        positions = torch.arange(T, device=idx.device)
        x = self.embed(idx, positions, token_type_ids)
        h, attn = self.encoder(x, positions, key_padding_mask, need_weights=need_weights)
        logits = self.output_logits(self.mlm_head(h)) + self.mlm_head.bias
        return ModelOutput(logits, h, None if attn is None else {"encoder": attn["self"]})


class Seq2Seq(_IncrementalDecoding):
    """The paper's encoder-decoder: the decoder attends causally to itself and to the encoder output.

    With tie_embeddings the source embedding, target embedding and output projection share one
    matrix, as in the paper (a shared source-target vocabulary).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "encoder-decoder":
            raise ValueError(f"Seq2Seq needs arch='encoder-decoder', got {cfg.arch!r}")
        self.cfg = cfg
        self.embed = Embedding(cfg)  # the target embedding (and the source one when tied)
        # Untied: the source has its own. Tied with tie_positions=False (BART): the source borrows the
        # target's token embedding but has its own positions and embedding norm.
        self.src_embed = (
            Embedding(cfg) if not cfg.tie_embeddings else None if cfg.tie_positions else Embedding(cfg, tokens=False)
        )
        self.encoder = TransformerStack(cfg, cfg.n_encoder_layers, causal=False)
        self.decoder = TransformerStack(cfg, cfg.n_decoder_layers, causal=True, cross=True)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.memory_padding_mask: Tensor | None = None  # the source mask while a cache is set up
        self._init_weights()

    def encode(
        self, src: Tensor, src_padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """src: (B, S) -> memory (B, S, d_model), and the encoder self-attention weights when asked."""
        S = src.size(1)
        _check_length(S, self.cfg)
        positions = torch.arange(S, device=src.device)
        if self.src_embed is None:
            x = self.embed(src, positions)
        else:
            x = self.src_embed(src, positions, tok=self.embed.tok if self.src_embed.tok is None else None)
        memory, attn = self.encoder(x, positions, src_padding_mask, need_weights=need_weights)
        return memory, None if attn is None else attn["self"]

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        input_pos: Tensor | None = None,
        need_weights: bool = False,
        last_only: bool = False,
    ) -> ModelOutput:
        """tgt: (B, T) target ids (shifted right). memory may be None once setup_cache has stored
        the cross-attention keys/values; memory_padding_mask: (B, S), True for real source tokens.
        last_only: logits of the last position only, as in DecoderLM.forward."""
        B, T = tgt.shape
        _check_length(T, self.cfg)
        positions = _positions(T, input_pos, positions, tgt.device)
        x = self.embed(tgt, positions)
        h, attn = self.decoder(
            x, positions, tgt_padding_mask, input_pos, memory, memory_padding_mask, need_weights=need_weights
        )
        attentions = None if attn is None else {"decoder": attn["self"], "cross": attn["cross"]}
        return ModelOutput(self.output_logits(h[:, -1:] if last_only else h), h, attentions)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> ModelOutput:
        memory, enc_w = self.encode(src, src_padding_mask, need_weights)
        out = self.decode(tgt, memory, src_padding_mask, tgt_padding_mask, need_weights=need_weights)
        if need_weights:
            out.attentions = {"encoder": enc_w, **out.attentions}
        return out

    def _set_source(self, memory: Tensor | None, memory_padding_mask: Tensor | None) -> None:
        if memory is None:
            raise ValueError("Seq2Seq.setup_cache needs memory, the encoder output of the source")
        self.decoder.set_memory(memory)
        self.memory_padding_mask = memory_padding_mask

    def clear_cache(self) -> None:
        super().clear_cache()
        self.memory_padding_mask = None

    def select_cache_rows(self, index: Tensor) -> None:
        super().select_cache_rows(index)
        if self.memory_padding_mask is not None:
            self.memory_padding_mask = self.memory_padding_mask.index_select(0, index)

    def next_token_logits(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, positions: Tensor | None = None,
        input_pos: Tensor | None = None, memory: Tensor | None = None, memory_padding_mask: Tensor | None = None,
    ) -> Tensor:
        if memory is None:  # cached: the cross-attention keys/values and the source mask are stored
            memory_padding_mask = self.memory_padding_mask
        out = self.decode(idx, memory, memory_padding_mask, key_padding_mask, positions, input_pos, last_only=True)
        return out.logits[:, -1]


MODELS: dict[str, type[_LMBase]] = {"encoder": EncoderModel, "decoder": DecoderLM, "encoder-decoder": Seq2Seq}


def build_model(cfg: ModelConfig) -> EncoderModel | DecoderLM | Seq2Seq:
    """The model class for cfg.arch, freshly initialised."""
    return MODELS[cfg.arch](cfg)
