"""Tokenizers and token files: train (or load) a tokenizer, then stream a corpus through it into flat token files.

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
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tformer import __version__
from tformer.corpus import DEFAULT_CORPUS_NAME, default_corpus
from tformer.errors import TformerError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")  # ids 0..4 in every tokenizer trained here
KINDS = ("bpe", "char", "byte")
DEFAULT_BPE_VOCAB = 4096
FORMAT = "tformer-tokens/1"

# A piece is the text handed to the tokenizer in one go; a batch is one encode_batch call. Big enough
# to keep the tokenizer's threads busy, small enough that memory stays flat (see benchmarks/).
PIECE_BYTES = 1 << 16
BATCH_BYTES = 1 << 20
_SEARCH_BYTES = 1 << 20  # how far to look for a line start when placing the train/val split

Progress = Callable[[str, int, int], None]
"""progress(phase, bytes_done, bytes_total), phase being "train" (reading to train) or "encode"."""


# --- special tokens ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of a tokenizer; None where it has no such token."""

    pad: int | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    mask: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


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


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Decode ids to text, keeping special tokens (so nothing is silently dropped)."""
    ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=False)


# --- finding and reading the corpus -----------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One corpus file; `start` is its byte offset in the concatenated corpus."""

    path: Path
    size: int
    start: int


