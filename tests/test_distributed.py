"""Distributed training on the CPU: 2 ranks under torchrun (gloo), against one process.

Each test starts `python -m torch.distributed.run --standalone --nproc_per_node=2` on a tiny model
and corpus, through a small worker that runs the ordinary `tformer train` CLI and, for the test
only, records what each rank ends with.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from typer.testing import CliRunner

from tformer.checkpoint import load_checkpoint
from tformer.cli import app

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

runner = CliRunner()
# dropout 0 and fp32 on the CPU: a 2-rank run must reproduce the one-process losses
TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--context", "32", "--batch-size", "8",
        "--eval-batches", "3", "--log-every", "1", "--dropout", "0", "--device", "cpu", "--warmup", "2", "--quiet"]

# Runs `tformer train ARGS` like `torchrun -m tformer` does. With RECORD_DIR set, each rank also writes a
# digest of its final parameters; with KILL_AT_STEP, rank 1 kills itself (SIGKILL) at that step; with
# INTERRUPT_AT_STEP, rank 0 sends the launcher (its parent) SIGINT, as Ctrl-C in its terminal would.
WORKER = """
import hashlib, os, signal, sys
from pathlib import Path
import tformer.training.loop as core

real_train = core.train

def train(*args, **kwargs):
    view = kwargs["on_event"]
    def on_event(kind, info):
        if kind == "log" and os.environ["RANK"] == "1" and info["step"] == int(os.environ.get("KILL_AT_STEP", 0)):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "log" and os.environ["RANK"] == "0" and info["step"] == int(os.environ.get("INTERRUPT_AT_STEP", 0)):
            os.kill(os.getppid(), signal.SIGINT)
        view(kind, info)
    kwargs["on_event"] = on_event
    result = real_train(*args, **kwargs)
    if "RECORD_DIR" in os.environ and result.model is not None:
        digest = hashlib.sha256()
        for name, p in sorted(result.model.state_dict().items()):
            digest.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
        Path(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.txt").write_text(digest.hexdigest())
    return result

core.train = train
from tformer.cli import app
app(["train", *sys.argv[1:]], prog_name="tformer")
"""


def write_corpus(path: Path, n_lines: int = 400) -> Path:
    rng = random.Random(0)
    subjects, verbs = ["the cat", "a dog", "my friend", "the old man"], ["sees", "likes", "finds", "reads"]
    objects = ["the ball", "a book", "the red apple", "some water"]
    path.write_text("\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                              for _ in range(n_lines)) + "\n", encoding="utf-8")
    return path


def torchrun(tmp_path: Path, args: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TFORMER_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                            cwd=tmp_path, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {j["step"]: j[key] for j in map(json.loads, lines) if key in j}


def assert_close(a: dict[int, float], b: dict[int, float], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, (worst, a, b)


@pytest.mark.parametrize("objective", ["causal", "masked", "span", "pairs"])
def test_ranks_split_the_global_batch_of_one_process(objective):
    """The rows of ranks 0..3 of a global batch, stacked, are the batch one process draws."""
    from tformer.data.batches import Batches, Objective
    from tformer.data.tokenizer import SpecialIds
    from tformer.data.tokens import PairTokens

    rng = np.random.default_rng(0)
    specials = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4)
    tokens = rng.integers(5, 50, size=2000).astype(np.uint16)
    lengths = rng.integers(2, 9, size=(60, 2))
    offsets = [np.concatenate([[0], np.cumsum(lengths[:, i])]) for i in (0, 1)]
    pairs = PairTokens(rng.integers(5, 50, size=offsets[0][-1]).astype(np.uint16), offsets[0],
                       rng.integers(5, 50, size=offsets[1][-1]).astype(np.uint16), offsets[1])
    obj = Objective(objective, tokens if objective != "pairs" else None, pairs if objective == "pairs" else None,
                    specials, 50)
    one = Batches(obj, 16, 8, seed=3)
    ranks = [Batches(obj, 16, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        whole, parts = next(one), [next(b) for b in ranks]
        for key, value in whole.items():
            width = max(p[key].shape[1] for p in parts)
            assert all(p[key].shape[0] == 2 for p in parts)
            # pairs are padded per rank; pad the stacked rows back to the global batch's width
            stacked = torch.cat([torch.nn.functional.pad(p[key], (0, value.shape[1] - p[key].shape[1]),
                                                         value=_pad_value(key, specials)) for p in parts])
            assert width <= value.shape[1] and torch.equal(stacked, value), key
    assert all(torch.equal(b.state(), one.state()) for b in ranks)  # one data position for every rank


def test_evaluation_batches_are_dealt_round_robin_with_the_same_count_per_rank(monkeypatch):
    from tformer.training import distributed

    batches = [{"idx": torch.full((2, 3), i), "labels": torch.full((2, 3), i)} for i in range(7)]
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(list(distributed.my_share(iter(batches))))
    assert [len(s) for s in shares] == [3, 3, 3]  # FSDP: every rank runs every forward pass
    counted = sorted(int(b["labels"][0, 0]) for s in shares for b in s if (b["labels"] != -100).any())
    assert counted == list(range(7))  # each batch is scored once, by rank i % 3


def _pad_value(key: str, specials) -> int:
    return {"labels": -100, "src_mask": 0, "tgt_mask": 0}.get(key, specials.pad)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One process, 20 steps, global micro-batch 8 with 2 micro-batches per step (the 2-rank runs split it)."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(tmp / "corpus.txt")
    out = tmp / "one"
    result = runner.invoke(app, ["train", str(corpus), *TINY, "--kind", "char", "--grad-accum", "2",
                                 "--steps", "20", "--eval-every", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return corpus, out


def test_two_ranks_train_exactly_like_one_process(tmp_path, reference):
    corpus, one = reference
    out = tmp_path / "two"
    proc = torchrun(tmp_path, [str(corpus), *TINY, "--kind", "char", "--grad-accum", "2", "--steps", "20",
                               "--eval-every", "10", "--out", str(out)], env={"RECORD_DIR": str(tmp_path)})
    output = finish(proc)
    assert proc.returncode == 0, output
    # the ranks end with identical parameters (DDP averaged the same gradients into both)
    digests = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1
    # the same loss curve and validation as one process with the same global batch: the ranks split
    # each global batch, so only the order of float sums differs
    assert_close(losses(out), losses(one), 1e-5)
    assert_close(losses(out, "val_loss"), losses(one, "val_loss"), 1e-5)
    assert sorted(losses(out)) == list(range(1, 21))  # one metrics line per step: rank 0 alone writes
    assert output.count("training run") == 1  # rank 0 alone prints the summary
    # the checkpoint is the ordinary one-process format, with the same weights and optimizer state
    a, b = load_file(str(out / "latest/model.safetensors")), load_file(str(one / "latest/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    a, b = (load_file(str(d / "latest/optimizer.safetensors")) for d in (out, one))
    assert a.keys() == b.keys()
    assert json.loads((out / "latest/trainer_state.json").read_text())["step"] == 20
    # ... which one process loads and generates from: greedy text equal to the one-process model's
    assert load_checkpoint(out / "latest").config == load_checkpoint(one / "latest").config
    texts = []
    for run in (out, one):
        result = runner.invoke(app, ["generate", "-c", str(run / "latest"), "-p", "the cat", "-n", "12",
                                     "--temperature", "0"])
        assert result.exit_code == 0, result.output
        texts.append(result.stdout)
    assert texts[0] == texts[1] and texts[0].strip()
    result = runner.invoke(app, ["inspect", "--checkpoint", str(out / "latest")])
    n_params = load_checkpoint(out / "latest").model.num_parameters()
    assert result.exit_code == 0 and f"{n_params:,}" in result.output, result.output


def test_ctrl_c_saves_once_and_a_sharded_run_resumes_it(tmp_path, reference):
    """Ctrl-C on the launcher: both ranks stop at the same step and rank 0 saves once. Then FSDP
    (fully_shard on the CPU with gloo) resumes that checkpoint on 2 ranks and finishes like one process."""
    corpus, one = reference
    out = tmp_path / "run"
    proc = torchrun(tmp_path, [str(corpus), *TINY, "--kind", "char", "--steps", "20", "--eval-every", "10",
                               "--grad-accum", "2", "--out", str(out)], env={"INTERRUPT_AT_STEP": "3"})
    output = finish(proc)
    stopped = json.loads((out / "latest/trainer_state.json").read_text())["step"]
    assert output.count(f"stopped at step {stopped}") == 1, output
    assert "Traceback" not in output.split("stopped at step")[0]  # the ranks stopped cleanly
    assert stopped < 20 and sorted(losses(out)) == list(range(1, stopped + 1))
    # the run was resumable: one rank-0 checkpoint with its metrics up to the stop
    assert not list(out.glob(".latest.*"))

    proc = torchrun(tmp_path, ["--out", str(out), "--resume", "auto", "--fsdp", "--quiet"])
    output = finish(proc)
    assert proc.returncode == 0, output
    assert sorted(losses(out)) == list(range(1, 21))
    resumed = {k: v for k, v in losses(out).items() if k > stopped}
    assert_close(resumed, {k: v for k, v in losses(one).items() if k > stopped}, 1e-4)
    # the sharded run was gathered into an ordinary checkpoint
    a, b = load_file(str(out / "latest/model.safetensors")), load_file(str(one / "latest/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # AdamW's moments were restored into the shards, carried on, and gathered back
    a, b = (load_file(str(d / "latest/optimizer.safetensors")) for d in (out, one))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert load_checkpoint(out / "latest").model.num_parameters() > 0


def test_a_killed_rank_stops_the_others_with_one_line(tmp_path, reference):
    corpus, _ = reference
    out = tmp_path / "run"
    proc = torchrun(tmp_path, [str(corpus), *TINY, "--kind", "char", "--steps", "1000", "--out", str(out)],
                    env={"KILL_AT_STEP": "3"})
    started = time.time()
    output = finish(proc, timeout=60)
    assert proc.returncode != 0
    assert time.time() - started < 60
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with the other ranks" in errors[0], output
    assert "tformer/" not in output  # no traceback from tformer (torchrun prints its own report)
