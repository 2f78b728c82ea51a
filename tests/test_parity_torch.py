"""The paper's encoder-decoder against torch.nn.Transformer with the same weights copied in."""

import pytest
import torch
from conftest import tiny_config
from torch import nn

from tformer.model.transformer import Seq2Seq


def copy_weights_into_reference(model: Seq2Seq, ref: nn.Transformer) -> None:
    d = model.cfg.d_model

    def attn(ours, theirs, cross=False):
        if cross:
            w = torch.cat([ours.q_proj.weight, ours.kv_proj.weight])
            b = torch.cat([ours.q_proj.bias, ours.kv_proj.bias])
        else:
            w, b = ours.qkv_proj.weight, ours.qkv_proj.bias
        theirs.in_proj_weight.copy_(w)
        theirs.in_proj_bias.copy_(b)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
        assert theirs.in_proj_weight.shape == (3 * d, d)

    def copy(src, dst):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, ref.encoder.layers):
            attn(ours.self_attn, theirs.self_attn)
            copy(ours.ffn.w1, theirs.linear1)
            copy(ours.ffn.w2, theirs.linear2)
            copy(ours.self_attn_norm, theirs.norm1)
            copy(ours.ffn_norm, theirs.norm2)
        for ours, theirs in zip(model.decoder.layers, ref.decoder.layers):
            attn(ours.self_attn, theirs.self_attn)
            attn(ours.cross_attn, theirs.multihead_attn, cross=True)
            copy(ours.ffn.w1, theirs.linear1)
            copy(ours.ffn.w2, theirs.linear2)
            copy(ours.self_attn_norm, theirs.norm1)
            copy(ours.cross_attn_norm, theirs.norm2)
            copy(ours.ffn_norm, theirs.norm3)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_paper_encoder_decoder_equals_torch_nn_transformer(n_layers):
    cfg = tiny_config(
        arch="encoder-decoder", n_encoder_layers=n_layers, n_decoder_layers=n_layers,
        pos_encoding="sinusoidal", norm_placement="post", activation="relu", norm="layernorm",
        scale_embeddings=True, init="paper",
    )
    model = Seq2Seq(cfg).eval()
    with torch.no_grad():  # norms start as ones and zeros; random values make a swapped norm visible
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
    ref = nn.Transformer(
        d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=n_layers, num_decoder_layers=n_layers,
        dim_feedforward=cfg.d_ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False,
    )
    # The paper's post-norm layers already end in a norm; nn.Transformer adds one more per stack.
    ref.encoder.norm = None
    ref.decoder.norm = None
    ref.train()  # dropout is 0; training mode keeps nn.Transformer off its nested-tensor fast path
    copy_weights_into_reference(model, ref)

    B, S, T = 3, 9, 7
    src, tgt = torch.randint(0, cfg.vocab_size, (B, S)), torch.randint(0, cfg.vocab_size, (B, T))
    src_lens, tgt_lens = torch.tensor([9, 5, 7]), torch.tensor([7, 7, 3])
    src_real = torch.arange(S)[None] < src_lens[:, None]  # True for real tokens
    tgt_real = torch.arange(T)[None] < tgt_lens[:, None]

    out = model(src, tgt, src_padding_mask=src_real, tgt_padding_mask=tgt_real)
    x_src = model.embed(src, torch.arange(S))
    x_tgt = model.embed(tgt, torch.arange(T))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # nn.Transformer: True means "not allowed"
    ref_hidden = ref(
        x_src, x_tgt, tgt_mask=future, src_key_padding_mask=~src_real, tgt_key_padding_mask=~tgt_real,
        memory_key_padding_mask=~src_real, tgt_is_causal=True,
    )
    assert (out.hidden - ref_hidden).abs().max().item() <= 1e-5
    assert (out.logits - model.output_logits(ref_hidden)).abs().max().item() <= 1e-4
    # embeddings really are scaled by sqrt(d_model) and shared with the output projection
    assert torch.allclose(x_src[0, 0], model.embed.tok.weight[src[0, 0]] * cfg.d_model**0.5 + model.embed.pe[0])
