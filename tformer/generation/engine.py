"""The decode engine: prefill and decode steps over the static KV cache, and the decoding loop.

Decoder-only and encoder-decoder models share one loop. A prompt (for the encoder-decoder: `<bos>`,
the source having been encoded once) is *prefilled* into the cache in one forward pass; then each
*decode step* feeds one token at an explicit cache slot and gets the next token's logits. The decode
step has the same shapes every time, so it is the one part `torch.compile` captures (with CUDA graphs
on a GPU). The `use_cache=False` path (`recompute.RecomputeWindow`) recomputes the whole window every
step: it is the oracle the cached path is tested against.

Batches are left-padded so every row's next token lands in the same cache slot; each row gets its
own positions (counted from its first real token) and stops on its own at `<eos>` or a stop string.

Context limits. A prompt longer than the model's context (`max_seq_len`) keeps its last
`max_seq_len` tokens. Generating past the context slides the window: when the cache is full, the
last `max_seq_len // 2` tokens are re-prefilled at slots 0.. (positions counted afresh) and decoding
goes on after them, so each slide costs one prefill of half a context. Beam search does not slide;
it stops at the context.
"""


from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tformer.generation.config import GenerateConfig
from tformer.generation.quantize import compile_kernels
from tformer.generation.recompute import RecomputeWindow
from tformer.generation.results import Timings
from tformer.generation.sampling import Sampler
from tformer.generation.stream import HostTokens, Row
from tformer.generation.window import Head, Window, left_pad, logits_only, row_positions
from tformer.model.cache import CrossKV, KVCache

WARMUP_STEPS = 3  # decode steps a compiled step needs before it runs at speed (compile, then CUDA-graph capture)


def prefill(model: nn.Module, idx: Tensor, key_padding_mask: Tensor, positions: Tensor) -> Tensor:
    """Write tokens idx (B, T) at cache slots 0..T-1 and return the last position's logits (B, V).

    key_padding_mask: (B, cache_len), True for real tokens (False for left padding, True beyond T);
    positions: (B, T), each row's positions counted from its first real token.
    """
    return model.next_token_logits(idx, key_padding_mask, positions, torch.arange(idx.size(1), device=idx.device))


def decode_step(model: nn.Module, token: Tensor, input_pos: Tensor, positions: Tensor, key_padding_mask: Tensor) -> Tensor:
    """Feed one token per row, token (B, 1), at cache slot input_pos (1,) with positions (B, 1);
    return the next logits (B, V). Shapes never change between steps, so this compiles to one graph."""
    return model.next_token_logits(token, key_padding_mask, positions, input_pos)


def make_step(model: nn.Module, head: Head, compile: bool) -> Callable[..., Tensor]:
    """The decode step followed by the head, compiled when asked (only this part is ever compiled)."""

    def step(token: Tensor, input_pos: Tensor, positions: Tensor, key_padding_mask: Tensor,
             *head_args: Tensor) -> Tensor:
        return head(decode_step(model, token, input_pos, positions, key_padding_mask), *head_args)

    if not compile:
        return step
    device = next(model.parameters()).device
    # CUDA graphs replay the whole step as one launch: what makes small-batch decoding fast on a GPU.
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)


