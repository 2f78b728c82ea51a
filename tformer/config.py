"""Model configuration: one dataclass that checks itself, and named presets.

Kept free of torch imports so the CLI starts fast and configs can be read anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tformer.errors import ConfigError
from tformer.limits import check_model_size

ARCHS = ("encoder", "decoder", "encoder-decoder")
POS_ENCODINGS = ("sinusoidal", "learned", "rope")
NORM_PLACEMENTS = ("post", "pre")
NORMS = ("layernorm", "rmsnorm")
# gelu_tanh is GPT-2's tanh approximation of GELU ("gelu_new" in transformers).
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
INITS = ("paper", "gpt2")


@dataclass
class ModelConfig:
    """The shape of a Transformer, with names from "Attention Is All You Need" (Vaswani et al., 2017).

    `arch` picks the variant: `encoder` (BERT-style, masked LM), `decoder` (GPT-style, causal LM)
    or `encoder-decoder` (the paper's translation model). `n_encoder_layers` is used by the
    encoder and encoder-decoder, `n_decoder_layers` by the decoder and encoder-decoder.
    """

    arch: str = "decoder"
    vocab_size: int = 8192
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    max_seq_len: int = 512
    pos_encoding: str = "sinusoidal"
    rope_base: float = 10000.0
    norm_placement: str = "post"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "relu"
    bias: bool = True
    tie_embeddings: bool = True
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model), as in the paper (section 3.4)
    init: str = "paper"  # "paper": Xavier uniform; "gpt2": N(0, 0.02) with scaled residual projections
    # Shapes of pretrained models (tformer/hf/); the defaults leave tformer's own models as they were.
    qkv_bias: bool | None = None  # biases of the query/key/value projections (None: as `bias`; Qwen2: True alone)
    out_bias: bool | None = None  # bias of the attention output projection W^O (None: as `bias`)
    mlp_bias: bool | None = None  # biases of the feed-forward layers (None: as `bias`)
    # RoPE frequency scaling for long contexts: {"type": "linear", "factor": f}, or Llama 3.1's
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}.
    rope_scaling: dict[str, Any] | None = None
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input, as BERT's; 0: none
    embed_norm: bool = False  # a norm after the embedding sum (BERT's embedding LayerNorm, BART's layernorm_embedding)
    pos_offset: int = 0  # learned positions: position p reads row p + pos_offset of the table (BART: 2)
    # Encoder-decoder with tied token embeddings: the encoder shares the decoder's position table and
    # embedding norm (False: it has its own, as BART).
    tie_positions: bool = True
    preset: str | None = field(default=None, compare=False)  # the preset this config started from

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    # -- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """d_k = d_v = d_model / n_heads."""
        return self.d_model // self.n_heads

    def bias_of(self, part: str) -> bool:
        """Whether `part` ("qkv", "out" or "mlp") has biases: its own field when set, else `bias`."""
        own = {"qkv": self.qkv_bias, "out": self.out_bias, "mlp": self.mlp_bias}[part]
        return self.bias if own is None else own

    @property
    def has_encoder(self) -> bool:
        return self.arch in ("encoder", "encoder-decoder")

    @property
    def has_decoder(self) -> bool:
        return self.arch in ("decoder", "encoder-decoder")

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what is allowed."""
        _choice("arch", self.arch, ARCHS)
        _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        _choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, INITS)
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        check_model_size(self, "")  # upper bounds first: a config from a file is untrusted
        for name in ("bias", "tie_embeddings", "scale_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a boolean (true or false)")
        if self.has_encoder and self.n_encoder_layers == 0:
            raise ConfigError(f"n_encoder_layers must be at least 1 for arch={self.arch!r}")
        if self.has_decoder and self.n_decoder_layers == 0:
            raise ConfigError(f"n_decoder_layers must be at least 1 for arch={self.arch!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model: {_divisors(self.d_model)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"choose n_kv_heads among {_divisors(self.n_heads)}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"pos_encoding='rope' needs an even head_dim, but d_model/n_heads = {self.head_dim}"
            )
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"pos_encoding='sinusoidal' needs an even d_model, got {self.d_model}")
        if not (_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if not (_real(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be a number in (0, 1)")
        if not (_real(self.rope_base) and self.rope_base > 1):
            raise ConfigError(f"rope_base={self.rope_base!r} must be a finite number > 1")
        for name in ("bias", "tie_embeddings", "scale_embeddings", "embed_norm", "tie_positions"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("qkv_bias", "out_bias", "mlp_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true, false or null (as `bias`)")
        for name in ("type_vocab_size", "pos_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        if self.pos_offset and self.pos_encoding != "learned":
            raise ConfigError(f"pos_offset={self.pos_offset} needs pos_encoding='learned'")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    # -- construction and serialisation ----------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset, with any field overridden (None values are ignored)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict({**values, "preset": name})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. a checkpoint's config.json); unknown keys are an error."""
        return _from_dict(cls, values, "model config field")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, values: dict[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")}


def _check_rope_scaling(scaling: Any) -> None:
    kinds = ", ".join(ROPE_SCALINGS)
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALINGS:
        raise ConfigError(f"rope_scaling={scaling!r} must be null or a dict whose type is one of: {kinds}")
    keys = ROPE_SCALINGS[scaling["type"]]
    if set(scaling) != {"type", *keys}:
        raise ConfigError(f"rope_scaling of type {scaling['type']!r} needs exactly the keys type, {', '.join(keys)}")
    for key in keys:
        value = scaling[key]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"rope_scaling {key}={value!r} must be a positive number")
    if scaling["type"] == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling high_freq_factor must be greater than low_freq_factor")


def _real(value: Any) -> bool:
    """A finite int or float, not a bool (JSON's true is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _divisors(n: int, shown: int = 24) -> str:
    """The divisors of `n`, found up to its square root (n comes from files: no loop as long as n), the
    first `shown` of them listed."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small) | {n // d for d in small})
    return ", ".join(map(str, found[:shown])) + (f", ... ({len(found)} in all)" if len(found) > shown else "")


# The paper's model, as in Vaswani et al. (2017): post-norm, ReLU, sinusoidal positions,
# embeddings scaled by sqrt(d_model) and shared with the pre-softmax projection.
_PAPER = dict(
    arch="encoder-decoder",
    pos_encoding="sinusoidal",
    norm_placement="post",
    norm="layernorm",
    activation="relu",
    bias=True,
    tie_embeddings=True,
    scale_embeddings=True,
    init="paper",
)
# GPT-2 (Radford et al., 2019): pre-norm, learned positions, tanh-GELU, N(0, 0.02) init.
_GPT = dict(
    arch="decoder",
    pos_encoding="learned",
    norm_placement="pre",
    norm="layernorm",
    activation="gelu_tanh",
    bias=True,
    tie_embeddings=True,
    scale_embeddings=False,
    init="gpt2",
    norm_eps=1e-5,
)
# A small modern decoder for a CPU, in Llama's shape so that `tformer export` writes it as a
# LlamaForCausalLM: pre-RMSNorm, rotary positions, SwiGLU, no biases. The SwiGLU width is 8/3 d_model
# (rounded to a multiple of 8), the FLOPs of a 4 d_model GELU layer (Shazeer, 2020).
_SMALL_GPT = dict(_GPT, pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, dropout=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # Table 3 of the paper, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1; 37000-token shared BPE vocabulary.
    "vaswani-base": dict(
        _PAPER, vocab_size=37000, d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6,
        d_ff=2048, dropout=0.1, max_seq_len=512,
    ),
    # Table 3, "big": d_model=1024, d_ff=4096, h=16, P_drop=0.3.
    "vaswani-big": dict(
        _PAPER, vocab_size=37000, d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=6,
        d_ff=4096, dropout=0.3, max_seq_len=512,
    ),
    # GPT-2 small, 124M parameters.
    "gpt2": dict(
        _GPT, vocab_size=50257, d_model=768, n_heads=12, n_encoder_layers=0, n_decoder_layers=12,
        d_ff=3072, dropout=0.1, max_seq_len=1024,
    ),
    # BERT-base (Devlin et al., 2019): post-norm, learned positions, GELU, LayerNorm eps 1e-12.
    "bert-base": dict(
        arch="encoder", vocab_size=30522, d_model=768, n_heads=12, n_encoder_layers=12, n_decoder_layers=0,
        d_ff=3072, dropout=0.1, max_seq_len=512, pos_encoding="learned", norm_placement="post",
        norm="layernorm", norm_eps=1e-12, activation="gelu", bias=True, tie_embeddings=True,
        scale_embeddings=False, init="gpt2",
    ),
    # Small models that train in minutes on a laptop CPU.
    "tiny": dict(
        _SMALL_GPT, vocab_size=8192, d_model=128, n_heads=4, n_encoder_layers=4, n_decoder_layers=4,
        d_ff=344, max_seq_len=256,
    ),
    "small": dict(
        _SMALL_GPT, vocab_size=8192, d_model=384, n_heads=6, n_encoder_layers=6, n_decoder_layers=6,
        d_ff=1024, max_seq_len=256, dropout=0.1,
    ),
}


# torch's own names are accepted for --dtype too.
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def canonical_dtype(name: str) -> str:
    """`bfloat16` -> `bf16` (and the like); other names as given."""
    return DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
