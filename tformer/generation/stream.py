"""Rows being produced: incremental detokenization in whole characters, stop strings, host copies of tokens."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from tformer.data.tokenizer import SpecialIds, token_bytes_of

OnText = Callable[[int, str], None]
"""on_text(row, text): called with each new piece of a row's completion, whole characters only."""


def hidden_tokens(specials: SpecialIds) -> frozenset[int]:
    """The special tokens a completion's text leaves out (their ids stay in the token ids): all but <eos>,
    which ends the row instead."""
    return frozenset(i for i in specials.to_dict().values() if i is not None and i not in specials.stops)


class Row:
    """One completion being produced: its token ids, its text so far, and whether it has stopped.

    Only whole characters are released: byte-level BPE can end a token in the middle of a UTF-8
    sequence. For byte-level tokenizers the row keeps the bytes and decodes them incrementally, so an
    incomplete character is held until its last byte arrives and an invalid byte shows as U+FFFD at
    once (as the tokenizer's own decode shows it). For other tokenizers, text ending in U+FFFD is held
    (vLLM's incremental scheme). Text that could be the start of a stop string is held back until it
    is known not to be one.
    """

    def __init__(self, index: int, tokenizer: Tokenizer, eos: int | Collection[int] | None, stops: Sequence[str],
                 on_text: OnText | None, token_bytes: Callable[[int], bytes] | None = None,
                 hidden: frozenset[int] = frozenset()):
        self.index, self.tokenizer, self.stops, self.on_text = index, tokenizer, stops, on_text
        self.eos = frozenset([eos] if isinstance(eos, int) else eos or ())  # the tokens that end the row
        self.hidden = hidden  # ids kept in `ids` but not shown in the text (special tokens)
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
        if token in self.eos:
            self.finish("eos")
            return
        self.ids.append(token)
        if token in self.hidden:
            return
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
        shown = [i for i in ids if i not in self.hidden]
        return self.tokenizer.decode(shown, skip_special_tokens=False) if shown else ""

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


class HostTokens:
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
