"""A checkpoint's anatomy: config, parameter counts, size and dtype on disk, memory estimates, training state, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tformer.checkpoint import (
    DTYPE_BYTES,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    Checkpoint,
    stored_dtypes,
    weight_files,
)
from tformer.config import ModelConfig
from tformer.data.tokenizer import is_byte_level
from tformer.model.attention import MultiHeadAttention
from tformer.model.layers import Embedding, FeedForward
from tformer.model.transformer import MLMHead

COMPONENTS = ("embeddings", "attention", "feed-forward", "norms", "output head")
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# == anatomy ====================================================================================

def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component (COMPONENTS, plus "other" if any) and "total"; a tied matrix counts once.

    A parameter belongs to the outermost module of a known kind that holds it, so the norm inside
    BERT's masked-LM head counts as output head, and a layer's norms as norms.
    """
    owners: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Embedding):
            owners[name] = "embeddings"
        elif isinstance(module, MultiHeadAttention):
            owners[name] = "attention"
        elif isinstance(module, FeedForward):
            owners[name] = "feed-forward"
        elif isinstance(module, MLMHead) or name == "lm_head":
            owners[name] = "output head"
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            owners[name] = "norms"
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # shared tensors are listed once
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        kind = next((owners[q] for q in prefixes if q in owners), "other")
        counts[kind] = counts.get(kind, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


def memory_estimate(cfg: ModelConfig, n_params: int, bytes_per_param: int, batch: int, context: int,
                    activation_bytes: int = 4) -> dict[str, Any]:
    """Bytes needed to run (inference) and to train the model on `batch` sequences of `context` tokens.

    inference = weights (n_params x bytes_per_param)
              + KV cache 2 x decoder layers x B x T x n_kv_heads x head_dim x bytes_per_param
                (x 2 for an encoder-decoder: the cross-attention keys/values of a source of T tokens)
              + one layer's activations B x T x (4 d_model + d_ff) x bytes_per_param (d_ff twice for SwiGLU)
              + logits B x T x vocab x 4
    training  = 16 bytes per parameter (fp32 weights 4 + gradients 4 + AdamW moments 8)
              + activations kept for the backward pass, per layer B x T x (18 d_model + 4 d_ff) bytes at
                16 bits (Korthikanti et al., 2022, with fused attention, which keeps no T x T scores;
                d_ff twice for SwiGLU; a cross-attention adds 13 d_model), x activation_bytes / 2
              + logits and their gradient 2 x B x T x vocab x 4
    These are estimates: allocator overhead, the CUDA context and temporary buffers come on top.
    """
    B, T, d = batch, context, cfg.d_model
    ffn = cfg.d_ff * (2 if cfg.activation == "swiglu" else 1)
    dec = cfg.n_decoder_layers if cfg.has_decoder else 0
    enc = cfg.n_encoder_layers if cfg.has_encoder else 0
    cross = dec if cfg.arch == "encoder-decoder" else 0
    kv_width = cfg.n_kv_heads * cfg.head_dim
    logits = B * T * cfg.vocab_size * 4
    inference = {
        "weights": n_params * bytes_per_param,
        "kv_cache": 2 * (dec + cross) * B * T * kv_width * bytes_per_param,
        "activations": B * T * (4 * d + ffn) * bytes_per_param,
        "logits": logits,
    }
    training = {
        "weights_gradients_optimizer": 16 * n_params,
        "activations": B * T * ((enc + dec) * (18 * d + 4 * ffn) + cross * 13 * d) * activation_bytes // 2,
        "logits": 2 * logits,
    }
    return {
        "batch": B, "context": T, "bytes_per_param": bytes_per_param, "activation_bytes": activation_bytes,
        "inference": {**inference, "total": sum(inference.values())},
        "training": {**training, "total": sum(training.values())},
        "inference_formula": "weights N·p + KV cache 2·layers·B·T·kv_heads·head_dim·p + one layer "
                             "B·T·(4·d_model + d_ff)·p + logits B·T·vocab·4  (p = bytes per parameter)",
        "training_formula": "16·N (fp32 weights, grads, AdamW m and v) + activations "
                            "layers·B·T·(18·d_model + 4·d_ff)·a/2 (fused attention, Korthikanti et al. 2022; "
                            "a = activation bytes) + logits 2·B·T·vocab·4",
    }


def training_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """What `tformer train` saved beside the weights (trainer_state.json and config.json's "train"), or None."""
    state_path = ckpt.path / TRAINER_STATE_FILE
    train = ckpt.extra.get("train")
    if not state_path.is_file() and not isinstance(train, dict):
        return None
    out: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            state = {}
            out["error"] = f"{TRAINER_STATE_FILE} is unreadable: {e}"
        for key in ("step", "total_steps", "tokens_seen", "best_val_loss", "val_loss", "train_loss", "lr",
                    "elapsed"):
            out[key] = state.get(key) if isinstance(state, dict) else None
    if isinstance(train, dict):
        out["train_config"] = {k: train.get(k) for k in ("batch_size", "grad_accum", "context", "steps", "lr",
                                                         "schedule", "dtype", "device")}
    optimizer = ckpt.path / OPTIMIZER_FILE
    out["optimizer_bytes"] = optimizer.stat().st_size if optimizer.is_file() else None
    return out


def _tokenizer_json(tok: Any) -> dict[str, Any]:
    return json.loads(tok.to_str())


def tokenizer_kind(doc: dict[str, Any]) -> str:
    """bpe (byte-level BPE), byte, char, or the tokenizers model type for other tokenizers."""
    model = doc.get("model") or {}
    kind = str(model.get("type", "unknown"))
    if kind != "BPE":
        return kind.lower()
    if not model.get("merges"):
        return "byte" if is_byte_level(doc) else "char"
    return "bpe" if is_byte_level(doc) else "bpe (not byte-level)"


def tokenizer_info(ckpt: Checkpoint) -> dict[str, Any] | None:
    """Kind, vocabulary size and special tokens of the checkpoint's tokenizer.json, or None without one."""
    from tformer.data.tokenizer import load_tokenizer, special_ids

    if ckpt.tokenizer_path is None:
        return None
    tok = load_tokenizer(ckpt.tokenizer_path)
    data = ckpt.extra.get("data") if isinstance(ckpt.extra.get("data"), dict) else {}
    kind = data.get("kind") if data.get("kind") in ("bpe", "char", "byte") else tokenizer_kind(_tokenizer_json(tok))
    specials = {role: {"id": i, "token": tok.id_to_token(i)}
                for role, i in special_ids(tok).to_dict().items() if i is not None}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return {"kind": kind, "vocab_size": vocab, "special": specials, "file": str(ckpt.tokenizer_path),
            "matches_model": vocab <= ckpt.config.vocab_size}


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def anatomy(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything about a checkpoint that needs no input text, as JSON-ready values."""
    cfg = ckpt.config
    counts = parameter_counts(ckpt.model)
    files = weight_files(ckpt.path)
    dtypes = stored_dtypes(files)
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else "F32"
    train = training_state(ckpt)
    train_cfg = (train or {}).get("train_config") or {}
    if isinstance(train_cfg.get("batch_size"), int) and isinstance(train_cfg.get("context"), int):
        batch, context, assumed = train_cfg["batch_size"], train_cfg["context"], None
    else:
        batch, context = 1, cfg.max_seq_len
        assumed = "batch 1 and max_seq_len (the checkpoint has no tformer training config)"
    activation_bytes = 2 if train_cfg.get("dtype") in ("bf16", "fp16") else 4
    memory = memory_estimate(cfg, counts["total"], DTYPE_BYTES.get(main_dtype, 4), batch, context,
                             activation_bytes)
    memory["assumed"] = assumed
    return {
        "checkpoint": str(ckpt.path),
        "source": ckpt.source,
        "arch": cfg.arch,
        "config": {**cfg.to_dict(), "head_dim": cfg.head_dim},
        "parameters": counts,
        "tied_embeddings": cfg.tie_embeddings,
        "size": {
            "weights_bytes": sum(p.stat().st_size for p in files),
            "directory_bytes": _dir_bytes(ckpt.path),
            "dtype": _DTYPE_NAMES.get(main_dtype, main_dtype.lower()),
            "bytes_by_dtype": {_DTYPE_NAMES.get(k, k.lower()): v for k, v in dtypes.items()},
        },
        "memory": memory,
        "training": train,
        "tokenizer": tokenizer_info(ckpt),
    }
