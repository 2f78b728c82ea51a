"""Tensor names of Hugging Face models <-> tformer's, both ways.

Each model type is a list of rules `(ours, hf_names, transposed)`: our tensor is the listed HF
tensors concatenated along dim 0 (one name: a rename; three: a fused q/k/v projection; two: a
fused cross-attention k/v), transposed for GPT-2's Conv1D, which stores (in, out). Export runs
the same rules backwards, splitting fused tensors at the query/key/value sizes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from tformer.config import ModelConfig
from tformer.errors import CheckpointError, UnsupportedModelError

Rule = tuple[str, tuple[str, ...], bool]

# HF tensors that are not weights (derived buffers), or that repeat a tied matrix, or belong to
# heads tformer has no use for (BERT's pooler and next-sentence head); skipped on import.
_SKIP = {
    "gpt2": r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
    "llama": r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq",
    "bert": r"bert\.pooler\..*|cls\.seq_relationship\..*|bert\.embeddings\.position_ids|cls\.predictions\.decoder\.bias",
    "bart": r"model\.(encoder|decoder)\.embed_tokens\.weight",
}
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert.", "bart": "model."}
_HEADS = {"gpt2": ("lm_head.",), "llama": ("lm_head.",), "bert": ("cls.",), "bart": ("lm_head.", "final_logits_bias")}


def family(model_type: str) -> str:
    """The naming scheme of a model type: Mistral and Qwen2 name their tensors as Llama does."""
    return "llama" if model_type in ("llama", "mistral", "qwen2") else model_type


def _pairs(ours: str, hf: str, names: Iterable[str] = ("weight", "bias")) -> list[Rule]:
    return [(f"{ours}.{n}", (f"{hf}.{n}",), False) for n in names]


def _fused(ours: str, hf: Iterable[str]) -> list[Rule]:
    return [(f"{ours}.{n}", tuple(f"{h}.{n}" for h in hf), False) for n in ("weight", "bias")]


def rules(model_type: str, cfg: ModelConfig) -> list[Rule]:
    """Every rule of this model type for this config; rules whose tensor the model lacks (a bias it
    does not have, the untied head) are dropped by the caller against the model's state dict."""
    kind = family(model_type)
    out: list[Rule] = []
    if kind == "gpt2":
        out += [("embed.tok.weight", ("transformer.wte.weight",), False),
                ("embed.pos.weight", ("transformer.wpe.weight",), False)]
        for i in range(cfg.n_decoder_layers):
            L, H = f"decoder.layers.{i}", f"transformer.h.{i}"
            out += _pairs(f"{L}.self_attn_norm", f"{H}.ln_1") + _pairs(f"{L}.ffn_norm", f"{H}.ln_2")
            for ours, hf in (("self_attn.qkv_proj", "attn.c_attn"), ("self_attn.out_proj", "attn.c_proj"),
                             ("ffn.w1", "mlp.c_fc"), ("ffn.w2", "mlp.c_proj")):
                out += [(f"{L}.{ours}.weight", (f"{H}.{hf}.weight",), True),
                        (f"{L}.{ours}.bias", (f"{H}.{hf}.bias",), False)]
        out += _pairs("decoder.final_norm", "transformer.ln_f")
    elif kind == "llama":
        out.append(("embed.tok.weight", ("model.embed_tokens.weight",), False))
        for i in range(cfg.n_decoder_layers):
            L, H = f"decoder.layers.{i}", f"model.layers.{i}"
            out += _pairs(f"{L}.self_attn_norm", f"{H}.input_layernorm", ("weight",))
            out += _pairs(f"{L}.ffn_norm", f"{H}.post_attention_layernorm", ("weight",))
            out += _fused(f"{L}.self_attn.qkv_proj", [f"{H}.self_attn.{p}_proj" for p in "qkv"])
            out += _pairs(f"{L}.self_attn.out_proj", f"{H}.self_attn.o_proj")
            out += _pairs(f"{L}.ffn.w1", f"{H}.mlp.gate_proj") + _pairs(f"{L}.ffn.w3", f"{H}.mlp.up_proj")
            out += _pairs(f"{L}.ffn.w2", f"{H}.mlp.down_proj")
        out += _pairs("decoder.final_norm", "model.norm", ("weight",))
    elif kind == "bert":
        E = "bert.embeddings"
        out += [("embed.tok.weight", (f"{E}.word_embeddings.weight",), False),
                ("embed.pos.weight", (f"{E}.position_embeddings.weight",), False),
                ("embed.token_type.weight", (f"{E}.token_type_embeddings.weight",), False)]
        out += _pairs("embed.norm", f"{E}.LayerNorm")
        for i in range(cfg.n_encoder_layers):
            L, H = f"encoder.layers.{i}", f"bert.encoder.layer.{i}"
            out += _fused(f"{L}.self_attn.qkv_proj", [f"{H}.attention.self.{p}" for p in ("query", "key", "value")])
            out += _pairs(f"{L}.self_attn.out_proj", f"{H}.attention.output.dense")
            out += _pairs(f"{L}.self_attn_norm", f"{H}.attention.output.LayerNorm")
            out += _pairs(f"{L}.ffn.w1", f"{H}.intermediate.dense") + _pairs(f"{L}.ffn.w2", f"{H}.output.dense")
            out += _pairs(f"{L}.ffn_norm", f"{H}.output.LayerNorm")
        out += _pairs("mlm_head.dense", "cls.predictions.transform.dense")
        out += _pairs("mlm_head.norm", "cls.predictions.transform.LayerNorm")
        out += [("mlm_head.bias", ("cls.predictions.bias",), False),
                ("lm_head.weight", ("cls.predictions.decoder.weight",), False)]
        return out
    elif kind == "bart":
        out.append(("embed.tok.weight", ("model.shared.weight",), False))
        for ours, side in (("embed", "decoder"), ("src_embed", "encoder")):
            out.append((f"{ours}.pos.weight", (f"model.{side}.embed_positions.weight",), False))
            out += _pairs(f"{ours}.norm", f"model.{side}.layernorm_embedding")
        for side, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
            for i in range(n):
                L, H = f"{side}.layers.{i}", f"model.{side}.layers.{i}"
                out += _fused(f"{L}.self_attn.qkv_proj", [f"{H}.self_attn.{p}_proj" for p in "qkv"])
                out += _pairs(f"{L}.self_attn.out_proj", f"{H}.self_attn.out_proj")
                out += _pairs(f"{L}.self_attn_norm", f"{H}.self_attn_layer_norm")
                if side == "decoder":
                    out += _pairs(f"{L}.cross_attn.q_proj", f"{H}.encoder_attn.q_proj")
                    out += _fused(f"{L}.cross_attn.kv_proj", [f"{H}.encoder_attn.{p}_proj" for p in "kv"])
                    out += _pairs(f"{L}.cross_attn.out_proj", f"{H}.encoder_attn.out_proj")
                    out += _pairs(f"{L}.cross_attn_norm", f"{H}.encoder_attn_layer_norm")
                out += _pairs(f"{L}.ffn.w1", f"{H}.fc1") + _pairs(f"{L}.ffn.w2", f"{H}.fc2")
                out += _pairs(f"{L}.ffn_norm", f"{H}.final_layer_norm")
        return out
    else:
        raise UnsupportedModelError(f"no tensor names for model_type={model_type!r}")
    out.append(("lm_head.weight", ("lm_head.weight",), False))
    return out


