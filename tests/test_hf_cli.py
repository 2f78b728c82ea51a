"""Imported Llama-family directories through the CLI: `tformer generate --json` gives transformers' greedy
ids, and `tformer train --init-from` fine-tunes one whose checkpoint then generates."""

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import make  # noqa: E402

from tformer.cli import app
from tformer.data.tokenizer import train_tokenizer

runner = CliRunner()
TEXT = "the cat sat on the mat. a dog ran in the park, and the cat saw it.\n" * 20
PROMPTS = ["the cat", "a dog ran"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], "byte")  # 261 ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, <mask> 4, bytes


def hf_dir(root, name, tok):
    hf = make(transformers, name, root, vocab=tok.get_vocab_size())
    tok.save(str(root / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_generate_json_gives_transformers_greedy_ids(tmp_path, tokenizer, name):
    hf = hf_dir(tmp_path, name, tokenizer)
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<eos>")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = runner.invoke(app, ["generate", "-c", str(tmp_path), "--prompt-file", str(prompts), "-n", "30",
                                 "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    ours = [c["token_ids"] for c in json.loads(result.stdout)["completions"]]
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    P = max(map(len, ids))
    inp = torch.tensor([[pad] * (P - len(i)) + i for i in ids])
    attn = (torch.arange(P)[None, :] >= torch.tensor([P - len(i) for i in ids])[:, None]).long()
    with torch.no_grad():
        ref = hf.generate(inp, attention_mask=attn, max_new_tokens=30, do_sample=False, pad_token_id=pad,
                          eos_token_id=eos)[:, P:].tolist()
    ref = [row[:row.index(eos)] if eos in row else row for row in ref]
    assert ours == ref and len(ours[0]) > 0


def test_train_init_from_a_llama_directory_runs_and_its_checkpoint_generates(tmp_path, tokenizer):
    hf_dir(tmp_path / "llama", "llama", tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus), "--init-from", str(tmp_path / "llama"), "--out", str(out),
                                 "--steps", "5", "--context", "32", "--batch-size", "4", "--warmup", "1",
                                 "--eval-batches", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "latest" / "config.json").read_text())
    assert config["model"]["rope_scaling"]["type"] == "llama3" and config["model"]["norm"] == "rmsnorm"
    result = runner.invoke(app, ["generate", "-c", str(out), "-p", "the cat", "-n", "5", "--temperature", "0",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["completions"][0]["token_ids"]) > 0


def test_bert_fill_mask_gives_transformers_top5(tmp_path, tokenizer):
    """The model side of fill-mask: the same ids (tformer feeds no [CLS]/[SEP]) give the same top 5."""
    hf = hf_dir(tmp_path, "bert", tokenizer)
    result = runner.invoke(app, ["generate", "-c", str(tmp_path), "-p", "the <mask> sat on", "--top", "5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    candidates = doc["fill_mask"][0]["masks"][0]
    ids = tokenizer.encode("the<mask> sat on", add_special_tokens=False).ids  # the mask takes its space
    where = ids.index(tokenizer.token_to_id("<mask>"))
    with torch.no_grad():
        probs = hf(torch.tensor([ids])).logits[0, where].softmax(-1)
    p, top = probs.topk(5)
    assert [c["id"] for c in candidates] == top.tolist()
    assert [c["prob"] for c in candidates] == pytest.approx(p.tolist(), abs=1e-5)


def test_bart_greedy_ids_when_the_decoder_starts_with_bos(tmp_path, tokenizer):
    """tformer's generate starts the decoder with <bos>; a BART whose decoder_start_token_id is <bos> (and no
    forced tokens) decodes exactly as transformers does. (BART's own start, </s> then a forced <s>, needs the
    generation loop to read them from the checkpoint: see the report of issue 13.)"""
    bos, eos, pad = (tokenizer.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>"))
    hf = make(transformers, "bart", tmp_path, vocab=tokenizer.get_vocab_size())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(decoder_start_token_id=bos, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                  forced_eos_token_id=None, forced_bos_token_id=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").unlink()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    result = runner.invoke(app, ["generate", "-c", str(tmp_path), "-p", "the cat sat", "-n", "30",
                                 "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["completions"][0]["token_ids"]
    src = torch.tensor([tokenizer.encode("the cat sat", add_special_tokens=False).ids])
    with torch.no_grad():
        ref = hf.generate(src, max_new_tokens=30, do_sample=False, num_beams=1)[0, 1:].tolist()
    ref = ref[:ref.index(eos)] if eos in ref else ref
    assert ours == ref and len(ours) > 0


@pytest.mark.parametrize("name, prompt", [("llama", "the cat"), ("bert", "the <mask> sat"), ("bart", "the cat")])
def test_inspect_reads_imported_directories(tmp_path, tokenizer, name, prompt):
    hf_dir(tmp_path, name, tokenizer)
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", prompt, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["anatomy"]["source"] == f"hf-{name}" and doc["attention"]


@pytest.mark.parametrize("beams", [1, 3])
def test_bart_decodes_with_its_own_start_and_forced_tokens(tmp_path, tokenizer, beams):
    """BART's generation ids as transformers uses them: the decoder starts with decoder_start_token_id (</s>),
    forced_bos_token_id is the first token and forced_eos_token_id the last when the length runs out."""
    hf = hf_dir(tmp_path, "bart", tokenizer)
    hf.generation_config.forced_bos_token_id = 0
    hf.generation_config.forced_eos_token_id = 2
    hf.generation_config.save_pretrained(tmp_path)
    result = runner.invoke(app, ["generate", "-c", str(tmp_path), "-p", "the cat sat", "-n", "12", "--beams",
                                 str(beams), "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["completions"][0]["token_ids"]
    src = torch.tensor([tokenizer.encode("the cat sat").ids])
    with torch.no_grad():
        ref = hf.generate(src, max_new_tokens=12, do_sample=False, num_beams=beams, early_stopping=False,
                          length_penalty=1.0)[0].tolist()
    assert ref[0] == 2 and ref[1] == 0  # decoder start, then the forced <s>
    ref = ref[1:]
    ref = ref[:ref.index(2)] if 2 in ref else ref  # our ids stop before the eos that ends the row
    assert ours == ref


def test_half_precision_weights_keep_their_dtype_on_a_gpu(tmp_path):
    """The headers decide: a checkpoint stored mostly in bf16 (or fp16) loads in that dtype on a GPU with
    --dtype auto; fp32 checkpoints get the usual choice."""
    from safetensors.torch import save_file

    from tformer.generation.load import stored_half_dtype

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, None)):
        d = tmp_path / str(dtype)
        d.mkdir()
        save_file({"a": torch.zeros(64, 64, dtype=dtype), "norm": torch.zeros(8)}, str(d / "model.safetensors"))
        assert stored_half_dtype(d) == name
    assert stored_half_dtype(tmp_path / "missing") is None
