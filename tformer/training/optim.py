"""The optimizer and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.training.config import TrainConfig

# -- schedules ----------------------------------------------------------------------------------

def learning_rate(step: int, cfg: TrainConfig, total_steps: int, progress: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup to `lr`, then cosine decay to lr * min_lr_ratio at the last step, or sooner:
      `progress` (0 to 1, e.g. the share of a time budget spent) moves the decay on when it is ahead.
    noam: the paper's (section 5.3) d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), scaled so its peak
      at s = warmup equals `lr`; lr = d_model^-0.5 * warmup^-0.5 gives the paper's formula exactly.
    constant: linear warmup, then `lr`.
    """
    s = step + 1
    if cfg.schedule == "noam":
        return cfg.lr * min(s ** -0.5, s * cfg.warmup ** -1.5) / cfg.warmup ** -0.5
    if cfg.warmup and s <= cfg.warmup:
        return cfg.lr * s / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, max(progress, (s - cfg.warmup) / max(1, total_steps - cfg.warmup)))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = any(part in f".{name}" for part in (".tok.", ".pos.", ".token_type."))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
