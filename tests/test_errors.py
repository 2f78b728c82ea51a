"""Bad inputs, broken files and faults (issue 12): each ends in exactly one `error:` line, exit status 1 (2 for
usage errors), no traceback, quickly, and with nothing in the working directory created or changed.

The commands run in-process through `tformer.cli.run`, as the installed `tformer` script does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tformer.checkpoint import load_checkpoint
from tformer.cli import run
from tformer.errors import TformerError
from tformer.training.lock import RunLock

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--context", "32", "--batch-size", "8",
        "--eval-batches", "2", "--kind", "char", "--quiet"]
BIG = str(2**70)


def invoke(args: list[str], stdin: bytes | None = None) -> int:
    """Run `tformer ARGS` in-process and return its exit status."""
    class _Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8") if stdin is not None else _Terminal()
    try:
        run(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = saved
    return 0


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, mode, and (for files) size and content hash."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                seen[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path.relative_to(root))] = ("file", st.st_mode, st.st_size,
                                                     hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                seen[str(path.relative_to(root))] = ("dir", st.st_mode)
    return seen


def write_corpus(path: Path, lines: int = 300) -> Path:
    words = "the cat a dog sees likes the ball a book red apple some water green door".split()
    path.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8))
                              for i in range(lines)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny trained run (`run/`, checkpoints in run/latest) and its corpus, made once."""
    root = tmp_path_factory.mktemp("base")
    corpus = write_corpus(root / "c.txt")
    code = invoke(["train", str(corpus), *TINY, "--steps", "2", "--eval-every", "2", "--out", str(root / "run")])
    assert code == 0
    assert (root / "run" / "latest" / "optimizer.safetensors").is_file()
    return root


# -- setups: what a case puts in the working directory before it runs --------------------------------

def corpus(work: Path, base: Path) -> None:
    shutil.copy(base / "c.txt", work / "c.txt")


def run_dir(work: Path, base: Path) -> None:
    corpus(work, base)
    shutil.copytree(base / "run", work / "run")


def ckpt(work: Path, base: Path) -> Path:
    shutil.copytree(base / "run" / "latest", work / "ck")
    return work / "ck"


def model_config(**changes) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        ck = ckpt(work, base)
        doc = json.loads((ck / "config.json").read_text())
        doc["model"].update(changes)
        (ck / "config.json").write_text(json.dumps(doc))
    return setup


def config_text(text: str) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        (ckpt(work, base) / "config.json").write_text(text)
    return setup


def tensors(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        ck = ckpt(work, base)
        weights = load_file(str(ck / "model.safetensors"))
        change(weights)
        save_file(weights, str(ck / "model.safetensors"))
    return setup


def nan_weights(weights: dict) -> None:
    weights["embed.tok.weight"] = torch.full_like(weights["embed.tok.weight"], float("nan"))


def int_weights(weights: dict) -> None:
    weights["embed.tok.weight"] = weights["embed.tok.weight"].to(torch.int64)


def huge_header(work: Path, base: Path) -> None:
    """A model.safetensors whose header describes a 12 GiB tensor, in a file of a few bytes."""
    ck = ckpt(work, base)
    header = json.dumps({"embed.tok.weight": {"dtype": "F32", "shape": [3 << 30],
                                              "data_offsets": [0, 12 << 30]}}).encode()
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def truncated(work: Path, base: Path) -> None:
    ck = ckpt(work, base)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])


