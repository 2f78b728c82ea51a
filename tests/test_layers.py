import math

import torch
import torch.nn.functional as F
from conftest import tiny_config

from tformer.model.layers import (
    FeedForward,
    RotaryEmbedding,
    apply_rotary,
    sinusoidal_table,
)


def test_sinusoidal_encoding_equals_the_papers_formula():
    n, d = 50, 16
    table = sinusoidal_table(n, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / (10000 ** (2 * i / d))
            assert math.isclose(table[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        cq, sq = rope(torch.tensor([m]))
        ck, sk = rope(torch.tensor([n]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-4)
    assert math.isclose(score(20, 20), score(0, 0), rel_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)
    # rotation keeps the norm, and position 0 is the identity
    c0, s0 = rope(torch.tensor([0]))
    assert torch.allclose(apply_rotary(q, c0, s0), q)
    c5, s5 = rope(torch.tensor([5]))
    assert math.isclose(apply_rotary(q, c5, s5).norm().item(), q.norm().item(), rel_tol=1e-5)


def test_feed_forward_is_equation_2():
    ffn = FeedForward(tiny_config(activation="relu"))
    x = torch.randn(2, 5, 32)
    expected = F.relu(x @ ffn.w1.weight.T + ffn.w1.bias) @ ffn.w2.weight.T + ffn.w2.bias
    assert torch.allclose(ffn(x), expected, atol=1e-6)


def test_swiglu_feed_forward():
    ffn = FeedForward(tiny_config(activation="swiglu", bias=False))
    x = torch.randn(2, 5, 32)
    expected = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    assert torch.allclose(ffn(x), expected, atol=1e-6)


def test_gpt2_init_scales_residual_projections_and_paper_init_is_xavier():
    from tformer.model.transformer import build_model

    cfg = tiny_config(d_model=256, n_heads=4, d_ff=1024, n_decoder_layers=8, init="gpt2", vocab_size=500)
    model = build_model(cfg)
    block = model.decoder.layers[0]
    assert abs(block.self_attn.qkv_proj.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / math.sqrt(2 * 8)
    for w in (block.self_attn.out_proj.weight, block.ffn.w2.weight):
        assert abs(w.std().item() - residual_std) < 0.1 * residual_std
    assert block.ffn.w1.bias.abs().sum() == 0

    paper = build_model(tiny_config(arch="encoder-decoder", d_model=256, n_heads=4, d_ff=1024, init="paper"))
    w = paper.encoder.layers[0].ffn.w1.weight  # Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (256 + 1024))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    emb = paper.embed.tok.weight  # N(0, d_model^-1/2): after the sqrt(d_model) scaling, unit variance
    assert abs(emb.std().item() - 256**-0.5) < 0.1 * 256**-0.5
