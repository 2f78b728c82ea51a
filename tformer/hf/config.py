"""Hugging Face `config.json` <-> ModelConfig, for the model types tformer represents exactly.

Every value is checked by type and range before any tensor is read: a size is a bounded integer
(not a bool, not a float), a flag a bool. An unknown model_type, or an option that would change
the computation in a way tformer cannot reproduce, is one line naming it and what is supported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tformer.config import ModelConfig
from tformer.errors import ConfigError, UnsupportedModelError

SUPPORTED_TYPES = ("gpt2", "llama", "mistral", "qwen2", "bert", "bart")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# Bounds that no real model reaches; they keep a malformed file from allocating absurd tensors.
MAX_DIM = 1 << 17  # hidden and feed-forward sizes
MAX_VOCAB = 1 << 22
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 20

# transformers' activation names -> ours
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = object()


class _Reader:
    """Typed, bounded access to one config.json's values; errors name the file and the key."""

    def __init__(self, hf: dict[str, Any], where: Path | str):
        self.hf, self.where = hf, where

    def fail(self, message: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.where}: {message}")

    def get(self, key: str, default: Any) -> Any:
        value = self.hf.get(key, default)
        if value is _REQUIRED:
            raise self.fail(f"{self.hf.get('model_type')} config lacks {key!r}")
        return value

    def int(self, key: str, default: Any = _REQUIRED, low: int = 1, high: int = MAX_DIM) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(f"{key}={value!r} must be an integer in {low}..{high}")
        return value

    def num(self, key: str, default: Any = _REQUIRED, low: float = 0.0, high: float = math.inf) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(f"{key}={value!r} must be a number in [{low}, {high}]")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key}={value!r} must be true or false")
        return value

    def require(self, key: str, allowed: tuple[Any, ...], default: Any) -> Any:
        """A value that must be one of `allowed` (others change the computation: unsupported)."""
        value = self.get(key, default)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise self.fail(f"{key}={value!r} is not supported (supported: {shown})")
        return value


