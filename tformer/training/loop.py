"""The training loop: setup, the optimizer step, evaluation and logging, checkpoints and exact resume.

A run directory (`--out`) holds `latest/` and `best/` (full checkpoints: weights, config, tokenizer,
optimizer state, trainer state) and `metrics.jsonl` (one JSON line per log step). Each checkpoint
directory is built aside and swapped in, so an interrupted save leaves the previous one loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from tformer.checkpoint import (
    OPTIMIZER_FILE,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    save_checkpoint,
)
from tformer.config import ModelConfig
from tformer.data.batches import Batches, eval_batches
from tformer.device import (
    flops_per_token,
    peak_flops,
    resolve_device,
    resolve_precision,
)
from tformer.errors import TformerError
from tformer.files import atomic_directory
from tformer.model.transformer import build_model
from tformer.training import distributed
from tformer.training.config import TrainConfig
from tformer.training.cpu_parallel import (
    CPUDataParallel,
    auto_processes,
    can_fork,
    shared_memory_shortfall,
)
from tformer.training.evaluate import (
    BLEU_SAMPLE,
    corpus_bleu,
    evaluate,
    have_sacrebleu,
    translate_sample,
)
from tformer.training.objectives import (
    TrainData,
    forward_logits,
    loss_fn,
    sequence_tokens,
)
from tformer.training.optim import learning_rate, make_optimizer, set_learning_rate
from tformer.training.plan import check_data, total_steps_for
from tformer.training.resume import restore, truncate_metrics
from tformer.training.state import METRICS_FILE, LoopState


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    total_steps: int
    tokens_seen: int
    elapsed: float
    train_loss: float | None
    val: dict[str, float]
    best_val_loss: float | None
    stopped: str  # "done", "interrupted", "time budget"
    model: nn.Module | None = None


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms while training, then as before. torch.compile's CPU kernels
    otherwise add up embedding gradients with atomics, in an order that changes from run to run, and a
    resumed --compile run would drift from an uninterrupted one in the last bits."""
    if not enabled:
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# -- stopping on request -----------------------------------------------------------------------

class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step (and save); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# -- the run -----------------------------------------------------------------------------------

