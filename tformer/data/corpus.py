"""Finding and reading a corpus: the built-in default corpus, files, globs and directories, read in bounded pieces."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tformer.errors import TformerError
from tformer.files import atomic_write

DEFAULT_CORPUS_NAME = "pydoc-topics"


def default_corpus_text() -> str:
    """The default corpus: every distinct pydoc help topic, in topic order, separated by a blank line."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split the stdlib documentation into another package
        raise TformerError(
            "the built-in corpus needs the standard-library module pydoc_data, which this Python lacks; "
            "pass a CORPUS file instead"
        ) from e
    seen: set[str] = set()
    parts = []
    for _, text in sorted(topics.items()):
        text = text.strip("\n")
        if text and text not in seen:  # a few topics share one text
            seen.add(text)
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def default_corpus(data_dir: str | Path = "data") -> Path:
    """Write the default corpus to `data_dir/pydoc-topics.txt` (atomically, only if it changed) and return the path."""
    path = Path(data_dir) / f"{DEFAULT_CORPUS_NAME}.txt"
    data = default_corpus_text().encode("utf-8")  # bytes, so no platform rewrites the line ends
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass  # missing or unreadable: rewrite it
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


# A piece is the text handed to the tokenizer in one go; a batch is one encode_batch call. Big enough
# to keep the tokenizer's threads busy, small enough that memory stays flat (see benchmarks/).
PIECE_BYTES = 1 << 16
# The longest run of non-whitespace bytes handed to the tokenizer in one piece: BPE's cost grows faster
# than linearly with a word's length, and text without spaces (a minified file, CJK) is one long "word".
WORD_BYTES = 1 << 8
_LONG_WORD = re.compile(rb"\S{%d,}" % WORD_BYTES)

Progress = Callable[[str, int, int], None]
"""progress(phase, bytes_done, bytes_total), phase being "train" (reading to train) or "encode"."""


@dataclass
class ReadStats:
    """What reading the corpus counted: characters, replaced bytes, and each source file."""

    chars: int = 0
    replaced: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)




_SEARCH_BYTES = 1 << 20  # how far to look for a line start when placing the train/val split


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
    holding a newline is preferred, then any space. A word longer than WORD_BYTES (text without spaces)
    ends the piece before it, or, at the start of a piece, is itself cut after WORD_BYTES at a UTF-8
    character boundary, which may change a token there but never the decoded text: the tokenizer never
    sees a word longer than that, so time stays linear and memory flat on text without any whitespace.
    """
    cut = _long_word_cut(buf, limit)
    if cut is not None:
        return cut
    for sep in (b"\n", b" "):
        i = buf.rfind(sep, 0, limit)
        if i > 0:
            i = len(buf[:i].rstrip())  # back to the start of the run (ASCII whitespace)
            if i > 0:
                return i
    return _char_start(buf, limit)


def _long_word_cut(buf: bytes, limit: int) -> int | None:
    """Where to cut buf[:limit] because of a word longer than WORD_BYTES in it (None: there is none)."""
    long_word = _LONG_WORD.search(buf, 0, limit)
    if long_word is None:
        return None
    i = len(buf[:long_word.start()].rstrip())  # before the whitespace that leads up to the long word
    return i if i > 0 else _char_start(buf, long_word.start() + WORD_BYTES)


def _char_start(buf: bytes, i: int) -> int:
    """`i`, or the start of the UTF-8 character that byte `i` is inside (never 0: a piece is never empty)."""
    if i >= len(buf):
        return len(buf)
    j = i
    while j > 0 and buf[j] & 0xC0 == 0x80:  # a continuation byte: step back to the character's start
        j -= 1
    return j or i


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


def read_pieces(
    source: Source, split_at: int, errors: str, stats: ReadStats | None = None
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
                if len(buf) > PIECE_BYTES:
                    n = _piece_end(buf, PIECE_BYTES)
                else:  # the end of the file: the rest, but still no word longer than WORD_BYTES
                    n = _long_word_cut(buf, len(buf)) or len(buf)
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


def read_pairs(
    source: Source, split_at: int, errors: str, stats: ReadStats | None = None
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


def training_texts(
    sources: Sequence[Source], pairs: bool, errors: str, progress: Progress | None
) -> Iterator[list[str]]:
    """The corpus as batches of strings for training a tokenizer (every split: the vocabulary must cover val)."""
    total, done = sum(s.size for s in sources), 0
    for source in sources:
        if pairs:
            batch: list[str] = []
            for src, tgt, _, n in read_pairs(source, 0, errors):
                batch += [src, tgt]
                done += n
                if len(batch) >= 2048:
                    yield batch
                    batch = []
                    report_progress(progress, "train", done, total)
            if batch:
                yield batch
        else:
            for text, _, n in read_pieces(source, 0, errors):
                done += n
                yield [text]
                report_progress(progress, "train", done, total)
    report_progress(progress, "train", total, total)


def report_progress(progress: Progress | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)
