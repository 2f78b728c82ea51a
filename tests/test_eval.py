"""`tformer eval`: loss against a hand computation, the sliding window, streaming, train's validation, errors."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from typer.testing import CliRunner

import tformer.data.corpus
import tformer.evaluation
from tformer.checkpoint import load_checkpoint, save_checkpoint
from tformer.cli import app
from tformer.data.tokenizer import char_tokenizer
from tformer.evaluation import evaluate_text
from tformer.model.transformer import build_model

runner = CliRunner()
CONTEXT = 16
ALPHABET = "abcdefgh \n"


def _text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A random tiny decoder with a character tokenizer, trained (in config.json) with context 16."""
    torch.manual_seed(0)
    tok = char_tokenizer(ALPHABET)
    root = tmp_path_factory.mktemp("decoder")
    cfg = tiny_config(vocab_size=tok.get_vocab_size(), max_seq_len=64)
    save_checkpoint(root, build_model(cfg), cfg, extra={"train": {"context": CONTEXT}})
    tok.save(str(root / "tokenizer.json"))
    return root


def _hand_nats(model: torch.nn.Module, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Every token after the first scored once, by the window (at most `context` inputs, starting every
    `stride` tokens) that first reaches it; the log-softmax written out, from the model's logits."""
    nats, n, scored_to, begin = 0.0, 0, 0, 0
    last = len(ids) - 1
    while scored_to < last:
        end = min(begin + context, last)
        if end == last and begin + context > last:  # the tail: the window ending at the last token
            begin = max(0, last - context)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
        log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
        for j in range(max(scored_to, begin) + 1, end + 1):  # target index j, predicted at position j - 1
            nats -= float(log_probs[j - 1 - begin, ids[j]])
            n += 1
        scored_to = end
        begin += stride
    return nats, n


@pytest.mark.parametrize("n_chars, stride", [(16 * 5 + 1, 16), (200, 16), (200, 8), (200, 5), (9, 8)])
def test_loss_equals_a_hand_computation(decoder_dir, tmp_path, monkeypatch, n_chars, stride):
    # small pieces, one per encode call: the windows cross many piece boundaries
    monkeypatch.setattr(tformer.data.corpus, "PIECE_BYTES", 32)
    monkeypatch.setattr(tformer.evaluation, "ENCODE_BATCH", 1)
    text = _text(n_chars)
    (tmp_path / "a.txt").write_text(text)
    ckpt = load_checkpoint(decoder_dir)
    tok = char_tokenizer(ALPHABET)
    ids = tok.encode(text).ids
    result = evaluate_text(ckpt.model, tok, [tmp_path / "a.txt"], CONTEXT, stride, batch_size=3)
    nats, n = _hand_nats(ckpt.model, ids, CONTEXT, stride)
    assert result.tokens == n == len(ids) - 1
    assert result.text_tokens == len(ids)
    assert result.loss == pytest.approx(nats / n, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / (math.log(2) * len(text.encode())), rel=1e-5)


def test_cross_entropy_by_hand_on_one_window(decoder_dir, tmp_path):
    """The plainest case: a text shorter than the context is one window, the mean of -log p(next token)."""
    text = "abc defg\nhab"
    (tmp_path / "t.txt").write_text(text)
    ckpt = load_checkpoint(decoder_dir)
    tok = char_tokenizer(ALPHABET)
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        logits = ckpt.model(ids[:, :-1]).logits[0]
    expected = float(F.cross_entropy(logits, ids[0, 1:]))
    got = evaluate_text(ckpt.model, tok, [tmp_path / "t.txt"], CONTEXT)
    assert got.loss == pytest.approx(expected, rel=1e-5) and got.windows == 1 and got.tokens == len(text) - 1


def test_files_are_one_stream(decoder_dir, tmp_path):
    (tmp_path / "a.txt").write_text("abc de")
    (tmp_path / "b.txt").write_text("fgh ab\nc")
    (tmp_path / "ab.txt").write_text("abc defgh ab\nc")
    ckpt = load_checkpoint(decoder_dir)
    tok = char_tokenizer(ALPHABET)
    two = evaluate_text(ckpt.model, tok, [tmp_path / "a.txt", tmp_path / "b.txt"], 4, 2)
    one = evaluate_text(ckpt.model, tok, [tmp_path / "ab.txt"], 4, 2)
    assert two.loss == pytest.approx(one.loss, rel=1e-6) and two.bytes == one.bytes == 14


def test_cli_json_and_table(decoder_dir, tmp_path):
    (tmp_path / "a.txt").write_text(_text(100))
    out = runner.invoke(app, ["eval", "-c", str(decoder_dir), str(tmp_path / "a.txt"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["context"] == CONTEXT and report["stride"] == CONTEXT // 2  # the trained context, half of it
    assert report["tokens"] == 99 and report["bytes"] == 100
    assert {"loss", "perplexity", "bits_per_byte", "tokens_per_s", "text_tokens"} <= report.keys()
    table = runner.invoke(app, ["eval", "-c", str(decoder_dir), str(tmp_path / "a.txt"), "--stride", "16"])
    assert table.exit_code == 0 and "perplexity" in table.stdout and "bits per byte" in table.stdout


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"), (b"", "is empty"), (b"ab\xff\xfecd", "not valid UTF-8"),
])
def test_bad_files_are_one_error_line(decoder_dir, tmp_path, content, expected):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    out = runner.invoke(app, ["eval", "-c", str(decoder_dir), str(path)])
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.txt" in lines[0] and expected in lines[0]


def test_bad_options_and_other_architectures(decoder_dir, tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh")
    for args, expected in ((["--stride", "17"], "--stride 17"), (["--context", "65"], "--context 65"),
                           (["--batch-size", "0"], "--batch-size")):
        out = runner.invoke(app, ["eval", "-c", str(decoder_dir), str(tmp_path / "a.txt"), *args])
        assert out.exit_code == 1 and expected in out.stderr and out.stderr.startswith("error:"), out.output
    (tmp_path / "one.txt").write_text("a")
    out = runner.invoke(app, ["eval", "-c", str(decoder_dir), str(tmp_path / "one.txt")])
    assert out.exit_code == 1 and "too short" in out.stderr
    tok = char_tokenizer(ALPHABET)
    for arch in ("encoder", "encoder-decoder"):
        d = tmp_path / arch
        cfg = tiny_config(arch=arch, vocab_size=tok.get_vocab_size())
        save_checkpoint(d, build_model(cfg), cfg)
        tok.save(str(d / "tokenizer.json"))
        out = runner.invoke(app, ["eval", "-c", str(d), str(tmp_path / "a.txt")])
        assert out.exit_code == 1 and f"is an {arch}" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_equals_train_validation_on_its_own_split(tmp_path):
    """`tformer train --eval-batches 0` scores its whole validation split in non-overlapping windows
    (evaluate() in tformer/training/evaluate.py); `tformer eval --stride CONTEXT` on the split's text agrees.

    The corpus is 175 lines of 17 characters: the split falls after line 157, so the validation text is
    17 x 17 = 289 = 18 x 16 + 1 characters, whole windows of 16 with no tail (which train's validation drops).
    """
    rng = random.Random(1)
    lines = ["".join(rng.choice("abcdefgh ") for _ in range(16)) + "\n" for _ in range(175)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(lines))
    run = tmp_path / "run"
    out = runner.invoke(app, [
        "train", str(corpus), "--kind", "char", "--context", "16", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--d-ff", "64", "--steps", "3", "--batch-size", "4", "--eval-batches", "0",
        "--device", "cpu", "--out", str(run), "--quiet",
    ])
    assert out.exit_code == 0, out.output
    state = json.loads((run / "latest" / "trainer_state.json").read_text())
    val_loss = state["val"]["val_loss"] if "val" in state else state["val_loss"]
    val_text = tmp_path / "val.txt"
    val_text.write_text("".join(lines[158:]))
    meta = json.loads((run / "data" / "meta.json").read_text())
    val_ids = np.memmap(run / "data" / "val.bin", dtype=meta["dtype"], mode="r")
    assert len(val_ids) == 289
    res = runner.invoke(app, ["eval", "-c", str(run / "latest"), str(val_text), "--stride", "16", "--json",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["tokens"] == state["val"].get("val_tokens", 288) == 288
    assert report["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
