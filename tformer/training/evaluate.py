"""Evaluation during training: validation loss, perplexity, token accuracy, and BLEU for pairs."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tformer.checkpoint import eval_mode, unwrap_model
from tformer.data.batches import IGNORE_INDEX
from tformer.device import Precision
from tformer.training import distributed
from tformer.training.objectives import TrainData, forward_logits, loss_fn


@torch.no_grad()
def evaluate(
    model: nn.Module, arch: str, batches: Iterator[dict[str, Tensor]], device: torch.device, precision: Precision,
    parallel: Any = None,
) -> dict[str, float]:
    """Validation loss (no label smoothing), perplexity and token accuracy, weighted by labelled tokens.
    With `parallel` (a CPUDataParallel), its processes take the batches in turns."""
    if parallel is not None:
        total_loss, total_correct, total_tokens = parallel.evaluate(batches)
    else:
        total_loss, total_correct, total_tokens = 0.0, 0, 0
        with eval_mode(model):
            for batch in batches:
                loss, correct, n = batch_totals(model, arch, {k: v.to(device) for k, v in batch.items()},
                                                precision.autocast(device))
                total_loss, total_correct, total_tokens = total_loss + loss, total_correct + correct, total_tokens + n
    # distributed: each rank evaluated its share of the batches; add up the totals (no-op in one process)
    total_loss, total_correct, total_tokens = distributed.sum_over_ranks(total_loss, total_correct, total_tokens)
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": total_correct / total_tokens,
            "val_tokens": total_tokens}


def batch_totals(model: nn.Module, arch: str, batch: dict[str, Tensor], autocast: Any) -> tuple[float, int, int]:
    """(summed loss, correct predictions, labelled tokens) of one batch, the model in eval mode."""
    with autocast:
        logits = forward_logits(model, arch, batch)
    labels = batch["labels"]
    n = int((labels != IGNORE_INDEX).sum())
    if n == 0:
        return 0.0, 0, 0
    correct = int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())
    return loss_fn(logits, labels).item() * n, correct, n


BLEU_SAMPLE = 100  # validation pairs translated at each evaluation of an encoder-decoder trained on pairs


def have_sacrebleu() -> bool:
    """BLEU needs sacrebleu, an optional extra (`pip install 'tformer[bleu]'`)."""
    return importlib.util.find_spec("sacrebleu") is not None


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0 to 100) of one reference per hypothesis, with sacrebleu's standard settings
    (13a tokenization, exact match), as papers report it."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def translate_sample(model: nn.Module, data: TrainData, n: int, context: int) -> tuple[list[str], list[str]]:
    """Greedy translations of the first `n` validation pairs, decoded with the KV cache exactly as
    `tformer generate --temperature 0` would, and their reference targets (as text)."""
    from tformer.data.tokenizer import load_tokenizer
    from tformer.generation.config import GenerateConfig
    from tformer.generation.generate import generate

    tokenizer = load_tokenizer(data.tokenizer_path)

    def text(ids: np.ndarray) -> str:
        return tokenizer.decode([int(i) for i in ids if i != data.specials.eos], skip_special_tokens=False)

    sources, references = [], []
    for i in range(min(n, len(data.val_pairs))):
        src, tgt = data.val_pairs[i]
        source = text(src[:context])
        if source:  # an empty source has nothing to translate
            sources.append(source)
            references.append(text(tgt))
    if not sources:
        return [], []
    plain = unwrap_model(model)
    with eval_mode(plain):
        result = generate(plain, tokenizer, sources, GenerateConfig(max_new_tokens=context, temperature=0.0),
                          specials=data.specials)
    return [c.text for c in result.completions], references
