"""Data parallelism across CPU cores (training/cpu_parallel.py): the shared-out step computes the gradient of the
whole micro-batch, for every objective; a helper's death stops the run with one line; the CLI checks the option."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tformer.cli import app
from tformer.data.batches import IGNORE_INDEX, Batches, Objective
from tformer.data.tokens import PairTokens
from tformer.device import resolve_precision
from tformer.errors import TformerError
from tformer.model.transformer import build_model
from tformer.training.cpu_parallel import CPUDataParallel, can_fork
from tformer.training.objectives import forward_logits, loss_fn

from conftest import tiny_config
from test_train import SPECIALS, TINY, one_line_error, write_corpus

pytestmark = pytest.mark.skipif(not can_fork(), reason="helpers are forked")
FP32 = resolve_precision("fp32", torch.device("cpu"))
runner = CliRunner()


def tiny(arch: str, dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = tiny_config(arch=arch, vocab_size=40, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, max_seq_len=32,
                      dropout=dropout)
    return build_model(cfg).train()


def batch_of(objective: str) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    if objective == "pairs":
        lengths = rng.integers(1, 14, size=(2, 40))  # uneven rows: padding, and shares with unequal token counts
        src, tgt = ([rng.integers(5, 40, n).astype(np.uint16) for n in side] for side in lengths)
        offsets = [np.concatenate([[0], np.cumsum([len(x) for x in side])]) for side in (src, tgt)]
        pairs = PairTokens(np.concatenate(src), offsets[0], np.concatenate(tgt), offsets[1])
        obj = Objective("pairs", pairs=pairs, specials=SPECIALS, vocab_size=40)
    else:
        obj = Objective(objective, tokens=rng.integers(5, 40, 4000).astype(np.uint16), specials=SPECIALS,
                        vocab_size=40)
    return next(Batches(obj, 16, 7, seed=3))  # 7 rows: shares of 3 and 4 (or 3, 2, 2)


def gradients_alone(model, arch, batch, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(forward_logits(model, arch, batch), batch["labels"]) * scale
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch, objective", [("decoder", "causal"), ("encoder", "masked"),
                                             ("encoder-decoder", "pairs")])
def test_shared_out_gradients_equal_the_whole_batch_gradients(arch, objective):
    model = tiny(arch)
    batch = batch_of(objective)
    if objective == "masked":  # labelled tokens differ from row to row: the shares must be weighted by them
        counts = (batch["labels"] != IGNORE_INDEX).sum(1)
        assert counts.unique().numel() > 1
    expected_loss, expected = gradients_alone(model, arch, batch, scale=0.5)
    for processes in (2, 3):
        model.zero_grad(set_to_none=True)
        parallel = CPUDataParallel(model, arch, processes, 0.0, FP32)
        try:
            loss = parallel.forward_backward(batch, 0.5)
            loss = loss + parallel.forward_backward(batch, 0.5)  # a second micro-batch adds to .grad
        finally:
            parallel.close()
        assert loss.item() == pytest.approx(2 * expected_loss.item(), rel=1e-5)
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, 2 * g, rtol=1e-4, atol=1e-6)


def test_parameters_updated_in_place_are_seen_by_the_helpers_and_dropout_is_reproducible():
    model = tiny("decoder", dropout=0.3)
    batch = batch_of("causal")

    def two_steps():
        torch.manual_seed(5)
        parallel = CPUDataParallel(model, "decoder", 2, 0.0, FP32)
        try:
            grads = []
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                parallel.forward_backward(batch, 1.0)
                grads.append([p.grad.clone() for p in model.parameters()])
                with torch.no_grad():  # as an optimizer does: in place, in this process only
                    for p in model.parameters():
                        p.mul_(0.5)
        finally:
            parallel.close()
        return grads

    start = {k: v.clone() for k, v in model.state_dict().items()}
    first = two_steps()
    model.load_state_dict(start)
    second = two_steps()
    for a, b in zip(first[1] + first[0], second[1] + second[0]):
        assert torch.equal(a, b)  # the helpers' dropout seeds come from this process's generator
    # the helper computed its share at the halved weights: the second step's gradient is not the first's
    assert not all(torch.equal(a, b) for a, b in zip(first[0], first[1]))


def test_a_killed_helper_stops_the_step_with_an_error_not_a_hang():
    model = tiny("decoder")
    batch = batch_of("causal")
    parallel = CPUDataParallel(model, "decoder", 2, 0.0, FP32)
    try:
        parallel.forward_backward(batch, 1.0)
        os.kill(parallel.helpers[0][0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TformerError, match="training process 1 of 2 was killed by signal SIGKILL"):
            parallel.forward_backward(batch, 1.0)
        assert time.monotonic() - start < 10
    finally:
        parallel.close()
    assert torch.get_num_threads() >= 1


def test_helpers_end_with_the_run_and_threads_are_given_back(tmp_path):
    threads = torch.get_num_threads()
    model = tiny("decoder")
    parallel = CPUDataParallel(model, "decoder", 2, 0.0, FP32)
    process = parallel.helpers[0][0]
    assert torch.get_num_threads() == 1
    with parallel.full_threads():
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == 1
    parallel.close()
    assert not process.is_alive() and process.exitcode == 0
    assert torch.get_num_threads() == threads


def test_cli_trains_with_processes_and_checks_the_option(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    ok = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--steps", "4", "--processes", "2",
                             *[a for a in TINY if a != "--quiet"]])
    assert ok.exit_code == 0, ok.output
    assert "x 2 processes (fp32, 1 thread each)" in ok.output
    zero = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "z"), "--processes", "0", *TINY])
    assert "processes" in one_line_error(zero)
    compiled = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "c"), "--processes", "2",
                                   "--compile", *TINY])
    assert "--processes 2 needs training on the CPU" in one_line_error(compiled)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
def test_helpers_do_not_hold_the_run_lock(tmp_path):
    """A helper still finishing its share after the main process was killed must not keep --out locked."""
    from tformer.training.lock import RunLock

    with RunLock(tmp_path / "run") as lock:
        parallel = CPUDataParallel(tiny("decoder"), "decoder", 2, 0.0, FP32)
        try:
            pid = parallel.helpers[0][0].pid
            parallel.forward_backward(batch_of("causal"), 1.0)  # the helper has closed what it inherited by now
            opened = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert str(lock.path.resolve()) not in opened
            assert str(lock.path.resolve()) in {os.path.realpath(f"/proc/self/fd/{fd}")
                                                for fd in os.listdir("/proc/self/fd")}
        finally:
            parallel.close()


def test_shared_out_evaluation_equals_one_process():
    from tformer.training.evaluate import evaluate

    model = tiny("encoder-decoder", dropout=0.3)  # eval mode in every process: no dropout anywhere
    batches = [batch_of("pairs") for _ in range(5)]  # 5 batches over 2 processes: a last round of one
    alone = evaluate(model, "encoder-decoder", iter(batches), torch.device("cpu"), FP32)
    parallel = CPUDataParallel(model, "encoder-decoder", 2, 0.0, FP32)
    try:
        shared = evaluate(model, "encoder-decoder", iter(batches), torch.device("cpu"), FP32, parallel)
        assert model.training  # as it was
    finally:
        parallel.close()
    assert shared["val_tokens"] == alone["val_tokens"] and shared["val_acc"] == alone["val_acc"]
    assert shared["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)


def test_shared_out_orthogonalization_equals_one_process_and_a_muon_step_uses_it():
    from tformer.training.config import TrainConfig
    from tformer.training.optim import make_optimizer, orthogonalize_each

    g = torch.Generator().manual_seed(0)
    stacks = [torch.randn(3, 8, 20, generator=g), torch.randn(1, 16, 16, generator=g), torch.randn(4, 6, 9, generator=g)]
    model, twin = tiny("decoder"), tiny("decoder")
    opts = [make_optimizer(m, TrainConfig(optimizer="muon"), torch.device("cpu")) for m in (model, twin)]
    # one stack has fewer matrices than processes; the optimizer's orthogonalization is shared out while it lives
    parallel = CPUDataParallel(model, "decoder", 3, 0.0, FP32, optimizer=opts[0])
    try:
        assert opts[0].orthogonalize_stacks == parallel.orthogonalize
        shared = parallel.orthogonalize(stacks, 5)
        alone = orthogonalize_each(stacks, 5)
        assert [len(s) for s in shared] == [3, 1, 4]
        for s, a in zip(shared, alone):
            for x, y in zip(s, a):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        # a Muon step with the stacks shared out moves the weights as one computed alone
        calls = []
        opts[0].orthogonalize_stacks = lambda st, n: calls.append(len(st)) or parallel.orthogonalize(st, n)
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        for opt in opts:
            opt.step()
        assert calls and calls[0] > 0
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        parallel.close()
    assert opts[0].orthogonalize_stacks is None  # the helpers are gone: the optimizer works alone again


def test_too_little_shared_memory_falls_back_to_threads_or_stops_with_one_line(tmp_path, monkeypatch):
    """A full tmpfs kills the process that writes to it with SIGBUS: the need is checked before sharing."""
    import tformer.training.cpu_parallel as cp

    monkeypatch.setattr(cp, "shared_memory_free", lambda: 100_000)
    corpus = write_corpus(tmp_path / "corpus.txt")
    auto = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "a"), "--steps", "2", "--threads", "2",
                               *[a for a in TINY if a != "--quiet"]])
    assert auto.exit_code == 0, auto.output
    assert "shared memory" in auto.output and "x 2 processes" not in auto.output
    explicit = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "e"), "--steps", "2",
                                   "--processes", "2", *TINY])
    assert "MiB of shared memory in /dev/shm" in one_line_error(explicit)