Event = Callable[[str, dict[str, Any]], None]


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: TrainData,
    out: Path,
    *,
    resume: Path | None = None,
    init_from: nn.Module | None = None,
    on_event: Event | None = None,
    stop: StopFlag | None = None,
    extra_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model_cfg` on `data` with `cfg`, saving checkpoints under `out`. See the module docstring."""
    run = _Run(model_cfg, cfg, data, out, resume, init_from, on_event or (lambda kind, info: None),
               stop or StopFlag(), extra_config or {})
    return run.run()


class _Run:
    """One training run: the model (`self.model`, plain or FSDP-sharded; `self.compiled`, what the step calls:
    compiled and/or DDP-wrapped), its optimizer, batches and state, and the steps that move them."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: TrainData, out: Path, resume: Path | None,
                 init_from: nn.Module | None, emit: Event, stop: StopFlag, extra_config: dict[str, Any]):
        self.model_cfg, self.cfg, self.data, self.out, self.emit, self.stop = model_cfg, cfg, data, out, emit, stop
        self.arch = model_cfg.arch
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.dtype, self.device)
        self.total_steps = total_steps_for(cfg, data)
        check_data(data, cfg)
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
        if init_from is not None:
            model.load_state_dict(init_from.state_dict())
        model.to(self.device)
        # distributed: --fsdp shards the model in place, before the optimizer sees its parameters
        self.model = distributed.shard(model, cfg.fsdp, self.precision, self.device)
        distributed.check_batch_size(cfg.batch_size)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.batches = Batches(data.split("train", cfg), cfg.context, cfg.batch_size, cfg.seed,
                               rank=distributed.rank(), world_size=distributed.world_size())  # this rank's rows
        self.state = LoopState()
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / METRICS_FILE
        if resume is not None:
            self.state = restore(resume, self.model, self.optimizer, self.scaler, self.batches, self.arch)
            if distributed.is_main():  # distributed: rank 0 alone owns metrics.jsonl
                truncate_metrics(self.metrics_path, self.state.step)
        elif distributed.is_main():
            self.metrics_path.unlink(missing_ok=True)
        compiled = torch.compile(self.model) if cfg.compile else self.model
        self.compiled = distributed.wrap(compiled, self.device)  # distributed: DDP on more than one rank
        self.config_doc = {"train": cfg.to_dict(), "data": data.source, **extra_config}
        self.bleu = self._bleu_enabled()
        self.world = distributed.world_size()  # distributed: tokens/s and MFU count all ranks
        peak = peak_flops(self.device)
        self.peak = None if peak is None else peak * self.world
        layers = model_cfg.n_decoder_layers + (model_cfg.n_encoder_layers if model_cfg.has_encoder else 0)
        self.n_params = self.model.num_parameters()
        self.token_flops = flops_per_token(self.n_params, layers, model_cfg.d_model, cfg.context)
        self.smoothing = cfg.label_smoothing if self.arch == "encoder-decoder" else 0.0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.processes = self._processes()
        self.parallel: CPUDataParallel | None = None  # forked in run(), once the model is final

    def _processes(self) -> int:
        """How many CPU processes share each micro-batch (1: this one alone, with intra-op threads)."""
        cfg = self.cfg
        eligible = (self.device.type == "cpu" and self.world == 1 and not cfg.compile
                    and not self.precision.needs_scaler and can_fork())
        if cfg.processes is None:
            return auto_processes(torch.get_num_threads(), cfg.batch_size) if eligible else 1
        if cfg.processes > 1 and not eligible:
            raise TformerError(f"--processes {cfg.processes} needs training on the CPU, in one process (not under "
                               "torchrun), without --compile or fp16, on a system that can fork; use --processes 1")
        return cfg.processes

    def _bleu_enabled(self) -> bool:
        pairs = self.data.objective == "pairs"
        bleu = pairs and have_sacrebleu()
        if pairs and not bleu:
            self.emit("notice", {"message": "BLEU is skipped: it needs sacrebleu (pip install 'tformer[bleu]')"})
        if bleu and distributed.is_sharded(self.model):  # distributed: decoding needs the whole model in one process
            self.emit("notice", {"message": "BLEU is skipped under --fsdp: greedy decoding needs the whole model"})
            return False
        return bleu

    def run(self) -> TrainResult:
        self.compiled.train()
        threads = torch.get_num_threads()
        if self.processes > 1 and self.cfg.processes is None \
                and (shortfall := shared_memory_shortfall(self.model, self.processes)) is not None:
            self.emit("notice", {"message": f"{shortfall}: training in one process with {threads} threads"})
            self.processes = 1
        if self.processes > 1:
            threads = max(1, threads // self.processes)
            self.parallel = CPUDataParallel(self.model, self.arch, self.processes, self.smoothing, self.precision,
                                            threads, self.optimizer)
        try:
            return self._run(threads)
        finally:
            if self.parallel is not None:
                self.parallel.close()

    def _run(self, threads: int) -> TrainResult:
        cfg, state = self.cfg, self.state
        where = str(self.device) + distributed.describe(self.model)  # e.g. " x 8 ranks (DDP)"
        if self.parallel is not None:
            where += f" x {self.parallel.processes} processes"
        self.emit("start", {"total_steps": self.total_steps, "step": state.step, "dtype": self.precision.name,
                            "device": where, "parameters": self.n_params, "out": str(self.out), "threads": threads,
                            "processes": self.processes})
        self.invoked = time.perf_counter()  # --time-budget counts this command, not the runs before a resume
        self.started = self.invoked - state.elapsed
        # decay_to_budget: a resumed run spends the rest of the decay over its own budget
        self.progress_start = state.progress
        self.window_start, self.window_tokens = time.perf_counter(), 0
        stopped = "done"
        with open(self.metrics_path if distributed.is_main() else os.devnull, "a", encoding="utf-8") as metrics, \
                deterministic_kernels(cfg.compile and self.device.type == "cpu"):
            while state.step < self.total_steps:
                step_loss = self.step()
                last = state.step == self.total_steps
                spent = time.perf_counter() - self.invoked
                out_of_time = cfg.time_budget is not None and spent >= cfg.time_budget
                if cfg.decay_to_budget and cfg.time_budget is not None:
                    share = self.progress_start + (1 - self.progress_start) * min(1.0, spent / cfg.time_budget)
                    state.progress = distributed.max_over_ranks(share)  # every rank steps with the same rate
                halt = distributed.any_rank(self.stop.requested is not None or out_of_time)  # stop together
                eval_now = state.step % cfg.eval_every == 0 or last or halt
                if state.step % cfg.log_every == 0 or eval_now:
                    self.log(step_loss, eval_now, metrics)
                if state.step % cfg.save_every == 0 or last or halt:
                    self.check_finite("the last good checkpoint in '{out}' is kept (try a lower --lr)")
                    state.elapsed = time.perf_counter() - self.started
                    self.save("latest")
                if halt:
                    stopped = "interrupted" if self.stop.requested else "time budget"
                    break
        return TrainResult(self.out, state.step, self.total_steps, state.tokens_seen,
                           time.perf_counter() - self.started, state.train_loss, state.val, state.best_val_loss,
                           stopped, distributed.local_model(self.model))

    def step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the step's loss (on the device)."""
        cfg, state, device = self.cfg, self.state, self.device
        lr = learning_rate(state.step, cfg, self.total_steps, state.progress)
        set_learning_rate(self.optimizer, lr, cfg)
        step_loss = torch.zeros((), device=device)
        step_tokens = 0
        pin = device.type == "cuda"
        for micro in range(cfg.grad_accum):
            host_batch = next(self.batches)
            step_tokens += sequence_tokens(host_batch) * self.world  # counted on the CPU copy: no GPU sync
            # pinned memory makes the copy truly asynchronous (from pageable memory it blocks the host)
            batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host_batch.items()}
            if self.parallel is not None:  # CPU: the rows are shared out among processes
                step_loss += self.parallel.forward_backward(batch, 1 / cfg.grad_accum)
                continue
            # distributed: gradients are reduced across ranks in the last micro-batch's backward only
            with distributed.micro_step(self.compiled, last=micro == cfg.grad_accum - 1):
                with self.precision.autocast(device):
                    logits = forward_logits(self.compiled, self.arch, batch)
                loss = loss_fn(logits, batch["labels"], self.smoothing) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        # checked on the device and read only when logging: no host sync in the step
        self.nonfinite |= ~torch.isfinite(step_loss)
        if cfg.clip > 0:
            self.scaler.unscale_(self.optimizer)
            # foreach: a few kernels over all gradients rather than one norm per tensor (not on FSDP's shards)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip,
                                     foreach=None if distributed.is_sharded(self.model) else True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.lr = lr
        state.tokens_seen += step_tokens
        self.window_tokens += step_tokens
        return step_loss

    def check_finite(self, keeps: str) -> None:
        """Stop with one line once a NaN or infinity has reached the loss (read only here: a host sync)."""
        if distributed.any_true(self.nonfinite):
            raise TformerError(f"the loss became NaN or infinite by step {self.state.step}; training stopped and "
                               + keeps.format(out=self.out))

    def log(self, step_loss: torch.Tensor, eval_now: bool, metrics: Any) -> None:
        """A metrics line (and, when due, an evaluation and the best checkpoint)."""
        state = self.state
        self.check_finite("the last good checkpoint in '{out}' is kept (try a lower --lr or --clip)")
        now = time.perf_counter()
        state.train_loss = distributed.mean(step_loss).item()  # distributed: the global batch's loss
        state.elapsed = now - self.started
        line = {"step": state.step, "loss": state.train_loss, "lr": state.lr, "tokens": state.tokens_seen,
                "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9), "time": state.elapsed}
        if self.peak is not None:
            line["mfu"] = self.token_flops * line["tokens_per_s"] / self.peak
        if eval_now:
            state.val = self.evaluate()
            line.update(state.val)
            if state.val and (state.best_val_loss is None or state.val["val_loss"] < state.best_val_loss):
                state.best_val_loss = state.val["val_loss"]
                self.save("best")
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        self.emit("log", line)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        val = eval_batches(self.data.split("val", cfg), cfg.context, cfg.batch_size, cfg.eval_batches, cfg.seed + 1)
        val = distributed.my_share(val)  # distributed: batch i on rank i % world_size
        metrics = evaluate(self.compiled, self.arch, val, self.device, self.precision, self.parallel)
        if self.bleu and metrics:
            with self.parallel.full_threads() if self.parallel is not None else nullcontext():  # greedy decoding
                hypotheses, references = translate_sample(self.model, self.data, BLEU_SAMPLE, cfg.context)
            if hypotheses:
                metrics["val_bleu"] = corpus_bleu(hypotheses, references)
        return metrics

    def save(self, name: str) -> Path:
        target = self.out / name
        # distributed: every rank joins (a sharded model is gathered), rank 0 alone writes
        snapshot = distributed.snapshot_for_saving(self.model, self.optimizer, self.model_cfg)
        if snapshot is None:
            return target
        try:
            with atomic_directory(target) as tmp:
                save_checkpoint(tmp, snapshot[0], self.model_cfg, extra=self.config_doc)
                shutil.copyfile(self.data.tokenizer_path, tmp / TOKENIZER_FILE)
                save_file(snapshot[1], str(tmp / OPTIMIZER_FILE))
                info = self.state.to_json(self.batches, self.scaler, {"arch": self.arch, "total_steps": self.total_steps})
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
                if self.metrics_path.exists():
                    shutil.copyfile(self.metrics_path, tmp / METRICS_FILE)
        except (OSError, SafetensorError) as e:  # a full disk, say: the half-written copy is gone, the last stays
            raise TformerError(f"cannot save the checkpoint '{target}' at step {self.state.step}: "
                               f"{getattr(e, 'strerror', None) or e}; training stopped, the last checkpoint in "
                               f"'{self.out}' is kept (free some space, then --resume auto)") from None
        self.emit("save", {"path": str(target), "step": self.state.step})
        return target
