"""Llama, Mistral, Qwen2 (and GPT-2) directories written by transformers load as DecoderLMs with the
same logits: whole sequences, left-padded batches, and step by step through the KV cache."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import MAX_POS, VOCAB, left_padded, make  # noqa: E402

from tformer.checkpoint import load_checkpoint
from tformer.errors import CheckpointError, UnsupportedModelError
from tformer.model.transformer import DecoderLM

DECODERS = ["gpt2", "llama", "llama-tied-bias", "mistral", "qwen2"]
TOL = 1e-4


@pytest.fixture(scope="module", params=DECODERS)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make(transformers, request.param, directory)
    return request.param, hf, load_checkpoint(directory)


def test_config_maps_the_model_type(pair):
    name, hf, ckpt = pair
    assert isinstance(ckpt.model, DecoderLM) and ckpt.source == f"hf-{name.split('-')[0]}"
    c = hf.config
    assert ckpt.config.tie_embeddings == c.tie_word_embeddings
    if name != "gpt2":
        assert (ckpt.config.n_kv_heads, ckpt.config.norm, ckpt.config.activation) == (
            c.num_key_value_heads, "rmsnorm", "swiglu")
        assert ckpt.config.bias_of("qkv") == (name in ("qwen2", "llama-tied-bias"))
        assert ckpt.config.bias_of("out") == (name == "llama-tied-bias")
    if name == "llama":
        assert ckpt.config.rope_base == 500.0 and ckpt.config.rope_scaling["type"] == "llama3"


def test_logits_match_for_whole_sequences(pair):
    _, hf, ckpt = pair
    idx = torch.randint(0, VOCAB, (2, MAX_POS))
    with torch.no_grad():
        assert (hf(idx).logits - ckpt.model(idx).logits).abs().max().item() <= TOL


def test_left_padded_batch_matches(pair):
    _, hf, ckpt = pair
    idx, real, positions = left_padded()
    with torch.no_grad():
        ref = hf(idx, attention_mask=real.long(), position_ids=positions).logits
        ours = ckpt.model(idx, key_padding_mask=real, positions=positions).logits
    assert (ref - ours)[real].abs().max().item() <= TOL


def test_kv_cache_steps_match(pair):
    """Prefill 5 tokens, then one token per step; each step's logits equal transformers' full pass."""
    _, hf, ckpt = pair
    model = ckpt.model
    idx, real, positions = left_padded(lengths=(16, 9))
    T, prefill = idx.size(1), 5
    with torch.no_grad():
        ref = hf(idx, attention_mask=real.long(), position_ids=positions).logits
        model.setup_cache(batch_size=2, max_len=T)
        try:
            steps = [model(idx[:, :prefill], key_padding_mask=real, positions=positions[:, :prefill],
                           input_pos=torch.arange(prefill)).logits]
            for t in range(prefill, T):
                steps.append(model(idx[:, t:t + 1], key_padding_mask=real, positions=positions[:, t:t + 1],
                                   input_pos=torch.tensor([t])).logits)
        finally:
            model.clear_cache()
    ours = torch.cat(steps, dim=1)
    assert (ref - ours)[real].abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_sharded_directory_loads(tmp_path, name):
    hf = make(transformers, name, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (hf(idx).logits - load_checkpoint(tmp_path).model(idx).logits).abs().max().item() <= TOL


def test_shard_outside_the_directory_is_refused(tmp_path):
    make(transformers, "llama", tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"must be a \.safetensors file name inside"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "t5"}, ["model_type='t5' is not supported", "gpt2, llama, mistral, qwen2, bert, bart"]),
    ({"sliding_window": 16}, ["sliding_window=16", "sliding-window attention is not supported"]),
    ({"num_local_experts": 8}, ["num_local_experts=8", "mixture-of-experts"]),
    ({"hidden_size": True}, ["hidden_size=True", "must be an integer"]),
    ({"num_hidden_layers": 10**9}, ["num_hidden_layers=1000000000", "1..1024"]),
    ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings='yes'", "true or false"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, ["rope_type='yarn'", "llama3"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "'silu'"]),
])
def test_unsupported_or_invalid_config_is_one_line_before_any_tensor(tmp_path, change, words):
    make(transformers, "mistral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # the config is checked first
    with pytest.raises(UnsupportedModelError) as err:
        load_checkpoint(tmp_path)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)
