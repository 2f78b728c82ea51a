"""`tformer export`: a checkpoint as a Hugging Face directory that `transformers` loads with the same logits.

A shape is exported only where a transformers class computes exactly the same function:

| tformer shape                                            | transformers class            |
|----------------------------------------------------------|-------------------------------|
| decoder, pre-LayerNorm, learned positions, biases         | GPT2LMHeadModel               |
| decoder, pre-RMSNorm, RoPE, SwiGLU (any biases)          | LlamaForCausalLM              |
| the same, imported from a Qwen2 directory                 | Qwen2ForCausalLM              |
| encoder, post-LayerNorm, learned positions, embedding norm| BertForMaskedLM               |
| encoder-decoder, as BERT, tied embeddings                 | BartForConditionalGeneration  |

Anything else (e.g. the paper's post-norm sinusoidal model) is one line naming the fields that
have no equivalent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tformer.config import ModelConfig
from tformer.errors import TformerError, UnsupportedModelError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "bert": "BertForMaskedLM", "bart": "BartForConditionalGeneration"}
_GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_ALL_BIASES = {"bias": (True,), "qkv_bias": (None, True), "out_bias": (None, True), "mlp_bias": (None, True)}
# field -> allowed values, per target; the checks that involve two fields are in `_mismatches`.
_SHAPES: dict[str, dict[str, tuple[Any, ...]]] = {
    "gpt2": dict(arch=("decoder",), pos_encoding=("learned",), norm_placement=("pre",), norm=("layernorm",),
                 activation=tuple(_GPT2_ACTIVATIONS), scale_embeddings=(False,), type_vocab_size=(0,),
                 embed_norm=(False,), pos_offset=(0,), **_ALL_BIASES),
    "llama": dict(arch=("decoder",), pos_encoding=("rope",), norm_placement=("pre",), norm=("rmsnorm",),
                  activation=("swiglu",), scale_embeddings=(False,), type_vocab_size=(0,), embed_norm=(False,)),
    "bert": dict(arch=("encoder",), pos_encoding=("learned",), norm_placement=("post",), norm=("layernorm",),
                 activation=("gelu",), scale_embeddings=(False,), embed_norm=(True,), pos_offset=(0,), **_ALL_BIASES),
    "bart": dict(arch=("encoder-decoder",), pos_encoding=("learned",), norm_placement=("post",), norm=("layernorm",),
                 activation=tuple(_GPT2_ACTIVATIONS), embed_norm=(True,), pos_offset=(0, 2), tie_embeddings=(True,),
                 type_vocab_size=(0,), norm_eps=(1e-5,), **_ALL_BIASES),
}


def _mismatches(cfg: ModelConfig, target: str) -> list[str]:
    problems = [f"{field}={getattr(cfg, field)!r} (needs {' or '.join(repr(v) for v in allowed)})"
                for field, allowed in _SHAPES[target].items() if getattr(cfg, field) not in allowed]
    if target != "llama" and cfg.n_kv_heads != cfg.n_heads:
        problems.append(f"n_kv_heads={cfg.n_kv_heads} (needs n_heads={cfg.n_heads})")
    return problems


def export_target(cfg: ModelConfig, prefer: str | None = None) -> str:
    """The transformers model type that computes what `cfg` does ("gpt2", "llama", "qwen2", "bert", "bart").

    Llama's attention_bias covers q, k, v and o together; a model with only some of them is written
    with zero biases for the others. Qwen2's shape (q/k/v biases alone) goes back to Qwen2 only when
    it came from there (`prefer`): transformers 5 gives every qwen2 directory Qwen's own tokenizer
    class, which re-splits a tokenizer.json trained elsewhere.
    """
    candidates = [t for t in _SHAPES if cfg.arch in _SHAPES[t]["arch"]]
    for target in candidates:
        if not _mismatches(cfg, target):
            qwen2_shape = cfg.bias_of("qkv") and not cfg.bias_of("out") and not cfg.bias_of("mlp")
            if target == "llama" and prefer == "qwen2" and qwen2_shape:
                return "qwen2"
            return target
    closest = min(candidates, key=lambda t: len(_mismatches(cfg, t)))
    raise UnsupportedModelError(
        f"this {cfg.arch} has no Hugging Face equivalent; the closest, {ARCHITECTURES[closest]}, needs: "
        + "; ".join(_mismatches(cfg, closest))
    )


def hf_config(cfg: ModelConfig, target: str, specials: dict[str, int | None]) -> dict[str, Any]:
    """config.json for the transformers class of `target`."""
    ids = {f"{role}_token_id": specials.get(role) for role in ("bos", "eos", "pad")}
    common = {"architectures": [ARCHITECTURES[target]], "model_type": target, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32", **ids}
    if target == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_decoder_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": _GPT2_ACTIVATIONS[cfg.activation], "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    if target in ("llama", "qwen2"):
        out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
               "num_hidden_layers": cfg.n_decoder_layers, "num_attention_heads": cfg.n_heads,
               "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
               "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
               "attention_dropout": 0.0}
        if target == "llama":
            out.update(attention_bias=cfg.bias_of("qkv") or cfg.bias_of("out"), mlp_bias=cfg.bias_of("mlp"))
        else:
            out.update(use_sliding_window=False, sliding_window=None)
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            out["rope_scaling"] = {"rope_type": s["type"], "factor": s["factor"]} if s["type"] == "linear" else {
                "rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                "high_freq_factor": s["high_freq_factor"], "original_max_position_embeddings": s["original_max_seq_len"]}
        return out
    if target == "bert":
        return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_encoder_layers,
                "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
                "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size or 1,
                "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute"}
    return {**common, "d_model": cfg.d_model, "encoder_layers": cfg.n_encoder_layers,
            "decoder_layers": cfg.n_decoder_layers, "encoder_attention_heads": cfg.n_heads,
            "decoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len, "activation_function": _GPT2_ACTIVATIONS[cfg.activation],
            "scale_embedding": cfg.scale_embeddings, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
            "activation_dropout": cfg.dropout, "is_encoder_decoder": True,
            # tformer starts the decoder's output with <bos> (generate.py)
            "decoder_start_token_id": specials.get("bos"), "forced_eos_token_id": specials.get("eos")}


def generation_config(cfg: ModelConfig, target: str, specials: dict[str, int | None],
                      source: dict[str, Any] | None = None) -> dict[str, Any]:
    """generation_config.json: the special ids (an imported model keeps its own), greedy by default."""
    out = {f"{role}_token_id": specials.get(role) for role in ("bos", "eos", "pad")}
    if target == "bart":
        out.update(decoder_start_token_id=specials.get("bos"), forced_eos_token_id=specials.get("eos"))
    out.update({k: v for k, v in (source or {}).items() if v is not None})
    return {k: v for k, v in out.items() if v is not None}


def _zero_attention_biases(tensors: dict, cfg: ModelConfig) -> None:
    """Llama's q/k/v/o biases come together: the ones this model lacks are zeros (adding nothing)."""
    sizes = {"q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim,
             "v": cfg.n_kv_heads * cfg.head_dim, "o": cfg.d_model}
    like = tensors["model.embed_tokens.weight"]
    for i in range(cfg.n_decoder_layers):
        for p, size in sizes.items():
            tensors.setdefault(f"model.layers.{i}.self_attn.{p}_proj.bias", like.new_zeros(size))


