"""Generation: prefill and decode steps over the static KV cache, sampling, beam search, fill-mask, streaming.

Decoder-only and encoder-decoder models share one loop. A prompt (for the encoder-decoder: `<bos>`,
the source having been encoded once) is *prefilled* into the cache in one forward pass; then each
*decode step* feeds one token at an explicit cache slot and gets the next token's logits. The decode
step has the same shapes every time, so it is the one part `torch.compile` captures (with CUDA graphs
on a GPU). The `use_cache=False` path recomputes the whole window every step: it is the oracle the
cached path is tested against.

Batches are left-padded so every row's next token lands in the same cache slot; each row gets its
own positions (counted from its first real token) and stops on its own at `<eos>` or a stop string.

Context limits. A prompt longer than the model's context (`max_seq_len`) keeps its last
`max_seq_len` tokens. Generating past the context slides the window: when the cache is full, the
last `max_seq_len // 2` tokens are re-prefilled at slots 0.. (positions counted afresh) and decoding
goes on after them, so each slide costs one prefill of half a context. Beam search does not slide;
it stops at the context.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from tformer.checkpoint import eval_mode, find_latest_checkpoint, is_checkpoint_dir, load_checkpoint, unwrap_model
from tformer.config import ModelConfig
from tformer.cpu_decoding import cpu_decoding_layout
from tformer.errors import ConfigError, TformerError
from tformer.model import CrossKV, DecoderLM, EncoderModel, KVCache, Seq2Seq
from tformer.tokenize import SpecialIds, load_tokenizer, special_ids

OnText = Callable[[int, str], None]
"""on_text(row, text): called with each new piece of a row's completion, whole characters only."""


# -- options --------------------------------------------------------------------------------------

