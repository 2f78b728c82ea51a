"""One checkpoint resolver for every command: what a --checkpoint argument (or none) means, through the CLI
of both `generate` and `inspect`, and for `train --init-from`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from tokenizers import AddedToken, Tokenizer, decoders, models
from typer.testing import CliRunner

from tformer.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tformer.cli import app
from tformer.model.transformer import build_model

runner = CliRunner()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]


def make_checkpoint(directory: Path, age_s: float = 0.0) -> Path:
    """A tiny decoder with a character tokenizer, its weights written `age_s` seconds ago."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in "abcdefgh ":
        vocab[ch] = len(vocab)
    cfg = tiny_config(vocab_size=len(vocab))
    save_checkpoint(directory, build_model(cfg).eval(), cfg)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    weights = directory / "model.safetensors"
    when = weights.stat().st_mtime - age_s
    os.utime(weights, (when, when))
    return directory


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """checkpoints/{a,b}/{latest,best} of different ages, a plain checkpoint, and a transformers GPT-2 directory."""
    root = tmp_path_factory.mktemp("resolve")
    make_checkpoint(root / "checkpoints" / "a" / "latest", age_s=300)
    make_checkpoint(root / "checkpoints" / "a" / "best", age_s=400)
    make_checkpoint(root / "checkpoints" / "b" / "latest", age_s=100)
    make_checkpoint(root / "checkpoints" / "b" / "best", age_s=50)  # a best newer than its latest
    make_checkpoint(root / "plain", age_s=10)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=14, n_positions=32, n_embd=16, n_layer=1,
                                                              n_head=2))
    hf.save_pretrained(root / "hf-gpt2")
    shutil.copyfile(root / "plain" / "tokenizer.json", root / "hf-gpt2" / "tokenizer.json")
    return root


CASES = [  # (argument, the checkpoint it means, whether a note names the choice)
    (None, "checkpoints/b/best", True),  # nothing: the newest under checkpoints/
    ("plain", "plain", False),  # a checkpoint directory: itself
    ("checkpoints/a", "checkpoints/a/latest", True),  # a run: the newer of latest/ and best/
    ("checkpoints/b", "checkpoints/b/best", True),
    ("checkpoints", "checkpoints/b/best", True),  # a directory of runs: the newest below it
    ("checkpoints/a/best", "checkpoints/a/best", False),
    ("hf-gpt2", "hf-gpt2", False),  # a transformers directory
]


@pytest.mark.parametrize("given, meant, noted", CASES)
def test_resolver(tree, monkeypatch, given, meant, noted):
    monkeypatch.chdir(tree)
    path, note = resolve_checkpoint(given)
    assert path == Path(meant)
    assert (note is not None) == noted and (note is None or str(Path(meant)) in note)


@pytest.mark.parametrize("given, meant, noted", CASES)
def test_generate_and_inspect_resolve_alike(tree, monkeypatch, given, meant, noted):
    monkeypatch.chdir(tree)
    flag = [] if given is None else ["-c", given]
    gen = runner.invoke(app, ["generate", *flag, "-p", "abc", "-n", "2", "--temperature", "0", "--json"])
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["checkpoint"] == str(Path(meant))
    ins = runner.invoke(app, ["inspect", *flag, "--json"])
    assert ins.exit_code == 0, ins.output
    assert json.loads(ins.stdout)["anatomy"]["checkpoint"] == str(Path(meant))
    for result in (gen, ins):
        assert (f"using the checkpoint {Path(meant)}" in result.stderr) == noted


def test_an_interrupted_swap_is_read_where_it_stands(tmp_path, monkeypatch):
    """Between the two renames of a checkpoint swap only `.latest.old` exists: every command reads it (and the
    Python loader too), and nothing on disk changes."""
    make_checkpoint(tmp_path / "run" / ".latest.old")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert load_checkpoint(tmp_path / "run" / "latest").path == tmp_path / "run" / ".latest.old"
    for args in (["generate", "-c", str(tmp_path / "run"), "-p", "ab", "-n", "1", "--json"],
                 ["generate", "-c", str(tmp_path / "run" / "latest"), "-p", "ab", "-n", "1", "--json"],
                 ["inspect", "-c", str(tmp_path / "run" / "latest"), "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert ".latest.old" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_nothing_to_resolve_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["generate", "-p", "x"], ["inspect"], ["generate", "-c", "missing", "-p", "x"],
                 ["inspect", "-c", "missing"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
