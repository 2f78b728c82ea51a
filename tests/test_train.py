"""Training: schedules, objectives, the loop from the CLI for all three architectures, exact resume,
interruption, and bad input."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tformer.checkpoint import load_checkpoint
from tformer.cli import app
from tformer.data.batches import IGNORE_INDEX, mask_tokens, span_corrupt
from tformer.data.tokenizer import SpecialIds
from tformer.training.config import TrainConfig
from tformer.training.optim import learning_rate, make_optimizer

runner = CliRunner()
TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--context", "32",
        "--batch-size", "8", "--eval-batches", "2", "--kind", "char", "--quiet"]
SPECIALS = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4)


def write_corpus(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    """Made-up English-like sentences: enough regularity that the loss falls within a few dozen steps."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "finds", "reads", "wants", "keeps"]
    objects = ["the ball", "a book", "the red apple", "some water", "the green door", "a letter"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, n: int = 300) -> Path:
    """A toy translation task: reverse the words of each sentence."""
    rng = random.Random(1)
    words = ["red", "blue", "cat", "dog", "runs", "sleeps", "big", "small", "tree", "house"]
    rows = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        rows.append(" ".join(src) + "\t" + " ".join(reversed(src)))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {j["step"]: j["loss"] for j in map(json.loads, lines)}


def one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# -- schedules and optimizer ------------------------------------------------------------------

def test_cosine_schedule_warms_up_peaks_and_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [learning_rate(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)


def test_noam_schedule_is_the_papers_formula():
    d_model, warmup = 512, 4000
    cfg = TrainConfig(lr=d_model**-0.5 * warmup**-0.5, warmup=warmup, schedule="noam")
    for step in (1, 100, 3999, 4000, 4001, 20000):
        paper = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert learning_rate(step - 1, cfg, 100000) == pytest.approx(paper, rel=1e-9)


def test_constant_schedule():
    cfg = TrainConfig(lr=5e-4, warmup=4, schedule="constant")
    assert [learning_rate(s, cfg, 50) for s in (0, 3, 10, 49)] == pytest.approx([1.25e-4, 5e-4, 5e-4, 5e-4])


def test_weight_decay_skips_norms_biases_and_embeddings():
    from tformer.config import ModelConfig
    from tformer.model.transformer import build_model

    model = build_model(ModelConfig.from_preset("tiny", vocab_size=100, pos_encoding="learned", bias=True))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "decoder.layers.0.self_attn.qkv_proj.weight" in decayed
    assert {"embed.tok.weight", "embed.pos.weight", "decoder.layers.0.ffn_norm.weight",
            "decoder.layers.0.ffn.w1.bias"} <= plain
    assert decayed | plain == set(names.values()) and not decayed & plain


# -- objectives ---------------------------------------------------------------------------------

def test_masked_lm_corruption_follows_bert():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(5, 1000, (64, 512))
    out = mask_tokens(idx, SPECIALS, 1000, 0.15, g)
    chosen = out["labels"] != IGNORE_INDEX
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert torch.equal(out["labels"][chosen], idx[chosen])
    assert torch.equal(out["idx"][~chosen], idx[~chosen])
    masked = (out["idx"] == SPECIALS.mask) & chosen
    kept = (out["idx"] == idx) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02  # (random picks of the same id are rare)


def test_span_corruption_can_be_undone():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        tokens = torch.randint(10, 100, (int(torch.randint(8, 60, (1,), generator=g)),), generator=g)
        src, tgt = span_corrupt(tokens, SPECIALS, 0.15, 3.0, g)
        assert src[-1] == SPECIALS.eos and tgt[-1] == SPECIALS.eos
        # fill each <mask> of the source with the span that follows the same <mask> in the target
        spans, current = [], None
        for t in tgt[:-1].tolist():
            if t == SPECIALS.mask:
                current = []
                spans.append(current)
            else:
                current.append(t)
        rebuilt, k = [], 0
        for t in src[:-1].tolist():
            if t == SPECIALS.mask:
                rebuilt += spans[k]
                k += 1
            else:
                rebuilt.append(t)
        assert rebuilt == tokens.tolist() and k == len(spans) >= 1


# -- the CLI, end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_each_architecture_trains_from_the_cli_and_the_loss_falls(tmp_path, arch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus), "--arch", arch, "--out", str(out), "--steps", "60",
                                 "--lr", "3e-3", "--warmup", "5", "--eval-every", "20", "--log-every", "5", *TINY])
    assert result.exit_code == 0, result.output
    seen = list(losses(out).values())
    first, last = sum(seen[:3]) / 3, sum(seen[-3:]) / 3  # single steps are noisy (few masked tokens)
    assert last < 0.93 * first, (first, last)
    for name in ("latest", "best"):
        ckpt = load_checkpoint(out / name)
        assert ckpt.config.arch == arch and (out / name / "tokenizer.json").is_file()
        assert (out / name / "optimizer.safetensors").is_file()
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["tokens_seen"] > 0 and state["lr"] > 0
    document = json.loads((out / "latest" / "config.json").read_text())
    assert document["train"]["steps"] == 60 and document["model"]["d_model"] == 32
    assert "validation loss" in result.output