@dataclass
class GenerateConfig:
    """How to generate. Sampling applies, in this order: repetition penalty, top-k, temperature,
    top-p, min-p (see `process_logits`); temperature 0 is greedy (argmax) whatever the others say."""

    max_new_tokens: int = 200
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
    early_stopping: bool = True  # beam search ends once `beams` finished hypotheses exist
    use_cache: bool = True  # False: recompute the whole window at every step (slow; the oracle)
    compile: bool = False  # torch.compile the decode step (CUDA graphs on a GPU)
    fill_top: int = 5  # fill-mask: candidates shown per <mask>

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first option out of range and the allowed range."""
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _int_at_least("top_k", self.top_k, 0)
        _int_at_least("num_samples", self.num_samples, 1)
        _int_at_least("beams", self.beams, 1)
        _int_at_least("fill_top", self.fill_top, 1)
        _number("temperature", self.temperature, lambda v: v >= 0, "must be >= 0 (0 means greedy)")
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "must be in (0, 1]")
        _number("min_p", self.min_p, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "must be > 0 (1 means off)")
        _number("length_penalty", self.length_penalty, math.isfinite, "must be a finite number")
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty text")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{_option(name)}={value!r} must be an integer >= {low}")


def _number(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ConfigError(f"{_option(name)}={value!r} {rule}")


# -- sampling -------------------------------------------------------------------------------------

def process_logits(logits: Tensor, cfg: GenerateConfig, seen: Tensor | None = None) -> Tensor:
    """Next-token logits (B, V) -> float32 logits with -inf outside the allowed set, in this order:

    1. repetition penalty: logits of tokens in `seen` (B, V) bool are divided by the penalty when
       positive, multiplied when negative (Keskar et al., 2019, as in transformers);
    2. top-k: keep the k largest (ties with the k-th are kept);
    3. temperature: divide by it (with temperature 0 the caller takes the argmax; steps 2-5 never
       remove the largest logit, so they cannot change it);
    4. top-p (nucleus, Holtzman et al., 2020): keep the most likely tokens until their probability
       reaches p (the token that crosses p is kept);
    5. min-p: drop tokens whose probability is below min_p times the largest probability.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.greedy:
        return logits
    if 0 < cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        logits = logits.masked_fill((before >= cfg.top_p).scatter(-1, order, before >= cfg.top_p), float("-inf"))
    if cfg.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def sample_logits(
    logits: Tensor, cfg: GenerateConfig, seen: Tensor | None = None,
    noise: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """The next token (B,) from logits (B, V): the argmax at temperature 0, else a draw from the
    processed distribution. The draw is argmax(p / E) with E ~ Exp(1) per token (`noise`, or drawn
    from `generator`), an exact categorical sample that needs no host sync, unlike torch.multinomial.
    """
    logits = process_logits(logits, cfg, seen)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    # An Exp(1) draw can be exactly 0; clamped, a token of probability 0 scores 0 and is never chosen.
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


# -- one forward pass -----------------------------------------------------------------------------

def _forward(
    model: nn.Module, idx: Tensor, key_padding_mask: Tensor, positions: Tensor, input_pos: Tensor | None,
    memory: Tensor | None = None, memory_padding_mask: Tensor | None = None,
) -> Tensor:
    """Logits (B, 1, V) of the last position, of a decoder-only model or of an encoder-decoder's decoder."""
    if isinstance(model, Seq2Seq):
        return model.decode(idx, memory, memory_padding_mask, key_padding_mask, positions, input_pos,
                            last_only=True).logits
    return model(idx, key_padding_mask=key_padding_mask, positions=positions, input_pos=input_pos,
                 last_only=True).logits


def prefill(
    model: nn.Module, idx: Tensor, key_padding_mask: Tensor, positions: Tensor,
    memory_padding_mask: Tensor | None = None,
) -> Tensor:
    """Write tokens idx (B, T) at cache slots 0..T-1 and return the last position's logits (B, V).

    key_padding_mask: (B, cache_len), True for real tokens (False for left padding, True beyond T);
    positions: (B, T), each row's positions counted from its first real token.
    """
    input_pos = torch.arange(idx.size(1), device=idx.device)
    return _forward(model, idx, key_padding_mask, positions, input_pos, None, memory_padding_mask)[:, -1]


def decode_step(
    model: nn.Module, token: Tensor, input_pos: Tensor, positions: Tensor, key_padding_mask: Tensor,
    memory_padding_mask: Tensor | None = None,
) -> Tensor:
    """Feed one token per row, token (B, 1), at cache slot input_pos (1,) with positions (B, 1);
    return the next logits (B, V). Shapes never change between steps, so this compiles to one graph."""
    return _forward(model, token, key_padding_mask, positions, input_pos, None, memory_padding_mask)[:, -1]


def _positions(real: Tensor) -> Tensor:
    """Per-row positions (B, T) for a left-padded window: 0 at the first real token (as HF's position_ids)."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


Head = Callable[..., Tensor]
"""What is done with the logits (B, V) of each step: sampling (returns tokens), or nothing (beam search)."""


def _logits_only(logits: Tensor) -> Tensor:
    return logits


class _Window:
    """Feeds a batch of token windows to the model, with the static KV cache or without it.

    With the cache, `prefill` writes the window at slots 0..T-1 and each `step` one token at the
    next slot. Without it (the oracle), every call recomputes the whole window. The window holds
    at most `size` tokens; a token arriving when it is full makes it slide: the last `keep` tokens
    (the new one included) move to the front and are prefilled again, with fresh positions. Both
    paths slide at the same moments, so they see the same tokens.
    """

    def __init__(
        self, model: nn.Module, batch: int, size: int, keep: int, use_cache: bool, head: Head = _logits_only,
        memory: Tensor | None = None, memory_mask: Tensor | None = None, compile: bool = False,
    ):
        device = next(model.parameters()).device
        self.model, self.size, self.keep, self.use_cache, self.head = model, size, keep, use_cache, head
        self.memory, self.memory_mask = memory, memory_mask
        self.ids = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.real = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.n = 0  # tokens in the window: a host-side count, never read back from the device
        self.slides = 0
        self.step_fn = _make_step(model, head, compile) if use_cache else None
        self.cudagraphs = use_cache and compile and device.type == "cuda"
        if use_cache:
            if isinstance(model, Seq2Seq):
                model.setup_cache(memory, max_len=size)
            else:
                model.setup_cache(batch, max_len=size)
            self.key_padding_mask = torch.ones(batch, size, dtype=torch.bool, device=device)
            self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # the slot of the next fed token
            self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # its position in each row
            if self.cudagraphs:
                # Tensors that keep their storage for the whole run: a CUDA graph reads them in place
                # instead of copying them in before every replay.
                caches = [m for m in model.modules() if isinstance(m, (KVCache, CrossKV))]
                for t in [self.key_padding_mask, self.input_pos, self.pos, *(c.k for c in caches),
                          *(c.v for c in caches)]:
                    torch._dynamo.mark_static_address(t)

    def close(self) -> None:
        if self.use_cache:
            self.model.clear_cache()

    def prefill(self, ids: Tensor, real: Tensor, *head_args: Tensor) -> Tensor:
        """Start the window with ids (B, T) (real: True for tokens, False for left padding)."""
        T = ids.size(1)
        self.ids[:, :T], self.real[:, :T], self.n = ids, real, T
        return self._run_window(*head_args)

    def _run_window(self, *head_args: Tensor) -> Tensor:
        ids, real = self.ids[:, :self.n], self.real[:, :self.n]
        positions = _positions(real)
        if not self.use_cache:
            logits = _forward(self.model, ids, real, positions, None, self.memory, self.memory_mask)[:, -1]
            return self.head(logits, *head_args)
        self.key_padding_mask[:, :self.n] = real
        self.key_padding_mask[:, self.n:] = True
        logits = prefill(self.model, ids, self.key_padding_mask, positions, self.memory_mask)
        self.input_pos.fill_(self.n)
        self.pos.copy_(positions[:, -1:])
        return self.head(logits, *head_args)

    def step(self, token: Tensor, *head_args: Tensor) -> Tensor:
        """Append token (B,) to every row and return the head's output for the next position."""
        if self.n == self.size:  # full: slide
            kept = self.keep - 1
            self.ids[:, :kept] = self.ids[:, self.n - kept:self.n].clone()
            self.real[:, :kept] = self.real[:, self.n - kept:self.n].clone()
            self.n = kept
            self.slides += 1
            self.ids[:, self.n], self.real[:, self.n] = token, True
            self.n += 1
            return self._run_window(*head_args)
        self.ids[:, self.n], self.real[:, self.n] = token, True
        self.n += 1
        if not self.use_cache:
            return self._run_window(*head_args)
        self.pos += 1
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the graph may now overwrite the last step's outputs
        # The token is read back from the window, not from the last step's output, which a CUDA graph reuses.
        token = self.ids[:, self.n - 1:self.n]  # (B, 1)
        out = self.step_fn(token, self.input_pos, self.pos, self.key_padding_mask, self.memory_mask, *head_args)
        self.input_pos += 1
        return out

    def select_rows(self, index: Tensor) -> None:
        """Keep rows `index` in that order (beam search), caches and masks together."""
        for name in ("ids", "real") + (("key_padding_mask", "pos") if self.use_cache else ()):
            setattr(self, name, getattr(self, name).index_select(0, index))
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
        if self.memory is not None and not self.use_cache:
            self.memory = self.memory.index_select(0, index)
        if self.use_cache:
            self.model.select_cache_rows(index)


def _make_step(model: nn.Module, head: Head, compile: bool) -> Callable[..., Tensor]:
    """The decode step followed by the head, compiled when asked (only this part is ever compiled)."""

    def step(token: Tensor, input_pos: Tensor, positions: Tensor, key_padding_mask: Tensor,
             memory_padding_mask: Tensor | None, *head_args: Tensor) -> Tensor:
        logits = decode_step(model, token, input_pos, positions, key_padding_mask, memory_padding_mask)
        return head(logits, *head_args)

    if not compile:
        return step
    device = next(model.parameters()).device
    # CUDA graphs replay the whole step as one launch: what makes small-batch decoding fast on a GPU.
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)


