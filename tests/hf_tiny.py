"""Tiny random transformers models of every supported model type, saved as Hugging Face directories.

Norm weights start as ones and biases as zeros in transformers; they are randomised here so that a
swapped norm or a dropped bias changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 89
MAX_POS = 64


def _decoder_kwargs(vocab=VOCAB, **kw):
    return {**dict(vocab_size=vocab, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0), **kw}


def configs(transformers, vocab: int = VOCAB) -> dict[str, tuple[type, object]]:
    """name -> (model class, config) for each variant the tests cover."""
    t, VOCAB = transformers, vocab  # noqa: N806
    return {
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=32, n_layer=2, n_head=4,
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**_decoder_kwargs(VOCAB,
            rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}))),
        "llama-tied-bias": (t.LlamaForCausalLM, t.LlamaConfig(**_decoder_kwargs(VOCAB,
            tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4))),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**_decoder_kwargs(VOCAB, sliding_window=4096, rope_theta=1e4))),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**_decoder_kwargs(VOCAB, tie_word_embeddings=True, num_key_value_heads=1))),
        "bert": (t.BertForMaskedLM, t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=56,
                                                 max_position_embeddings=MAX_POS, type_vocab_size=2, pad_token_id=0)),
        "bart": (t.BartForConditionalGeneration, t.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=56, decoder_ffn_dim=56, max_position_embeddings=MAX_POS,
            scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_bos_token_id=0)),
    }


def make(transformers, name: str, directory: Path, max_shard_size: str | None = None, seed: int = 0,
         vocab: int = VOCAB):
    """A random eval-mode transformers model of variant `name`, saved (safetensors) to `directory`."""
    cls, config = configs(transformers, vocab)[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or ".ln_" in pname or pname.endswith("bias"):
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


def left_padded(batch: int = 2, lengths: tuple[int, ...] = (13, 7), low: int = 3):
    """Random ids (B, T) left-padded to the longest length, the mask of real tokens, and their positions."""
    T = max(lengths)
    idx = torch.randint(low, VOCAB, (batch, T))
    real = torch.zeros(batch, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        real[b, T - n:] = True
    idx[~real] = 0
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return idx, real, positions
