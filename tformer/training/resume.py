"""Resuming a run: finding its checkpoint, and restoring weights, optimizer, RNG and data position exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tformer.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    resolve_checkpoint,
)
from tformer.data.batches import Batches
from tformer.errors import CheckpointError, TformerError
from tformer.files import atomic_write_text, recover_directory
from tformer.training import distributed
from tformer.training.state import LoopState, unb64


def restore(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    batches: Batches, arch: str,
) -> LoopState:
    """Load weights, optimizer, RNG and data position from a checkpoint written by `train`."""
    from tformer.checkpoint_checks import check_tensors, read_trainer_state

    info = read_trainer_state(directory, TRAINER_STATE_FILE, OPTIMIZER_FILE)  # checked before anything moves
    try:
        optim = load_file(str(directory / OPTIMIZER_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"the optimizer state in '{directory}' is unreadable: {e}") from None
    check_tensors(optim, str(directory / OPTIMIZER_FILE))
    if info.get("arch") != arch:
        raise TformerError(f"cannot resume '{directory}': it trained arch={info.get('arch')!r}, "
                           f"this run is arch={arch!r}")
    from tformer.checkpoint import read_safetensors

    weights = read_safetensors(directory)
    check_tensors(weights, str(directory))
    _check_optimizer_shapes(optim, weights, directory / OPTIMIZER_FILE)
    # distributed: these also load into a model sharded with --fsdp
    distributed.load_model_state(model, weights, str(directory))
    distributed.load_optimizer_state(optimizer, model, optim)
    if info.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(info["scaler"])
    try:
        torch.set_rng_state(unb64(info["rng"]["torch"]))
        if "cuda" in info["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([unb64(s) for s in info["rng"]["cuda"]])
        batches.load_state(unb64(info["rng"]["data"]))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"the random state in '{directory / TRAINER_STATE_FILE}' is invalid: "
                              f"{str(e).splitlines()[0]}") from None
    return LoopState(step=info["step"], tokens_seen=info["tokens_seen"], best_val_loss=info["best_val_loss"],
                     val=info.get("val") or {}, lr=info["lr"], elapsed=info.get("elapsed", 0.0),
                     train_loss=info.get("train_loss"), progress=info.get("progress", 0.0))


def _check_optimizer_shapes(optim: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], where: Path) -> None:
    """AdamW's moments and Muon's momentum have their parameter's shape (a wrong one would fail only at the first
    step)."""
    for key, tensor in optim.items():
        name, _, kind = key.rpartition(".")
        if kind in ("exp_avg", "exp_avg_sq", "momentum_buffer") and name in weights and tensor.shape != weights[name].shape:
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(tensor.shape)} but its parameter "
                                  f"has {tuple(weights[name].shape)}")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to the resumed step (later ones belong to the interrupted tail)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def resume_dir(resume: str, out: Path) -> Path:
    """The checkpoint to resume: `--resume auto` is the latest of --out; otherwise what `resolve_checkpoint`
    makes of the given directory (a run's directory means its newest checkpoint)."""
    path = out / "latest" if resume == "auto" else Path(resume)
    recover_directory(path)  # the run is ours: an interrupted swap is finished here
    path, _ = resolve_checkpoint(path)
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"nothing to resume: '{path}' is not a checkpoint written by tformer train")
    return path