# -- rows, streaming and stopping -----------------------------------------------------------------

def token_bytes_of(tokenizer: Tokenizer) -> Callable[[int], bytes] | None:
    """For a byte-level tokenizer (GPT-2's alphabet, as `tformer tokenize` builds), a function giving the
    bytes a token id stands for, as its ByteLevel decoder reads them; None for other tokenizers."""
    from tokenizers import decoders

    from tformer.tokenize import byte_alphabet

    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    byte_of = {c: b for b, c in enumerate(byte_alphabet())}
    cache: dict[int, bytes] = {}

    def token_bytes(token: int) -> bytes:
        if token not in cache:
            piece = tokenizer.id_to_token(token) or ""
            # A token with a character outside the alphabet (an added token such as "<é>") is its own text.
            known = all(c in byte_of for c in piece)
            cache[token] = bytes(byte_of[c] for c in piece) if known else piece.encode("utf-8")
        return cache[token]

    return token_bytes


class _Row:
    """One completion being produced: its token ids, its text so far, and whether it has stopped.

    Only whole characters are released: byte-level BPE can end a token in the middle of a UTF-8
    sequence. For byte-level tokenizers the row keeps the bytes and decodes them incrementally, so an
    incomplete character is held until its last byte arrives and an invalid byte shows as U+FFFD at
    once (as the tokenizer's own decode shows it). For other tokenizers, text ending in U+FFFD is held
    (vLLM's incremental scheme). Text that could be the start of a stop string is held back until it
    is known not to be one.
    """

    def __init__(self, index: int, tokenizer: Tokenizer, eos: int | None, stops: Sequence[str],
                 on_text: OnText | None, token_bytes: Callable[[int], bytes] | None = None):
        self.index, self.tokenizer, self.eos, self.stops, self.on_text = index, tokenizer, eos, stops, on_text
        self.ids: list[int] = []
        self.text = ""  # whole characters decoded so far
        self.sent = 0  # characters of self.text already handed to on_text
        self.finish_reason: str | None = None
        self._bytes = token_bytes or token_bytes_of(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._bytes else None
        self._prefix = 0  # other tokenizers: ids[_prefix:_read] decode to text already in self.text
        self._read = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        if self.done:
            return
        if token == self.eos:
            self.finish("eos")
            return
        self.ids.append(token)
        if self._utf8 is not None:
            new = self._utf8.decode(self._bytes(token))
            if new:
                self._extend(new)
            return
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            self._extend(after[len(before):])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def _extend(self, new: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += new
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish("stop")
            return
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._emit(len(self.text) - held)

    def _emit(self, end: int) -> None:
        if end > self.sent and self.on_text is not None:
            self.on_text(self.index, self.text[self.sent:end])
        self.sent = max(self.sent, end)

    def finish(self, reason: str) -> None:
        """Stop the row: at <eos>, a stop string, or the token limit (incomplete bytes then show as U+FFFD)."""
        if self.done:
            return
        if reason != "stop":
            if self._utf8 is not None:
                self.text += self._utf8.decode(b"", final=True)
            else:
                self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self.finish_reason = reason
        self._emit(len(self.text))


class _HostTokens:
    """Each step's tokens on the host. On CUDA they are copied asynchronously and read one step late,
    so the host never waits for a step while the GPU could be running the next one."""

    def __init__(self, device: torch.device):
        self.lag = 1 if device.type == "cuda" else 0
        self.pending: list[Any] = []

    def push(self, tokens: Tensor) -> None:
        if self.lag == 0:
            self.pending.append(tokens.tolist())
            return
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event))

    def ready(self, drain: bool = False) -> list[list[int]]:
        """Tokens of the steps that may be read now (all of them with drain)."""
        out = []
        while len(self.pending) > (0 if drain else self.lag):
            item = self.pending.pop(0)
            if isinstance(item, tuple):
                item[1].synchronize()
                item = item[0].tolist()
            out.append(item)
        return out


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
    compile_s: float | None = None  # the first decode steps with --compile: tracing, compiling, graph capture
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


