"""`tformer tokenize`: train (or load) a tokenizer, then stream a corpus through it into token files.

An output directory, which `tformer train` reads:

    tokenizer.json          Hugging Face `tokenizers` format (loads in `transformers` too)
    tokenizer_config.json   names the special tokens for `transformers.AutoTokenizer`
    train.bin, val.bin      flat token ids, uint16 when the vocabulary fits else uint32 (`numpy.memmap`)
    meta.json               kind, vocab size, dtype, special ids, token counts, the split, the sources

A `.tsv` corpus of `source<TAB>target` lines (for the encoder-decoder) gives, per split, instead of one file:

    {split}.src.bin, {split}.tgt.bin   flat token ids of all sources / all targets
    {split}.src.idx, {split}.tgt.idx   uint64 offsets (pairs + 1): pair i is ids[idx[i]:idx[i + 1]]

Decoding is exact: trained tokenizers have no normalizer, byte-level pre-tokenization adds no prefix
space, nothing is inserted between pieces, and special-token text inside the corpus is encoded as plain
text. So decoding train.bin followed by val.bin gives back the corpus byte for byte (`bpe`, `byte`, and
`char` when every character is in its vocabulary).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tformer import __version__
from tformer.data.corpus import (
    DEFAULT_CORPUS_NAME,
    Progress,
    ReadStats,
    Source,
    default_corpus,
    find_corpus,
    read_pairs,
    read_pieces,
    report_progress,
    training_texts,
    val_start,
)
from tformer.data.tokenizer import (
    KINDS,
    SpecialIds,
    _check_vocab_size,
    decode,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from tformer.data.tokens import FORMAT, token_dtype
from tformer.errors import TformerError
from tformer.files import atomic_directory
from tformer.limits import MAX_DIM, short

BATCH_BYTES = 1 << 20


# --- encoding ---------------------------------------------------------------------------------------

class _Counter:
    """Counts how often each id occurs, to report the vocabulary used and the unknown-token rate."""

    def __init__(self, vocab_size: int):
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def add(self, ids: np.ndarray) -> None:
        if ids.size:
            self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]


def _encode_ids(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode `texts` on the tokenizer's threads; all ids as one array, and each text's token count."""
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets, which token files do not need.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    lists = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _in_batches(items: Iterable[tuple[Any, int]], total: int, progress: Progress | None) -> Iterator[list[Any]]:
    """Group (item, n_bytes) pairs into lists of about BATCH_BYTES; report progress once each is processed."""
    batch: list[Any] = []
    size = done = 0
    for item, n in items:
        batch.append(item)
        size += n
        done += n
        if size >= BATCH_BYTES:
            yield batch
            report_progress(progress, "encode", done, total)
            batch, size = [], 0
    if batch:
        yield batch
    report_progress(progress, "encode", total, total)


def _encode_flat(
    tok: Tokenizer, sources: Sequence[Source], split_at: int, errors: str, dtype: np.dtype,
    out: Path, counter: _Counter, stats: ReadStats, progress: Progress | None,
) -> dict[str, int]:
    """Stream every source through `tok` into out/train.bin and out/val.bin; returns the token counts."""
    counts = {"train": 0, "val": 0}
    pieces = (((text, val), n) for source in sources for text, val, n in read_pieces(source, split_at, errors, stats))
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(out / f"{split}.bin", "wb")) for split in counts}
        for batch in _in_batches(pieces, sum(s.size for s in sources), progress):
            flat, lengths = _encode_ids(tok, [text for text, _ in batch], dtype)
            counter.add(flat)
            # Pieces come in corpus order, so a batch is some train pieces followed by some val pieces.
            n_train = int(lengths[: sum(not val for _, val in batch)].sum())
            for split, part in (("train", flat[:n_train]), ("val", flat[n_train:])):
                part.tofile(files[split])
                counts[split] += len(part)
    return counts


