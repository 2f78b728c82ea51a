"""Token files on disk: their dtype, and reading them back (flat tokens or source/target pairs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tformer.data.tokenizer import SpecialIds, decode, load_tokenizer
from tformer.errors import TformerError

FORMAT = "tformer-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- reading token files back -----------------------------------------------------------------------

@dataclass(frozen=True)
class PairTokens:
    """Source and target token arrays of one split with their offsets: pair i is (src[i], tgt[i])."""

    src: np.ndarray
    src_offsets: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return (self.src[self.src_offsets[i]:self.src_offsets[i + 1]],
                self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]])


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise TformerError(f"token file '{path}' is missing")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenData:
    """A directory written by `tokenize_corpus`, opened for training: meta, tokenizer, special ids, token arrays."""

    directory: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    special: SpecialIds

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def is_pairs(self) -> bool:
        return self.meta["layout"] == "pairs"

    def tokens(self, split: str = "train") -> np.ndarray:
        """The flat token ids of `split` ("train" or "val"), memory-mapped read-only."""
        if self.is_pairs:
            raise TformerError(f"'{self.directory}' holds source/target pairs; use .pairs()")
        return _memmap(self.directory / self.meta["files"][split], self.dtype)

    def pairs(self, split: str = "train") -> PairTokens:
        """The source/target pairs of `split`, memory-mapped read-only."""
        if not self.is_pairs:
            raise TformerError(f"'{self.directory}' holds flat text tokens, not source/target pairs")
        names = self.meta["files"][split]
        return PairTokens(
            src=_memmap(self.directory / names["src"], self.dtype),
            src_offsets=_memmap(self.directory / names["src_offsets"], np.dtype(np.uint64)),
            tgt=_memmap(self.directory / names["tgt"], self.dtype),
            tgt_offsets=_memmap(self.directory / names["tgt_offsets"], np.dtype(np.uint64)),
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return decode(self.tokenizer, ids)


def open_tokens(directory: str | Path) -> TokenData:
    """Open a token directory written by `tokenize_corpus` (checks its format and files)."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise TformerError(f"'{directory}' is not a token directory (no meta.json); run tformer tokenize first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TformerError(f"cannot read '{meta_path}': {e}") from e
    if meta.get("format") != FORMAT:
        raise TformerError(f"'{meta_path}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    tok = load_tokenizer(directory / meta["tokenizer"])
    tok.encode_special_tokens = True
    return TokenData(directory, meta, tok, SpecialIds(**meta["special_ids"]))
