"""The `transduction` preset (the default for a .tsv of pairs) and the cosine that follows --time-budget."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tformer.cli import app
from tformer.training.config import PAIRS_PRESET, TrainConfig, preset_kind
from tformer.training.optim import learning_rate
from tformer.training.options import resolve_configs

runner = CliRunner()
SMALL = ["--d-model", "32", "--heads", "2", "--d-ff", "64", "--batch-size", "8", "--eval-batches", "1",
         "--threads", "1", "--quiet"]


def write_reversal(path: Path, n: int = 120) -> Path:
    rng = random.Random(3)
    rows = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 6))) for _ in range(n)]
    path.write_text("".join(f"{s}\t{s[::-1]}\n" for s in rows), encoding="utf-8")
    return path


def test_the_preset_resolves_to_a_small_noiseless_model_that_follows_the_budget():
    model, train = resolve_configs({"arch": "encoder-decoder", "preset": "transduction"})
    assert PAIRS_PRESET == "transduction" and preset_kind("transduction") == "char" and preset_kind("tiny") is None
    assert (model.n_encoder_layers, model.n_decoder_layers, model.d_model, model.dropout) == (2, 2, 128, 0.0)
    assert model.norm_placement == "pre" and model.max_seq_len >= train.context
    assert train.label_smoothing == 0.0 and train.decay_to_budget and train.batch_size == 64
    # flags still win over the preset
    _, train = resolve_configs({"arch": "encoder-decoder", "preset": "transduction", "label_smoothing": 0.1})
    assert train.label_smoothing == 0.1


def test_cosine_progress_moves_the_decay_on_only_when_ahead():
    cfg = TrainConfig(lr=1e-3, warmup=10, min_lr_ratio=0.1, schedule="cosine")
    assert learning_rate(50, cfg, 1000) == learning_rate(50, cfg, 1000, progress=0.0)
    assert learning_rate(50, cfg, 1000, progress=1.0) == pytest.approx(1e-4)
    assert learning_rate(50, cfg, 1000, progress=0.5) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert learning_rate(999, cfg, 1000, progress=0.2) == pytest.approx(1e-4)  # the steps are ahead: they rule
    assert learning_rate(4, cfg, 1000, progress=1.0) == pytest.approx(5e-4)  # warmup stays by steps


def test_pairs_default_to_the_preset_train_and_translate(tmp_path):
    pairs = write_reversal(tmp_path / "rev.tsv")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(pairs), "--arch", "encoder-decoder", "--out", str(out),
                                 "--steps", "4", *SMALL])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "latest" / "config.json").read_text())
    assert document["train"]["label_smoothing"] == 0.0 and document["train"]["decay_to_budget"] is True
    assert document["model"]["n_encoder_layers"] == 2 and document["data"]["kind"] == "char"
    prompts = tmp_path / "sources.txt"
    prompts.write_text("abc\nfed\n")
    gen = runner.invoke(app, ["generate", "--checkpoint", str(out), "--prompt-file", str(prompts), "--temperature",
                              "0", "--max-new-tokens", "8", "--json", "--threads", "1"])
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout)["completions"]) == 2
    # a named preset keeps its own tokenizer and options
    result = runner.invoke(app, ["train", str(pairs), "--arch", "encoder-decoder", "--out", str(tmp_path / "tiny"),
                                 "--preset", "tiny", "--steps", "2", *SMALL])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "tiny" / "latest" / "config.json").read_text())
    assert document["data"]["kind"] == "bpe" and document["train"]["label_smoothing"] == 0.1


def test_the_decay_ends_with_the_budget_and_a_resume_continues_it(tmp_path):
    pairs = write_reversal(tmp_path / "rev.tsv")
    out = tmp_path / "run"
    args = ["train", str(pairs), "--arch", "encoder-decoder", "--out", str(out), "--steps", "100000",
            "--warmup", "1", "--lr", "1e-3", "--time-budget", "0.5", *SMALL]
    assert runner.invoke(app, args).exit_code == 0
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["step"] < 100000 and state["progress"] == pytest.approx(1.0)
    assert state["lr"] < 5e-4  # near the floor (lr x min_lr_ratio), not the 1e-3 of the step-based cosine
    result = runner.invoke(app, [*args, "--resume", "auto"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert resumed["step"] > state["step"] and resumed["lr"] == pytest.approx(1e-4)  # not back at the peak