def test_encoder_decoder_trains_on_tsv_pairs(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(pairs), "--arch", "encoder-decoder", "--out", str(out),
                                 "--steps", "60", "--lr", "3e-3", "--warmup", "5", "--eval-every", "30", *TINY])
    assert result.exit_code == 0, result.output
    seen = losses(out)
    assert seen[60] < seen[10] * 0.8
    # pairs without --preset train with the transduction preset: no label smoothing (--label-smoothing 0.1: the paper's)
    assert json.loads((out / "latest" / "config.json").read_text())["train"]["label_smoothing"] == 0.0

    # BLEU of greedy translations of the validation pairs, logged with the other validation metrics
    evals = [j for j in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in j]
    assert [j["step"] for j in evals] == [30, 60] and all(0 <= j["val_bleu"] <= 100 for j in evals)
    assert "BLEU" in result.output
    # ... equal to sacrebleu's BLEU of what `tformer generate --temperature 0` writes for the validation
    # sources, against the targets as written in the .tsv file
    from tformer.data.tokens import open_tokens

    n_val = len(open_tokens(out / "data").pairs("val"))
    rows = [line.split("\t") for line in pairs.read_text().splitlines()[-n_val:]]
    prompts = tmp_path / "sources.txt"
    prompts.write_text("".join(src + "\n" for src, _ in rows))
    gen = runner.invoke(app, ["generate", "--checkpoint", str(out / "latest"), "--prompt-file", str(prompts),
                              "--temperature", "0", "--max-new-tokens", "32", "--json"])
    assert gen.exit_code == 0, gen.output
    hypotheses = [c["text"] for c in json.loads(gen.stdout)["completions"]]
    assert len(hypotheses) == n_val
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.corpus_bleu(hypotheses, [[tgt for _, tgt in rows]]).score
    assert evals[-1]["val_bleu"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("optimizer, processes", [("adamw", 1), ("muon", 2)])
def test_resume_continues_bit_for_bit(tmp_path, optimizer, processes):
    """A run stopped at step k and resumed logs the same losses as one that was never stopped (with Muon too:
    its momentum is saved and restored by parameter name; with the batch shared by two processes too: their
    dropout seeds come from the main process's saved generator)."""
    from tformer.training.loop import StopFlag, train
    from tformer.training.plan import plan_run

    corpus = write_corpus(tmp_path / "corpus.txt")
    options = dict(d_model=32, layers=1, heads=2, d_ff=64, context=32, batch_size=4, steps=30, log_every=3,
                   eval_every=10, eval_batches=2, dropout=0.1, warmup=3, optimizer=optimizer, processes=processes)

    def run(out: Path, stop_at: int | None = None, resume: str | None = None):
        plan = plan_run([corpus], options, out=out, kind="char", resume=resume)
        stop = StopFlag()

        def on_event(kind, info):
            if stop_at is not None and kind == "log" and info["step"] == stop_at:
                stop.requested = "SIGINT"

        return train(plan.model_cfg, plan.train_cfg, plan.data, plan.out, resume=plan.resume,
                     init_from=plan.init_model, on_event=on_event, stop=stop)

    straight = tmp_path / "straight"
    run(straight)
    stopped = tmp_path / "stopped"
    first = run(stopped, stop_at=12)
    assert first.stopped == "interrupted" and first.step == 13
    second = run(stopped, resume="auto")
    assert second.step == 30
    a, b = losses(straight), losses(stopped)
    assert set(a) <= set(b)
    assert all(a[step] == b[step] for step in a)  # exactly equal, not approximately


def test_compiled_cpu_runs_use_deterministic_kernels_and_restore_the_setting():
    """torch.compile's CPU kernels add embedding gradients with atomics (the order varies from run to run);
    PyTorch's deterministic mode makes them fall back to the ordered kernel, which a bit-for-bit resume of a
    --compile run needs (checked by hand: a 30-step compiled run stopped at step 13 and resumed logs the same
    losses as an uninterrupted one; compiling makes that too slow for this suite)."""
    from tformer.training.loop import deterministic_kernels

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # ops without such a kernel still run
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_sigterm_saves_and_exits_0_and_the_run_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=2000)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tformer", "train", str(corpus), "--out", str(out), "--steps", "100000",
            "--log-every", "1", *[a for a in TINY if a != "--quiet"]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "step 5/" not in seen:
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen + rest
    assert "--resume auto" in rest and "Traceback" not in rest
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["step"] >= 5
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "auto", "--steps", str(state["step"] + 3),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["step"] == state["step"] + 3


