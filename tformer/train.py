"""The training loop: objectives, learning-rate schedules, evaluation, checkpoints and exact resume.

A run directory (`--out`) holds `latest/` and `best/` (full checkpoints: weights, config, tokenizer,
optimizer state, trainer state) and `metrics.jsonl` (one JSON line per log step). Each checkpoint
directory is built aside and swapped in, so an interrupted save leaves the previous one loadable.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tformer.checkpoint import (
    CONFIG_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE, eval_mode, save_checkpoint, unwrap_model,
)
from tformer.config import ModelConfig, TrainConfig
from tformer.data import IGNORE_INDEX, Batches, Objective, eval_batches, steps_per_epoch
from tformer.tokenize import PairTokens, SpecialIds
from tformer.device import Precision, flops_per_token, peak_flops, resolve_device, resolve_precision
from tformer import distributed
from tformer.errors import CheckpointError, TformerError
from tformer.files import atomic_directory, atomic_write_text, recover_directory
from tformer.model import build_model

METRICS_FILE = "metrics.jsonl"
OBJECTIVES = {"decoder": "causal", "encoder": "masked"}  # encoder-decoder: "pairs" or "span"


@dataclass
class TrainData:
    """Everything the loop needs from a tokenized corpus."""

    objective: str  # causal, masked, span (denoising plain text) or pairs (source/target)
    specials: SpecialIds
    vocab_size: int
    tokenizer_path: Path
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None
    train_pairs: PairTokens | None = None
    val_pairs: PairTokens | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what was read, recorded in config.json

    @property
    def n_train(self) -> int:
        return len(self.train_pairs) if self.objective == "pairs" else len(self.train_tokens)

    def split(self, name: str, cfg: TrainConfig) -> Objective:
        """The objective on the "train" or "val" split."""
        return Objective(self.objective, getattr(self, f"{name}_tokens"), getattr(self, f"{name}_pairs"),
                         self.specials, self.vocab_size, cfg.mask_prob, cfg.mean_span)


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


# -- schedules ----------------------------------------------------------------------------------

def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup to `lr`, then cosine decay to lr * min_lr_ratio at the last step.
    noam: the paper's (section 5.3) d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), scaled so its peak
      at s = warmup equals `lr`; lr = d_model^-0.5 * warmup^-0.5 gives the paper's formula exactly.
    constant: linear warmup, then `lr`.
    """
    s = step + 1
    if cfg.schedule == "noam":
        return cfg.lr * min(s ** -0.5, s * cfg.warmup ** -1.5) / cfg.warmup ** -0.5
    if cfg.warmup and s <= cfg.warmup:
        return cfg.lr * s / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (s - cfg.warmup) / max(1, total_steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = ".tok." in f".{name}" or ".pos." in f".{name}"
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


# -- objectives -----------------------------------------------------------------------------------

def forward_logits(model: nn.Module, arch: str, batch: dict[str, Tensor]) -> Tensor:
    """Run the model on a batch of its objective; returns logits aligned with batch["labels"]."""
    if arch == "encoder-decoder":
        return model(batch["src"], batch["tgt"], batch["src_mask"], batch["tgt_mask"]).logits
    return model(batch["idx"]).logits


def loss_fn(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the labelled positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, arch: str, batches: Iterator[dict[str, Tensor]], device: torch.device, precision: Precision
) -> dict[str, float]:
    """Validation loss (no label smoothing), perplexity and token accuracy, weighted by labelled tokens."""
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    with eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision.autocast(device):
                logits = forward_logits(model, arch, batch)
            labels = batch["labels"]
            n = int((labels != IGNORE_INDEX).sum())
            if n == 0:
                continue
            total_loss += loss_fn(logits, labels).item() * n
            total_correct += int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())
            total_tokens += n
    # distributed: each rank evaluated its share of the batches; add up the totals (no-op in one process)
    total_loss, total_correct, total_tokens = distributed.sum_over_ranks(total_loss, total_correct, total_tokens)
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": total_correct / total_tokens,
            "val_tokens": total_tokens}


BLEU_SAMPLE = 100  # validation pairs translated at each evaluation of an encoder-decoder trained on pairs


