"""Tokenizers: the special tokens, building byte/char/BPE tokenizers, loading one, and decoding."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from tformer.errors import TformerError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")  # ids 0..4 in every tokenizer trained here
KINDS = ("bpe", "char", "byte")
DEFAULT_BPE_VOCAB = 4096


# --- special tokens ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of a tokenizer; None where it has no such token."""

    pad: int | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    mask: int | None = None
    # How a checkpoint decodes, where its config says (Hugging Face generation ids); not tokenizer roles.
    decoder_start: int | None = None  # an encoder-decoder's first target token (default: bos)
    forced_bos: int | None = None  # the token forced as the first one generated (BART)
    forced_eos: int | None = None  # the token forced as the last one when the length runs out (BART)
    also_eos: tuple[int, ...] = ()  # further tokens that end a row (a config's list of eos ids)

    def to_dict(self) -> dict[str, int | None]:
        """The five token roles (pad, bos, eos, unk, mask)."""
        return {role: getattr(self, role) for role in ("pad", "bos", "eos", "unk", "mask")}

    @property
    def stops(self) -> frozenset[int]:
        """Every token that ends a row."""
        return frozenset(i for i in (self.eos, *self.also_eos) if i is not None)


# Names used by tokenizers trained elsewhere, ours first. GPT-2 has only <|endoftext|>, which
# serves as both its bos and eos; it has no pad, unk or mask (left None for the trainer to decide).
_SPECIAL_NAMES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Find the pad/bos/eos/unk/mask ids of any tokenizer (ours: 0..4; GPT-2: <|endoftext|> as bos and eos)."""
    found: dict[str, int | None] = {}
    for role, names in _SPECIAL_NAMES.items():
        if role == "unk" and getattr(tokenizer.model, "unk_token", None):
            names = (tokenizer.model.unk_token, *names)
        found[role] = next((i for n in names if (i := tokenizer.token_to_id(n)) is not None), None)
    return SpecialIds(**found)


# --- building tokenizers ----------------------------------------------------------------------------

def byte_alphabet() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level tokenizers (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the others (control bytes, space, ...) are shifted to
    code points from 256 on, so that every token is a visible string and any byte sequence is covered.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _special_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def _finish(tok: Tokenizer) -> Tokenizer:
    # Marks the specials as special (so transformers and skip_special_tokens know them); ids stay 0..4.
    # (No lstrip on <mask>: text that spells "<mask>" must round-trip exactly; fill-mask gives the space
    # before a mask to the mask itself, see mask_prompt.)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _byte_level(tok: Tokenizer, use_regex: bool) -> Tokenizer:
    # No prefix space and untrimmed offsets: the defaults that keep every byte of the input.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _check_vocab_size(vocab_size: int | None, alphabet: int, what: str) -> None:
    need = alphabet + len(SPECIAL_TOKENS)
    if vocab_size is not None and vocab_size < need:
        raise TformerError(
            f"--vocab-size {vocab_size} is smaller than the {alphabet} {what} plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {need}"
        )


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens after the 5 specials: the id of byte b is 5 + b."""
    vocab = _special_vocab()
    vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in enumerate(byte_alphabet())})
    # One "word" per piece (no regex split): with no merges the model just maps each byte.
    return _finish(_byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False))


def char_tokenizer(alphabet: Iterable[str]) -> Tokenizer:
    """One token per character (Unicode code point), in code-point order after the 5 specials; others map to <unk>."""
    vocab = _special_vocab()
    for ch in sorted(set(alphabet)):
        vocab.setdefault(ch, len(vocab))
    # A BPE model without merges or pre-tokenizer splits text into characters; Fuse joins them back.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return _finish(tok)


def train_bpe(texts: Iterable[str | list[str]], vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, every byte in the base alphabet) on `texts`."""
    _check_vocab_size(vocab_size, 256, "bytes")
    tok = _byte_level(Tokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _finish(tok)


def train_tokenizer(texts: Iterable[str | list[str]], kind: str = "bpe", vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of `kind` ("bpe", "char" or "byte") from `texts`; `vocab_size` is an upper bound."""
    if kind == "bpe":
        return train_bpe(texts, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    if kind == "char":
        alphabet: set[str] = set()
        for text in texts:
            for t in [text] if isinstance(text, str) else text:
                alphabet.update(t)
        _check_vocab_size(vocab_size, len(alphabet), "distinct characters of the corpus")
        return char_tokenizer(alphabet)
    if kind == "byte":
        _check_vocab_size(vocab_size, 256, "bytes")
        return byte_tokenizer()
    raise TformerError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")


def mask_prompt(tokenizer: Tokenizer, text: str, mask: int) -> str:
    """A fill-mask prompt as the tokenizer should see it: "<mask>" spelled as its mask token (BERT's [MASK]),
    and, for byte-level tokenizers, the white space before each mask absorbed by the mask, as RoBERTa's lstrip
    does: "the <mask> sat" then masks one token that carries its space (Ġking), as the masked-LM objective
    masks them in training, instead of a lone space token followed by space-less candidates."""
    token = tokenizer.id_to_token(mask)
    if token and token != "<mask>":
        text = text.replace("<mask>", token)
    if token and is_byte_level(tokenizer):
        text = re.sub(r"\s+(?=" + re.escape(token) + ")", "", text)
    return text


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: str | Path) -> None:
    """Refuse a tokenizer whose ids a model of `vocab_size` tokens cannot take (the "tokenizer does not belong
    to this model" check, done once where a checkpoint or its tokenizer is loaded)."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise TformerError(f"{where} has {n:,} tokens but the model's vocabulary only {vocab_size:,}: "
                           "they do not belong together")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer.json (or a directory holding one), ready to encode a corpus exactly."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TformerError(f"tokenizer file '{path}' does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TformerError(f"cannot load tokenizer '{path}': {reason}") from e
    # A tokenizer.json may carry truncation/padding settings; a corpus is encoded whole.
    tok.no_truncation()
    tok.no_padding()
    return tok


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Decode ids to text, keeping special tokens (so nothing is silently dropped)."""
    ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=False)


# -- byte-level tokenizers ------------------------------------------------------------------------

def is_byte_level(tokenizer: Tokenizer | dict[str, Any]) -> bool:
    """True when the tokenizer (or its JSON document) maps bytes to printable stand-ins, as GPT-2's does
    (Ġ for a space): a ByteLevel pre-tokenizer or decoder anywhere in it."""
    doc = tokenizer if isinstance(tokenizer, dict) else json.loads(tokenizer.to_str())

    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(doc.get("pre_tokenizer")) or has(doc.get("decoder"))


def token_bytes_of(tokenizer: Tokenizer) -> Callable[[int], bytes] | None:
    """For a byte-level tokenizer (GPT-2's alphabet, as `tformer tokenize` builds), a function giving the
    bytes a token id stands for, as its ByteLevel decoder reads them; None for other tokenizers."""


    if not is_byte_level(tokenizer):
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