def config_from_hf(hf: Any, where: Path | str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers config.json dict of a supported model_type."""
    if not isinstance(hf, dict):
        raise UnsupportedModelError(f"{where} must hold a JSON object")
    kind = hf.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type={kind!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    r = _Reader(hf, where)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            raise r.fail(f"{key}={hf[key]!r}: mixture-of-experts layers are not supported")
    values = {"gpt2": _gpt2, "bert": _bert, "bart": _bart}.get(kind, _llama)(r)
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise r.fail(str(e)) from None


def _gpt2(r: _Reader) -> dict[str, Any]:
    """GPT-2 (Radford et al., 2019): pre-norm, learned positions, fused Conv1D projections."""
    for flag, fine in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                       ("scale_attn_weights", True), ("reorder_and_upcast_attn", False)):
        r.require(flag, (fine,), fine)
    activation = r.require("activation_function", tuple(_ACTIVATIONS), "gelu_new")
    d_model = r.int("n_embd")
    return dict(
        arch="decoder", vocab_size=r.int("vocab_size", high=MAX_VOCAB), d_model=d_model,
        n_heads=r.int("n_head", high=MAX_LAYERS), n_encoder_layers=0,
        n_decoder_layers=r.int("n_layer", high=MAX_LAYERS),
        d_ff=r.int("n_inner", None) if r.hf.get("n_inner") is not None else 4 * d_model,
        dropout=r.num("resid_pdrop", 0.1, high=0.99), max_seq_len=r.int("n_positions", high=MAX_POSITIONS),
        pos_encoding="learned", norm_placement="pre", norm="layernorm",
        norm_eps=r.num("layer_norm_epsilon", 1e-5, high=1.0), activation=_ACTIVATIONS[activation], bias=True,
        tie_embeddings=r.bool("tie_word_embeddings", True), scale_embeddings=False, init="gpt2",
    )


def _llama(r: _Reader) -> dict[str, Any]:
    """Llama, Mistral and Qwen2: pre-RMSNorm, RoPE, SwiGLU, grouped-query attention."""
    kind = r.hf["model_type"]
    r.require("hidden_act", ("silu",), "silu")
    d_model = r.int("hidden_size")
    n_heads = r.int("num_attention_heads", high=MAX_LAYERS)
    max_seq_len = r.int("max_position_embeddings", high=MAX_POSITIONS)
    if d_model % n_heads:
        raise r.fail(f"hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    head_dim = r.hf.get("head_dim")
    if head_dim is not None and r.int("head_dim") != d_model // n_heads:
        raise r.fail(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                     f"{d_model // n_heads}; only head_dim = hidden_size / num_attention_heads is supported")
    if r.hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise r.fail(f"partial_rotary_factor={r.hf['partial_rotary_factor']!r} is not supported (supported: 1.0)")
    _check_no_sliding_window(r, kind, max_seq_len)
    rope_base, rope_scaling = _rope(r)
    qkv_bias = out_bias = r.bool("attention_bias", False) if kind == "llama" else False
    if kind == "qwen2":
        qkv_bias = True  # Qwen2's q/k/v projections have biases, its output projection none
    return dict(
        arch="decoder", vocab_size=r.int("vocab_size", high=MAX_VOCAB), d_model=d_model, n_heads=n_heads,
        n_kv_heads=r.int("num_key_value_heads", n_heads, high=n_heads), n_encoder_layers=0,
        n_decoder_layers=r.int("num_hidden_layers", high=MAX_LAYERS), d_ff=r.int("intermediate_size"),
        dropout=0.0, max_seq_len=max_seq_len, pos_encoding="rope", rope_base=rope_base, rope_scaling=rope_scaling,
        norm_placement="pre", norm="rmsnorm", norm_eps=r.num("rms_norm_eps", 1e-6, high=1.0), activation="swiglu",
        bias=False, qkv_bias=qkv_bias or None, out_bias=out_bias or None,
        mlp_bias=(r.bool("mlp_bias", False) if kind == "llama" else False) or None,
        tie_embeddings=r.bool("tie_word_embeddings", False), scale_embeddings=False, init="gpt2",
    )


def _check_no_sliding_window(r: _Reader, kind: str, max_seq_len: int) -> None:
    """A sliding window narrower than the context changes attention; one as wide as it changes nothing."""
    window = r.hf.get("sliding_window")
    active = window is not None and (kind != "qwen2" or r.bool("use_sliding_window", False))
    if active and r.int("sliding_window", high=MAX_POSITIONS) < max_seq_len:
        raise r.fail(f"sliding_window={window} < max_position_embeddings={max_seq_len}: sliding-window attention "
                     "is not supported (supported: full attention, sliding_window null or >= the context)")
    layer_types = r.hf.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or set(layer_types) - {"full_attention"}):
        if active or not isinstance(layer_types, list):
            raise r.fail(f"layer_types={layer_types!r} is not supported (supported: all 'full_attention')")


def _rope(r: _Reader) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the frequency scaling, from transformers 5's rope_parameters or 4's rope_theta/rope_scaling."""
    params = r.hf.get("rope_parameters") or {}
    legacy = r.hf.get("rope_scaling")
    if not isinstance(params, dict) or not isinstance(legacy or {}, dict):
        raise r.fail("rope_parameters / rope_scaling must be JSON objects")
    scaling = _Reader({"model_type": r.hf["model_type"], **params, **(legacy or {})}, r.where)
    theta = scaling.num("rope_theta", r.hf.get("rope_theta", 10000.0), low=1e-6)
    kind = scaling.require("rope_type", _ROPE_TYPES, scaling.hf.get("type", "default"))
    if kind == "default":
        return theta, None
    factor = scaling.num("factor", low=1e-6)
    if kind == "linear":
        return theta, {"type": "linear", "factor": factor}
    return theta, {
        "type": "llama3", "factor": factor, "low_freq_factor": scaling.num("low_freq_factor", low=1e-6),
        "high_freq_factor": scaling.num("high_freq_factor", low=1e-6),
        "original_max_seq_len": scaling.int("original_max_position_embeddings", high=MAX_POSITIONS),
    }


def _bert(r: _Reader) -> dict[str, Any]:
    """BERT (Devlin et al., 2019) with its masked-LM head: post-norm, learned + token-type embeddings."""
    r.require("position_embedding_type", ("absolute",), "absolute")
    r.require("is_decoder", (False,), False)
    r.require("add_cross_attention", (False,), False)
    r.require("hidden_act", ("gelu",), "gelu")  # the MLM head's transform uses it too
    return dict(
        arch="encoder", vocab_size=r.int("vocab_size", high=MAX_VOCAB), d_model=r.int("hidden_size"),
        n_heads=r.int("num_attention_heads", high=MAX_LAYERS), n_encoder_layers=r.int("num_hidden_layers", high=MAX_LAYERS),
        n_decoder_layers=0, d_ff=r.int("intermediate_size"), dropout=r.num("hidden_dropout_prob", 0.1, high=0.99),
        max_seq_len=r.int("max_position_embeddings", high=MAX_POSITIONS), pos_encoding="learned",
        norm_placement="post", norm="layernorm", norm_eps=r.num("layer_norm_eps", 1e-12, high=1.0),
        activation="gelu", bias=True, tie_embeddings=r.bool("tie_word_embeddings", True), scale_embeddings=False,
        init="gpt2", type_vocab_size=r.int("type_vocab_size", 2, low=0, high=MAX_LAYERS), embed_norm=True,
    )


BART_POS_OFFSET = 2  # BART's learned position table starts two rows in (a fairseq legacy)


def _bart(r: _Reader) -> dict[str, Any]:
    """BART (Lewis et al., 2020): post-norm encoder-decoder with learned positions and an embedding norm."""
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if r.int(enc) != r.int(dec):
            raise r.fail(f"{enc}={r.hf[enc]} differs from {dec}={r.hf[dec]}; only equal values are supported")
    for flag in ("normalize_before", "add_final_layer_norm", "normalize_embedding"):
        if flag in r.hf:  # mBART-style options that transformers' BART ignores
            r.require(flag, (False,) if flag != "normalize_embedding" else (True,), None)
    activation = r.require("activation_function", tuple(_ACTIVATIONS), "gelu")
    r.require("tie_word_embeddings", (True,), True)  # tformer ties the source, target and output embeddings
    return dict(
        arch="encoder-decoder", vocab_size=r.int("vocab_size", high=MAX_VOCAB), d_model=r.int("d_model"),
        n_heads=r.int("encoder_attention_heads", high=MAX_LAYERS),
        n_encoder_layers=r.int("encoder_layers", high=MAX_LAYERS), n_decoder_layers=r.int("decoder_layers", high=MAX_LAYERS),
        d_ff=r.int("encoder_ffn_dim"), dropout=r.num("dropout", 0.1, high=0.99),
        max_seq_len=r.int("max_position_embeddings", high=MAX_POSITIONS), pos_encoding="learned",
        norm_placement="post", norm="layernorm", norm_eps=1e-5, activation=_ACTIVATIONS[activation], bias=True,
        tie_embeddings=True, scale_embeddings=r.bool("scale_embedding", False), init="gpt2", embed_norm=True,
        pos_offset=BART_POS_OFFSET, tie_positions=False,
    )


GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                   "forced_bos_token_id", "forced_eos_token_id")


def generation_ids(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The special ids that drive generation: config.json's, overridden by generation_config.json's
    (as transformers reads them). eos_token_id may be a list."""
    merged = {k: hf.get(k) for k in GENERATION_KEYS}
    merged.update({k: v for k, v in (generation or {}).items() if k in GENERATION_KEYS and v is not None})
    clean: dict[str, Any] = {}
    for key, value in merged.items():
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
        clean[key] = value if ok else None
    return clean
