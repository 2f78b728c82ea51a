"""Shared fixtures: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from tformer.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A tiny model of any architecture; dropout off so outputs are deterministic."""
    values = dict(
        arch="decoder", vocab_size=61, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
        d_ff=64, dropout=0.0, max_seq_len=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