def shard_index(name: str) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        ck = ckpt(work, base)
        (ck / "model.safetensors").rename(work / "outside.safetensors")
        index = {"metadata": {}, "weight_map": {"embed.tok.weight": name}}
        (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    return setup


def no_tokenizer(work: Path, base: Path) -> None:
    (ckpt(work, base) / "tokenizer.json").unlink()


def trainer_state(change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        run_dir(work, base)
        path = work / "run" / "latest" / "trainer_state.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps(change(state)))
    return setup


def without(key: str) -> Callable[[dict], dict]:
    return lambda state: {k: v for k, v in state.items() if k != key}


def no_optimizer(work: Path, base: Path) -> None:
    run_dir(work, base)
    (work / "run" / "latest" / "optimizer.safetensors").unlink()


def short_corpus(work: Path, base: Path) -> None:
    run_dir(work, base)
    (work / "short.txt").write_text("too short\n" * 3)


def symlink_loop(work: Path, base: Path) -> None:
    corpus(work, base)
    os.symlink("loop", work / "loop")


def files(**contents: bytes | str) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        corpus(work, base)
        for name, data in contents.items():
            path = work / name.replace("__", "/").replace("_DOT_", ".")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def empty_dir(name: str) -> Callable[[Path, Path], None]:
    def setup(work: Path, base: Path) -> None:
        corpus(work, base)
        (work / name).mkdir()
    return setup


@dataclass
class Case:
    id: str
    args: list[str]
    setup: Callable[[Path, Path], None] | None = corpus
    code: int = 1
    stdin: bytes | None = None
    says: str = ""  # a piece of the message


T = ["tokenize"]
R = ["train", "c.txt", *TINY, "--steps", "2", "--out", "new"]
G = ["generate", "-c", "ck", "-p", "the cat", "-n", "2", "--device", "cpu"]
GR = ["generate", "-c", "run", "-p", "the cat", "-n", "2", "--device", "cpu"]
I = ["inspect", "-c", "ck"]
RESUME = ["train", "--out", "run", "--resume", "auto", "--steps", "4", "--quiet"]

CASES = [
    # -- tokenize
    Case("tok-missing", [*T, "nope.txt"], says="nope.txt"),
    Case("tok-empty-file", [*T, "empty.txt"], files(empty_DOT_txt=b""), says="empty"),
    Case("tok-dir-without-text", [*T, "d"], empty_dir("d"), says="no text"),
    Case("tok-not-utf8", [*T, "bad.txt", "--kind", "char"], files(bad_DOT_txt=b"ok\n\xff\xfe\n"), says="UTF-8"),
    Case("tok-vocab-2**70", [*T, "c.txt", "--vocab-size", BIG], says="--vocab-size"),
    Case("tok-vocab-10**30", [*T, "c.txt", "--vocab-size", str(10**30)], says="--vocab-size"),
    Case("tok-vocab-0", [*T, "c.txt", "--vocab-size", "0"], says="--vocab-size"),
    Case("tok-vocab-below-alphabet", [*T, "c.txt", "--vocab-size", "100"], says="--vocab-size"),
    Case("tok-kind", [*T, "c.txt", "--kind", "wordpiece"], says="--kind"),
    Case("tok-val-nan", [*T, "c.txt", "--val-fraction", "nan"], says="--val-fraction"),
    Case("tok-val-inf", [*T, "c.txt", "--val-fraction", "inf"], says="--val-fraction"),
    Case("tok-val-1", [*T, "c.txt", "--val-fraction", "1"], says="--val-fraction"),
    Case("tok-errors", [*T, "c.txt", "--errors", "ignore"], says="--errors"),
    Case("tok-tsv-no-tab", [*T, "p.tsv"], files(p_DOT_tsv="a\tb\nno tab here\n"), says="tab"),
    Case("tok-mixed-tsv", [*T, "p.tsv", "c.txt"], files(p_DOT_tsv="a\tb\n"), says=".tsv"),
    Case("tok-out-not-token-dir", [*T, "c.txt", "--out", "d", "--force"], files(d__x_DOT_txt="x"), says="d"),
    Case("tok-out-exists", [*T, "c.txt", "--out", "d"], files(d__meta_DOT_json="{}"), says="--force"),
    Case("tok-out-is-file", [*T, "c.txt", "--out", "c.txt"], says="not a directory"),
    Case("tok-out-symlink-loop", [*T, "c.txt", "--kind", "char", "--out", "loop/x"], symlink_loop, says="loop"),
    Case("tok-out-unwritable", [*T, "c.txt", "--kind", "char", "--out", "/proc/tformer-test/x"]),
    Case("tok-tokenizer-missing", [*T, "c.txt", "--tokenizer", "none.json"], says="none.json"),
    Case("tok-tokenizer-not-json", [*T, "c.txt", "--tokenizer", "t.json"], files(t_DOT_json="{oops"), says="t.json"),
    Case("tok-glob-nothing", [*T, "zz*.txt"], says="zz*.txt"),
    Case("tok-usage-int", [*T, "c.txt", "--vocab-size", "abc"], code=2, says="--vocab-size"),
    Case("tok-usage-unknown", [*T, "c.txt", "--bogus"], code=2, says="--bogus"),
    # -- train: numbers and options
    Case("train-seed-2**70", [*R, "--seed", BIG], says="seed"),
    Case("train-seed-negative", [*R, "--seed", "-1"], says="seed"),
    Case("train-epochs-inf", [*R[:-4], "--epochs", "inf", "--out", "new"], says="epochs"),
    Case("train-epochs-nan", [*R[:-4], "--epochs", "nan", "--out", "new"], says="epochs"),
    Case("train-lr-inf", [*R, "--lr", "inf"], says="lr"),
    Case("train-lr-zero", [*R, "--lr", "0"], says="lr"),
    Case("train-weight-decay-inf", [*R, "--weight-decay", "inf"], says="weight_decay"),
    Case("train-clip-nan", [*R, "--clip", "nan"], says="clip"),
    Case("train-vocab-10**30", [*R[:-2], "--kind", "bpe", "--vocab-size", str(10**30), "--out", "new"],
         says="--vocab-size"),
    Case("train-d-model-10**9", [*R, "--d-model", str(10**9)], says="d_model"),
    Case("train-d-model-memory", [*R, "--d-model", str(2**22), "--heads", "1"], says="needs about"),
    Case("train-batch-10**9", [*R, "--batch-size", str(10**9)], says="needs about"),
    Case("train-grad-accum-10**20", [*R, "--grad-accum", str(10**20)], says="grad_accum"),
    Case("train-steps-2**70", [*R[:-4], "--steps", BIG, "--out", "new"], says="steps"),
    Case("train-heads-not-divisor", [*R, "--d-model", "30", "--heads", "4"], says="divisible"),
    Case("train-context-zero", [*R, "--context", "0"], says="context"),
    Case("train-dropout", [*R, "--dropout", "1.5"], says="dropout"),
    Case("train-log-every-zero", [*R, "--log-every", "0"], says="log_every"),
    Case("train-time-budget", [*R, "--time-budget", "-1"], says="time_budget"),
    Case("train-schedule", [*R, "--schedule", "bogus"], says="schedule"),
    Case("train-device", [*R, "--device", "tpu"], says="device"),
    Case("train-dtype", [*R, "--dtype", "fp8"], says="dtype"),
    Case("train-preset", [*R, "--preset", "nope"], says="preset"),
    Case("train-config-missing", [*R, "--config", "none.toml"], says="none.toml"),
    Case("train-config-not-toml", [*R, "--config", "r.toml"], files(r_DOT_toml="= nope"), says="r.toml"),
    Case("train-config-unknown-key", [*R, "--config", "r.toml"], files(r_DOT_toml="colour = 3\n"), says="colour"),
    Case("train-context-too-long", [*R, "--context", "20000"], says="context"),
    Case("train-tsv-for-decoder", ["train", "p.tsv", *TINY, "--out", "new"],
         files(p_DOT_tsv="".join(f"a b {i}\tb a {i}\n" for i in range(200))), says="encoder-decoder"),
    Case("train-missing-corpus", ["train", "nope.txt", *TINY, "--out", "new"], says="nope.txt"),
    Case("train-out-symlink-loop", [*R[:-2], "--out", "loop/run"], symlink_loop, says="loop"),
    Case("train-out-unwritable", [*R[:-2], "--out", "/proc/tformer-test/run"], says="--out"),
    Case("train-usage-float", [*R, "--lr", "fast"], code=2, says="--lr"),
    # -- train: runs that exist, resuming, and what must survive a refusal
    Case("train-existing-run", ["train", "c.txt", *TINY, "--out", "run"], run_dir, says="--resume"),
    Case("train-resume-auto-no-out", ["train", "--resume", "auto"], run_dir, says="--out"),
    Case("train-resume-nothing", ["train", "--out", "d", "--resume", "auto"], empty_dir("d"), says="resume"),
    Case("train-resume-and-init", [*RESUME, "--init-from", "run/latest"], run_dir, says="--init-from"),
    Case("train-resume-state-not-object", RESUME, trainer_state(lambda s: [1, 2]), says="trainer_state.json"),
    Case("train-resume-state-no-step", RESUME, trainer_state(without("step")), says="step"),
    Case("train-resume-state-string-step", RESUME, trainer_state(lambda s: {**s, "step": "2"}), says="step"),
    Case("train-resume-state-bad-rng", RESUME, trainer_state(lambda s: {**s, "rng": {"torch": 5}}), says="rng"),
    Case("train-resume-state-not-json", RESUME, trainer_state(lambda s: float("nan")), says="trainer_state.json"),
    Case("train-resume-no-optimizer", RESUME, no_optimizer, says="optimizer.safetensors"),
    Case("train-resume-other-arch", [*RESUME, "--arch", "encoder"], run_dir, says="arch"),
    Case("train-resume-other-shape", [*RESUME, "--d-model", "64"], run_dir, says="d_model"),
    Case("train-resume-short-corpus", ["train", "short.txt", "--out", "run", "--resume", "auto", "--quiet"],
         short_corpus, says="context"),
    Case("train-force-short-corpus", ["train", "short.txt", *TINY, "--out", "run", "--force"], short_corpus,
         says="context"),
    Case("train-init-from-missing", [*R, "--init-from", "nowhere"], says="nowhere"),
    # -- generate: options
    Case("gen-seed-2**70", [*G, "--seed", BIG], ckpt, says="--seed"),
    Case("gen-beams-10**6", [*G, "--beams", str(10**6)], ckpt, says="--beams"),
    Case("gen-samples-10**6", [*G, "--num-samples", str(10**6)], ckpt, says="--num-samples"),
    Case("gen-samples-memory", [*G[:-4], "--num-samples", "4096", "-n", str(2**20)], model_config(max_seq_len=2**20),
         says="needs about"),
    Case("gen-max-new-zero", [*G, "-n", "0"], ckpt, says="max-new-tokens"),
    Case("gen-max-new-2**70", [*G[:-4], "-n", BIG], ckpt, says="max-new-tokens"),
    Case("gen-temperature-nan", [*G, "--temperature", "nan"], ckpt, says="temperature"),
    Case("gen-temperature-negative", [*G, "--temperature", "-1"], ckpt, says="temperature"),
    Case("gen-top-p-zero", [*G, "--top-p", "0"], ckpt, says="top-p"),
    Case("gen-top-p-inf", [*G, "--top-p", "inf"], ckpt, says="top-p"),
    Case("gen-min-p", [*G, "--min-p", "2"], ckpt, says="min-p"),
    Case("gen-repetition-penalty", [*G, "--repetition-penalty", "0"], ckpt, says="repetition-penalty"),
    Case("gen-length-penalty-inf", [*G, "--length-penalty", "inf"], ckpt, says="length-penalty"),
    Case("gen-stop-empty", [*G, "--stop", ""], ckpt, says="stop"),
    Case("gen-device", [*G, "--device", "tpu"], ckpt, says="device"),
    Case("gen-dtype", [*G, "--dtype", "fp8"], ckpt, says="dtype"),
    Case("gen-usage-int", [*G, "--top-k", "many"], ckpt, code=2, says="--top-k"),
    # -- generate: prompts
    Case("gen-stdin-not-utf8", ["generate", "-c", "ck", "-n", "2"], ckpt, stdin=b"the \xff\xfe cat", says="stdin"),
    Case("gen-no-prompt", ["generate", "-c", "ck"], ckpt, says="prompt"),
    Case("gen-empty-prompt", ["generate", "-c", "ck", "-p", ""], ckpt, says="empty"),
    Case("gen-prompt-and-file", [*G, "--prompt-file", "p.txt"], files(p_DOT_txt="x"), says="--prompt-file"),
    Case("gen-prompt-file-missing", ["generate", "-c", "ck", "--prompt-file", "none.txt"], ckpt, says="none.txt"),
    Case("gen-prompt-file-not-utf8", ["generate", "-c", "ck", "--prompt-file", "p.txt"],
         files(p_DOT_txt=b"\xff\n"), says="UTF-8"),
    Case("gen-mask-to-decoder", ["generate", "-c", "ck", "-p", "the <mask> sat"], ckpt, says="mask"),
    # -- generate: checkpoints as untrusted input
    Case("gen-ckpt-missing", G, None, says="ck"),
    Case("gen-ckpt-empty-dir", G, empty_dir("ck"), says="ck"),
    Case("gen-ckpt-tie-embeddings-string", G, model_config(tie_embeddings="no"), says="tie_embeddings"),
    Case("gen-ckpt-bias-int", G, model_config(bias=1), says="bias"),
    Case("gen-ckpt-d-model-hang", G, model_config(d_model=10**12, n_heads=7), says="d_model"),
    Case("gen-ckpt-d-model-not-divisible", G, model_config(d_model=2**24 - 1, n_heads=2), says="divisible"),
    Case("gen-ckpt-vocab-huge", G, model_config(vocab_size=2**24), says="does not match"),
    Case("gen-ckpt-vocab-2**40", G, model_config(vocab_size=2**40), says="vocab_size"),
    Case("gen-ckpt-max-seq-len", G, model_config(max_seq_len=2**40), says="max_seq_len"),
    Case("gen-ckpt-memory", G, model_config(d_model=2**20, n_heads=1, n_kv_heads=1, vocab_size=2**22),
         says="needs about"),
    Case("gen-ckpt-dropout-string", G, model_config(dropout="0.1"), says="dropout"),
    Case("gen-ckpt-norm-eps-nan", G, config_text('{"format": "tformer", "model": {"norm_eps": NaN}}'),
         says="norm_eps"),
    Case("gen-ckpt-unknown-field", G, model_config(colour="red"), says="colour"),
    Case("gen-ckpt-config-not-json", G, config_text("{oops"), says="JSON"),
    Case("gen-ckpt-config-list", G, config_text("[1]"), says="object"),
    Case("gen-ckpt-model-not-object", G, config_text('{"format": "tformer", "model": 3}'), says="model"),
    Case("gen-ckpt-nan-weights", G, tensors(nan_weights), says="embed.tok.weight"),
    Case("gen-ckpt-int-weights", G, tensors(int_weights), says="embed.tok.weight"),
    Case("gen-ckpt-missing-tensor", G, tensors(lambda w: w.pop("embed.tok.weight")), says="embed.tok.weight"),
    Case("gen-ckpt-12gib-header", G, huge_header, says="embed.tok.weight"),
    Case("gen-ckpt-truncated", G, truncated, says="model.safetensors"),
    Case("gen-ckpt-shard-outside", G, shard_index("../outside.safetensors"), says="outside"),
    Case("gen-ckpt-shard-absolute", G, shard_index("/etc/passwd"), says="/etc/passwd"),
    Case("gen-ckpt-no-tokenizer", G, no_tokenizer, says="tokenizer.json"),
    Case("gen-run-no-checkpoint", GR, empty_dir("run"), says="run"),
    # -- inspect
    Case("inspect-missing", I, None, says="ck"),
    Case("inspect-layer", [*I, "-p", "the cat", "--layer", "99"], ckpt, says="layer"),
    Case("inspect-layer-2**70", [*I, "-p", "the cat", "--layer", BIG], ckpt, says="layer"),
    Case("inspect-head", [*I, "-p", "the cat", "--head", "-1"], ckpt, says="head"),
    Case("inspect-stack", [*I, "-p", "the cat", "--stack", "bogus"], ckpt, says="stack"),
    Case("inspect-html-symlink-loop", [*I, "-p", "the cat", "--html", "loop/x.html"],
         lambda w, b: (ckpt(w, b), os.symlink("loop", w / "loop")), says="loop"),
    Case("inspect-html-unwritable", [*I, "-p", "the cat", "--html", "/proc/tformer-test/x.html"], ckpt),
    Case("inspect-nan-weights", I, tensors(nan_weights), says="embed.tok.weight"),
    Case("inspect-tie-embeddings-string", I, model_config(tie_embeddings="no"), says="tie_embeddings"),
    Case("inspect-12gib-header", I, huge_header, says="embed.tok.weight"),
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.args[0] for c in CASES} == {"tokenize", "train", "generate", "inspect"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, base: Path, tmp_path: Path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if case.setup is not None:
        case.setup(work, base)
    before = snapshot(work)
    capsys.readouterr()
    started = time.perf_counter()
    code = invoke(case.args, case.stdin)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    text = out + err
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert code == case.code, text
    assert case.says in errors[0], errors[0]
    assert snapshot(work) == before, "the refused command changed the working directory"
    assert seconds < 20, f"took {seconds:.1f} s"


# -- load_checkpoint from Python: the same checkpoints, the same one-line errors --------------------

CHECKPOINT_CASES = [c for c in CASES if c.id.startswith("gen-ckpt-") and c.setup is not None]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c.id for c in CHECKPOINT_CASES])
def test_load_checkpoint_refuses_a_mutated_checkpoint(case: Case, base: Path, tmp_path: Path, monkeypatch):
    if case.id == "gen-ckpt-no-tokenizer":
        pytest.skip("a checkpoint without a tokenizer loads; generation needs one")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    case.setup(work, base)
    before = snapshot(work)
    with pytest.raises(TformerError) as info:
        load_checkpoint(work / "ck")
    assert "\n" not in str(info.value) and case.says in str(info.value)
    assert snapshot(work) == before


def test_load_checkpoint_recovers_an_interrupted_swap(base: Path, tmp_path: Path):
    """Killed between the two renames of a save, `latest` is missing and `.latest.old` holds it."""
    run_copy = tmp_path / "run"
    shutil.copytree(base / "run", run_copy)
    (run_copy / "latest").rename(run_copy / ".latest.old")
    assert load_checkpoint(run_copy / "latest").config.d_model == 32


def test_checkpoint_files_share_one_mode(base: Path):
    modes = {p.name: p.stat().st_mode & 0o777 for p in (base / "run" / "latest").iterdir()}
    assert len(set(modes.values())) == 1, modes


# -- runs: the lock, a moved run, a refused --force, a full disk -------------------------------------

def test_a_second_training_on_a_locked_run_stops_at_once(base: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir(tmp_path, base)
    before = snapshot(tmp_path)
    with RunLock(tmp_path / "run"):
        started = time.perf_counter()
        code = invoke(RESUME)
        assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert code == 1 and "in use by another tformer train" in err and f"pid {os.getpid()}" in err
    assert snapshot(tmp_path) == before  # the lock file went with the lock
    assert invoke(RESUME) == 0  # released: the run continues


def test_two_trainings_on_one_out(base: Path, tmp_path: Path, capsys, monkeypatch):
    """A real second process: while it trains, an in-process training on the same --out is refused."""
    import subprocess

    run_dir(tmp_path, base)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen([sys.executable, "-m", "tformer", "train", "--out", "run", "--resume", "auto",
                              "--steps", "100000", "--quiet"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / ".lock").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "run" / ".lock").exists()
        monkeypatch.chdir(tmp_path)
        code = invoke(RESUME)
        assert code == 1 and "in use by another tformer train" in capsys.readouterr().err
    finally:
        first.terminate()  # SIGTERM: it saves and exits
        first.wait(60)
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_moved_run_resumes(base: Path, tmp_path: Path, monkeypatch):
    shutil.copytree(base / "run", tmp_path / "elsewhere" / "moved")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert json.loads((tmp_path / "elsewhere/moved/latest/config.json").read_text())["data"]["directory"] == "data"
    assert invoke(["train", "--out", "moved", "--resume", "auto", "--steps", "3", "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)  # and from another directory
    assert invoke(["train", "--out", "elsewhere/moved", "--resume", "auto", "--steps", "4", "--quiet"]) == 0


def test_a_force_that_fails_after_tokenizing_leaves_the_old_run_resumable(base: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir(tmp_path, base)
    (tmp_path / "other.txt").write_text("completely different text, xyz QRS\n" * 20)
    before = snapshot(tmp_path)
    # bpe tokenizing succeeds, then the check that the data holds a context window fails
    assert invoke(["train", "other.txt", *TINY[:-3], "--kind", "bpe", "--vocab-size", "300", "--context", "600",
                   "--out", "run", "--force", "--quiet"]) == 1
    assert snapshot(tmp_path) == before
    assert invoke(RESUME) == 0


def test_a_full_disk_stops_training_with_the_last_checkpoint_intact(base: Path, tmp_path: Path, capsys):
    """On a 1 MiB tmpfs (root only): the second save does not fit."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to make a small file system")
    try:
        shutil.copytree(base / "run", mount / "run", ignore=shutil.ignore_patterns("best"))
        filler = mount / "filler"
        free = shutil.disk_usage(mount).free
        # room for the new data swap but not for a second full checkpoint
        latest_size = sum(p.stat().st_size for p in (mount / "run" / "latest").iterdir())
        filler.write_bytes(b"\0" * max(0, free - latest_size // 2))
        code = invoke(["train", "--out", str(mount / "run"), "--resume", "auto", "--steps", "4", "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
        assert "space" in err
        filler.unlink()
        assert load_checkpoint(mount / "run" / "latest").config.d_model == 32
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- flat memory on any text --------------------------------------------------------------------------

def test_text_without_whitespace_streams_in_bounded_pieces(tmp_path: Path):
    """A 300 KB line with no space or newline is read in pieces of at most WORD_BYTES (plus a character),
    each a whole number of UTF-8 characters, and they add up to the text."""
    from tformer.data.corpus import WORD_BYTES, find_corpus, read_pieces

    text = ("abcdé€𝄞" * 40_000)[:100_000]
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = [piece for piece, _, _ in read_pieces(find_corpus([path])[0], path.stat().st_size, "strict")]
    assert "".join(pieces) == text
    assert max(len(p.encode()) for p in pieces) <= WORD_BYTES + 4


def test_a_long_word_after_spaces_ends_the_piece_before_it():
    from tformer.data.corpus import WORD_BYTES, _piece_end

    buf = b"some words then " + b"x" * (4 * WORD_BYTES) + b" end"
    assert _piece_end(buf, len(buf) - 1) == len(b"some words then")
    assert _piece_end(buf[16:], len(buf) - 17) == WORD_BYTES


def test_bpe_on_text_without_newlines_round_trips(tmp_path: Path, monkeypatch):
    import random

    import numpy as np

    from tformer.data.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefgh") for _ in range(60_000)) + " tail words"
    (tmp_path / "long.txt").write_text(text)
    started = time.perf_counter()
    assert invoke(["tokenize", "long.txt", "--vocab-size", "300", "--out", "tok"]) == 0
    assert time.perf_counter() - started < 30
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    ids = [np.fromfile(tmp_path / "tok" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert "".join(tok.decode(i.tolist(), skip_special_tokens=False) for i in ids) == text