def _encode_pairs(
    tok: Tokenizer, sources: Sequence[Source], split_at: int, errors: str, dtype: np.dtype,
    out: Path, counter: _Counter, stats: ReadStats, progress: Progress | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Stream `source<TAB>target` lines into {split}.src/.tgt.bin token files and their uint64 .idx offsets.

    Returns the token counts (sources and targets together) and the pair counts, per split.
    """
    n_pairs = {"train": 0, "val": 0}
    ends = {(split, side): 0 for split in n_pairs for side in ("src", "tgt")}  # tokens written so far
    pairs = (((src, tgt, val), n)
             for source in sources for src, tgt, val, n in read_pairs(source, split_at, errors, stats))
    with contextlib.ExitStack() as stack:
        files = {}
        for split, side in ends:
            files[split, side] = stack.enter_context(open(out / f"{split}.{side}.bin", "wb"))
            files[split, side, "idx"] = stack.enter_context(open(out / f"{split}.{side}.idx", "wb"))
            np.zeros(1, dtype=np.uint64).tofile(files[split, side, "idx"])  # offsets start at 0
        for batch in _in_batches(pairs, sum(s.size for s in sources), progress):
            n = len(batch)
            n_train = sum(not val for _, _, val in batch)  # pairs come in corpus order: train, then val
            flat, lengths = _encode_ids(tok, [src for src, _, _ in batch] + [tgt for _, tgt, _ in batch], dtype)
            counter.add(flat)
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for k, side in enumerate(("src", "tgt")):  # sources are texts 0..n-1, targets n..2n-1
                for split, lo, hi in (("train", k * n, k * n + n_train), ("val", k * n + n_train, k * n + n)):
                    if hi > lo:
                        flat[starts[lo]:starts[hi]].tofile(files[split, side])
                        offsets = ends[split, side] + np.cumsum(lengths[lo:hi]).astype(np.uint64)
                        offsets.tofile(files[split, side, "idx"])
                        ends[split, side] = int(offsets[-1])
            n_pairs["train"] += n_train
            n_pairs["val"] += n - n_train
    tokens = {split: ends[split, "src"] + ends[split, "tgt"] for split in n_pairs}
    return tokens, n_pairs


# --- the output directory ---------------------------------------------------------------------------

def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an existing `out_dir` unless `force`; even then replace only an empty or tformer token directory."""
    out_dir = Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise TformerError(f"--out '{out_dir}' exists and is not a directory")
    if not force:
        raise TformerError(f"output directory '{out_dir}' already exists (use --force to replace it)")
    if any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        # --force must not wipe an unrelated directory given by mistake (say --out .)
        raise TformerError(f"refusing to replace '{out_dir}': it is not a tformer token directory (no meta.json)")


@contextlib.contextmanager
def _building(out_dir: Path, force: bool) -> Iterator[Path]:
    """A fresh temporary sibling of `out_dir`, swapped in for it once the block succeeds (`atomic_directory`);
    until then an existing `out_dir` is untouched, and on any failure the temporary directory goes."""
    with atomic_directory(out_dir) as tmp:
        yield tmp
        check_out_dir(out_dir, force)  # again: something may have appeared meanwhile


def _write_json(path: Path, obj: Any) -> None:
    # Inside the temporary directory: the directory swap is what makes the output atomic.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_config(tok: Tokenizer, special: SpecialIds) -> dict[str, Any]:
    """tokenizer_config.json for transformers: the special tokens, and no clean-up that would alter the text."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, i in special.to_dict().items():
        if i is not None:
            config[f"{role}_token"] = tok.id_to_token(i)
    return config


# --- the whole job ----------------------------------------------------------------------------------

@dataclass
class TokenizeResult:
    """What `tokenize_corpus` wrote and measured."""

    out_dir: Path
    kind: str
    vocab_size: int
    dtype: str
    special: SpecialIds
    files: int
    chars: int
    bytes: int
    tokens: dict[str, int]  # per split; for pairs, sources and targets together
    pairs: dict[str, int] | None  # pairs per split, for a .tsv corpus
    vocab_used: int
    unk_tokens: int
    replaced: int  # invalid UTF-8 sequences replaced by U+FFFD (--errors replace)
    train_seconds: float
    encode_seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.encode_seconds

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(1, self.total_tokens)

    @property
    def unk_rate(self) -> float:
        return self.unk_tokens / max(1, self.total_tokens)

    @property
    def mb_per_s(self) -> float:
        """Encoding throughput in MB/s (10**6 bytes)."""
        return self.bytes / 1e6 / max(self.encode_seconds, 1e-9)


def default_out_dir(paths: Sequence[str | Path], kind: str | None = None, tokenizer: str | Path | None = None) -> Path:
    """data/<name of the first corpus path>-<kind, or the tokenizer's name>, e.g. data/tinyshakespeare-char."""
    name = Path(str(paths[0]).rstrip("/\\")).stem if paths else DEFAULT_CORPUS_NAME
    if tokenizer is None:
        label = kind or "bpe"
    else:  # gpt2/tokenizer.json -> gpt2; my-tok.json -> my-tok
        tokenizer = Path(tokenizer)
        label = tokenizer.stem if tokenizer.stem != "tokenizer" else tokenizer.resolve().parent.name
    return Path("data") / f"{name or 'corpus'}-{label or 'tokenizer'}"


def tokenize_corpus(
    paths: Sequence[str | Path] = (),
    out_dir: str | Path | None = None,
    *,
    kind: str | None = None,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.1,
    errors: str = "strict",
    force: bool = False,
    progress: Progress | None = None,
) -> TokenizeResult:
    """Train a tokenizer of `kind` on the corpus (or load `tokenizer`), then encode the corpus into `out_dir`.

    `paths`: files, globs or directories (every non-empty *.txt below); all `.tsv` means source/target pairs;
    none: the built-in corpus (`tformer.corpus`). `out_dir`: default `default_out_dir(paths, kind, tokenizer)`.
    `kind`: "bpe" (default), "char" or "byte"; `vocab_size`: upper bound (BPE default 4096).
    `val_fraction`: the last part of the corpus (whole lines, or whole pairs) that goes to val.
    `errors`: "strict" stops at the first byte that is not UTF-8, "replace" substitutes U+FFFD.
    `force`: replace an existing `out_dir` (only once the new one is complete).
    `progress(phase, done, total)`: called with bytes read, phase "train" then "encode".
    Raises TformerError for every problem with the input; nothing is written then.
    """
    if tokenizer is not None and (kind is not None or vocab_size is not None):
        raise TformerError("--tokenizer uses an existing tokenizer; drop --kind and --vocab-size")
    if tokenizer is None:
        kind = kind or "bpe"
    if tokenizer is None and kind not in KINDS:
        raise TformerError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if vocab_size is not None and not 1 <= vocab_size <= MAX_DIM:
        raise TformerError(f"--vocab-size {short(vocab_size)} is out of range; allowed: 1 to {MAX_DIM:,}")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):  # also refuses nan
        raise TformerError(f"--val-fraction must be at least 0 and below 1, not {val_fraction}")
    if errors not in ("strict", "replace"):
        raise TformerError(f"--errors must be 'strict' or 'replace', not {errors!r}")
    if out_dir is None:
        out_dir = default_out_dir(paths, kind, tokenizer)
    out_dir = Path(os.path.abspath(out_dir))  # so '.' and '..' have a name and a parent
    check_out_dir(out_dir, force)
    sources = find_corpus(paths or [default_corpus()])
    pairs = sources[0].path.suffix.lower() == ".tsv"
    if kind == "bpe" and tokenizer is None:
        _check_vocab_size(vocab_size, 256, "bytes")  # before spending time on training

    start = time.perf_counter()
    if tokenizer is not None:
        tok, kind = load_tokenizer(tokenizer), "file"
    else:
        tok = train_tokenizer(training_texts(sources, pairs, errors, progress), str(kind), vocab_size)
    tok.encode_special_tokens = True  # "<eos>" written in the corpus is text, not a control token
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    special = special_ids(tok)
    split_at = val_start(sources, val_fraction)
    counter, stats = _Counter(vocab), ReadStats()
    with _building(out_dir, force) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _hf_config(tok, special))
        if pairs:
            tokens, n_pairs = _encode_pairs(tok, sources, split_at, errors, dtype, tmp, counter, stats, progress)
        else:
            tokens = _encode_flat(tok, sources, split_at, errors, dtype, tmp, counter, stats, progress)
            n_pairs = None
        encode_seconds = time.perf_counter() - start
        result = TokenizeResult(
            out_dir=out_dir, kind=kind, vocab_size=vocab, dtype=dtype.name, special=special,
            files=len(sources), chars=stats.chars, bytes=sum(s.size for s in sources), tokens=tokens,
            pairs=n_pairs, vocab_used=int((counter.counts > 0).sum()),
            unk_tokens=int(counter.counts[special.unk]) if special.unk is not None else 0,
            replaced=stats.replaced, train_seconds=train_seconds, encode_seconds=encode_seconds,
        )
        result.warnings += _round_trip_warnings(tok, sources, pairs, errors, result)
        _write_json(tmp / "meta.json", _meta(result, tokenizer, val_fraction, split_at, sources, stats, errors))
    return result