class CachedWindow(Window):
    """The window over the static KV cache: `run_window` prefills slots 0..n-1, `advance` one slot."""

    def __init__(self, model: nn.Module, batch: int, size: int, keep: int, head: Head = logits_only,
                 memory: Tensor | None = None, memory_mask: Tensor | None = None, compile: bool = False):
        super().__init__(model, batch, size, keep, head)
        device = self.ids.device
        model.setup_cache(batch, max_len=size, memory=memory, memory_padding_mask=memory_mask)
        self.step_fn = make_step(model, head, compile)
        self.cudagraphs = compile and device.type == "cuda"
        self.key_padding_mask = torch.ones(batch, size, dtype=torch.bool, device=device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # the slot of the next fed token
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # its position in each row
        if self.cudagraphs:
            # Tensors that keep their storage for the whole run: a CUDA graph reads them in place
            # instead of copying them in before every replay.
            caches = [m for m in model.modules() if isinstance(m, (KVCache, CrossKV))]
            for t in [self.key_padding_mask, self.input_pos, self.pos, *(c.k for c in caches), *(c.v for c in caches)]:
                torch._dynamo.mark_static_address(t)

    def run_window(self, *head_args: Tensor) -> Tensor:
        ids, real = self.ids[:, :self.n], self.real[:, :self.n]
        positions = row_positions(real)
        self.key_padding_mask[:, :self.n] = real
        self.key_padding_mask[:, self.n:] = True
        logits = prefill(self.model, ids, self.key_padding_mask, positions)
        self.input_pos.fill_(self.n)
        self.pos.copy_(positions[:, -1:])
        return self.head(logits, *head_args)

    def advance(self, *head_args: Tensor) -> Tensor:
        self.pos += 1
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the graph may now overwrite the last step's outputs
        # The token is read back from the window, not from the last step's output, which a CUDA graph reuses.
        token = self.ids[:, self.n - 1:self.n]  # (B, 1)
        out = self.step_fn(token, self.input_pos, self.pos, self.key_padding_mask, *head_args)
        self.input_pos += 1
        return out

    def select_rows(self, index: Tensor) -> None:
        super().select_rows(index)
        self.key_padding_mask, self.pos = self.key_padding_mask.index_select(0, index), self.pos.index_select(0, index)
        self.model.select_cache_rows(index)

    def close(self) -> None:
        self.model.clear_cache()


def make_window(model: nn.Module, batch: int, size: int, keep: int, use_cache: bool, head: Head = logits_only,
                memory: Tensor | None = None, memory_mask: Tensor | None = None, compile: bool = False) -> Window:
    """The cached window, or without the cache the recompute oracle."""
    if use_cache:
        return CachedWindow(model, batch, size, keep, head, memory, memory_mask, compile)
    return RecomputeWindow(model, batch, size, keep, head, memory, memory_mask)


def sync(device: torch.device) -> None:
    """Wait for the device, so that host timers measure its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


class _Feed:
    """Hands each step's tokens to the sampler and, once on the host, to the rows."""

    def __init__(self, rows: list[Row], sampler: Sampler, device: torch.device, timings: Timings):
        self.rows, self.sampler, self.timings = rows, sampler, timings
        self.host = HostTokens(device)

    def take(self, tokens: Tensor) -> None:
        self.sampler.observe(tokens)
        self.host.push(tokens)

    def consume(self, drain: bool = False) -> None:
        for step_tokens in self.host.ready(drain):
            self.timings.new_tokens += 1
            for row, token in zip(self.rows, step_tokens):
                row.add(token)

    @property
    def done(self) -> bool:
        return all(row.done for row in self.rows)


def decode(
    model: nn.Module, prompts: list[list[int]], rows: list[Row], cfg: GenerateConfig, seed: int,
    memory: Tensor | None = None, memory_mask: Tensor | None = None, pad: int = 0, banned: Sequence[int] = (),
    forced_first: int | None = None, forced_last: int | None = None,
) -> tuple[Timings, int]:
    """Greedy or sampled decoding of a batch of prompts (left-padded); fills `rows`; returns the timings
    and how many times the window slid. Sampling never draws the `banned` tokens; `forced_first` is the first
    token generated and `forced_last` the one generated when the length runs out (as a Hugging Face config's
    forced_bos_token_id and forced_eos_token_id)."""
    device, dtype = device_dtype(model)
    B, ctx = len(prompts), model.cfg.max_seq_len
    ids, real = left_pad(prompts, pad, device)
    N = cfg.new_tokens(ctx, ids.size(1))
    size = min(ids.size(1) + N - 1, ctx)  # the last token is never fed back, so it needs no slot
    sampler = Sampler(cfg, B, model.cfg.vocab_size, device, seed, ids, real, banned)
    window = make_window(model, B, size, max(1, ctx // 2), cfg.use_cache, sampler.choose, memory, memory_mask,
                         cfg.compile)
    timings = Timings(str(device), dtype_name(dtype), B, ids.size(1), 0.0, 0, cache=cfg.use_cache)
    feed = _Feed(rows, sampler, device, timings)
    if not cfg.compile:  # a compiled step traces the int8 products into its own graph
        timings.compile_s = compile_kernels(model)
    try:
        sync(device)
        start = time.perf_counter()
        sampler.draw()
        token = window.prefill(ids, real, *sampler.state)
        for forced in (forced_first, forced_last if N == 1 else None):
            if forced is not None:
                token = torch.full_like(token, forced)
        feed.take(token)
        feed.consume(drain=True)
        timings.first_token_s = time.perf_counter() - start
        _decode_steps(window, sampler, feed, N - 1, WARMUP_STEPS if cfg.compile and cfg.use_cache else 0, token,
                      forced_last)
    finally:
        window.close()
    for row in rows:
        row.finish("length")
    return timings, window.slides


def _decode_steps(window: Window, sampler: Sampler, feed: _Feed, steps: int, warmup: int, token: Tensor,
                  forced_last: int | None = None) -> None:
    """Up to `steps` decode steps (until every row is done); times them, a compile warm-up apart."""
    timings, device = feed.timings, window.ids.device
    timed_from, timed = time.perf_counter(), 0
    for i in range(steps):
        if feed.done:
            break
        sampler.draw()
        token = window.step(token, *sampler.state)
        if forced_last is not None and i == steps - 1:
            token = torch.full_like(token, forced_last)
        feed.take(token)
        feed.consume()
        timed += 1
        if timed == warmup and timings.compile_s is None:  # compiled and captured: time from here
            sync(device)
            timings.compile_s = time.perf_counter() - timed_from
            timed_from, timed = time.perf_counter(), 0
    feed.consume(drain=True)
    sync(device)
    timings.decode_s, timings.decode_steps = time.perf_counter() - timed_from, timed
