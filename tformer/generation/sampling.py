"""Turning next-token logits into a token: the processing order and the sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tformer.data.tokenizer import SpecialIds
from tformer.generation.config import GenerateConfig


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
    noise: Tensor | None = None, generator: torch.Generator | None = None, banned: Tensor | None = None,
) -> Tensor:
    """The next token (B,) from logits (B, V): the argmax at temperature 0, else a draw from the
    processed distribution. The draw is argmax(p / E) with E ~ Exp(1) per token (`noise`, or drawn
    from `generator`), an exact categorical sample that needs no host sync, unlike torch.multinomial.
    Tokens in `banned` (ids) are never drawn.
    """
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    logits = process_logits(logits, cfg, seen)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    # An Exp(1) draw can be exactly 0; clamped, a token of probability 0 scores 0 and is never chosen.
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


class Sampler:
    """Chooses each row's next token from the logits of a step, as `sample_logits` does, and owns what
    sampling carries from step to step: the seeded generator, the Exp(1) noise of the next draw, and the
    tokens seen so far (for the repetition penalty). Its tensors keep their storage for the whole run,
    so a compiled (CUDA-graph) decode step can read them in place.
    """

    def __init__(self, cfg: GenerateConfig, batch: int, vocab_size: int, device: torch.device, seed: int,
                 prompt_ids: Tensor | None = None, prompt_real: Tensor | None = None, banned: Sequence[int] = ()):
        self.cfg = cfg
        # Greedy decoding keeps every token, as transformers does (its ids stay comparable); a trained model
        # never prefers these anyway, while sampling at a high temperature would draw them.
        self.banned = (torch.tensor(sorted(set(banned)), dtype=torch.long, device=device)
                       if banned and not cfg.greedy else None)
        self.seen: Tensor | None = None  # (B, V) bool: tokens of each row's prompt and output
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
            if prompt_ids is not None:
                rows = torch.arange(batch, device=device)[:, None].expand_as(prompt_ids)
                self.seen[rows[prompt_real], prompt_ids[prompt_real]] = True
        self.generator: torch.Generator | None = None
        self.noise: Tensor | None = None  # (B, V) float32: the Exp(1) draw of the next step
        if not cfg.greedy:
            self.generator = torch.Generator(device=device).manual_seed(seed)
            self.noise = torch.empty(batch, vocab_size, dtype=torch.float32, device=device)

    @property
    def state(self) -> tuple[Tensor | None, Tensor | None]:
        """(seen, noise): the arguments a step passes back to `choose`."""
        return self.seen, self.noise

    def draw(self) -> None:
        """Fresh noise for the next step (before the step runs)."""
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def choose(self, logits: Tensor, seen: Tensor | None, noise: Tensor | None) -> Tensor:
        """The next token (B,) from logits (B, V): a pure function of its arguments, so it compiles."""
        return sample_logits(logits, self.cfg, seen, noise, banned=self.banned)

    def observe(self, tokens: Tensor) -> None:
        """Record the chosen tokens (B,) for the repetition penalty."""
        if self.seen is not None:
            self.seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True


def never_sampled(specials: SpecialIds, byte_fallback: bool) -> list[int]:
    """Special tokens sampling never draws: <pad>, <mask>, <bos> (unless it is also the <eos>, as GPT-2's
    <|endoftext|> is), and <unk> where the tokenizer can spell any text without it. <eos> stays: it stops a row."""
    ids = [specials.pad, specials.mask, specials.bos] + ([specials.unk] if byte_fallback else [])
    return [i for i in ids if i is not None and i != specials.eos]
