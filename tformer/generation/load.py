"""Loading a checkpoint ready to generate from: model, tokenizer, device and dtype."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from tformer.checkpoint import (
    FORMAT,
    Checkpoint,
    load_checkpoint,
    read_config,
    resolve_checkpoint,
    stored_dtypes,
    weight_files,
)
from tformer.config import ModelConfig
from tformer.data.tokenizer import SpecialIds, check_fits, load_tokenizer, special_ids
from tformer.errors import TformerError
from tformer.generation.cpu_decoding import cpu_decoding_layout


@dataclass
class Loaded:
    """A checkpoint ready to generate from: the model on its device and dtype, and its tokenizer."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    specials: SpecialIds
    path: Path
    device: torch.device
    dtype: torch.dtype
    note: str | None = None  # how the checkpoint was chosen, when the user did not name it exactly
    extra_generation: dict | None = None  # a Hugging Face checkpoint's generation ids, as read


def load(checkpoint: str | Path | None = None, device: str = "auto", dtype: str = "auto",
         quantize: str | None = None) -> Loaded:
    """Load the checkpoint `checkpoint` names (see `resolve_checkpoint`) and its tokenizer.json.

    device "auto" picks CUDA, then MPS, then the CPU; dtype "auto" is bf16 on a GPU that has it
    (fp16 otherwise), fp32 on the CPU and MPS. quantize "int8" gives the linear layers (and a tied
    output projection) int8 weights, for decoding on the CPU; a checkpoint that `tformer export
    --quantize int8` wrote is loaded so whatever `quantize` says.
    """
    from tformer.device import resolve_device, resolve_precision
    from tformer.generation import quantize as q

    q.check_method(quantize)
    torch_device = resolve_device(device)
    path, note = resolve_checkpoint(checkpoint)
    config, source, extra = read_config(path) if path.is_dir() else (None, None, {})  # a Hub name: loaded below
    stored_int8 = "quantization" in extra and source == FORMAT
    if dtype == "auto" and torch_device.type == "cuda" and not stored_int8:
        dtype = stored_half_dtype(path) or dtype  # bf16/fp16 weights stay in their dtype on a GPU
    precision = resolve_precision(dtype, torch_device)
    if stored_int8 or quantize:
        q.check_applies(torch_device, precision.dtype)
    if stored_int8:
        ckpt = Checkpoint(q.load_quantized(path, config, extra, torch_device), config, path, source, extra)
    else:
        ckpt = load_checkpoint(path, device=torch_device, dtype=precision.dtype)
        if quantize:
            q.quantize_model(ckpt.model)
    if ckpt.tokenizer_path is None:
        raise TformerError(f"checkpoint '{path}' has no tokenizer.json: its tokens cannot be turned into text")
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    check_fits(tokenizer, ckpt.config.vocab_size, ckpt.tokenizer_path)
    if torch_device.type == "cpu":
        cpu_decoding_layout(ckpt.model)
    return Loaded(ckpt.model, ckpt.config, tokenizer, checkpoint_specials(tokenizer, ckpt.extra), ckpt.path,
                  torch_device,
                  precision.dtype, note, ckpt.extra.get("generation"))


def checkpoint_specials(tokenizer: Tokenizer, extra: dict) -> SpecialIds:
    """The tokenizer's special ids, overridden by a Hugging Face checkpoint's generation ids (its config is what
    transformers decodes with: pad, bos and eos, the decoder's start token, forced first and last tokens)."""
    found = special_ids(tokenizer)
    ids = extra.get("generation") if isinstance(extra.get("generation"), dict) else None
    if not ids:
        return found
    eos = ids.get("eos_token_id")
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    return dataclasses.replace(
        found,
        pad=ids["pad_token_id"] if ids.get("pad_token_id") is not None else found.pad,
        bos=ids["bos_token_id"] if ids.get("bos_token_id") is not None else found.bos,
        eos=eos_list[0] if eos_list else found.eos,
        also_eos=tuple(eos_list[1:]),
        decoder_start=ids.get("decoder_start_token_id"),
        forced_bos=ids.get("forced_bos_token_id"),
        forced_eos=ids.get("forced_eos_token_id"),
    )


def stored_half_dtype(directory: Path) -> str | None:
    """"bf16" or "fp16" when most of a checkpoint's weight bytes are stored so (read from the headers only)."""
    try:
        sizes = stored_dtypes(weight_files(directory))
    except (TformerError, OSError, ValueError):
        return None  # loading says what is wrong
    half = max(("BF16", "F16"), key=lambda k: sizes.get(k, 0))
    return {"BF16": "bf16", "F16": "fp16"}[half] if sizes.get(half, 0) > sizes.get("F32", 0) else None