# -- the decoding loops ---------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids (B, P) and real-token mask (B, P) of prompts left-padded to the longest, P."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    real = torch.zeros(len(prompts), P, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
        real[r, P - len(p):] = True
    return ids.to(device), real.to(device)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


WARMUP_STEPS = 3  # decode steps a compiled step needs before it runs at speed (compile, then CUDA-graph capture)


def _sample_loop(
    model: nn.Module, prompts: list[list[int]], rows: list[_Row], cfg: GenerateConfig, seed: int,
    memory: Tensor | None = None, memory_mask: Tensor | None = None, pad: int = 0,
) -> Timings:
    """Greedy or sampled decoding of a batch of prompts (left-padded); fills `rows`; returns the timings."""
    device, dtype = _device_dtype(model)
    B, N, ctx = len(prompts), cfg.max_new_tokens, model.cfg.max_seq_len
    ids, real = _left_pad(prompts, pad, device)
    P = ids.size(1)
    size = min(P + N - 1, ctx)  # the last token is never fed back, so it needs no slot
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[torch.arange(B, device=device)[:, None].expand_as(ids)[real], ids[real]] = True
    noise, generator = None, None
    if not cfg.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.empty(B, model.cfg.vocab_size, dtype=torch.float32, device=device)

    def draw() -> None:
        if noise is not None:
            noise.exponential_(generator=generator)

    def head(logits: Tensor, seen: Tensor | None, noise: Tensor | None) -> Tensor:
        return sample_logits(logits, cfg, seen, noise)

    window = _Window(model, B, size, max(1, ctx // 2), cfg.use_cache, head, memory, memory_mask, cfg.compile)
    host = _HostTokens(device)
    timings = Timings(str(device), _dtype_name(dtype), B, P, 0.0, 0, cache=cfg.use_cache)

    def take(tokens: Tensor) -> None:
        if seen is not None:
            seen[torch.arange(B, device=device), tokens] = True
        host.push(tokens)

    def consume(drain: bool = False) -> None:
        for step_tokens in host.ready(drain):
            timings.new_tokens += 1
            for row, token in zip(rows, step_tokens):
                row.add(token)

    try:
        _sync(device)
        start = time.perf_counter()
        draw()
        token = window.prefill(ids, real, seen, noise)
        take(token)
        consume(drain=True)
        timings.first_token_s = time.perf_counter() - start
        warmup = WARMUP_STEPS if cfg.compile and cfg.use_cache else 0
        timed_from, steps = time.perf_counter(), 0
        for i in range(1, N):
            if all(row.done for row in rows):
                break
            draw()
            token = window.step(token, seen, noise)
            take(token)
            consume()
            steps += 1
            if steps == warmup and timings.compile_s is None:  # compiled and captured: time from here
                _sync(device)
                timings.compile_s = time.perf_counter() - timed_from
                timed_from, steps = time.perf_counter(), 0
        consume(drain=True)
        _sync(device)
        timings.decode_s, timings.decode_steps = time.perf_counter() - timed_from, steps
    finally:
        window.close()
    for row in rows:
        row.finish("length")
    return timings


class _Hypotheses:
    """The best `n` finished hypotheses of one beam search, by length-normalised score."""

    def __init__(self, n: int, length_penalty: float):
        self.n, self.length_penalty = n, length_penalty
        self.items: list[tuple[float, list[int], str]] = []  # (score, ids, finish reason), best first

    def score(self, logprob: float, length: int) -> float:
        return logprob / length**self.length_penalty

    def add(self, ids: list[int], logprob: float, reason: str) -> None:
        self.items.append((self.score(logprob, len(ids)), ids, reason))
        self.items.sort(key=lambda h: -h[0])
        del self.items[self.n:]

    @property
    def full(self) -> bool:
        return len(self.items) >= self.n

    @property
    def worst(self) -> float:
        return self.items[-1][0] if self.items else float("-inf")


def _beam_search(
    model: nn.Module, prompts: list[list[int]], cfg: GenerateConfig, eos: int | None, max_new: int,
    memory: Tensor | None = None, memory_mask: Tensor | None = None, pad: int = 0,
) -> tuple[list[_Hypotheses], Timings]:
    """Beam search over `cfg.beams` beams per prompt. Scores are sums of log-probabilities; a
    hypothesis ends at <eos> (which counts in its length) and is ranked by score / length ** length_penalty."""
    device, dtype = _device_dtype(model)
    n, V = cfg.beams, model.cfg.vocab_size
    B = len(prompts)
    ids, real = _left_pad([p for p in prompts for _ in range(n)], pad, device)  # (B * n, P)
    if memory is not None:
        memory, memory_mask = memory.repeat_interleave(n, 0), memory_mask.repeat_interleave(n, 0)
    P = ids.size(1)
    window = _Window(model, B * n, P + max_new - 1, P + max_new - 1, cfg.use_cache, _logits_only,
                     memory, memory_mask, compile=False)
    hyps = [_Hypotheses(n, cfg.length_penalty) for _ in range(B)]
    done = [False] * B
    seqs: list[list[int]] = [[] for _ in range(B * n)]
    scores = torch.zeros(B, n, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: let only the first one expand at step 0
    timings = Timings(str(device), _dtype_name(dtype), B * n, P, 0.0, 0, cache=cfg.use_cache)
    try:
        _sync(device)
        start = time.perf_counter()
        logits = window.prefill(ids, real)
        for t in range(max_new):
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B * n, V)
            candidates = (scores.view(-1, 1) + logprobs).view(B, n * V)
            top_scores, top_index = candidates.topk(min(2 * n, n * V), dim=1)
            top_scores, top_index = top_scores.tolist(), top_index.tolist()
            if t == 0:
                timings.first_token_s, timed_from = time.perf_counter() - start, time.perf_counter()
            index, tokens, new_scores = [], [], []
            for b in range(B):
                chosen = []
                if not done[b]:
                    for rank, (score, flat) in enumerate(zip(top_scores[b], top_index[b])):
                        beam, token = divmod(flat, V)
                        row = b * n + beam
                        if score == float("-inf"):
                            break
                        if token == eos:
                            if rank < n:  # an <eos> below the top n would not have been kept as a beam
                                hyps[b].add(seqs[row] + [token], score, "eos")
                        else:
                            chosen.append((score, token, row))
                        if len(chosen) == n:
                            break
                    if hyps[b].full and (cfg.early_stopping or not chosen
                                         or hyps[b].worst >= hyps[b].score(chosen[0][0], t + 1)):
                        done[b] = True
                chosen += [(0.0, pad, b * n)] * (n - len(chosen))  # finished prompts keep dummy rows
                for score, token, row in chosen:
                    index.append(row)
                    tokens.append(token)
                    new_scores.append(score)
            seqs = [seqs[row] + [token] for row, token in zip(index, tokens)]
            if all(done):
                break
            if t == max_new - 1:  # out of tokens: the running beams compete with the finished ones
                for b in range(B):
                    if not done[b]:
                        for j in range(n):
                            hyps[b].add(seqs[b * n + j], new_scores[b * n + j], "length")
                break
            scores = torch.tensor(new_scores, device=device).view(B, n)
            window.select_rows(torch.tensor(index, device=device))
            logits = window.step(torch.tensor(tokens, device=device))
            timings.decode_steps += 1
        _sync(device)
        timings.decode_s = time.perf_counter() - timed_from
        timings.new_tokens = max(len(s) for s in seqs)
    finally:
        window.close()
    return hyps, timings


# -- prompts --------------------------------------------------------------------------------------

def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _fit(ids: list[int], limit: int, what: str, notices: list[str]) -> list[int]:
    """Keep the last `limit` tokens of a prompt that is too long, and say so."""
    if len(ids) <= limit:
        return ids
    notices.append(f"{what} has {len(ids):,} tokens, more than the context of {limit:,}: keeping its last {limit:,}")
    return ids[-limit:]


def read_prompts(prompt: str | None = None, prompt_file: str | Path | None = None, stdin: str | None = None) -> list[str]:
    """The prompts of a command line: --prompt, else one per non-blank line of --prompt-file, else
    all of stdin as one prompt (its final newline removed)."""
    if prompt is not None and prompt_file is not None:
        raise TformerError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        prompts = [prompt]
    elif prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise TformerError(f"prompt file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TformerError(f"prompt file '{path}' is not UTF-8 text (byte {e.start})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise TformerError(f"prompt file '{path}' has no prompt (every line is blank)")
    elif stdin:
        prompts = [stdin.removesuffix("\n")]
    else:
        prompts = []
    _check_prompts(prompts)
    return prompts


def _check_prompts(prompts: Sequence[str]) -> None:
    if not prompts:
        raise TformerError("no prompt given: pass --prompt TEXT, --prompt-file FILE, or text on stdin")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise TformerError("the prompt is empty" if len(prompts) == 1 else f"prompt {i + 1} is empty")


def _name(i: int, n: int) -> str:
    return "the prompt" if n == 1 else f"prompt {i + 1}"


# -- public entry points --------------------------------------------------------------------------

@dataclass
class _Prepared:
    """Prompts turned into what the decoding loops take: each row's first tokens, and the encoder output."""

    starts: list[list[int]]  # decoder-only: the prompt ids; encoder-decoder: [<bos>]
    prompt_tokens: list[int]  # tokens of each prompt (of each source, for the encoder-decoder) actually used
    memory: Tensor | None
    memory_mask: Tensor | None
    pad: int
    notices: list[str]
    seconds: float = 0.0  # tokenizing and, for the encoder-decoder, encoding: part of the time to first token

    def time(self, timings: Timings) -> Timings:
        """The loop's timings, counting this preparation in the time to first token and the longest prompt
        (the source, for the encoder-decoder) as the prompt length."""
        timings.first_token_s += self.seconds
        timings.prompt_tokens = max(self.prompt_tokens)
        return timings


def _prepare(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], specials: SpecialIds) -> _Prepared:
    if isinstance(model, EncoderModel):
        raise TformerError("this is an encoder (masked-LM) model: it fills in <mask> tokens (fill_mask), "
                           "it does not continue text")
    if not isinstance(model, (DecoderLM, Seq2Seq)):
        raise TformerError(f"cannot generate with a {type(model).__name__}")
    _check_prompts(prompts)
    device, _ = _device_dtype(model)
    _sync(device)
    start = time.perf_counter()
    ctx, vocab, notices = model.cfg.max_seq_len, model.cfg.vocab_size, []
    encoded = [_encode(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise TformerError(f"{_name(i, len(prompts))} encodes to no tokens")
        if max(ids) >= vocab:
            raise TformerError(f"the tokenizer gives id {max(ids)}, but the model's vocabulary has {vocab} tokens: "
                               "they do not belong together")
    pad = specials.pad if specials.pad is not None else 0
    if isinstance(model, DecoderLM):
        if any("<mask>" in p for p in prompts) or (specials.mask is not None
                                                 and any(specials.mask in ids for ids in encoded)):
            raise TformerError("<mask> asks for fill-mask, which needs an encoder model; "
                               f"this checkpoint is a decoder (arch={model.cfg.arch})")
        starts = [_fit(ids, ctx, _name(i, len(prompts)), notices) for i, ids in enumerate(encoded)]
        return _Prepared(starts, [len(s) for s in starts], None, None, pad, notices, time.perf_counter() - start)
    if specials.bos is None:
        raise TformerError("the tokenizer has no <bos> token, which starts an encoder-decoder's output")
    # A source with <mask> asks for denoising: such sources were trained ending in <eos>.
    sources = [ids + [specials.eos] if specials.mask in ids and specials.eos is not None else ids
               for ids in encoded]
    sources = [_fit(s, ctx, _name(i, len(prompts)), notices) for i, s in enumerate(sources)]
    S = max(len(s) for s in sources)
    src = torch.tensor([s + [pad] * (S - len(s)) for s in sources], device=device)
    src_mask = torch.tensor([[True] * len(s) + [False] * (S - len(s)) for s in sources], device=device)
    memory, _ = model.encode(src, src_mask)
    _sync(device)
    return _Prepared([[specials.bos] for _ in prompts], [len(s) for s in sources], memory, src_mask, pad, notices,
                     time.perf_counter() - start)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: GenerateConfig | None = None,
    on_text: OnText | None = None, specials: SpecialIds | None = None,
) -> GenerateResult:
    """Continue each prompt (decoder-only) or translate it (encoder-decoder: the prompt is the source).

    Rows are prompts x num_samples, prompt-major (row = prompt * num_samples + sample); `on_text`
    receives each row's text as it is produced, whole characters only. With `cfg.beams` > 1 this is
    `beam_search`.
    """
    cfg = cfg or GenerateConfig()
    if cfg.beams > 1:
        return beam_search(model, tokenizer, prompts, cfg, specials)
    specials = specials or special_ids(tokenizer)
    model = unwrap_model(model)
    prep = _prepare(model, tokenizer, prompts, specials)
    if cfg.compile and _device_dtype(model)[0].type == "mps":
        cfg = dataclasses.replace(cfg, compile=False)
        prep.notices.append("--compile is not supported on Apple MPS: decoding without it")
    k = cfg.num_samples
    seed = cfg.seed if cfg.seed is not None else (None if cfg.greedy else random.randrange(2**31))
    token_bytes = token_bytes_of(tokenizer)
    rows = [_Row(r, tokenizer, specials.eos, cfg.stop, on_text, token_bytes) for r in range(len(prompts) * k)]
    memory, memory_mask = prep.memory, prep.memory_mask
    if memory is not None:
        memory, memory_mask = memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0)
    timings = prep.time(_sample_loop(model, [prep.starts[r // k] for r in range(len(rows))], rows, cfg, seed or 0,
                                     memory, memory_mask, prep.pad))
    ctx = model.cfg.max_seq_len
    if max(len(s) for s in prep.starts) + cfg.max_new_tokens - 1 > ctx:
        prep.notices.append(f"generation went past the context of {ctx:,} tokens: the window slid, keeping the "
                            f"last {max(1, ctx // 2):,} tokens each time")
    completions = [
        Completion(prompts[r // k], row.text, row.ids, prep.prompt_tokens[r // k], row.finish_reason or "length",
                   sample=r % k)
        for r, row in enumerate(rows)
    ]
    return GenerateResult(completions, timings, seed, prep.notices)


@torch.no_grad()
def beam_search(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: GenerateConfig,
    specials: SpecialIds | None = None,
) -> GenerateResult:
    """Beam search with `cfg.beams` beams per prompt (1 beam is greedy decoding); returns the best
    `cfg.num_samples` hypotheses of each prompt, best first, each with every kept beam in `beams`.
    The context window does not slide: the search stops at the context."""
    if cfg.num_samples > cfg.beams:
        raise ConfigError(f"--num-samples={cfg.num_samples} must be <= --beams={cfg.beams} with beam search")
    specials = specials or special_ids(tokenizer)
    model = unwrap_model(model)
    prep = _prepare(model, tokenizer, prompts, specials)
    ctx = model.cfg.max_seq_len
    max_new = min(cfg.max_new_tokens, ctx - max(len(s) for s in prep.starts) + 1)
    if max_new < cfg.max_new_tokens:
        prep.notices.append(f"beam search does not slide the context window: stopping after {max_new} new tokens "
                            f"(context {ctx})")
    if cfg.compile:
        prep.notices.append("--compile applies to greedy and sampled decoding: beam search runs without it")
    hyps, timings = _beam_search(model, prep.starts, cfg, specials.eos, max_new, prep.memory, prep.memory_mask,
                                 prep.pad)
    timings = prep.time(timings)
    completions = []
    for i, h in enumerate(hyps):
        beams = []
        for score, ids, reason in h.items:
            shown = ids[:-1] if reason == "eos" else ids
            beams.append({"text": tokenizer.decode(shown, skip_special_tokens=False), "token_ids": shown,
                          "score": score, "finish_reason": reason})
        for s, beam in enumerate(beams[:cfg.num_samples]):
            completions.append(Completion(prompts[i], beam["text"], beam["token_ids"], prep.prompt_tokens[i],
                                          beam["finish_reason"], sample=s, score=beam["score"], beams=beams))
    return GenerateResult(completions, timings, None, prep.notices)


@torch.no_grad()
def fill_mask(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], top: int = 5, specials: SpecialIds | None = None,
) -> list[FillMaskResult]:
    """For each <mask> in each prompt, the `top` most likely tokens with their probabilities."""
    specials = specials or special_ids(tokenizer)
    model = unwrap_model(model)
    if not isinstance(model, EncoderModel):
        raise TformerError("fill-mask needs an encoder (masked-LM) model")
    if specials.mask is None:
        raise TformerError("the tokenizer has no <mask> token")
    _check_prompts(prompts)
    device, _ = _device_dtype(model)
    encoded = [_encode(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if specials.mask not in ids:
            raise TformerError(f"{_name(i, len(prompts))} has no <mask>: an encoder model fills in <mask> tokens, "
                               "e.g. --prompt 'The cat sat on the <mask>.'")
        if len(ids) > model.cfg.max_seq_len:
            raise TformerError(f"{_name(i, len(prompts))} has {len(ids):,} tokens, more than the context of "
                               f"{model.cfg.max_seq_len:,}")
    T = max(len(ids) for ids in encoded)
    pad = specials.pad if specials.pad is not None else 0
    idx = torch.tensor([ids + [pad] * (T - len(ids)) for ids in encoded], device=device)
    real = torch.tensor([[True] * len(ids) + [False] * (T - len(ids)) for ids in encoded], device=device)
    probs = model(idx, key_padding_mask=real).logits.float().softmax(dim=-1)  # (B, T, V)
    results = []
    for b, (prompt, ids) in enumerate(zip(prompts, encoded)):
        where = [t for t, i in enumerate(ids) if i == specials.mask]
        p, cand = probs[b, where].topk(min(top, probs.size(-1)), dim=-1)  # (n_masks, top)
        masks = [[Candidate(tokenizer.decode([c], skip_special_tokens=False), c, round(q, 6))
                  for q, c in zip(pq, cq)] for pq, cq in zip(p.tolist(), cand.tolist())]
        filled = list(ids)
        for t, options in zip(where, masks):
            filled[t] = options[0].id
        results.append(FillMaskResult(prompt, masks, tokenizer.decode(filled, skip_special_tokens=False)))
    return results


@dataclass
class Loaded:
    """A checkpoint ready to generate from: the model on its device and dtype, and its tokenizer."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    specials: SpecialIds
    path: Path
    device: torch.device
    dtype: torch.dtype


def _checkpoint_in(path: Path) -> Path:
    """`path`, or for a training run's directory (whose latest/ and best/ are checkpoints) the newest of them."""
    if path.is_dir() and not is_checkpoint_dir(path) and any(is_checkpoint_dir(d) for d in path.iterdir()):
        return find_latest_checkpoint(path)
    return path  # load_checkpoint says what is missing


def load(checkpoint: str | Path | None = None, device: str = "auto", dtype: str = "auto") -> Loaded:
    """Load a checkpoint directory (default: the newest under checkpoints/; for a training run's
    directory, the newest of its checkpoints) and its tokenizer.json.

    device "auto" picks CUDA, then MPS, then the CPU; dtype "auto" is bf16 on a GPU that has it
    (fp16 otherwise), fp32 on the CPU and MPS.
    """
    from tformer.device import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    precision = resolve_precision(dtype, torch_device)
    path = find_latest_checkpoint() if checkpoint is None else _checkpoint_in(Path(checkpoint))
    ckpt = load_checkpoint(path, device=torch_device, dtype=precision.dtype)
    if ckpt.tokenizer_path is None:
        raise TformerError(f"checkpoint '{path}' has no tokenizer.json: its tokens cannot be turned into text")
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    if tokenizer.get_vocab_size(with_added_tokens=True) > ckpt.config.vocab_size:
        raise TformerError(f"{ckpt.tokenizer_path} has {tokenizer.get_vocab_size():,} tokens but the model's "
                           f"vocabulary only {ckpt.config.vocab_size:,}: they do not belong together")
    if torch_device.type == "cpu":
        cpu_decoding_layout(ckpt.model)
    return Loaded(ckpt.model, ckpt.config, tokenizer, special_ids(tokenizer), path, torch_device, precision.dtype)


def sample_continuation(
    model: nn.Module, tokenizer: Tokenizer, max_new_tokens: int = 100, prompt: str = "\n",
    temperature: float = 0.8, top_k: int = 50, seed: int = 1337,
) -> str:
    """A short sample from a decoder being trained (used at the end of `tformer train`).
    The model is put back in the mode it was in."""
    plain = unwrap_model(model)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    with eval_mode(plain):
        return generate(plain, tokenizer, [prompt], cfg).completions[0].text
