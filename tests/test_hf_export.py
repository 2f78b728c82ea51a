"""`tformer export`: tformer checkpoints load in transformers with the same logits and greedy ids, and
Hugging Face directories survive HF -> tformer -> HF with identical tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import VOCAB, make  # noqa: E402

from tformer.checkpoint import load_checkpoint, save_checkpoint
from tformer.cli import app
from tformer.config import ModelConfig
from tformer.data.tokenizer import train_tokenizer
from tformer.hf.export import export_target
from tformer.model.transformer import build_model

runner = CliRunner()
TOL = 1e-4
TEXT = "the cat sat on the mat; a dog ran far away, quickly!"


def export(src, out):
    result = runner.invoke(app, ["export", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-tied-bias", "mistral", "qwen2", "bert", "bart"])
def test_hf_to_tformer_to_hf_keeps_every_tensor(tmp_path, name):
    hf = make(transformers, name, tmp_path / "hf")
    out = export(tmp_path / "hf", tmp_path / "out")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf.config.architectures[0] if name != "mistral" else "LlamaForCausalLM"]


def tformer_checkpoint(tmp_path, **shape):
    """A random tformer checkpoint of `shape` with a character tokenizer, its norms randomised."""
    tok = train_tokenizer([TEXT], "char")
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_heads=4, n_encoder_layers=2,
                      n_decoder_layers=2, d_ff=48, dropout=0.0, max_seq_len=48, **shape)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.normal_(0.0, 0.1)
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, model, cfg)
    tok.save(str(directory / "tokenizer.json"))
    return directory, model, tok


LLAMA_SHAPE = dict(arch="decoder", pos_encoding="rope", norm_placement="pre", norm="rmsnorm", activation="swiglu",
                   bias=False, n_kv_heads=2, rope_base=500.0, tie_embeddings=False, scale_embeddings=False)
GPT2_SHAPE = dict(arch="decoder", pos_encoding="learned", norm_placement="pre", activation="gelu_tanh",
                  scale_embeddings=False)


@pytest.mark.parametrize("shape, architecture", [
    (LLAMA_SHAPE, "LlamaForCausalLM"),
    # Qwen2's shape: Llama with zero output biases (transformers 5 forces Qwen's tokenizer on qwen2 directories)
    (dict(LLAMA_SHAPE, qkv_bias=True, tie_embeddings=True, n_kv_heads=4), "LlamaForCausalLM"),
    (GPT2_SHAPE, "GPT2LMHeadModel"),
])
def test_decoder_exports_with_the_same_logits_tokenizer_and_greedy_ids(tmp_path, shape, architecture):
    directory, model, tok = tformer_checkpoint(tmp_path, **shape)
    out = export(directory, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == architecture
    idx = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx).logits).abs().max().item() <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "the cat"
    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=15, do_sample=False, min_new_tokens=15,
                          pad_token_id=0)[0, len(ids):].tolist()
        seq = list(ids)
        for _ in range(15):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(ids):] == ref


def test_encoder_exports_as_bert(tmp_path):
    shape = dict(arch="encoder", pos_encoding="learned", norm_placement="post", activation="gelu",
                 scale_embeddings=False, embed_norm=True)
    directory, model, _ = tformer_checkpoint(tmp_path, **shape)
    out = export(directory, tmp_path / "out")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    idx = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx).logits).abs().max().item() <= TOL


def test_encoder_decoder_exports_as_bart(tmp_path):
    shape = dict(arch="encoder-decoder", pos_encoding="learned", norm_placement="post", activation="gelu",
                 embed_norm=True, norm_eps=1e-5)  # tie_positions: one position table, copied to both sides
    directory, model, tok = tformer_checkpoint(tmp_path, **shape)
    out = export(directory, tmp_path / "out")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "BartForConditionalGeneration"
    src, tgt = torch.randint(0, model.cfg.vocab_size, (2, 15)), torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=src, decoder_input_ids=tgt).logits
        assert (ref - model(src, tgt).logits).abs().max().item() <= TOL
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == tok.token_to_id("<bos>")


def test_paper_shape_has_no_equivalent_and_says_which_fields(tmp_path):
    directory, _, _ = tformer_checkpoint(tmp_path, arch="encoder-decoder")  # post-norm, sinusoidal, ReLU
    result = runner.invoke(app, ["export", str(directory), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert "pos_encoding='sinusoidal'" in message and "embed_norm=False" in message


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_quick_start_presets_export_as_llama(preset):
    cfg = ModelConfig.from_preset(preset)
    assert export_target(cfg) == "llama"


def test_exported_llama_loads_back_in_tformer(tmp_path):
    directory, model, _ = tformer_checkpoint(tmp_path, **LLAMA_SHAPE)
    out = export(directory, tmp_path / "out")
    again = load_checkpoint(out)
    idx = torch.randint(0, VOCAB if model.cfg.vocab_size > VOCAB else model.cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.allclose(again.model(idx).logits, model(idx).logits, atol=1e-6)
