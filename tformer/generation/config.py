"""How to generate: the options of `tformer generate` and their ranges, defined once."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tformer.errors import ConfigError
from tformer.limits import MAX_BEAMS, MAX_SAMPLES, SEED_MAX, check_int

MAX_NEW_TOKENS = 2**40  # the sliding window makes any length possible; this keeps counters in range

# -- options --------------------------------------------------------------------------------------

DEFAULT_NEW_TOKENS = 200


@dataclass
class GenerateConfig:
    """How to generate. Sampling applies, in this order: repetition penalty, top-k, temperature,
    top-p, min-p (see `process_logits`); temperature 0 is greedy (argmax) whatever the others say."""

    max_new_tokens: int | None = None  # None: what fits the context after the prompt, at most DEFAULT_NEW_TOKENS
    temperature: float = 0.8
    top_k: int = 50  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL's)
    stop: tuple[str, ...] = ()  # a row stops when its text contains one of these (not included in the text)
    seed: int | None = None  # None: a fresh seed, reported in the result
    num_samples: int = 1  # completions per prompt
    beams: int = 1  # > 1: beam search (deterministic; sampling options are ignored)
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    # True: a prompt's search ends once `beams` hypotheses have finished, even while a running beam could still
    # beat them; False (as transformers): only once none can, so beams never do worse than greedy on a good model
    early_stopping: bool = False
    use_cache: bool = True  # False: recompute the whole window at every step (slow; the oracle)
    compile: bool = False  # torch.compile the decode step (CUDA graphs on a GPU)
    fill_top: int = 5  # fill-mask: candidates shown per <mask>
    show_special: bool = False  # print special tokens (<pad>, <unk>, ...) in completions; token ids keep them

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first option out of range and the allowed range."""
        if self.max_new_tokens is not None:
            _int_at_least("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _int_at_least("top_k", self.top_k, 0)
        _int_at_least("num_samples", self.num_samples, 1, MAX_SAMPLES)
        _int_at_least("beams", self.beams, 1, MAX_BEAMS)
        _int_at_least("fill_top", self.fill_top, 1)
        _number("temperature", self.temperature, lambda v: v >= 0, "must be >= 0 (0 means greedy)")
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "must be in (0, 1]")
        _number("min_p", self.min_p, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "must be > 0 (1 means off)")
        _number("length_penalty", self.length_penalty, math.isfinite, "must be a finite number")
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0, SEED_MAX)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty text")

    def new_tokens(self, context: int, prompt_tokens: int) -> int:
        """Tokens to generate per row: max_new_tokens, or by default what fits the context after the longest
        prompt (at most DEFAULT_NEW_TOKENS, at least 1), so a default run never slides the window."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(1, min(DEFAULT_NEW_TOKENS, context - prompt_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int_at_least(name: str, value: Any, low: int, high: int = 2**63 - 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{_option(name)}={value!r} must be an integer >= {low}")
    if value > high:
        check_int(_option(name), value, low, high)  # says the range, with a huge value abbreviated


def _number(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{_option(name)}={value!r} {rule}")
