"""Loading a checkpoint ready to generate from: model, tokenizer, device and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from tformer.checkpoint import (
    find_latest_checkpoint,
    is_checkpoint_dir,
    load_checkpoint,
)
from tformer.config import ModelConfig
from tformer.data.tokenizer import SpecialIds, load_tokenizer, special_ids
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


def _checkpoint_in(path: Path) -> Path:
    """`path`, or for a training run's directory (whose latest/ and best/ are checkpoints) the newest of them."""
    if path.is_dir() and not is_checkpoint_dir(path) and any(is_checkpoint_dir(d) for d in path.iterdir()):
        return find_latest_checkpoint(path)
    return path  # load_checkpoint says what is missing


def load(checkpoint: str | Path | None = None, device: str = "auto", dtype: str = "auto") -> Loaded:
    """Load a checkpoint directory (default: the newest under checkpoints/; for a training run's
    directory, the newest of its checkpoints) and its tokenizer.json.

    device "auto" picks CUDA, then MPS, then the CPU; dtype "auto" is bf16 on a GPU that has it
    (fp16 otherwise), fp32 on the CPU and MPS.
    """
    from tformer.device import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    precision = resolve_precision(dtype, torch_device)
    path = find_latest_checkpoint() if checkpoint is None else _checkpoint_in(Path(checkpoint))
    ckpt = load_checkpoint(path, device=torch_device, dtype=precision.dtype)
    if ckpt.tokenizer_path is None:
        raise TformerError(f"checkpoint '{path}' has no tokenizer.json: its tokens cannot be turned into text")
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    if tokenizer.get_vocab_size(with_added_tokens=True) > ckpt.config.vocab_size:
        raise TformerError(f"{ckpt.tokenizer_path} has {tokenizer.get_vocab_size():,} tokens but the model's "
                           f"vocabulary only {ckpt.config.vocab_size:,}: they do not belong together")
    if torch_device.type == "cpu":
        cpu_decoding_layout(ckpt.model)
    return Loaded(ckpt.model, ckpt.config, tokenizer, special_ids(tokenizer), path, torch_device, precision.dtype)
