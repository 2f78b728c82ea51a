"""What the model is trained on and how the loss is computed, per architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.data.batches import IGNORE_INDEX, Objective
from tformer.data.tokenizer import SpecialIds
from tformer.data.tokens import PairTokens
from tformer.training.config import TrainConfig

OBJECTIVES = {"decoder": "causal", "encoder": "masked"}  # encoder-decoder: "pairs" or "span"


@dataclass
class TrainData:
    """Everything the loop needs from a tokenized corpus."""

    objective: str  # causal, masked, span (denoising plain text) or pairs (source/target)
    specials: SpecialIds
    vocab_size: int
    tokenizer_path: Path
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None
    train_pairs: PairTokens | None = None
    val_pairs: PairTokens | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what was read, recorded in config.json

    @property
    def n_train(self) -> int:
        return len(self.train_pairs) if self.objective == "pairs" else len(self.train_tokens)

    def split(self, name: str, cfg: TrainConfig) -> Objective:
        """The objective on the "train" or "val" split."""
        return Objective(self.objective, getattr(self, f"{name}_tokens"), getattr(self, f"{name}_pairs"),
                         self.specials, self.vocab_size, cfg.mask_prob, cfg.mean_span)


# -- objectives -----------------------------------------------------------------------------------

def forward_logits(model: nn.Module, arch: str, batch: dict[str, Tensor]) -> Tensor:
    """Run the model on a batch of its objective; returns logits aligned with batch["labels"]."""
    if arch == "encoder-decoder":
        return model(batch["src"], batch["tgt"], batch["src_mask"], batch["tgt_mask"]).logits
    return model(batch["idx"]).logits


def loss_fn(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the labelled positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
    )


def sequence_tokens(batch: dict[str, Tensor]) -> int:
    if "src" in batch:
        return int(batch["src_mask"].sum() + batch["tgt_mask"].sum())
    return batch["idx"].numel()
