"""A GPT-2 directory written by transformers loads as a DecoderLM with the same logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tformer.checkpoint import load_checkpoint
from tformer.model.transformer import DecoderLM


def make_hf_gpt2(tmp_path, **kwargs):
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=48, n_embd=48, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, **kwargs,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # norms start as ones and zeros; random values make a swapped norm visible
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"tie_word_embeddings": False, "n_inner": 80}, {"activation_function": "relu", "layer_norm_epsilon": 1e-6}],
)
def test_gpt2_directory_gives_the_same_logits(tmp_path, kwargs):
    hf = make_hf_gpt2(tmp_path, **kwargs)
    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt.model, DecoderLM) and ckpt.source == "hf-gpt2"
    assert ckpt.config.tie_embeddings == kwargs.get("tie_word_embeddings", True)
    for B, T in [(1, 1), (4, 17), (2, 48)]:
        idx = torch.randint(0, 97, (B, T))
        with torch.no_grad():
            ref = hf(idx).logits
            ours = ckpt.model(idx).logits
        assert (ref - ours).abs().max().item() <= 1e-4


def test_gpt2_left_padded_batch_matches_with_position_ids(tmp_path):
    hf = make_hf_gpt2(tmp_path)
    model = load_checkpoint(tmp_path).model
    idx = torch.randint(1, 97, (3, 10))
    real = torch.ones(3, 10, dtype=torch.bool)
    real[1, :4] = False
    real[2, :7] = False
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(idx, attention_mask=real.long(), position_ids=positions).logits
        ours = model(idx, key_padding_mask=real, positions=positions).logits
    assert (ref - ours)[real].abs().max().item() <= 1e-4


def test_unsupported_gpt2_option_is_a_clear_error(tmp_path):
    make_hf_gpt2(tmp_path, scale_attn_by_inverse_layer_idx=True)
    from tformer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load_checkpoint(tmp_path)