def _tokenizer_files(tokenizer_json: Path, out: Path, source_dir: Path, max_len: int) -> dict[str, int | None]:
    """Copy tokenizer.json; write tokenizer_config.json (the source's, when it has one) and
    special_tokens_map.json; return the special ids."""
    from tokenizers import Tokenizer

    from tformer.data.tokenizer import special_ids

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = special_ids(tok).to_dict()
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    names = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items() if i is not None}
    own = source_dir / "tokenizer_config.json"
    config = json.loads(own.read_text(encoding="utf-8")) if own.is_file() else {}
    if not isinstance(config, dict) or config.get("format") == "tformer":
        config = {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": max_len, **names, **config}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False), encoding="utf-8")
    return ids


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write checkpoint `checkpoint` (any that load_checkpoint reads) as a Hugging Face directory `out`.

    Returns (out, the transformers class name). The directory is built beside `out` and renamed into
    place, so a failure leaves no half-written export.
    """
    from safetensors.torch import save_file

    from tformer.checkpoint import load_checkpoint, state_dict_for_saving
    from tformer.files import atomic_directory
    from tformer.hf.weights import state_to_hf

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise TformerError(f"--out '{out}' exists and is not an exported model directory; choose a new directory")
    ckpt = load_checkpoint(checkpoint)
    if out.resolve() == ckpt.path.resolve():
        raise TformerError(f"--out '{out}' is the checkpoint itself; choose another directory")
    cfg = ckpt.config
    target = export_target(cfg, prefer=ckpt.source.removeprefix("hf-"))  # before anything is written
    tensors = state_to_hf(target, state_dict_for_saving(ckpt.model), cfg)
    if target == "llama" and cfg.bias_of("qkv") != cfg.bias_of("out"):
        _zero_attention_biases(tensors, cfg)
    with atomic_directory(out) as tmp:
        specials: dict[str, int | None] = {}
        if ckpt.tokenizer_path is not None:
            specials = _tokenizer_files(ckpt.tokenizer_path, tmp, ckpt.path, cfg.max_seq_len)
        source_ids = (ckpt.extra.get("generation") or {}) if ckpt.source == f"hf-{target}" else {}
        specials = {**specials, **{k.removesuffix("_token_id"): v for k, v in source_ids.items()
                                   if k in ("bos_token_id", "eos_token_id", "pad_token_id") and isinstance(v, int)}}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, document in (("config.json", hf_config(cfg, target, specials)),
                               ("generation_config.json", generation_config(cfg, target, specials, source_ids))):
            (tmp / name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return out, ARCHITECTURES[target]
