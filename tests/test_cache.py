"""Incremental decoding with the static KV cache equals the full forward pass."""

import pytest
import torch
from conftest import tiny_config

from tformer.model.transformer import DecoderLM, Seq2Seq

ATOL = 1e-5
VARIANTS = [
    dict(pos_encoding="learned", norm_placement="pre"),
    dict(pos_encoding="rope", norm_placement="pre", n_kv_heads=2),  # RoPE + grouped-query attention
    dict(pos_encoding="rope", n_kv_heads=1, norm="rmsnorm", activation="swiglu", bias=False),  # multi-query
    dict(pos_encoding="sinusoidal", norm_placement="post", scale_embeddings=True),  # the paper's
]
# (start, end) of each chunk fed to the cache: a prefill, single-token steps, a multi-token chunk, steps.
CHUNKS = [(0, 5), (5, 6), (6, 7), (7, 11), (11, 12), (12, 13), (13, 14)]


def left_padded_batch(vocab: int, lengths: list[int], T: int):
    idx = torch.randint(1, vocab, (len(lengths), T))
    real = torch.arange(T)[None] >= (T - torch.tensor(lengths))[:, None]  # (B, T), True for real tokens
    idx[~real] = 0
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # each row counts from its first real token
    return idx, real, positions


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_cached_chunks_equal_full_forward_per_row(variant):
    cfg = tiny_config(**variant)
    model = DecoderLM(cfg).eval()
    T, lengths = 14, [14, 9, 11]
    idx, real, positions = left_padded_batch(cfg.vocab_size, lengths, T)

    model.setup_cache(batch_size=3, max_len=T)
    cached = []
    for s, e in CHUNKS:
        out = model(idx[:, s:e], key_padding_mask=real, positions=positions[:, s:e], input_pos=torch.arange(s, e))
        cached.append(out.logits)
    cached = torch.cat(cached, dim=1)
    model.clear_cache()

    for row, n in enumerate(lengths):
        alone = model(idx[row:row + 1, T - n:]).logits[0]  # the row alone, unpadded, no cache
        assert (cached[row, T - n:] - alone).abs().max().item() <= ATOL
    # the whole padded batch without a cache agrees too
    full = model(idx, key_padding_mask=real, positions=positions).logits
    assert (full - cached)[real].abs().max().item() <= ATOL


def test_decode_step_keeps_static_shapes_and_buffers():
    cfg = tiny_config(pos_encoding="rope")
    model = DecoderLM(cfg).eval()
    model.setup_cache(batch_size=2, max_len=16)
    cache = model.decoder.layers[0].self_attn.cache
    ptr, shape = cache.k.data_ptr(), cache.k.shape
    assert shape == (2, cfg.n_kv_heads, 16, cfg.head_dim)
    model(torch.randint(0, 61, (2, 4)), input_pos=torch.arange(4))
    for t in range(4, 10):
        logits = model(torch.randint(0, 61, (2, 1)), input_pos=torch.tensor([t])).logits
        assert logits.shape == (2, 1, cfg.vocab_size)
        assert cache.k.data_ptr() == ptr and cache.k.shape == shape
    assert cache.k[:, :, :10].abs().sum() > 0 and cache.k[:, :, 10:].abs().sum() == 0  # only named slots written


def test_cache_is_never_saved_with_the_weights():
    model = DecoderLM(tiny_config(pos_encoding="rope"))
    before = set(model.state_dict())
    model.setup_cache(batch_size=2, max_len=8)
    assert set(model.state_dict()) == before
    assert not any("cache" in k or "rope" in k for k in before)


def test_cache_needs_explicit_positions_and_a_valid_length():
    model = DecoderLM(tiny_config()).eval()
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 1000)


