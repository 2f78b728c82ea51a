"""The training configuration and the named training presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tformer.config import (
    DTYPE_ALIASES,
    PRESETS,
    _choice,
    _from_dict,
    _positive_int,
    _real,
)
from tformer.errors import ConfigError
from tformer.limits import SEED_MAX, check_int

MAX_PROCESSES = 256
MAX_COUNT = 2**40  # steps, batch sizes, intervals: far beyond any run, and safe in every counter

# -- training -----------------------------------------------------------------------------------

SCHEDULES = ("cosine", "noam", "constant")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and checkpointing. The model's shape is a ModelConfig.

    Length: `steps`, else `epochs` (passes over the training tokens), else the preset's steps;
    `time_budget` (seconds) stops earlier, saving a checkpoint.
    """

    batch_size: int = 16  # sequences per micro-batch (under torchrun: the global one, split over the ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    context: int = 128  # tokens per training sequence
    steps: int | None = None
    epochs: float | None = None
    time_budget: float | None = None
    # with time_budget: the cosine decays by the end of the budget if that comes before the last step
    decay_to_budget: bool = False
    lr: float = 1e-3  # peak learning rate (for noam: the peak, reached at step = warmup)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1  # not applied to norms, biases or embeddings
    optimizer: str = "adamw"  # muon: Muon for the hidden weight matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales lr)
    beta1: float = 0.9
    beta2: float = 0.99
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP (tformer/distributed.py)
    # CPU: processes of one thread each that share every micro-batch's rows (training/cpu_parallel.py);
    # None: one per thread when training on a Linux CPU in one process without compile; 1: intra-op threads
    processes: int | None = None
    eval_every: int = 250
    eval_batches: int = 20  # 0 means the whole validation split
    save_every: int = 500
    log_every: int = 10
    label_smoothing: float = 0.1  # encoder-decoder objective (the paper's epsilon_ls)
    mask_prob: float = 0.15  # masked-LM / span-corruption noise density
    mean_span: float = 3.0  # mean span length of the span-corruption objective

    def __post_init__(self) -> None:
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        self.validate()

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "context", "eval_every", "save_every", "log_every"):
            _positive_int(name, getattr(self, name))
            check_int(name, getattr(self, name), 1, MAX_COUNT)
        if self.processes is not None:
            _positive_int("processes", self.processes)
            check_int("processes", self.processes, 1, MAX_PROCESSES)
        if self.steps is not None:
            _positive_int("steps", self.steps)
            check_int("steps", self.steps, 1, MAX_COUNT)
        for name in ("epochs", "time_budget", "lr", "muon_lr"):
            value = getattr(self, name)
            if value is not None and not (_real(value) and value > 0):
                raise ConfigError(f"{name}={value!r} must be a finite positive number")
        for name in ("warmup", "eval_batches", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        check_int("warmup", self.warmup, 0, MAX_COUNT)
        check_int("eval_batches", self.eval_batches, 0, MAX_COUNT)
        check_int("seed", self.seed, 0, SEED_MAX)
        for name, low, high in (("min_lr_ratio", 0, 1), ("label_smoothing", 0, 1), ("beta1", 0, 1),
                                ("beta2", 0, 1), ("mask_prob", 0, 1)):
            value = getattr(self, name)
            if not (_real(value) and low <= value < high):
                raise ConfigError(f"{name}={value!r} must be a number in [{low}, {high})")
        for name in ("weight_decay", "clip"):
            if not (_real(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a finite non-negative number")
        if not (_real(self.mean_span) and self.mean_span >= 1):
            raise ConfigError(f"mean_span={self.mean_span!r} must be a number >= 1")
        if not isinstance(self.decay_to_budget, bool):
            raise ConfigError(f"decay_to_budget={self.decay_to_budget!r} must be true or false")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("optimizer='muon' does not work with --fsdp: it orthogonalizes whole matrices, and "
                              "FSDP gives each rank a slice (use DDP, the default under torchrun)")
        if self.schedule == "noam" and self.warmup == 0:
            raise ConfigError("schedule='noam' needs warmup >= 1 (its peak is at step = warmup)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. config.json's "train" section); unknown keys are an error."""
        return _from_dict(cls, values, "training option")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A training preset names a model preset, changes to it, and training options. Model presets
# (PRESETS) are training presets too, with the default training options and `steps` below.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # `tformer train` with no options: a small decoder in a few minutes on a 2-core CPU. Dropout 0.2 (as
    # nanoGPT's character-level Shakespeare): the built-in corpus is small (about 100k BPE tokens), and
    # without it the validation loss climbs after a few epochs while the training loss keeps falling.
    "tiny": dict(model="tiny", model_overrides=dict(dropout=0.2),
                 train=dict(steps=600, context=128, batch_size=16, lr=2e-3)),
    "small": dict(model="small", model_overrides={}, train=dict(steps=5000, context=256, batch_size=32, lr=1e-3)),
    # nanoGPT's "baby" character-level Shakespeare model (its README): 4 layers, 4 heads, d_model 128,
    # context 64, batch 12, 2000 iterations, lr 1e-3, no dropout.
    "baby-shakespeare": dict(
        model="tiny",
        model_overrides=dict(d_model=128, n_heads=4, n_decoder_layers=4, n_encoder_layers=4, d_ff=512,
                             pos_encoding="learned", norm="layernorm", activation="gelu", dropout=0.0, bias=False),
        train=dict(steps=2000, context=64, batch_size=12, lr=1e-3, warmup=100, min_lr_ratio=0.1,
                   weight_decay=0.1, beta2=0.99, eval_every=250),
    ),
    # The fastest route found here to a validation loss <= 1.86 on Tiny Shakespeare at character level on a
    # 2-core CPU (benchmarks/bench_speedrun.py, benchmarks/RESULTS.md). Muon learns far more per step than AdamW,
    # and at this budget (well under a million characters) a narrow, shallow model seeing more characters beats
    # a wider or deeper one seeing fewer: d_model 64, 3 layers, 2 heads, rotary positions, and a ReLU
    # feed-forward twice as wide (ReLU learned faster here than SwiGLU, GELU or squared ReLU, and is cheaper).
    # AdamW (embeddings and norms) at 8e-3 learned faster than at 4e-3 or 1.2e-2; one evaluation, at the end.
    "shakespeare-speedrun": dict(
        model="tiny",
        model_overrides=dict(d_model=64, n_heads=2, n_kv_heads=2, n_decoder_layers=3, n_encoder_layers=3, d_ff=128,
                             pos_encoding="rope", norm="layernorm", activation="relu", dropout=0.0, bias=False),
        train=dict(steps=420, context=64, batch_size=32, optimizer="muon", lr=8e-3, muon_lr=0.06, warmup=20,
                   min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99, eval_every=420, log_every=20),
    ),
    # Encoder-decoder pairs (a .tsv of source<TAB>target) on a 2-core CPU, and the default for them: short
    # transduction tasks learned to exact match within minutes (benchmarks/bench_transduction.py). Characters
    # as tokens (a BPE vocabulary cuts digits and random letters into pieces the model must first learn to
    # spell); two layers a side, which take more steps in the same time than four and learn as much per step;
    # no dropout or label smoothing, which slow the climb to exact match on noiseless data; Muon for the
    # matrices, which reached a higher exact match than AdamW in the same minutes; the cosine follows
    # --time-budget (decay_to_budget), so a run cut by the budget still ends at the low rate.
    "transduction": dict(
        model="tiny", kind="char",
        model_overrides=dict(n_encoder_layers=2, n_decoder_layers=2, dropout=0.0),
        train=dict(steps=3000, context=256, batch_size=64, optimizer="muon", muon_lr=0.02, lr=2e-3, warmup=50,
                   label_smoothing=0.0, decay_to_budget=True, eval_every=500),
    ),
}
DEFAULT_STEPS = 1000
PAIRS_PRESET = "transduction"  # the preset of an encoder-decoder trained on a .tsv of pairs when none is named


def preset_kind(name: str | None) -> str | None:
    """The tokenizer kind a training preset gives raw text when --kind is not given (None: the usual default)."""
    return TRAIN_PRESETS.get(name or "", {}).get("kind")


def train_preset(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(model preset, model overrides, training options) for a training or model preset name."""
    if name in TRAIN_PRESETS:
        p = TRAIN_PRESETS[name]
        return p["model"], dict(p["model_overrides"]), dict(p["train"])
    if name in PRESETS:
        return name, {}, {}
    names = sorted(set(TRAIN_PRESETS) | set(PRESETS))
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