def _round_trip_warnings(tok: Tokenizer, sources: Sequence[Source], pairs: bool, errors: str,
                         result: TokenizeResult) -> list[str]:
    """Cheap checks that decoding will give the corpus back: a sample piece, unknown and replaced bytes."""
    notes = []
    if result.replaced:
        notes.append(f"replaced {result.replaced:,} invalid UTF-8 sequence(s) with U+FFFD")
    if result.unk_tokens:
        notes.append(f"{result.unk_tokens:,} token(s) are <unk>: decoding will not give back the exact text")
    elif not pairs:
        sample = next(read_pieces(sources[0], 0, errors))[0]
        ids = tok.encode(sample, add_special_tokens=False).ids
        if decode(tok, ids) != sample:
            notes.append("this tokenizer does not decode back to the exact text (a normalizer or lossy decoder)")
    return notes


def _meta(result: TokenizeResult, tokenizer: str | Path | None, val_fraction: float, split_at: int,
          sources: Sequence[Source], stats: ReadStats, errors: str) -> dict[str, Any]:
    if result.pairs is None:
        files: dict[str, Any] = {split: f"{split}.bin" for split in ("train", "val")}
        split_by = "at the end of the corpus, at the start of a line"
    else:
        files = {split: {key: f"{split}.{side}.{ext}" for side in ("src", "tgt")
                         for key, ext in ((side, "bin"), (f"{side}_offsets", "idx"))}
                 for split in ("train", "val")}
        split_by = "at the end of the corpus, by whole pairs"
    src = next((s for s in sources if s.start <= split_at < s.start + s.size), None)
    return {
        "format": FORMAT,
        "tformer_version": __version__,
        "kind": result.kind,
        "tokenizer": "tokenizer.json",
        "tokenizer_source": None if tokenizer is None else str(tokenizer),
        "vocab_size": result.vocab_size,
        "dtype": result.dtype,
        "special_ids": result.special.to_dict(),
        "layout": "flat" if result.pairs is None else "pairs",
        "files": files,
        "tokens": result.tokens,
        "pairs": result.pairs,
        "split": {
            "val_fraction": val_fraction,
            "by": split_by,
            "val_start": None if src is None else {"file": str(src.path), "byte": split_at - src.start},
        },
        "sources": stats.sources,
        "stats": {
            "files": result.files, "chars": result.chars, "bytes": result.bytes,
            "vocab_used": result.vocab_used, "unk_tokens": result.unk_tokens,
            "replaced_invalid_utf8": result.replaced, "errors": errors,
            "train_seconds": round(result.train_seconds, 3), "encode_seconds": round(result.encode_seconds, 3),
        },
    }
