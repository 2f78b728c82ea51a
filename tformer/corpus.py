"""The built-in default corpus, so `tformer tokenize` and `tformer train` work offline right after install.

Source: the help topics that ship with CPython itself, in the standard-library module
`pydoc_data.topics` (the text `help("assert")`, `help("for")`, ... prints; it is generated
from the Python Language Reference). It is about 465 KB of English prose with code examples,
present in every CPython installation, so nothing is downloaded and no text is committed to
this repository: the corpus is assembled at run time and cached as a UTF-8 file under `data/`.
Its exact content follows the installed Python version, which is why the cache is rebuilt
whenever the text differs.
"""

from __future__ import annotations

from pathlib import Path

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
