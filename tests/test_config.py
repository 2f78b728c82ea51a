import json

import pytest

from tformer.config import PRESETS, ModelConfig
from tformer.errors import ConfigError, TformerError


@pytest.mark.parametrize("name", ["vaswani-base", "vaswani-big", "gpt2", "bert-base", "tiny", "small"])
def test_every_named_preset_exists_and_is_valid(name):
    cfg = ModelConfig.from_preset(name)
    assert name in PRESETS and cfg.preset == name
    assert cfg.d_model % cfg.n_heads == 0


def test_paper_presets_follow_table_3():
    base, big = ModelConfig.from_preset("vaswani-base"), ModelConfig.from_preset("vaswani-big")
    assert (base.d_model, base.d_ff, base.n_heads, base.n_encoder_layers, base.dropout) == (512, 2048, 8, 6, 0.1)
    assert (big.d_model, big.d_ff, big.n_heads, big.n_decoder_layers, big.dropout) == (1024, 4096, 16, 6, 0.3)
    for cfg in (base, big):
        assert (cfg.arch, cfg.pos_encoding, cfg.norm_placement, cfg.activation) == (
            "encoder-decoder", "sinusoidal", "post", "relu")
        assert cfg.scale_embeddings and cfg.tie_embeddings


def test_gpt2_preset_has_124m_parameters():
    from tformer.model.transformer import build_model

    model = build_model(ModelConfig.from_preset("gpt2"))
    assert 124_000_000 < model.num_parameters() < 124_700_000  # 124,439,808 with tied embeddings


def test_overrides_and_serialisation_round_trip():
    cfg = ModelConfig.from_preset("tiny", d_model=64, n_heads=8, n_kv_heads=2, arch="encoder-decoder")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (64, 8, 2, 8)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_n_kv_heads_defaults_to_n_heads():
    assert ModelConfig(d_model=64, n_heads=8).n_kv_heads == 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(d_model=100, n_heads=3), ["d_model=100", "n_heads=3", "1, 2, 4, 5"]),
        (dict(n_heads=8, n_kv_heads=3), ["n_kv_heads=3", "1, 2, 4, 8"]),
        (dict(arch="gpt"), ["arch='gpt'", "encoder, decoder, encoder-decoder"]),
        (dict(pos_encoding="alibi"), ["pos_encoding", "sinusoidal, learned, rope"]),
        (dict(norm="batchnorm"), ["norm=", "layernorm, rmsnorm"]),
        (dict(norm_placement="middle"), ["norm_placement", "post, pre"]),
        (dict(activation="tanh"), ["activation", "relu, gelu"]),
        (dict(dropout=1.5), ["dropout=1.5", "[0, 1)"]),
        (dict(d_model=0), ["d_model=0", "positive integer"]),
        (dict(arch="decoder", n_decoder_layers=0), ["n_decoder_layers", "at least 1"]),
        (dict(d_model=36, n_heads=12, pos_encoding="rope"), ["even head_dim"]),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(err.value, TformerError)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*vaswani-base"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ConfigError, match="unknown model config field.*n_layer"):
        ModelConfig.from_dict({"n_layer": 3})