def test_kill_9_leaves_the_previous_checkpoint_loadable(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=2000)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tformer", "train", str(corpus), "--out", str(out), "--steps", "100000",
            "--save-every", "1", "--log-every", "1", *[a for a in TINY if a != "--quiet"]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "step 4/" not in seen:
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    time.sleep(0.3)  # saving every step: the kill lands at an arbitrary point of a save or a step
    proc.kill()
    proc.wait()
    from tformer.checkpoint import find_latest_checkpoint

    ckpt_dir = find_latest_checkpoint(out)
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.config.arch == "decoder"
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "auto", "--steps", "100000",
                                 "--time-budget", "1", "--quiet"])
    assert result.exit_code == 0, result.output


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import tformer.training.loop as core

    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    real = core.loss_fn
    calls = {"n": 0}

    def poisoned(logits, labels, label_smoothing=0.0):
        calls["n"] += 1
        loss = real(logits, labels, label_smoothing)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(core, "loss_fn", poisoned)
    result = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--steps", "40", "--save-every", "10",
                                 "--log-every", "5", "--eval-every", "100", "--processes", "1", *TINY])
    assert "NaN" in one_line_error(result)
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 10
    assert all(torch.isfinite(p).all() for p in load_checkpoint(out / "latest").model.parameters())