def _normalise(kind: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Names as the *LMHeadModel / *ForMaskedLM / *ForConditionalGeneration classes save them:
    the base-model prefix added where a file omits it, BERT's old gamma/beta as weight/bias."""
    prefix, heads = _PREFIX[kind], _HEADS[kind]
    out = {}
    for name, tensor in tensors.items():
        if not name.startswith(prefix) and not name.startswith(heads):
            name = prefix + name
        if kind == "bert":
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        out[name] = tensor
    if kind == "bert" and "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
    if kind == "bart" and "model.shared.weight" not in out:
        for side in ("decoder", "encoder"):  # a file that stores only the copies of the shared matrix
            if f"model.{side}.embed_tokens.weight" in out:
                out["model.shared.weight"] = out[f"model.{side}.embed_tokens.weight"]
                break
    return out


def state_from_hf(
    model_type: str, tensors: dict[str, Tensor], cfg: ModelConfig, expected: Iterable[str], where: str
) -> dict[str, Tensor]:
    """A transformers state dict renamed (fused, transposed) into tformer's names.

    `expected` are the model's own tensor names. A missing HF tensor is named in HF terms; an HF
    tensor that no rule uses and that is not known to be redundant is reported as unexpected.
    """
    kind = family(model_type)
    hf = _normalise(kind, tensors)
    expected = set(expected)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for ours, names, transposed in rules(model_type, cfg):
        if ours not in expected:
            continue
        absent = [n for n in names if n not in hf]
        if absent:
            missing += absent
            continue
        parts = [hf[n] for n in names]
        used.update(names)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        state[ours] = tensor.t().contiguous() if transposed else tensor
    skip = re.compile(_SKIP[kind])
    unexpected = []
    for name in hf.keys() - used:
        if skip.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if kind == "bert" and name == "cls.predictions.decoder.weight" and cfg.tie_embeddings:
            continue
        if kind == "bart" and name == "final_logits_bias":
            if hf[name].count_nonzero().item():
                raise UnsupportedModelError(f"{where}: a non-zero final_logits_bias is not supported")
            continue
        unexpected.append(name)
    if missing or unexpected:
        problems = ([f"missing tensor(s) {_names(missing)}"] if missing else []) + (
            [f"unexpected tensor(s) {_names(sorted(unexpected))}"] if unexpected else [])
        raise CheckpointError(f"{where} does not match its config.json: " + "; ".join(problems))
    return state


def state_to_hf(model_type: str, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """tformer's state dict under the names (and layouts) of the transformers class for `model_type`."""
    kind = family(model_type)
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out: dict[str, Tensor] = {}
    for ours, names, transposed in rules(model_type, cfg):
        if ours not in state:
            continue
        tensor = state[ours]
        if transposed:
            tensor = tensor.t()
        sizes = {1: [tensor.size(0)], 2: [kv_dim, kv_dim], 3: [q_dim, kv_dim, kv_dim]}[len(names)]
        for name, part in zip(names, tensor.split(sizes, dim=0)):
            out[name] = part.contiguous().clone()
    if kind == "bert" and "embed.token_type.weight" not in state:
        # BERT always adds a token-type row; a zero row for type 0 adds nothing.
        out["bert.embeddings.token_type_embeddings.weight"] = state["embed.tok.weight"].new_zeros(1, cfg.d_model)
    if kind == "bart":
        out["final_logits_bias"] = state["embed.tok.weight"].new_zeros(1, cfg.vocab_size)
        for ours, side in (("embed", "decoder"), ("src_embed", "encoder")):
            if f"{ours}.pos.weight" not in state:  # tie_positions: the encoder uses the decoder's
                out[f"model.{side}.embed_positions.weight"] = out["model.decoder.embed_positions.weight"].clone()
                for n in ("weight", "bias"):
                    out[f"model.{side}.layernorm_embedding.{n}"] = out[f"model.decoder.layernorm_embedding.{n}"].clone()
        if cfg.pos_offset == 0:  # BART reads row p + 2; two unused rows in front keep the positions
            for side in ("encoder", "decoder"):
                name = f"model.{side}.embed_positions.weight"
                out[name] = torch.cat([out[name].new_zeros(2, cfg.d_model), out[name]])
    return out


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
