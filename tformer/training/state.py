"""Training state beside the weights: optimizer state by parameter name, RNG and data position, metrics."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tformer.checkpoint import (
    unwrap_model,
)
from tformer.data.batches import Batches

METRICS_FILE = "metrics.jsonl"


# -- checkpoint state ----------------------------------------------------------------------------

def b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def unb64(s: str) -> Tensor:
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
    progress: float = 0.0  # the share of the cosine's decay done by the time budget (decay_to_budget)

    def to_json(self, batches: Batches, scaler: torch.amp.GradScaler | None, extra: dict[str, Any]) -> dict:
        rng = {"torch": b64(torch.get_rng_state()), "data": b64(batches.state())}
        if torch.cuda.is_available():
            rng["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
            "val_loss": self.val.get("val_loss"), "val": self.val, "lr": self.lr, "elapsed": self.elapsed,
            "train_loss": self.train_loss, "progress": self.progress, "rng": rng,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            **extra,
        }
