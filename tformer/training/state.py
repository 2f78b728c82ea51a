"""Training state beside the weights: optimizer state by parameter name, RNG and data position, metrics."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from tformer.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    unwrap_model,
)
from tformer.data.batches import Batches
from tformer.errors import CheckpointError, TformerError
from tformer.files import atomic_write_text, recover_directory
from tformer.training import distributed

METRICS_FILE = "metrics.jsonl"


# -- checkpoint state ----------------------------------------------------------------------------

def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as named tensors (e.g. 'decoder.layers.0.ffn.w1.weight.exp_avg')."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{names[id(p)]}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, Tensor]) -> None:
    state_dict = optimizer.state_dict()
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"{names[id(p)]}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                     and "." not in k[len(prefix):]}
            if entry:
                state_dict["state"][index] = entry
            index += 1
    optimizer.load_state_dict(state_dict)


@dataclass
class LoopState:
    """What, besides weights and optimizer, makes a resumed run continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    elapsed: float = 0.0
    train_loss: float | None = None

    def to_json(self, batches: Batches, scaler: torch.amp.GradScaler | None, extra: dict[str, Any]) -> dict:
        rng = {"torch": _b64(torch.get_rng_state()), "data": _b64(batches.state())}
        if torch.cuda.is_available():
            rng["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
            "val_loss": self.val.get("val_loss"), "val": self.val, "lr": self.lr, "elapsed": self.elapsed,
            "train_loss": self.train_loss, "rng": rng,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            **extra,
        }


def _restore(
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
    torch.set_rng_state(_unb64(info["rng"]["torch"]))
    if "cuda" in info["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in info["rng"]["cuda"]])
    batches.load_state(_unb64(info["rng"]["data"]))
    return LoopState(step=info["step"], tokens_seen=info["tokens_seen"], best_val_loss=info["best_val_loss"],
                     val=info.get("val") or {}, lr=info["lr"], elapsed=info.get("elapsed", 0.0),
                     train_loss=info.get("train_loss"))


def _truncate_metrics(path: Path, step: int) -> None:
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
    """`--resume auto` is the latest checkpoint of --out; otherwise the given directory (or its latest/)."""
    path = out / "latest" if resume == "auto" else Path(resume)
    recover_directory(path)
    if (path / "latest" / CONFIG_FILE).exists():
        path = path / "latest"
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"nothing to resume: '{path}' is not a checkpoint written by tformer train")
    return path


# -- resolving options ----------------------------------------------------------------------------
