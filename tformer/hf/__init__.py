"""Hugging Face model directories in and out: config mapping (config.py), tensor names (weights.py),
`tformer export` (export.py) and Hub names (hub.py). `transformers` is never imported here."""

from tformer.hf.config import SUPPORTED_TYPES, config_from_hf, generation_ids
from tformer.hf.weights import state_from_hf, state_to_hf

__all__ = ["SUPPORTED_TYPES", "config_from_hf", "generation_ids", "state_from_hf", "state_to_hf"]
