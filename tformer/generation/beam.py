"""Beam search over the static KV cache."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from tformer.checkpoint import unwrap_model
from tformer.data.tokenizer import SpecialIds, special_ids
from tformer.errors import ConfigError
from tformer.generation.config import GenerateConfig
from tformer.generation.engine import device_dtype, dtype_name, make_window, sync
from tformer.generation.prompts import prepare
from tformer.generation.quantize import compile_kernels
from tformer.generation.results import Completion, GenerateResult, Timings
from tformer.generation.stream import hidden_tokens
from tformer.generation.window import left_pad


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


def _expand(hyps: _Hypotheses, top: list[tuple[float, int]], n: int, V: int, first_row: int, seqs: list[list[int]],
            eos: frozenset[int]) -> list[tuple[float, int, int]]:
    """The next `n` beams (score, token, source row) of one prompt from its top 2n candidates (score, flat
    index over beams x vocabulary); an <eos> among the top n ends a hypothesis instead."""
    chosen = []
    for rank, (score, flat) in enumerate(top):
        beam, token = divmod(flat, V)
        row = first_row + beam
        if score == float("-inf"):
            break
        if token in eos:
            if rank < n:  # an <eos> below the top n would not have been kept as a beam
                hyps.add(seqs[row] + [token], score, "eos")
        else:
            chosen.append((score, token, row))
        if len(chosen) == n:
            break
    return chosen


def _finished(hyps: _Hypotheses, chosen: list[tuple[float, int, int]], early_stopping: bool, length: int) -> bool:
    """Whether a prompt's search is over: its finished set is full and, unless early stopping, no running
    beam could still score above the worst finished hypothesis."""
    if not hyps.full:
        return False
    return early_stopping or not chosen or hyps.worst >= hyps.score(chosen[0][0], length)


def _beam_search(
    model: nn.Module, prompts: list[list[int]], cfg: GenerateConfig, eos: frozenset[int], max_new: int,
    memory: Tensor | None = None, memory_mask: Tensor | None = None, pad: int = 0,
    forced: tuple[int | None, int | None] = (None, None),
) -> tuple[list[_Hypotheses], Timings]:
    """Beam search over `cfg.beams` beams per prompt. Scores are sums of log-probabilities; a
    hypothesis ends at <eos> (which counts in its length) and is ranked by score / length ** length_penalty."""
    device, dtype = device_dtype(model)
    n, V, B = cfg.beams, model.cfg.vocab_size, len(prompts)
    ids, real = left_pad([p for p in prompts for _ in range(n)], pad, device)  # (B * n, P)
    if memory is not None:
        memory, memory_mask = memory.repeat_interleave(n, 0), memory_mask.repeat_interleave(n, 0)
    P = ids.size(1)
    window = make_window(model, B * n, P + max_new - 1, P + max_new - 1, cfg.use_cache, memory=memory,
                         memory_mask=memory_mask)
    hyps = [_Hypotheses(n, cfg.length_penalty) for _ in range(B)]
    done = [False] * B
    seqs: list[list[int]] = [[] for _ in range(B * n)]
    scores = torch.zeros(B, n, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: let only the first one expand at step 0
    timings = Timings(str(device), dtype_name(dtype), B * n, P, 0.0, 0, cache=cfg.use_cache)
    timings.compile_s = compile_kernels(model)
    try:
        sync(device)
        start = time.perf_counter()
        logits = window.prefill(ids, real)
        for t in range(max_new):
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B * n, V)
            force = forced[1] if t == max_new - 1 and forced[1] is not None else forced[0] if t == 0 else None
            if force is not None:  # a config's forced first (bos) or last (eos) token
                logprobs = torch.full_like(logprobs, float("-inf")).index_fill_(-1, torch.tensor([force],
                                                                                         device=device), 0.0)
            candidates = (scores.view(-1, 1) + logprobs).view(B, n * V)
            top_scores, top_index = candidates.topk(min(2 * n, n * V), dim=1)
            top_scores, top_index = top_scores.tolist(), top_index.tolist()
            if t == 0:
                timings.first_token_s, timed_from = time.perf_counter() - start, time.perf_counter()
            index, tokens, new_scores = [], [], []
            for b in range(B):
                chosen = []
                if not done[b]:
                    chosen = _expand(hyps[b], list(zip(top_scores[b], top_index[b])), n, V, b * n, seqs, eos)
                    done[b] = _finished(hyps[b], chosen, cfg.early_stopping, t + 1)
                # dummy rows fill the beams of a finished prompt (or of a step with fewer live candidates, as after
                # a forced token): a score of -inf keeps them from ever being chosen
                chosen += [(float("-inf"), pad, b * n)] * (n - len(chosen))
                for score, token, row in chosen:
                    index.append(row)
                    tokens.append(token)
                    new_scores.append(score)
            seqs = [seqs[row] + [token] for row, token in zip(index, tokens)]
            if all(done):
                break
            if t == max_new - 1:  # out of tokens: the running beams compete with the finished ones
                for b in (b for b in range(B) if not done[b]):
                    for j in range(n):
                        if new_scores[b * n + j] > float("-inf"):
                            hyps[b].add(seqs[b * n + j], new_scores[b * n + j], "length")
                break
            scores = torch.tensor(new_scores, device=device).view(B, n)
            window.select_rows(torch.tensor(index, device=device))
            logits = window.step(torch.tensor(tokens, device=device))
            timings.decode_steps += 1
        sync(device)
        timings.decode_s = time.perf_counter() - timed_from
        timings.new_tokens = max(len(s) for s in seqs)
    finally:
        window.close()
    return hyps, timings


@torch.no_grad()
def beam_search(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: GenerateConfig,
    specials: SpecialIds | None = None, add_special_tokens: bool = True,
) -> GenerateResult:
    """Beam search with `cfg.beams` beams per prompt (1 beam is greedy decoding); returns the best
    `cfg.num_samples` hypotheses of each prompt, best first, each with every kept beam in `beams`.
    The context window does not slide: the search stops at the context."""
    if cfg.beams == 1:  # one beam is greedy decoding: the same engine as generate at temperature 0
        from tformer.generation.generate import generate

        return generate(model, tokenizer, prompts, dataclasses.replace(cfg, temperature=0.0), specials=specials,
                        add_special_tokens=add_special_tokens)
    if cfg.num_samples > cfg.beams:
        raise ConfigError(f"--num-samples={cfg.num_samples} must be <= --beams={cfg.beams} with beam search")
    specials = specials or special_ids(tokenizer)
    model = unwrap_model(model)
    prep = prepare(model, tokenizer, prompts, specials, add_special_tokens)
    ctx = model.cfg.max_seq_len
    longest = max(len(s) for s in prep.starts)
    max_new = min(cfg.new_tokens(ctx, longest), ctx - longest + 1)
    if cfg.max_new_tokens is not None and max_new < cfg.max_new_tokens:
        prep.notices.append(f"beam search does not slide the context window: stopping after {max_new} new tokens "
                            f"(context {ctx})")
    if cfg.compile:
        prep.notices.append("--compile applies to greedy and sampled decoding: beam search runs without it")
    hyps, timings = _beam_search(model, prep.starts, cfg, specials.stops, max_new, prep.memory, prep.memory_mask,
                                 prep.pad, (specials.forced_bos, specials.forced_eos))
    timings = prep.time(timings)
    completions = []
    hidden = frozenset() if cfg.show_special else hidden_tokens(specials)
    for i, h in enumerate(hyps):
        beams = []
        for score, ids, reason in h.items:
            shown = ids[:-1] if reason == "eos" else ids
            text = tokenizer.decode([i for i in shown if i not in hidden], skip_special_tokens=False)
            beams.append({"text": text, "token_ids": shown,
                          "score": score, "finish_reason": reason})
        for s, beam in enumerate(beams[:cfg.num_samples]):
            completions.append(Completion(prompts[i], beam["text"], beam["token_ids"], prep.prompt_tokens[i],
                                          beam["finish_reason"], sample=s, score=beam["score"], beams=beams))
    return GenerateResult(completions, timings, None, prep.notices)
