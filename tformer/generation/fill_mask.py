"""Fill-mask for encoder (masked-LM) models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import nn

from tformer.checkpoint import unwrap_model
from tformer.data.tokenizer import SpecialIds, mask_prompt, special_ids
from tformer.errors import TformerError
from tformer.generation.engine import device_dtype
from tformer.generation.prompts import _check_prompts, _encode, _name
from tformer.generation.results import Candidate, FillMaskResult
from tformer.generation.stream import hidden_tokens
from tformer.model.transformer import EncoderModel


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
    device, _ = device_dtype(model)
    encoded = [_encode(tokenizer, mask_prompt(tokenizer, p, specials.mask)) for p in prompts]
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
    hidden = hidden_tokens(specials)
    for b, (prompt, ids) in enumerate(zip(prompts, encoded)):
        where = [t for t, i in enumerate(ids) if i == specials.mask]
        p, cand = probs[b, where].topk(min(top, probs.size(-1)), dim=-1)  # (n_masks, top)
        masks = [[Candidate(tokenizer.decode([c], skip_special_tokens=False), c, round(q, 6))
                  for q, c in zip(pq, cq)] for pq, cq in zip(p.tolist(), cand.tolist())]
        filled = list(ids)
        for t, options in zip(where, masks):
            filled[t] = options[0].id
        shown = [i for i in filled if i not in hidden]  # a template's [CLS] ... [SEP] are not part of the text
        results.append(FillMaskResult(prompt, masks, tokenizer.decode(shown, skip_special_tokens=False)))
    return results
