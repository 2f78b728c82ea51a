"""The CPU decoding layout and the thread-split matrix-vector product, against plain F.linear and the unchanged model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import tformer.generation.cpu_decoding
from tformer.generation.cpu_decoding import (
    MAX_SPLIT_ROWS,
    SplitLinear,
    cpu_decoding_layout,
    split_linear,
)
from tformer.generation.engine import decode_step, prefill
from tformer.model.transformer import build_model


def transposed(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


@pytest.fixture
def split_small_matrices(monkeypatch):
    """Split even the tiny test models' matrices (the layout leaves small ones alone)."""
    monkeypatch.setattr(tformer.generation.cpu_decoding, "MIN_SPLIT_SIZE", 0)


@pytest.mark.parametrize("rows", [1, 3, MAX_SPLIT_ROWS, MAX_SPLIT_ROWS + 1])
@pytest.mark.parametrize("slices", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_equals_f_linear(rows, slices, bias):
    w = transposed(torch.randn(50, 48))
    b = torch.randn(50) if bias else None
    x = torch.randn(rows, 1, 48)[:, 0]  # a strided view, as h[:, -1:] is in the model
    y = split_linear(x, w, b, slices)
    assert y.shape == (rows, 50)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_split_linear_falls_back_when_it_cannot_split():
    x = torch.randn(2, 5, 48)
    plain_w = torch.randn(50, 48)  # (out, in) storage: the split would need a copy
    assert torch.equal(split_linear(x, plain_w, None, 2), F.linear(x, plain_w))
    w = transposed(plain_w)
    assert torch.equal(split_linear(x, w, None, 5), F.linear(x, w))  # 48 is not a multiple of 5
    assert torch.equal(split_linear(x, w, None, 1), F.linear(x, w))


def test_split_linear_is_one_opaque_op_under_torch_compile():
    """Under torch.compile the split is the custom op `tformer::split_linear` (inductor would rewrite a
    one-row bmm into a slower loop); aot_eager traces it through the op's fake implementation."""
    w, b, x = transposed(torch.randn(50, 48)), torch.randn(50), torch.randn(1, 1, 48)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: split_linear(x, w, b, 2), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert "tformer.split_linear" in graphs[0].code
    aot = torch.compile(lambda x: split_linear(x, w, b, 2), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(aot(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, bias=False), dict(arch="encoder-decoder")],
                         ids=["tied", "untied-nobias", "seq2seq"])
def test_layout_keeps_state_and_logits(overrides, split_small_matrices):
    plain = build_model(tiny_config(**overrides)).eval()
    fast = cpu_decoding_layout(copy.deepcopy(plain), threads=2)
    assert all(isinstance(m, SplitLinear) and m.slices == 2 for m in fast.modules() if isinstance(m, torch.nn.Linear))
    a, b = plain.state_dict(), fast.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = fast.embed.tok.weight if fast.lm_head is None else fast.lm_head.weight  # the output projection
    assert head.stride() == (1, fast.cfg.vocab_size)
    idx = torch.randint(5, 61, (1, 7))
    with torch.no_grad():
        if overrides.get("arch") == "encoder-decoder":
            want, got = plain(idx, idx).logits, fast(idx, idx).logits
        else:
            want, got = plain(idx).logits, fast(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(fast)  # a copy projects with its own matrices, not the original's
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        assert not twin.output_logits(torch.randn(1, 1, twin.cfg.d_model)).any()


def test_layout_with_one_thread_only_transposes(split_small_matrices):
    model = cpu_decoding_layout(build_model(tiny_config()), threads=1)
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    assert "output_logits" not in vars(model)
    assert model.decoder.layers[0].ffn.w1.weight.stride() == (1, 64)


def test_only_matrices_of_min_split_size_are_split():
    cfg = tiny_config(d_model=512, n_heads=4, d_ff=512, vocab_size=500, n_decoder_layers=1)  # 512 x 512 = 2**18
    model = cpu_decoding_layout(build_model(cfg), threads=4)
    split = {name: m.slices for name, m in model.named_modules() if isinstance(m, SplitLinear)}
    assert split == {"decoder.layers.0.self_attn.qkv_proj": 4, "decoder.layers.0.self_attn.out_proj": 4,
                     "decoder.layers.0.ffn.w1": 4, "decoder.layers.0.ffn.w2": 4}
    assert "output_logits" not in vars(model)  # 500 x 512 < 2**18: the tied projection stays whole


def test_cached_decode_steps_match_the_plain_model(split_small_matrices):
    """Prefill and decode steps at batch 1 and 3 (the split path) give the plain model's logits."""
    plain = build_model(tiny_config(d_model=48, n_heads=4, d_ff=96)).eval()
    fast = cpu_decoding_layout(copy.deepcopy(plain), threads=3)  # 3 slices of 16
    for B in (1, 3):
        ids = torch.randint(5, 61, (B, 12))
        mask = torch.ones(B, 12, dtype=torch.bool)
        outs = []
        for model in (plain, fast):
            model.setup_cache(B, max_len=12)
            with torch.no_grad():
                logits = [prefill(model, ids[:, :8], mask, torch.arange(8).expand(B, 8))]
                for t in range(8, 12):
                    pos = torch.full((B, 1), t)
                    logits.append(decode_step(model, ids[:, t:t + 1], torch.tensor([t]), pos, mask))
            model.clear_cache()
            outs.append(torch.stack(logits))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
