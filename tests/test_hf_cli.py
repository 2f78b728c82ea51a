"""Imported Llama-family directories through the CLI: `tformer generate --json` gives transformers' greedy
ids, and `tformer train --init-from` fine-tunes one whose checkpoint then generates."""

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_tiny import make  # noqa: E402

from tformer.cli import app  # noqa: E402
from tformer.tokenize import train_tokenizer  # noqa: E402

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
