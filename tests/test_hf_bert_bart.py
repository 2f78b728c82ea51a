"""BERT (BertForMaskedLM) loads as an EncoderModel and BART (BartForConditionalGeneration) as a Seq2Seq,
with transformers' logits: padded batches, token types, and BART's decoder step by step through the cache."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import VOCAB, make  # noqa: E402

from tformer.checkpoint import load_checkpoint, read_config
from tformer.errors import UnsupportedModelError
from tformer.model.transformer import EncoderModel, Seq2Seq

TOL = 1e-4


def right_padded(lengths=(11, 6), low=3):
    T = max(lengths)
    idx = torch.randint(low, VOCAB, (len(lengths), T))
    real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    idx[~real] = 1
    return idx, real


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    return make(transformers, "bert", directory), load_checkpoint(directory)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bart")
    return make(transformers, "bart", directory), load_checkpoint(directory)


def test_bert_config(bert):
    _, ckpt = bert
    c = ckpt.config
    assert isinstance(ckpt.model, EncoderModel) and ckpt.source == "hf-bert"
    assert (c.norm_placement, c.pos_encoding, c.type_vocab_size, c.embed_norm, c.norm_eps) == (
        "post", "learned", 2, True, 1e-12)


def test_bert_padded_batch_with_token_types(bert):
    hf, ckpt = bert
    idx, real = right_padded()
    types = torch.zeros_like(idx)
    types[:, 4:] = 1
    with torch.no_grad():
        for token_types in (None, types):
            ref = hf(idx, attention_mask=real.long(), token_type_ids=token_types).logits
            ours = ckpt.model(idx, key_padding_mask=real, token_type_ids=token_types).logits
            assert (ref - ours)[real].abs().max().item() <= TOL


def test_bert_sharded_and_old_layernorm_names(tmp_path):
    """A sharded directory, with the gamma/beta LayerNorm names of early BERT files."""
    from safetensors.torch import load_file, save_file

    hf = make(transformers, "bert", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(tmp_path / shard)
        renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                   for k, v in tensors.items()}
        save_file(renamed, tmp_path / shard, metadata={"format": "pt"})
    index["weight_map"] = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                           for k, v in index["weight_map"].items()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    idx = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert (hf(idx).logits - load_checkpoint(tmp_path).model(idx).logits).abs().max().item() <= TOL


def test_bart_config_and_generation_ids(bart):
    _, ckpt = bart
    c = ckpt.config
    assert isinstance(ckpt.model, Seq2Seq) and ckpt.source == "hf-bart"
    assert (c.pos_offset, c.embed_norm, c.tie_positions, c.scale_embeddings) == (2, True, False, True)
    gen = ckpt.extra["generation"]
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 2, 1)
    # generation_config.json overrides config.json, as in transformers (BART's forced_bos_token_id lives there)
    gen_file = ckpt.path / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "forced_bos_token_id": 0,
                                    "decoder_start_token_id": 7}))
    gen = read_config(ckpt.path)[2]["generation"]
    assert (gen["forced_bos_token_id"], gen["decoder_start_token_id"]) == (0, 7)


def test_bart_padded_batch(bart):
    hf, ckpt = bart
    src, src_real = right_padded((12, 7))
    tgt, tgt_real = right_padded((9, 5))
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_real.long(), decoder_input_ids=tgt,
                 decoder_attention_mask=tgt_real.long()).logits
        ours = ckpt.model(src, tgt, src_padding_mask=src_real, tgt_padding_mask=tgt_real).logits
    assert (ref - ours)[tgt_real].abs().max().item() <= TOL


def test_bart_decoder_cache_steps(bart):
    """Encode once, then decode one target token per step; each step equals transformers' full pass."""
    hf, ckpt = bart
    model = ckpt.model
    src, src_real = right_padded((12, 7))
    tgt = torch.randint(3, VOCAB, (2, 10))
    tgt[:, 0] = 2  # decoder_start_token_id
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_real.long(), decoder_input_ids=tgt).logits
        memory, _ = model.encode(src, src_real)
        model.setup_cache(2, max_len=tgt.size(1), memory=memory, memory_padding_mask=src_real)
        try:
            steps = [model.decode(tgt[:, :3], memory_padding_mask=src_real, input_pos=torch.arange(3)).logits]
            for t in range(3, tgt.size(1)):
                steps.append(model.decode(tgt[:, t:t + 1], memory_padding_mask=src_real,
                                          input_pos=torch.tensor([t])).logits)
        finally:
            model.clear_cache()
    assert (ref - torch.cat(steps, dim=1)).abs().max().item() <= TOL


def test_bart_non_zero_final_logits_bias_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make(transformers, "bart", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["final_logits_bias"] = torch.ones_like(tensors["final_logits_bias"])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="final_logits_bias"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name, change, word", [
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ("bert", {"hidden_act": "relu"}, "hidden_act='relu'"),
    ("bart", {"decoder_ffn_dim": 64}, "encoder_ffn_dim=56 differs from decoder_ffn_dim=64"),
    ("bart", {"d_model": 3.5}, "d_model=3.5"),
])
def test_unsupported_bert_and_bart_options(tmp_path, name, change, word):
    make(transformers, name, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as err:
        load_checkpoint(tmp_path)
    assert word in str(err.value) and "\n" not in str(err.value)
