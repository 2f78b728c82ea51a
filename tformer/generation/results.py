"""What a generate call returns: completions, fill-mask candidates and honest timings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# -- results --------------------------------------------------------------------------------------

@dataclass
class Timings:
    """Speed of one generate call. Rates are per row; `throughput` counts every row of the batch."""

    device: str
    dtype: str
    batch_size: int
    prompt_tokens: int  # the longest prompt (the source, for the encoder-decoder), in tokens
    first_token_s: float  # tokenizing, encoding the source, prefill and the first token, until it is on the host
    new_tokens: int  # tokens generated per row (the longest row)
    decode_steps: int = 0  # decode steps timed in decode_s (compile warm-up excluded)
    decode_s: float = 0.0
    compile_s: float | None = None  # before the clock: int8 kernels; with --compile the first steps (tracing, capture)
    cache: bool = True

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def throughput(self) -> float:
        return self.tokens_per_s * self.batch_size

    def describe(self) -> str:
        """One line saying what was measured and where."""
        what = f"{self.device} {self.dtype}, batch {self.batch_size}, prompt {self.prompt_tokens} tokens"
        if not self.cache:
            what += ", no cache"
        line = f"{what}: first token {self.first_token_s * 1e3:.1f} ms"
        if self.decode_steps:
            line += f"; {self.decode_steps} decode steps at {self.tokens_per_s:.1f} tok/s per row"
            if self.batch_size > 1:
                line += f" ({self.throughput:.1f} tok/s in all)"
        if self.compile_s is not None:
            line += f"; compile warm-up {self.compile_s:.1f} s (excluded)"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(tokens_per_s=_finite(self.tokens_per_s), throughput=_finite(self.throughput))
        return d


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


@dataclass
class Completion:
    """One completion of one prompt."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens, or the context for beams)
    sample: int = 0
    score: float | None = None  # beam search: sum of log-probs / length ** length_penalty
    beams: list[dict[str, Any]] | None = None  # beam search: every kept hypothesis, best first


@dataclass
class GenerateResult:
    completions: list[Completion]
    timings: Timings
    seed: int | None
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "completions": [dataclasses.asdict(c) for c in self.completions],
            "timings": self.timings.to_dict(),
            "seed": self.seed,
            "notices": self.notices,
        }


@dataclass
class Candidate:
    token: str
    id: int
    prob: float


@dataclass
class FillMaskResult:
    """The top candidates for each <mask> of a prompt, and the prompt filled with the best ones."""

    prompt: str
    masks: list[list[Candidate]]
    filled: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
