"""The training loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tformer.checkpoint import (
    OPTIMIZER_FILE,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    save_checkpoint,
    unwrap_model,
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
from tformer.training.evaluate import (
    BLEU_SAMPLE,
    corpus_bleu,
    evaluate,
    have_sacrebleu,
    translate_sample,
)
from tformer.training.objectives import TrainData, _seq_tokens, forward_logits, loss_fn
from tformer.training.optim import learning_rate, make_optimizer
from tformer.training.plan import check_data, total_steps_for
from tformer.training.state import METRICS_FILE, LoopState, _restore, _truncate_metrics

"""The training loop: objectives, learning-rate schedules, evaluation, checkpoints and exact resume.

A run directory (`--out`) holds `latest/` and `best/` (full checkpoints: weights, config, tokenizer,
optimizer state, trainer state) and `metrics.jsonl` (one JSON line per log step). Each checkpoint
directory is built aside and swapped in, so an interrupted save leaves the previous one loadable.
"""


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
    emit = on_event or (lambda kind, info: None)
    stop = stop or StopFlag()
    arch = model_cfg.arch
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device)
    total_steps = total_steps_for(cfg, data)
    check_data(data, cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if init_from is not None:
        model.load_state_dict(unwrap_model(init_from).state_dict())
    model.to(device)
    # distributed: --fsdp shards the model in place, before the optimizer sees its parameters
    model = distributed.shard(model, cfg.fsdp, precision, device)
    distributed.check_batch_size(cfg.batch_size)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    batches = Batches(data.split("train", cfg), cfg.context, cfg.batch_size, cfg.seed,
                      rank=distributed.rank(), world_size=distributed.world_size())  # distributed: this rank's rows
    state = LoopState()
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_FILE
    if resume is not None:
        state = _restore(resume, model, optimizer, scaler, batches, arch)
        if distributed.is_main():  # distributed: rank 0 alone owns metrics.jsonl
            _truncate_metrics(metrics_path, state.step)
    elif distributed.is_main():
        metrics_path.unlink(missing_ok=True)
    compiled = torch.compile(model) if cfg.compile else model
    compiled = distributed.wrap(compiled, device)  # distributed: DDP on more than one rank (unless sharded)

    config_doc = {"train": cfg.to_dict(), "data": data.source, **(extra_config or {})}

    def save(name: str) -> Path:
        target = out / name
        # distributed: every rank joins (a sharded model is gathered), rank 0 alone writes
        snapshot = distributed.snapshot_for_saving(model, optimizer, model_cfg)
        if snapshot is None:
            return target
        with atomic_directory(target) as tmp:
            save_checkpoint(tmp, snapshot[0], model_cfg, extra=config_doc)
            shutil.copyfile(data.tokenizer_path, tmp / TOKENIZER_FILE)
            save_file(snapshot[1], str(tmp / OPTIMIZER_FILE))
            info = state.to_json(batches, scaler, {"arch": arch, "total_steps": total_steps})
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            if metrics_path.exists():
                shutil.copyfile(metrics_path, tmp / METRICS_FILE)
        emit("save", {"path": str(target), "step": state.step})
        return target

    bleu = data.objective == "pairs" and have_sacrebleu()
    if data.objective == "pairs" and not bleu:
        emit("notice", {"message": "BLEU is skipped: it needs sacrebleu (pip install 'tformer[bleu]')"})
    if bleu and distributed.is_sharded(model):  # distributed: decoding needs the whole model in one process
        bleu = False
        emit("notice", {"message": "BLEU is skipped under --fsdp: greedy decoding needs the whole model"})

    def run_eval() -> dict[str, float]:
        val = eval_batches(data.split("val", cfg), cfg.context, cfg.batch_size, cfg.eval_batches, cfg.seed + 1)
        val = distributed.my_share(val)  # distributed: batch i on rank i % world_size
        metrics = evaluate(compiled, arch, val, device, precision)
        if bleu and metrics:
            hypotheses, references = translate_sample(model, data, BLEU_SAMPLE, cfg.context)
            if hypotheses:
                metrics["val_bleu"] = corpus_bleu(hypotheses, references)
        return metrics

    emit("start", {"total_steps": total_steps, "step": state.step, "dtype": precision.name,
                   "device": str(device) + distributed.describe(model),  # distributed: e.g. " x 8 ranks (DDP)"
                   "parameters": unwrap_model(model).num_parameters(), "out": str(out)})
    peak = peak_flops(device)
    world = distributed.world_size()  # distributed: tokens/s and MFU count all ranks
    pin = device.type == "cuda"
    if peak is not None:
        peak *= world
    layers = model_cfg.n_decoder_layers + (model_cfg.n_encoder_layers if model_cfg.has_encoder else 0)
    token_flops = flops_per_token(unwrap_model(model).num_parameters(), layers, model_cfg.d_model, cfg.context)
    compiled.train()
    smoothing = cfg.label_smoothing if arch == "encoder-decoder" else 0.0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    started = time.perf_counter() - state.elapsed
    window_start, window_tokens = time.perf_counter(), 0
    stopped = "done"
    with open(metrics_path if distributed.is_main() else os.devnull, "a", encoding="utf-8") as metrics, \
            deterministic_kernels(cfg.compile and device.type == "cpu"):
        while state.step < total_steps:
            lr = learning_rate(state.step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                host_batch = next(batches)
                step_tokens += _seq_tokens(host_batch) * world  # counted on the CPU copy: no GPU sync
                # pinned memory makes the copy truly asynchronous (from pageable memory it blocks the host)
                batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host_batch.items()}
                # distributed: gradients are reduced across ranks in the last micro-batch's backward only
                with distributed.micro_step(compiled, last=micro == cfg.grad_accum - 1):
                    with precision.autocast(device):
                        logits = forward_logits(compiled, arch, batch)
                    loss = loss_fn(logits, batch["labels"], smoothing) / cfg.grad_accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            # checked on the device and read only when logging: no host sync in the step
            nonfinite |= ~torch.isfinite(step_loss)
            if cfg.clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.lr = lr
            state.tokens_seen += step_tokens
            window_tokens += step_tokens
            last = state.step == total_steps
            out_of_time = cfg.time_budget is not None and time.perf_counter() - started >= cfg.time_budget
            halt = distributed.any_rank(stop.requested is not None or out_of_time)  # distributed: stop together
            eval_now = state.step % cfg.eval_every == 0 or last or halt

            if state.step % cfg.log_every == 0 or eval_now:
                if distributed.any_true(nonfinite):
                    raise TformerError(
                        f"the loss became NaN or infinite by step {state.step}; training stopped and the last "
                        f"good checkpoint in '{out}' is kept (try a lower --lr or --clip)"
                    )
                now = time.perf_counter()
                state.train_loss = distributed.mean(step_loss).item()  # distributed: the global batch's loss
                state.elapsed = now - started
                line = {"step": state.step, "loss": state.train_loss, "lr": lr, "tokens": state.tokens_seen,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9), "time": state.elapsed}
                if peak is not None:
                    line["mfu"] = token_flops * line["tokens_per_s"] / peak
                if eval_now:
                    state.val = run_eval()
                    line.update(state.val)
                    if state.val and (state.best_val_loss is None or state.val["val_loss"] < state.best_val_loss):
                        state.best_val_loss = state.val["val_loss"]
                        save("best")
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                emit("log", line)
                window_start, window_tokens = time.perf_counter(), 0
            if state.step % cfg.save_every == 0 or last or halt:
                if distributed.any_true(nonfinite):  # never save weights a NaN has reached
                    raise TformerError(f"the loss became NaN or infinite by step {state.step}; the last good "
                                       f"checkpoint in '{out}' is kept (try a lower --lr)")
                state.elapsed = time.perf_counter() - started
                save("latest")
            if halt:
                stopped = "interrupted" if stop.requested else "time budget"
                break
    return TrainResult(out, state.step, total_steps, state.tokens_seen, time.perf_counter() - started,
                       state.train_loss, state.val, state.best_val_loss, stopped, distributed.local_model(model))
