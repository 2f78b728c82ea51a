"""Prompts: reading them from the command line, encoding them, and preparing the first tokens of each row."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from tformer.data.tokenizer import SpecialIds, check_fits
from tformer.errors import TformerError
from tformer.generation.engine import device_dtype, sync
from tformer.generation.results import Timings
from tformer.model.transformer import DecoderLM, EncoderModel, Seq2Seq

# -- prompts --------------------------------------------------------------------------------------

def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    # The tokenizer's own template applies (a Llama <s>, BERT's [CLS] ... [SEP]), as transformers encodes;
    # the tokenizers tformer trains have none.
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


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
class Prepared:
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


def prepare(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], specials: SpecialIds,
            add_special_tokens: bool = True) -> Prepared:
    """Prompts as each row's first tokens (and, for an encoder-decoder, the encoded source). A prompt already
    rendered by a chat template carries its own special tokens: `add_special_tokens=False`."""
    if isinstance(model, EncoderModel):
        raise TformerError("this is an encoder (masked-LM) model: it fills in <mask> tokens (fill_mask), "
                           "it does not continue text")
    if not isinstance(model, (DecoderLM, Seq2Seq)):
        raise TformerError(f"cannot generate with a {type(model).__name__}")
    _check_prompts(prompts)
    device, _ = device_dtype(model)
    sync(device)
    start = time.perf_counter()
    ctx, notices = model.cfg.max_seq_len, []
    check_fits(tokenizer, model.cfg.vocab_size, "the tokenizer")
    encoded = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise TformerError(f"{_name(i, len(prompts))} encodes to no tokens")
    pad = specials.pad if specials.pad is not None else 0
    if isinstance(model, DecoderLM):
        if any("<mask>" in p for p in prompts) or (specials.mask is not None
                                                 and any(specials.mask in ids for ids in encoded)):
            raise TformerError("<mask> asks for fill-mask, which needs an encoder model; "
                               f"this checkpoint is a decoder (arch={model.cfg.arch})")
        starts = [_fit(ids, ctx, _name(i, len(prompts)), notices) for i, ids in enumerate(encoded)]
        return Prepared(starts, [len(s) for s in starts], None, None, pad, notices, time.perf_counter() - start)
    start = specials.decoder_start if specials.decoder_start is not None else specials.bos
    if start is None:
        raise TformerError("the tokenizer has no <bos> token, which starts an encoder-decoder's output")
    # A source with <mask> asks for denoising: such sources were trained ending in <eos>.
    sources = [ids + [specials.eos] if specials.mask in ids and specials.eos is not None else ids
               for ids in encoded]
    sources = [_fit(s, ctx, _name(i, len(prompts)), notices) for i, s in enumerate(sources)]
    S = max(len(s) for s in sources)
    src = torch.tensor([s + [pad] * (S - len(s)) for s in sources], device=device)
    src_mask = torch.tensor([[True] * len(s) + [False] * (S - len(s)) for s in sources], device=device)
    memory, _ = model.encode(src, src_mask)
    sync(device)
    return Prepared([[start] for _ in prompts], [len(s) for s in sources], memory, src_mask, pad, notices,
                     time.perf_counter() - start)
