"""Perplexity of a decoder on any text (`tformer eval`): loss, perplexity and bits per byte, streamed.

The text is read in bounded pieces (as `tformer tokenize` reads a corpus) and tokenized the same way, so
memory stays flat whatever its size. Files are one stream, concatenated as the tokenizer sees a corpus.

Scoring uses a sliding window (as transformers' perplexity guide does): windows of `context` input tokens
start every `stride` tokens, and each window scores only the next-token predictions not scored by an earlier
one, so every token after the first is scored exactly once, with at least `context - stride` tokens before
it (except in the first window). With stride = context the windows do not overlap: window k reads tokens
[k*context, (k+1)*context) and predicts [k*context + 1, (k+1)*context], exactly the windows `train`'s
validation uses on its own split (`tformer.data.batches.eval_batches`), so the numbers agree. A tail
shorter than a stride is scored by one last window ending at the last token.

Bits per byte, total nats / (ln 2 x UTF-8 bytes of the text), compares models with different tokenizers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from tformer.data.batches import IGNORE_INDEX
from tformer.data.corpus import Source, find_corpus, read_pieces
from tformer.errors import TformerError

ENCODE_BATCH = 16  # pieces per encode call: about 1 MiB of text, enough to keep the tokenizer's threads busy

Progress = Callable[[int, int, int], None]
"""progress(bytes_read, bytes_total, tokens_scored)."""


@dataclass
class EvalResult:
    """What `evaluate_text` measured. `loss` is the mean cross-entropy in nats per scored token."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int  # next-token predictions scored (every token of the text but the first)
    text_tokens: int  # tokens of the whole text
    bytes: int  # UTF-8 bytes of the text
    nats: float  # summed cross-entropy
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def token_pieces(tokenizer: Tokenizer, sources: Sequence[Source]) -> Iterator[tuple[np.ndarray, int]]:
    """The text of `sources` as token ids, a batch of pieces at a time, with the bytes each batch covers.

    Encoded as `tformer tokenize` encodes a corpus: pieces cut where no token changes, no special tokens
    added, special-token text (say "<eos>" written in the text) encoded as plain text.
    """
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    texts: list[str] = []
    n_bytes = 0

    def flush() -> tuple[np.ndarray, int]:
        ids = [i for e in encode(texts, add_special_tokens=False) for i in e.ids]
        return np.asarray(ids, dtype=np.int64), n_bytes

    for source in sources:
        # split_at past the end: every piece is "train", none is cut for a split
        for text, _, n in read_pieces(source, source.start + source.size, "strict"):
            texts.append(text)
            n_bytes += n
            if len(texts) >= ENCODE_BATCH:
                yield flush()
                texts, n_bytes = [], 0
    if texts:
        yield flush()


@torch.inference_mode()
def _window_nats(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """Summed cross-entropy (nats) of `labels` (IGNORE_INDEX: not scored) given `inputs`, both (B, T)."""
    logits = model(inputs).logits
    # float32 like train's validation (tformer.training.objectives.loss_fn), summed instead of averaged
    return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum"))


def evaluate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    paths: Sequence[str | Path],
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> EvalResult:
    """Score next-token prediction of a decoder `model` on the text of `paths` (files, directories, globs).

    stride: tokens between window starts (default context // 2); 1 <= stride <= context.
    """
    stride = max(1, context // 2) if stride is None else stride
    if context < 1:
        raise TformerError(f"context {context} must be at least 1")
    if not 1 <= stride <= context:
        raise TformerError(f"--stride {stride} must be between 1 and the context ({context})")
    if batch_size < 1:
        raise TformerError(f"--batch-size {batch_size} must be at least 1")
    sources = find_corpus(paths)  # a missing or empty file, or a directory without text: one line naming it
    total_bytes = sum(s.size for s in sources)
    device = torch.device(device)
    was_training = model.training
    model.eval()

    nats, scored, windows, n_text = 0.0, 0, 0, 0
    buf = np.zeros(0, dtype=np.int64)  # tokens from buf_start on: what the next windows still need
    buf_start = 0
    next_start = 0  # where the next full window starts
    scored_to = 0  # every target index <= scored_to is scored (token 0 has nothing before it)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    read = 0
    start = time.perf_counter()

    def run(batch: list[tuple[np.ndarray, np.ndarray]]) -> None:
        nonlocal nats, windows
        inputs = torch.from_numpy(np.stack([x for x, _ in batch])).to(device)
        labels = torch.from_numpy(np.stack([y for _, y in batch])).to(device)
        nats += _window_nats(model, inputs, labels)
        windows += len(batch)

    def window(begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs tokens [begin, end) and their next tokens as labels, only the unscored ones kept."""
        nonlocal scored_to, scored
        local = begin - buf_start
        inputs = buf[local:local + end - begin]
        labels = buf[local + 1:local + end - begin + 1].copy()
        first_new = max(scored_to + 1, begin + 1)  # target index of the first label not yet scored
        labels[: first_new - (begin + 1)] = IGNORE_INDEX
        scored += end - first_new + 1
        scored_to = end
        return inputs, labels

    try:
        for ids, n_bytes in token_pieces(tokenizer, sources):
            buf = np.concatenate([buf, ids])
            n_text += len(ids)
            read += n_bytes
            # every full window (context inputs + the next token) that the tokens so far allow
            while next_start + context < buf_start + len(buf):
                pending.append(window(next_start, next_start + context))
                next_start += stride
                if len(pending) == batch_size:
                    run(pending)
                    pending = []
            # tokens before the next window are never read again, except the last context + 1 (a tail window's)
            keep_from = max(buf_start, min(next_start, buf_start + len(buf) - (context + 1)))
            buf, buf_start = buf[keep_from - buf_start:], keep_from
            if progress is not None:
                progress(read, total_bytes, scored)
        if pending:
            run(pending)
        last = buf_start + len(buf) - 1  # index of the last token
        if last > scored_to:  # a tail: one window ending at the last token, as long as the context allows
            begin = max(0, last - context)
            run([window(begin, last)])
    finally:
        model.train(was_training)
    if progress is not None:
        progress(total_bytes, total_bytes, scored)
    if scored == 0:
        names = ", ".join(f"'{s.path}'" for s in sources)
        raise TformerError(f"{names}: {n_text} token(s), too short to score (next-token prediction needs at least 2)")
    seconds = time.perf_counter() - start
    loss = nats / scored
    return EvalResult(
        loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=nats / (math.log(2) * total_bytes),
        tokens=scored, text_tokens=n_text, bytes=total_bytes, nats=nats, windows=windows, context=context,
        stride=stride, seconds=seconds, tokens_per_s=scored / seconds if seconds > 0 else float("nan"),
    )