def test_init_from_our_checkpoint_starts_from_its_weights(tmp_path):
    """Fine-tuning on raw text (encoded with the checkpoint's tokenizer) or on a token directory written
    with that tokenizer starts where the first run ended, not from a fresh initialisation."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    first = tmp_path / "first"
    common = ["--log-every", "1", "--eval-every", "100", "--lr", "3e-3", "--warmup", "2", *TINY]
    assert runner.invoke(app, ["train", str(corpus), "--out", str(first), "--steps", "40", *common]).exit_code == 0
    start, end = losses(first)[1], losses(first)[40]
    tokens = tmp_path / "tokens"
    assert runner.invoke(app, ["tokenize", str(write_corpus(tmp_path / "more.txt", seed=7)), "--tokenizer",
                               str(first / "latest" / "tokenizer.json"), "--out", str(tokens)]).exit_code == 0
    for name, data in (("raw", tmp_path / "more.txt"), ("tokens", tokens)):
        args = ["train", str(data), "--init-from", str(first / "latest"), "--out", str(tmp_path / name),
                "--steps", "2", *common]
        result = runner.invoke(app, [a for a in args if a not in ("--kind", "char")])
        assert result.exit_code == 0, result.output
        assert abs(losses(tmp_path / name)[1] - end) < 0.25 * (start - end), (name, start, end)
        assert json.loads((tmp_path / name / "latest" / "config.json").read_text())["init_from"] == str(
            first / "latest")


def test_plain_log_lines_when_not_a_terminal_and_quiet_prints_only_the_summary(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = ["train", str(corpus), "--steps", "4", "--log-every", "2", *[a for a in TINY if a != "--quiet"]]
    loud = runner.invoke(app, [*args, "--out", str(tmp_path / "loud")])
    assert loud.exit_code == 0, loud.output
    assert "\x1b[" not in loud.output  # no terminal codes in a log file
    steps = [line for line in loud.output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"]
    assert all(" loss " in line and " lr " in line and "tok/s" in line for line in steps)
    assert " val " in steps[-1] and "training run" in loud.output
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "quiet"), "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "parameters on" not in quiet.output and not [l for l in quiet.output.splitlines() if l.startswith("step ")]
    assert "training run" in quiet.output and "validation loss" in quiet.output


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import tformer.cli.train_view as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=160))
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = runner.invoke(app, ["train", str(corpus), "--steps", "4", "--log-every", "2", "--out",
                                 str(tmp_path / "run"), *[a for a in TINY if a != "--quiet"]])
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    assert "\x1b[" in shown and "━" in shown  # a live bar, redrawn in place
    assert "4/4" in shown and "loss " in shown and " val " in shown and " lr " in shown and "tok/s" in shown
    assert not [line for line in shown.splitlines() if line.startswith("step ")]


def test_bleu_is_skipped_with_one_notice_without_sacrebleu(tmp_path, monkeypatch):
    import tformer.training.loop as core

    monkeypatch.setattr(core, "have_sacrebleu", lambda: False)
    pairs = write_pairs(tmp_path / "pairs.tsv")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(pairs), "--arch", "encoder-decoder", "--out", str(out), "--steps", "4",
                                 "--eval-every", "2", *[a for a in TINY if a != "--quiet"]])
    assert result.exit_code == 0, result.output
    assert result.output.count("BLEU is skipped: it needs sacrebleu") == 1
    evals = [j for j in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in j]
    assert len(evals) == 2 and not any("val_bleu" in j for j in evals)


def test_corpus_bleu_is_papineni_et_al():
    pytest.importorskip("sacrebleu")
    from tformer.training.evaluate import corpus_bleu

    references = ["the cat sat on a mat", "a dog runs in the big park"]
    assert corpus_bleu(references, references) == pytest.approx(100.0)
    # BLEU = BP * exp(mean of log n-gram precisions, n = 1..4); one sentence of equal length (BP = 1):
    # clipped matches 5/6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 four-grams
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)


def test_config_file_is_read_and_flags_override_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = tmp_path / "run.toml"
    config.write_text('steps = 4\nlr = 0.002\nd-model = 48\nheads = 4\nlayers = 1\ncontext = 16\n'
                      'batch_size = 4\neval_batches = 1\n')
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus), "--config", str(config), "--lr", "0.003", "--out", str(out),
                                 "--kind", "char", "--quiet"])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "latest" / "config.json").read_text())
    assert document["train"]["steps"] == 4 and document["train"]["lr"] == 0.003
    assert document["model"]["d_model"] == 48 and document["model"]["max_seq_len"] == 16


def test_init_from_a_gpt2_directory_fine_tunes_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = write_corpus(tmp_path / "corpus.txt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_dir = tmp_path / "gpt2"
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["train", str(corpus), "--init-from", str(hf_dir), "--out", str(out), "--steps", "30",
                                 "--context", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup", "3",
                                 "--log-every", "5", "--eval-batches", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    seen = losses(out)
    assert seen[30] < seen[5]
    tuned = load_checkpoint(out / "latest")
    assert tuned.config.d_model == 32 and tuned.config.vocab_size == tok.get_vocab_size()
    assert json.loads((out / "latest" / "config.json").read_text())["init_from"] == str(hf_dir)


# -- bad input ----------------------------------------------------------------------------------

def test_corpus_shorter_than_one_context_window(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("only a few words here.\n" * 3)
    result = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "run"), *TINY])
    assert "fewer than one context window" in one_line_error(result)
    assert not (tmp_path / "run").exists()  # the tokens cached for the rejected run are gone too


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_that_is_not_there_fails_before_anything_is_written(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "run"), "--device", "cuda", *TINY])
    assert "no CUDA GPU" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_tsv_for_a_decoder(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv")
    result = runner.invoke(app, ["train", str(pairs), "--out", str(tmp_path / "run"), *TINY])
    assert "encoder-decoder" in one_line_error(result)


def test_impossible_shape(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "run"), *TINY, "--heads", "3"])
    assert "not divisible by n_heads=3" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_unwritable_out(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, ["train", str(corpus), "--out", str(blocker / "run"), *TINY])
    assert "cannot write to --out" in one_line_error(result)


def test_existing_run_is_not_overwritten_and_resume_checks_the_architecture(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(out), "--steps", "3", *TINY]).exit_code == 0
    before = (out / "latest" / "model.safetensors").read_bytes()
    again = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--steps", "3", *TINY])
    assert "--resume auto" in one_line_error(again)
    other = runner.invoke(app, ["train", "--out", str(out), "--resume", "auto", "--arch", "encoder", "--quiet"])
    assert "decoder" in one_line_error(other)
    assert (out / "latest" / "model.safetensors").read_bytes() == before


def test_tokenizer_mismatch_between_checkpoint_and_data(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(out), "--steps", "2", *TINY]).exit_code == 0
    other = tmp_path / "other-tokens"
    assert runner.invoke(app, ["tokenize", str(write_corpus(tmp_path / "b.txt", seed=5)), "--kind", "byte",
                               "--out", str(other)]).exit_code == 0
    result = runner.invoke(app, ["train", str(other), "--init-from", str(out / "latest"), "--out",
                                 str(tmp_path / "tuned"), "--quiet"])
    assert "tokenizer of the checkpoint does not match" in one_line_error(result)
    assert not (tmp_path / "tuned" / "latest").exists()