def have_sacrebleu() -> bool:
    """BLEU needs sacrebleu, an optional extra (`pip install 'tformer[bleu]'`)."""
    return importlib.util.find_spec("sacrebleu") is not None


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0 to 100) of one reference per hypothesis, with sacrebleu's standard settings
    (13a tokenization, exact match), as papers report it."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def translate_sample(model: nn.Module, data: TrainData, n: int, context: int) -> tuple[list[str], list[str]]:
    """Greedy translations of the first `n` validation pairs, decoded with the KV cache exactly as
    `tformer generate --temperature 0` would, and their reference targets (as text)."""
    from tformer.generate import GenerateConfig, generate
    from tformer.tokenize import load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer_path)

    def text(ids: np.ndarray) -> str:
        return tokenizer.decode([int(i) for i in ids if i != data.specials.eos], skip_special_tokens=False)

    sources, references = [], []
    for i in range(min(n, len(data.val_pairs))):
        src, tgt = data.val_pairs[i]
        source = text(src[:context])
        if source:  # an empty source has nothing to translate
            sources.append(source)
            references.append(text(tgt))
    if not sources:
        return [], []
    plain = unwrap_model(model)
    with eval_mode(plain):
        result = generate(plain, tokenizer, sources, GenerateConfig(max_new_tokens=context, temperature=0.0),
                          specials=data.specials)
    return [c.text for c in result.completions], references


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


# -- checkpoint state ----------------------------------------------------------------------------

def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as named tensors (e.g. 'decoder.layers.0.ffn.w1.weight.exp_avg')."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{names[id(p)]}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, Tensor]) -> None:
    state_dict = optimizer.state_dict()
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"{names[id(p)]}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                     and "." not in k[len(prefix):]}
            if entry:
                state_dict["state"][index] = entry
            index += 1
    optimizer.load_state_dict(state_dict)


