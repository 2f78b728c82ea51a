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
    try:
        info = json.loads((directory / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        optim = load_file(str(directory / OPTIMIZER_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(f"'{directory}' has no training state ({Path(e.filename).name}); "
                              f"it cannot be resumed, only used with --init-from") from None
    except (json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"the training state in '{directory}' is unreadable: {e}") from None
    if info.get("arch") != arch:
        raise TformerError(f"cannot resume '{directory}': it trained arch={info.get('arch')!r}, "
                           f"this run is arch={arch!r}")
    from tformer.checkpoint import read_safetensors

    # distributed: these also load into a model sharded with --fsdp
    distributed.load_model_state(model, read_safetensors(directory), str(directory))
    distributed.load_optimizer_state(optimizer, model, optim)
    if info.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(info["scaler"])
    torch.set_rng_state(unb64(info["rng"]["torch"]))
    if "cuda" in info["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in info["rng"]["cuda"]])
    batches.load_state(unb64(info["rng"]["data"]))
    return LoopState(step=info["step"], tokens_seen=info["tokens_seen"], best_val_loss=info["best_val_loss"],
                     val=info.get("val") or {}, lr=info["lr"], elapsed=info.get("elapsed", 0.0),
                     train_loss=info.get("train_loss"))


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
