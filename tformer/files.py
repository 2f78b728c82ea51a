"""Atomic file and directory writes: a crash or Ctrl-C mid-write leaves the previous version intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    The temporary file lives in the same directory so the final `os.replace` is a rename
    on one filesystem, which POSIX guarantees to be atomic. On any exception (including
    KeyboardInterrupt) the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(_umask_mode(0o666))  # mkstemp makes it owner-only (0600); outputs get the usual mode
    try:
        yield tmp_path
        tmp_path.chmod(_umask_mode(0o666))  # again: a writer may have replaced the file (safetensors makes it 0600)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask_mode(mode: int) -> int:
    """`mode` less the process umask: the permissions `open()` or `mkdir()` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _usual_modes(directory: Path) -> None:
    """Give the files written into `directory` the mode `open()` would (some writers make them owner-only),
    so every file of a checkpoint can be read by whoever can read the others."""
    mode = _umask_mode(0o666)
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.stat().st_mode & 0o777 != mode:
            entry.chmod(mode)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def old_sibling(path: Path) -> Path:
    """Where `atomic_directory` keeps the previous version of `path` between the two renames of a swap."""
    return path.parent / f".{path.name}.old"


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` as a whole.

    The swap is two renames (old -> `.NAME.old`, new -> NAME). Killed between them, `path` is
    missing and `.NAME.old` holds the previous complete version: `recover_directory` puts it back.
    Killed earlier, `path` is untouched; only a `.NAME.new-*` directory is left, cleaned up next time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        tmp.chmod(_umask_mode(0o777))  # mkdtemp makes it owner-only (0700)
        yield tmp
        _usual_modes(tmp)
        old = old_sibling(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old_sibling(path), ignore_errors=True)


def recover_directory(path: str | os.PathLike) -> None:
    """Finish or undo a swap that `atomic_directory` was stopped in the middle of."""
    path = Path(path)
    old = old_sibling(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    for stale in path.parent.glob(f".{path.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)


def swap_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete directory `new` in the place of `path` (which may not exist), by the same two
    renames as `atomic_directory`, so `recover_directory` understands an interruption between them."""
    new, path = Path(new), Path(path)
    old = old_sibling(path)
    recover_directory(path)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