@dataclass
class LoopState:
    """What, besides weights and optimizer, makes a resumed run continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    elapsed: float = 0.0
    train_loss: float | None = None

    def to_json(self, batches: Batches, scaler: torch.amp.GradScaler | None, extra: dict[str, Any]) -> dict:
        rng = {"torch": _b64(torch.get_rng_state()), "data": _b64(batches.state())}
        if torch.cuda.is_available():
            rng["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
            "val_loss": self.val.get("val_loss"), "val": self.val, "lr": self.lr, "elapsed": self.elapsed,
            "train_loss": self.train_loss, "rng": rng,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            **extra,
        }


# -- the run -----------------------------------------------------------------------------------

Event = Callable[[str, dict[str, Any]], None]


def _seq_tokens(batch: dict[str, Tensor]) -> int:
    if "src" in batch:
        return int(batch["src_mask"].sum() + batch["tgt_mask"].sum())
    return batch["idx"].numel()


def total_steps_for(cfg: TrainConfig, data: TrainData) -> int:
    """Optimizer steps of the run: --steps, else --epochs passes over the training data."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        per_epoch = steps_per_epoch(data.objective, data.n_train, cfg.context,
                                    cfg.batch_size * cfg.grad_accum * cfg.context, cfg.batch_size * cfg.grad_accum)
        return max(1, math.ceil(cfg.epochs * per_epoch))
    from tformer.config import DEFAULT_STEPS

    return DEFAULT_STEPS


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """--out must be writable, and an existing run is continued (resume) or replaced (force), never silently."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TformerError(f"cannot write to --out '{out}': {e.strerror or e}") from None
    recover_directory(out / "latest")
    recover_directory(out / "best")
    if not resume and not force and ((out / "latest").exists() or (out / "best").exists()):
        raise TformerError(
            f"'{out}' already holds a training run; continue it with --resume auto, "
            f"start over with --force, or choose another --out"
        )


def check_data(data: TrainData, cfg: TrainConfig) -> None:
    """Each split of flat text must hold at least one training window."""
    if data.objective == "pairs":
        return
    needed = cfg.context + 1
    for split, tokens in (("training", data.train_tokens), ("validation", data.val_tokens)):
        if len(tokens) < needed:
            raise TformerError(
                f"the {split} split has {len(tokens)} tokens, fewer than one context window "
                f"({needed}); use a smaller --context or more text"
            )


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


def _restore(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    batches: Batches, arch: str,
) -> LoopState:
    """Load weights, optimizer, RNG and data position from a checkpoint written by `train`."""
    try:
        info = json.loads((directory / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        optim = load_file(str(directory / OPTIMIZER_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(f"'{directory}' has no training state ({Path(e.filename).name}); "
                              f"it cannot be resumed, only used with --init-from") from None
    except (json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"the training state in '{directory}' is unreadable: {e}") from None
    if info.get("arch") != arch:
        raise TformerError(f"cannot resume '{directory}': it trained arch={info.get('arch')!r}, "
                           f"this run is arch={arch!r}")
    from tformer.checkpoint import read_safetensors

    # distributed: these also load into a model sharded with --fsdp
    distributed.load_model_state(model, read_safetensors(directory), str(directory))
    distributed.load_optimizer_state(optimizer, model, optim)
    if info.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(info["scaler"])
    torch.set_rng_state(_unb64(info["rng"]["torch"]))
    if "cuda" in info["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in info["rng"]["cuda"]])
    batches.load_state(_unb64(info["rng"]["data"]))
    return LoopState(step=info["step"], tokens_seen=info["tokens_seen"], best_val_loss=info["best_val_loss"],
                     val=info.get("val") or {}, lr=info["lr"], elapsed=info.get("elapsed", 0.0),
                     train_loss=info.get("train_loss"))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to the resumed step (later ones belong to the interrupted tail)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def resume_dir(resume: str, out: Path) -> Path:
    """`--resume auto` is the latest checkpoint of --out; otherwise the given directory (or its latest/)."""
    path = out / "latest" if resume == "auto" else Path(resume)
    recover_directory(path)
    if (path / "latest" / CONFIG_FILE).exists():
        path = path / "latest"
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"nothing to resume: '{path}' is not a checkpoint written by tformer train")
    return path


# -- resolving options ----------------------------------------------------------------------------

# Short option names (CLI flags and --config keys) for ModelConfig fields; other ModelConfig and
# TrainConfig field names are accepted as they are.
MODEL_OPTION_NAMES = {"heads": "n_heads", "kv_heads": "n_kv_heads", "d_model": "d_model", "d_ff": "d_ff"}


def read_toml(path: Path) -> dict[str, Any]:
    """Options from a TOML file: flat `key = value` lines, keys as the CLI flags (dashes or underscores)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TformerError(f"--config file '{path}' does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TformerError(f"--config file '{path}' is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve_configs(options: dict[str, Any], base_model: ModelConfig | None = None,
                    base_train: TrainConfig | None = None) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from option values (None = not given).

    Precedence: dataclass defaults < preset < the options (the --config file merged under the flags).
    With `base_model` (resuming, or --init-from) the model's shape comes from the checkpoint and only
    dropout may change; with `base_train` (resuming) training options start from the saved ones.
    """
    from tformer.config import DEFAULT_STEPS, train_preset
    import dataclasses

    options = {k: v for k, v in options.items() if v is not None}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    preset = options.pop("preset", None)
    model_opts: dict[str, Any] = {}
    train_opts: dict[str, Any] = {}
    for key, value in options.items():
        if key == "layers":
            model_opts["n_encoder_layers"] = model_opts["n_decoder_layers"] = value
        elif key in MODEL_OPTION_NAMES:
            model_opts[MODEL_OPTION_NAMES[key]] = value
        elif key in train_fields:
            train_opts[key] = value
        elif key in model_fields:
            model_opts[key] = value
        else:
            known = sorted(train_fields | model_fields | set(MODEL_OPTION_NAMES) | {"layers", "preset"})
            raise TformerError(f"unknown option {key!r}; known options: {', '.join(known)}")
    if "context" in train_opts:
        model_opts.setdefault("max_seq_len", train_opts["context"])

    if base_model is not None:
        changed = {k: v for k, v in model_opts.items()
                   if k not in ("dropout", "max_seq_len") and getattr(base_model, k) != v}
        if changed:
            raise TformerError(
                "the model's shape comes from the checkpoint; these options disagree with it: "
                + ", ".join(f"{k}={v!r} (checkpoint: {getattr(base_model, k)!r})" for k, v in changed.items())
            )
        model_cfg = base_model.replace(dropout=model_opts.get("dropout", base_model.dropout))
        if train_opts.get("context", 0) > model_cfg.max_seq_len:
            raise TformerError(f"--context {train_opts['context']} is longer than the checkpoint's "
                               f"max_seq_len={model_cfg.max_seq_len}")
        train_defaults = base_train.to_dict() if base_train is not None else {}
        if base_train is None:
            train_defaults["context"] = min(TrainConfig.context, model_cfg.max_seq_len)
        values = {**train_defaults, **train_opts}
        if values.get("steps") is None and values.get("epochs") is None:
            values["steps"] = DEFAULT_STEPS
        return model_cfg, TrainConfig.from_dict(values)

    model_preset, model_overrides, train_defaults = train_preset(preset or "tiny")
    train_values = {**train_defaults, **train_opts}
    if "epochs" in train_opts and "steps" not in train_opts:
        train_values.pop("steps", None)  # --epochs replaces the preset's step count
    elif train_values.get("steps") is None:
        train_values["steps"] = DEFAULT_STEPS
    train_cfg = TrainConfig.from_dict(train_values)
    model_overrides.setdefault("max_seq_len", train_cfg.context)
    model_cfg = ModelConfig.from_preset(model_preset, **{**model_overrides, **model_opts})
    if model_cfg.max_seq_len < train_cfg.context:
        raise TformerError(f"--context {train_cfg.context} is longer than max_seq_len={model_cfg.max_seq_len}")
    return model_cfg, train_cfg


# -- planning a run from what the user gave ---------------------------------------------------------

@dataclass
class RunPlan:
    """A resolved run: configs, data, where it goes, and what it starts from."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: TrainData
    out: Path
    resume: Path | None = None
    init_model: nn.Module | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    sample: Callable[[nn.Module], str] | None = None


TOKENS_SUBDIR = "data"  # raw text is tokenized into <out>/data, and reused while the corpus is unchanged
_CACHE_KEY_FILE = "cache_key.json"


def _corpus_name(corpus: list[Path] | None) -> str:
    from tformer.corpus import DEFAULT_CORPUS_NAME

    if not corpus:
        return DEFAULT_CORPUS_NAME
    first = Path(corpus[0])
    return (first.stem if first.suffix else first.name) or "corpus"


def _cache_key(paths: list[Path], kind: str | None, vocab_size: int | None, tokenizer: Path | None) -> dict:
    """What the cached tokens depend on: the corpus files (path, size, modification time) and the options."""
    from tformer.tokenize import find_corpus

    files = [[str(s.path.resolve()), s.size, os.stat(s.path).st_mtime_ns] for s in find_corpus(paths)]
    tok = None
    if tokenizer is not None:
        tok_path = Path(tokenizer).resolve()
        tok = [str(tok_path), os.stat(tok_path).st_mtime_ns] if tok_path.exists() else str(tok_path)
    return {"files": files, "kind": kind, "vocab_size": vocab_size, "tokenizer": tok}


def _is_token_dir(corpus: list[Path] | None) -> bool:
    """Whether CORPUS is a directory written by `tformer tokenize` (rather than raw text)."""
    return bool(corpus) and len(corpus) == 1 and (Path(corpus[0]) / "meta.json").is_file()


def prepare_tokens(
    corpus: list[Path] | None, cache_dir: Path, kind: str | None, vocab_size: int | None,
    tokenizer: Path | None, on_tokenize: Callable | None = None,
) -> Path:
    """A token directory for `corpus`: itself if it already is one, else the corpus tokenized into
    `cache_dir` (reused when the files and options are unchanged)."""
    from tformer.corpus import default_corpus
    from tformer.tokenize import tokenize_corpus

    if _is_token_dir(corpus):
        if kind or vocab_size or tokenizer:
            raise TformerError(f"'{corpus[0]}' is already tokenized; --kind, --vocab-size and --tokenizer "
                               f"apply only to raw text")
        return Path(corpus[0])
    paths = [Path(p) for p in corpus] if corpus else [default_corpus()]
    key = _cache_key(paths, kind, vocab_size, tokenizer)
    key_file = cache_dir / _CACHE_KEY_FILE
    if key_file.is_file() and (cache_dir / "meta.json").is_file():
        try:
            if json.loads(key_file.read_text(encoding="utf-8")) == key:
                return cache_dir
        except json.JSONDecodeError:
            pass
    tokenize_corpus(paths, cache_dir, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer, force=True,
                    progress=on_tokenize)
    from tformer.files import atomic_write_json

    atomic_write_json(key_file, key)
    return cache_dir


def _same_tokenizer(a: Path, b: Path) -> bool:
    from tformer.tokenize import load_tokenizer

    return load_tokenizer(a).get_vocab(with_added_tokens=True) == load_tokenizer(b).get_vocab(with_added_tokens=True)


def plan_run(
    corpus: list[Path] | None,
    options: dict[str, Any],
    *,
    config_file: Path | None = None,
    out: Path | None = None,
    resume: str | None = None,
    init_from: Path | None = None,
    force: bool = False,
    kind: str | None = None,
    vocab_size: int | None = None,
    tokenizer: Path | None = None,
    on_tokenize: Callable | None = None,
) -> RunPlan:
    """Resolve what `tformer train` was given into a RunPlan, checking everything before any file is written."""
    from tformer.checkpoint import load_checkpoint, read_config

    flags = {k: v for k, v in options.items() if v is not None}
    options = {**(read_toml(Path(config_file)) if config_file else {}), **flags}
    if resume is not None and init_from is not None:
        raise TformerError("--resume continues a run and --init-from starts a new one from weights; choose one")
    arch = options.get("arch")

    base_model = base_train = None
    init_model = None
    ckpt_tokenizer: Path | None = None
    ckpt_dir: Path | None = None
    if resume is not None:
        if resume == "auto" and out is None:
            raise TformerError("--resume auto needs --out, the run directory to continue")
        if out is None:
            given = Path(resume)
            out = given.parent if given.name in ("latest", "best") or given.name.startswith(".") else given
        ckpt_dir = resume_dir(resume, out)
        base_model, _, extra = read_config(ckpt_dir)
        if "train" not in extra:
            raise TformerError(f"'{ckpt_dir}' was not written by tformer train; use --init-from to start from it")
        if arch is not None and arch != base_model.arch:
            raise TformerError(f"cannot resume '{ckpt_dir}' as arch={arch!r}: it is a {base_model.arch!r} model")
        base_train = TrainConfig.from_dict(extra["train"])
        ckpt_tokenizer = ckpt_dir / TOKENIZER_FILE
        kind = vocab_size = None  # the run's tokenizer is fixed: these only said how to build one
        data_dir = (extra.get("data") or {}).get("directory")
        if not corpus and data_dir:
            corpus = [Path(data_dir)]
    elif init_from is not None:
        ckpt = load_checkpoint(init_from)
        if ckpt.tokenizer_path is None:
            raise TformerError(f"'{init_from}' has no tokenizer.json; --init-from needs the checkpoint's tokenizer")
        if arch is not None and arch != ckpt.config.arch:
            raise TformerError(f"--arch {arch} disagrees with '{init_from}', a {ckpt.config.arch!r} model")
        base_model, init_model, ckpt_tokenizer = ckpt.config, ckpt.model, ckpt.tokenizer_path
        if tokenizer is not None or kind is not None or vocab_size is not None:
            raise TformerError("--init-from trains with the checkpoint's own tokenizer; drop --tokenizer, "
                               "--kind and --vocab-size")
    if ckpt_tokenizer is not None and tokenizer is None and not _is_token_dir(corpus):
        tokenizer = ckpt_tokenizer  # raw text is encoded with the checkpoint's own tokenizer
    if base_model is not None:
        options["arch"] = base_model.arch  # equal to --arch when given (checked above)
    model_cfg, train_cfg = resolve_configs(options, base_model, base_train)

    resolve_precision(train_cfg.dtype, resolve_device(train_cfg.device))  # an unavailable device fails here
    if out is None:
        out = Path("checkpoints") / f"{_corpus_name(corpus)}-{model_cfg.arch}"
    with _removed_on_error(out):
        return _plan_data(corpus, out, model_cfg, train_cfg, force=force, kind=kind, vocab_size=vocab_size,
                          tokenizer=tokenizer, on_tokenize=on_tokenize, base_model=base_model,
                          ckpt_dir=ckpt_dir, ckpt_tokenizer=ckpt_tokenizer, init_from=init_from,
                          init_model=init_model)


@contextmanager
def _removed_on_error(directory: Path) -> Iterator[None]:
    """A run rejected while it is being planned leaves no trace: `directory` goes again if it is new."""
    existed = directory.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _plan_data(
    corpus: list[Path] | None, out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, *, force: bool,
    kind: str | None, vocab_size: int | None, tokenizer: Path | None, on_tokenize: Callable | None,
    base_model: ModelConfig | None, ckpt_dir: Path | None, ckpt_tokenizer: Path | None,
    init_from: Path | None, init_model: nn.Module | None,
) -> RunPlan:
    """The second half of `plan_run`: --out, the tokens, and the checks that need them."""
    from tformer.tokenize import open_tokens

    if ckpt_dir is None:
        check_out_dir(out, resume=False, force=force)
    token_dir = prepare_tokens(corpus, out / TOKENS_SUBDIR, kind, vocab_size, tokenizer, on_tokenize)
    tokens = open_tokens(token_dir)
    tokenizer_path = token_dir / tokens.meta["tokenizer"]
    if ckpt_tokenizer is not None and not _same_tokenizer(ckpt_tokenizer, tokenizer_path):
        raise TformerError(
            f"the tokenizer of the checkpoint does not match the data in '{token_dir}'; tokenize the text "
            f"with --tokenizer {ckpt_tokenizer}"
        )
    if base_model is None:
        model_cfg = model_cfg.replace(vocab_size=tokens.vocab_size)
    elif tokens.vocab_size > model_cfg.vocab_size:
        raise TformerError(f"the data's vocabulary ({tokens.vocab_size}) is larger than the model's "
                           f"({model_cfg.vocab_size})")

    if tokens.is_pairs and model_cfg.arch != "encoder-decoder":
        raise TformerError(f"a .tsv of source/target pairs trains --arch encoder-decoder, not {model_cfg.arch}; "
                           f"give plain text for a {model_cfg.arch}")
    objective = OBJECTIVES.get(model_cfg.arch) or ("pairs" if tokens.is_pairs else "span")
    need = {"masked": ("mask",), "span": ("mask", "eos", "pad", "bos"), "pairs": ("eos", "pad", "bos")}
    missing = [r for r in need.get(objective, ()) if getattr(tokens.special, r) is None]
    if missing:
        raise TformerError(f"the {model_cfg.arch} objective needs the special token(s) {', '.join(missing)}, "
                           f"which this tokenizer lacks")
    if tokens.is_pairs:
        data = TrainData(objective, tokens.special, tokens.vocab_size, tokenizer_path,
                         train_pairs=tokens.pairs("train"), val_pairs=tokens.pairs("val"))
        if len(data.train_pairs) == 0 or len(data.val_pairs) == 0:
            raise TformerError(f"'{token_dir}' needs training and validation pairs (it has "
                               f"{len(data.train_pairs)} and {len(data.val_pairs)})")
    else:
        data = TrainData(objective, tokens.special, tokens.vocab_size, tokenizer_path,
                         train_tokens=tokens.tokens("train"), val_tokens=tokens.tokens("val"))
    data.source = {"directory": str(token_dir), "kind": tokens.meta.get("kind"),
                   "tokens": tokens.meta.get("tokens"), "sources": tokens.meta.get("sources")}
    check_data(data, train_cfg)
    if ckpt_dir is not None:
        check_out_dir(out, resume=True, force=False)
    extra = {"init_from": str(init_from)} if init_from is not None else {}
    return RunPlan(model_cfg, train_cfg, data, out, ckpt_dir, init_model, extra, _sampler(model_cfg, tokens))


def _sampler(model_cfg: ModelConfig, tokens: Any) -> Callable[[nn.Module], str] | None:
    """The short text printed at the end of a decoder's training run."""
    if model_cfg.arch != "decoder":
        return None

    def sample(model: nn.Module) -> str:
        from tformer.generate import sample_continuation

        return sample_continuation(model, tokens.tokenizer, max_new_tokens=100)

    return sample