def find_corpus(paths: Sequence[str | Path]) -> list[Source]:
    """Expand files, globs and directories (every non-empty *.txt below) into corpus files, in the given order."""
    if not paths:
        raise TformerError("no corpus given")
    files: list[Path] = []
    for given in paths:
        text = str(given)
        if any(c in text for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise TformerError(f"no file matches '{text}'")
        else:
            matches = [Path(text)]
        for path in matches:
            if not path.exists():
                raise TformerError(f"corpus path '{path}' does not exist")
            if path.is_dir():
                found = sorted(p for p in path.rglob("*.txt") if p.is_file() and p.stat().st_size > 0)
                if not found:
                    raise TformerError(f"directory '{path}' has no text (no non-empty .txt file below it)")
                files.extend(found)
            elif path.stat().st_size == 0:
                raise TformerError(f"corpus file '{path}' is empty")
            else:
                files.append(path)
    sources, seen, start = [], set(), 0
    for path in files:
        key = path.resolve()
        if key not in seen:  # a file named twice (say by a glob and by name) is read once
            seen.add(key)
            size = path.stat().st_size
            sources.append(Source(path, size, start))
            start += size
    tsv = [s.path.suffix.lower() == ".tsv" for s in sources]
    if any(tsv) and not all(tsv):
        raise TformerError("the corpus mixes .tsv pair files with text files; tokenize them separately")
    return sources


def _decode_utf8(data: bytes, source: Source, offset: int, errors: str) -> tuple[str, int]:
    """Decode bytes read at `offset` of `source`; returns the text and how many invalid sequences were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise TformerError(f"'{source.path}' is not valid UTF-8 at byte {offset + e.start} "
                               "(use --errors replace to substitute U+FFFD)") from None
    bad, pos = 0, 0
    while True:  # only for broken input: count what "replace" substitutes
        try:
            data[pos:].decode("utf-8")
            break
        except UnicodeDecodeError as e:
            bad += 1
            pos += e.end
    return data.decode("utf-8", "replace"), bad


def _piece_end(buf: bytes, limit: int) -> int:
    """Where to end a piece inside buf[:limit] (buf is longer), preferring cuts that change no token.

    The cut goes at the start of a run of whitespace, i.e. after a byte that is not whitespace: GPT-2-style
    pre-tokenization splits there, and both sides pre-tokenize exactly as they would inside the whole text
    (a whitespace run is only ever split before its last character, which needs what follows it). A run
    holding a newline is preferred, then any space; failing both (one huge word), a UTF-8 character
    boundary, which may change a token there but never the decoded text.
    """
    for sep in (b"\n", b" "):
        i = buf.rfind(sep, 0, limit)
        if i > 0:
            i = len(buf[:i].rstrip())  # back to the start of the run (ASCII whitespace)
            if i > 0:
                return i
    i = limit
    while i > 0 and buf[i] & 0xC0 == 0x80:  # a continuation byte: step back to the character's start
        i -= 1
    return i or limit


def val_start(sources: Sequence[Source], val_fraction: float) -> int:
    """Byte offset (in the concatenated corpus) where the validation split begins.

    It is the start of a line (or of a file) near the last `val_fraction` of the bytes, so that no
    line, word or character is divided; only a corpus without any newline is cut mid-line, and then
    still at a character boundary. Train and val are encoded separately, so no token spans the split.
    """
    total = sum(s.size for s in sources)
    if val_fraction <= 0 or total < 2:
        return total
    target = min(total - 1, max(1, round(total * (1 - val_fraction))))
    src = next(s for s in sources if s.start <= target < s.start + s.size)
    local = target - src.start
    with open(src.path, "rb") as f:
        f.seek(local)
        ahead = f.read(_SEARCH_BYTES)
        back = max(0, local - _SEARCH_BYTES)
        f.seek(back)
        behind = f.read(local - back)
    j = ahead.find(b"\n")
    if j != -1 and local + j + 1 < src.size:
        return target + j + 1
    if src is not sources[-1]:
        return src.start + src.size  # the next file starts a new document
    j = behind.rfind(b"\n")
    if j != -1:
        return src.start + back + j + 1
    k = 0
    while k < len(ahead) and ahead[k] & 0xC0 == 0x80:
        k += 1
    return target + k


def _read_pieces(
    source: Source, split_at: int, errors: str, stats: _Stats | None = None
) -> Iterator[tuple[str, bool, int]]:
    """Yield (text, is_val, n_bytes) pieces of about PIECE_BYTES of `source`, cut where `_piece_end` says.

    `split_at` is the corpus offset where val begins; pieces never straddle it. With `stats`, the file's
    sha256, characters and replaced bytes are recorded along the way.
    """
    cut = split_at - source.start  # local offset; <= 0: all val, >= size: all train
    sha = hashlib.sha256()
    buf, pos = b"", 0  # pos: file offset of buf[0]
    with open(source.path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            sha.update(block)
            buf += block
            while len(buf) > PIECE_BYTES or (not block and buf):
                n = _piece_end(buf, PIECE_BYTES) if len(buf) > PIECE_BYTES else len(buf)
                if pos < cut < pos + n:
                    n = cut - pos
                text, bad = _decode_utf8(buf[:n], source, pos, errors)
                if stats is not None:
                    stats.chars += len(text)
                    stats.replaced += bad
                yield text, pos >= cut, n
                buf, pos = buf[n:], pos + n
            if not block:
                break
    if stats is not None:
        stats.sources.append({"path": str(source.path), "bytes": source.size, "sha256": sha.hexdigest()})


def _read_pairs(
    source: Source, split_at: int, errors: str, stats: _Stats | None = None
) -> Iterator[tuple[str, str, bool, int]]:
    """Yield (source_text, target_text, is_val, n_bytes) for each `source<TAB>target` line; blank lines are skipped.

    A pair is in val when its line starts at or after `split_at`: the split is by whole pairs.
    """
    sha = hashlib.sha256()
    pos = skipped = 0
    with open(source.path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            sha.update(line)
            body = line[:-1] if line.endswith(b"\n") else line
            body = body[:-1] if body.endswith(b"\r") else body
            if not body:
                skipped += len(line)  # counted with the next pair, for progress
            else:
                tabs = body.count(b"\t")
                if tabs != 1:
                    raise TformerError(
                        f"{source.path}:{lineno}: expected exactly one tab between source and target, found {tabs}"
                    )
                left, right = body.split(b"\t")
                src, bad_src = _decode_utf8(left, source, pos, errors)
                tgt, bad_tgt = _decode_utf8(right, source, pos + len(left) + 1, errors)
                if stats is not None:
                    stats.chars += len(src) + len(tgt)
                    stats.replaced += bad_src + bad_tgt
                yield src, tgt, source.start + pos >= split_at, skipped + len(line)
                skipped = 0
            pos += len(line)
    if stats is not None:
        stats.sources.append({"path": str(source.path), "bytes": source.size, "sha256": sha.hexdigest()})


def _training_texts(
    sources: Sequence[Source], pairs: bool, errors: str, progress: Progress | None
) -> Iterator[list[str]]:
    """The corpus as batches of strings for training a tokenizer (every split: the vocabulary must cover val)."""
    total, done = sum(s.size for s in sources), 0
    for source in sources:
        if pairs:
            batch: list[str] = []
            for src, tgt, _, n in _read_pairs(source, 0, errors):
                batch += [src, tgt]
                done += n
                if len(batch) >= 2048:
                    yield batch
                    batch = []
                    _report(progress, "train", done, total)
            if batch:
                yield batch
        else:
            for text, _, n in _read_pieces(source, 0, errors):
                done += n
                yield [text]
                _report(progress, "train", done, total)
    _report(progress, "train", total, total)


def _report(progress: Progress | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


# --- encoding ---------------------------------------------------------------------------------------

@dataclass
class _Stats:
    chars: int = 0
    replaced: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)


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
            _report(progress, "encode", done, total)
            batch, size = [], 0
    if batch:
        yield batch
    _report(progress, "encode", total, total)


def _encode_flat(
    tok: Tokenizer, sources: Sequence[Source], split_at: int, errors: str, dtype: np.dtype,
    out: Path, counter: _Counter, stats: _Stats, progress: Progress | None,
) -> dict[str, int]:
    """Stream every source through `tok` into out/train.bin and out/val.bin; returns the token counts."""
    counts = {"train": 0, "val": 0}
    pieces = (((text, val), n) for source in sources for text, val, n in _read_pieces(source, split_at, errors, stats))
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
    out: Path, counter: _Counter, stats: _Stats, progress: Progress | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Stream `source<TAB>target` lines into {split}.src/.tgt.bin token files and their uint64 .idx offsets.

    Returns the token counts (sources and targets together) and the pair counts, per split.
    """
    n_pairs = {"train": 0, "val": 0}
    ends = {(split, side): 0 for split in n_pairs for side in ("src", "tgt")}  # tokens written so far
    pairs = (((src, tgt, val), n)
             for source in sources for src, tgt, val, n in _read_pairs(source, split_at, errors, stats))
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
    """Yield a fresh temporary sibling of `out_dir`; once the block succeeds, swap it in for `out_dir`.

    Until then an existing `out_dir` is untouched; on any failure the temporary directory is removed.
    The swap is two renames, so only a crash between them could leave `out_dir` missing (never half-written).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would outlive the rename; mkdir honours the umask.
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        check_out_dir(out_dir, force)  # again: something may have appeared meanwhile
        if out_dir.exists():
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    if vocab_size is not None and vocab_size < 1:
        raise TformerError(f"--vocab-size must be positive, not {vocab_size}")
    if not 0 <= val_fraction < 1:
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
        tok = train_tokenizer(_training_texts(sources, pairs, errors, progress), str(kind), vocab_size)
    tok.encode_special_tokens = True  # "<eos>" written in the corpus is text, not a control token
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    special = special_ids(tok)
    split_at = val_start(sources, val_fraction)
    counter, stats = _Counter(vocab), _Stats()
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
        sample = next(_read_pieces(sources[0], 0, errors))[0]
        ids = tok.encode(sample, add_special_tokens=False).ids
        if decode(tok, ids) != sample:
            notes.append("this tokenizer does not decode back to the exact text (a normalizer or lossy decoder)")
    return notes


def _meta(result: TokenizeResult, tokenizer: str | Path | None, val_fraction: float, split_at: int,
          sources: Sequence[Source], stats: _Stats, errors: str) -> dict[str, Any]:
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
