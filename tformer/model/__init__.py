"""The Transformer models and their parts."""

from tformer.model.attention import (
    MultiHeadAttention,
    attention_mask,
    scaled_dot_product_attention,
)
from tformer.model.cache import CrossKV, KVCache
from tformer.model.layers import (
    Embedding,
    FeedForward,
    RotaryEmbedding,
    sinusoidal_table,
)
from tformer.model.transformer import (
    MODELS,
    Block,
    DecoderLM,
    EncoderModel,
    ModelOutput,
    Seq2Seq,
    TransformerStack,
    build_model,
)

__all__ = [
    "Block", "CrossKV", "DecoderLM", "Embedding", "EncoderModel", "FeedForward", "KVCache", "MODELS",
    "ModelOutput", "MultiHeadAttention", "RotaryEmbedding", "Seq2Seq", "TransformerStack",
    "attention_mask", "build_model", "scaled_dot_product_attention", "sinusoidal_table",
]
