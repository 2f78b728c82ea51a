"""Greedy and sampled generation: the public entry point."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import nn

from tformer.checkpoint import eval_mode, unwrap_model
from tformer.data.tokenizer import SpecialIds, special_ids, token_bytes_of
from tformer.generation.beam import beam_search
from tformer.generation.config import GenerateConfig
from tformer.generation.engine import decode, device_dtype
from tformer.generation.prompts import prepare
from tformer.generation.results import Completion, GenerateResult
from tformer.generation.sampling import never_sampled
from tformer.generation.stream import OnText, Row, hidden_tokens


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: GenerateConfig | None = None,
    on_text: OnText | None = None, specials: SpecialIds | None = None, add_special_tokens: bool = True,
) -> GenerateResult:
    """Continue each prompt (decoder-only) or translate it (encoder-decoder: the prompt is the source).

    Rows are prompts x num_samples, prompt-major (row = prompt * num_samples + sample); `on_text`
    receives each row's text as it is produced, whole characters only. With `cfg.beams` > 1 this is
    `beam_search`.
    """
    cfg = cfg or GenerateConfig()
    if cfg.beams > 1:
        return beam_search(model, tokenizer, prompts, cfg, specials, add_special_tokens)
    specials = specials or special_ids(tokenizer)
    model = unwrap_model(model)
    prep = prepare(model, tokenizer, prompts, specials, add_special_tokens)
    if cfg.compile and device_dtype(model)[0].type == "mps":
        cfg = dataclasses.replace(cfg, compile=False)
        prep.notices.append("--compile is not supported on Apple MPS: decoding without it")
    k = cfg.num_samples
    seed = cfg.seed if cfg.seed is not None else (None if cfg.greedy else random.randrange(2**31))
    token_bytes = token_bytes_of(tokenizer)
    hidden = frozenset() if cfg.show_special else hidden_tokens(specials)
    rows = [Row(r, tokenizer, specials.stops, cfg.stop, on_text, token_bytes, hidden) for r in range(len(prompts) * k)]
    memory, memory_mask = prep.memory, prep.memory_mask
    if memory is not None:
        memory, memory_mask = memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0)
    timings, slides = decode(model, [prep.starts[r // k] for r in range(len(rows))], rows, cfg, seed or 0,
                             memory, memory_mask, prep.pad, never_sampled(specials, token_bytes is not None),
                             specials.forced_bos, specials.forced_eos)
    timings = prep.time(timings)
    if slides:
        ctx = model.cfg.max_seq_len
        prep.notices.append(f"generation went past the context of {ctx:,} tokens: the window slid "
                            f"{slides} time{'s' if slides > 1 else ''}, keeping the last {max(1, ctx // 2):,} "
                            f"tokens each time")
    completions = [
        Completion(prompts[r // k], row.text, row.ids, prep.prompt_tokens[r // k], row.finish_reason or "length",
                   sample=r % k)
        for r, row in enumerate(rows)
    ]
    return GenerateResult(completions, timings, seed, prep.notices)


def sample_continuation(
    model: nn.Module, tokenizer: Tokenizer, max_new_tokens: int = 100, prompt: str = "\n",
    temperature: float = GenerateConfig.temperature, top_k: int = GenerateConfig.top_k, seed: int = 1337,
) -> str:
    """A short sample from a decoder being trained (used at the end of `tformer train`).
    The model is put back in the mode it was in."""
    plain = unwrap_model(model)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    with eval_mode(plain):
        return generate(plain, tokenizer, [prompt], cfg).completions[0].text