def test_rows_can_be_reordered_and_dropped():
    cfg = tiny_config(pos_encoding="rope", n_kv_heads=2)
    model = DecoderLM(cfg).eval()
    idx = torch.randint(0, 61, (3, 10))
    full = model(idx).logits

    model.setup_cache(3, 10)
    model(idx[:, :6], input_pos=torch.arange(6))
    order = torch.tensor([2, 0, 1])
    model.select_cache_rows(order)  # same batch size: in place
    step = model(idx[order, 6:8], input_pos=torch.arange(6, 8)).logits
    assert (step - full[order, 6:8]).abs().max() <= ATOL

    keep = torch.tensor([1, 2])  # drop the first row of the reordered batch (original row 2)
    model.select_cache_rows(keep)
    original = order[keep]
    step = model(idx[original, 8:10], input_pos=torch.arange(8, 10)).logits
    assert step.shape[0] == 2
    assert (step - full[original, 8:10]).abs().max() <= ATOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_seq2seq_cached_decoding_equals_full_forward(variant):
    cfg = tiny_config(arch="encoder-decoder", **variant)
    model = Seq2Seq(cfg).eval()
    B, S, T = 3, 10, 14
    src = torch.randint(1, cfg.vocab_size, (B, S))
    src_lens = [10, 6, 8]
    src_real = torch.arange(S)[None] < torch.tensor(src_lens)[:, None]
    tgt = torch.randint(1, cfg.vocab_size, (B, T))

    memory, _ = model.encode(src, src_real)
    model.setup_cache(B, max_len=T, memory=memory)
    cached = torch.cat([
        model.decode(tgt[:, s:e], memory_padding_mask=src_real, input_pos=torch.arange(s, e)).logits
        for s, e in CHUNKS
    ], dim=1)
    model.clear_cache()

    for row, n in enumerate(src_lens):
        alone = model(src[row:row + 1, :n], tgt[row:row + 1]).logits[0]  # unpadded source, no cache
        assert (cached[row] - alone).abs().max().item() <= ATOL


def test_seq2seq_cross_kv_is_computed_once_and_rows_reorder():
    cfg = tiny_config(arch="encoder-decoder")
    model = Seq2Seq(cfg).eval()
    src, tgt = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 6))
    full = model(src, tgt).logits
    memory, _ = model.encode(src)
    model.setup_cache(2, max_len=6, memory=memory)
    cross = model.decoder.layers[0].cross_attn.cache
    k_before = cross.k.clone()
    calls = []
    handle = model.decoder.layers[0].cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
    model.decode(tgt[:, :3], input_pos=torch.arange(3))
    model.select_cache_rows(torch.tensor([1, 0]))
    step = model.decode(tgt[[1, 0], 3:6], input_pos=torch.arange(3, 6)).logits
    handle.remove()
    assert calls == []  # K/V of the source were never projected again
    assert torch.equal(cross.k, k_before[[1, 0]])
    assert (step - full[[1, 0], 3:6]).abs().max() <= ATOL


def test_both_decoding_models_share_one_interface():
    """DecoderLM and Seq2Seq decode through the same calls: setup_cache, next_token_logits, select_cache_rows,
    clear_cache; the cached logits equal the recomputed ones (the recompute path takes the memory again)."""
    torch.manual_seed(0)
    for arch in ("decoder", "encoder-decoder"):
        cfg = tiny_config(arch=arch)
        model = (DecoderLM if arch == "decoder" else Seq2Seq)(cfg).eval()
        B, T = 2, 6
        idx = torch.randint(1, cfg.vocab_size, (B, T))
        source = {}
        if arch == "encoder-decoder":
            src = torch.randint(1, cfg.vocab_size, (B, 5))
            mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
            source = {"memory": model.encode(src, mask)[0], "memory_padding_mask": mask}
        real = torch.ones(B, T, dtype=torch.bool)
        positions = torch.arange(T).expand(B, T)
        model.setup_cache(B, max_len=T, **({} if not source else {"memory": source["memory"],
                                                                  "memory_padding_mask": source["memory_padding_mask"]}))
        first = model.next_token_logits(idx[:, :4], real, positions[:, :4], torch.arange(4))
        model.select_cache_rows(torch.tensor([1, 0]))
        step = model.next_token_logits(idx[[1, 0], 4:5], real[[1, 0]], positions[:, 4:5], torch.tensor([4]))
        model.clear_cache()
        again = model.next_token_logits(idx[:, :4], real[:, :4], positions[:, :4], **source)
        swapped = {k: v[[1, 0]] for k, v in source.items()}
        recomputed = model.next_token_logits(idx[[1, 0], :5], real[[1, 0], :5], positions[:, :5], **swapped)
        assert first.shape == (B, cfg.vocab_size)
        assert (first - again).abs().max() <= ATOL
        assert (step - recomputed).abs().max() <= ATOL
