import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from tformer.model.attention import (
    MultiHeadAttention,
    attention_mask,
    scaled_dot_product_attention,
)
from tformer.model.transformer import build_model


def naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V with explicit loops over heads, as the slow reference."""
    B, H, Tq, d = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            hk = h // (H // k.size(1))
            s = q[b, h] @ k[b, hk].T / math.sqrt(d)
            if mask is not None:
                m = mask.expand(B, H, Tq, k.size(2))[b, h]
                s = s.masked_fill(~m, float("-inf"))
            out[b, h] = s.softmax(-1) @ v[b, hk]
    return out


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("need_weights", [False, True])
def test_sdpa_matches_naive_with_masks_and_gqa(n_kv, need_weights):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, n_kv, 7, 8), torch.randn(2, n_kv, 7, 8)
    kpm = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = attention_mask(torch.arange(2, 7), 7, causal=True, key_padding_mask=kpm)
    out, w = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)
    assert torch.allclose(out, naive_attention(q, k, v, mask), atol=1e-5)
    if need_weights:
        assert w.shape == (2, 4, 5, 7)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 5))
        assert (w.masked_select(~mask.expand_as(w)) == 0).all()


def test_is_causal_path_equals_explicit_mask():
    q, k, v = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    fast, _ = scaled_dot_product_attention(q, k, v, is_causal=True)
    slow, w = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert torch.equal(w.triu(1), torch.zeros_like(w))


def test_mask_for_a_chunk_inside_a_cache_is_not_top_left_aligned():
    # queries at slots 3, 4 over 6 key slots: query 3 sees 0..3, query 4 sees 0..4
    mask = attention_mask(torch.tensor([3, 4]), 6, causal=True)[0, 0]
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]


def test_left_padding_query_with_no_visible_key_sees_itself():
    kpm = torch.tensor([[False, False, True, True]])
    mask = attention_mask(torch.arange(4), 4, causal=True, key_padding_mask=kpm)[0, 0]
    assert mask[0].tolist() == [True, False, False, False]
    assert mask[1].tolist() == [False, True, False, False]
    assert mask[3].tolist() == [False, False, True, True]


def test_self_attention_matches_torch_multihead_attention():
    cfg = tiny_config()
    ours = MultiHeadAttention(cfg).eval()
    ref = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv_proj.weight)
        ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 6, cfg.d_model)
    kpm = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    y_ref, w_ref = ref(x, x, x, key_padding_mask=~kpm, need_weights=True, average_attn_weights=False)
    y, w = ours(x, mask=attention_mask(torch.arange(6), 6, False, kpm), need_weights=True)
    assert (y - y_ref).abs().max() <= 1e-5
    assert (w - w_ref).abs().max() <= 1e-6


@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "rope"])
def test_weights_path_gives_the_same_output_and_weights_from_q_and_k(pos):
    cfg = tiny_config(pos_encoding=pos, n_kv_heads=2, norm_placement="pre")
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    fast = model(idx)
    slow = model(idx, need_weights=True)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    weights = slow.attentions["decoder"]
    assert len(weights) == cfg.n_decoder_layers and weights[0].shape == (2, cfg.n_heads, 9, 9)

    # recompute layer 0's weights by hand from Q and K
    layer = model.decoder.layers[0]
    x = layer.self_attn_norm(model.embed(idx, torch.arange(9)))
    q, k, _ = layer.self_attn.qkv_proj(x).split([32, 16, 16], dim=-1)
    q = q.view(2, 9, 4, 8).transpose(1, 2)
    k = k.view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    if pos == "rope":
        from tformer.model.layers import apply_rotary

        cos, sin = model.decoder.rope(torch.arange(9))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(weights[0], scores.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "rope"])
def test_causal_masking_future_tokens_never_change_earlier_outputs(pos):
    cfg = tiny_config(pos_encoding=pos)
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % cfg.vocab_size
    a, b = model(idx).logits, model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_seq2seq_decoder_is_causal_and_encoder_is_bidirectional():
    cfg = tiny_config(arch="encoder-decoder")
    model = build_model(cfg).eval()
    src, tgt = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 10))
    tgt2 = tgt.clone()
    tgt2[:, 6] = (tgt[:, 6] + 1) % 61
    a, b = model(src, tgt).logits, model(src, tgt2).logits
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])

    enc = build_model(tiny_config(arch="encoder")).eval()
    x2 = src.clone()
    x2[:, 6] = (src[:, 6] + 1) % 61
    ha, hb = enc(src).hidden, enc(x2).hidden
    assert not torch.allclose(ha[:, :6], hb[:, :6])  # earlier positions see the later token
