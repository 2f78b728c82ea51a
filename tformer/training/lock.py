"""One training at a time per run directory: an advisory lock on `<out>/.lock`.

`fcntl.flock` belongs to the open file, so the operating system releases it when the process ends, however
it ends (kill -9 included): a lock file left behind by a dead run is stale by construction, and the next
run simply takes it. The file records the holder's pid and host for the message a second run prints, and
is removed when the lock is released.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from tformer.errors import TformerError

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def close_inherited_locks() -> None:
    """In a forked child: close the locks' descriptors it inherited. A flock belongs to the open file, which
    the child shares, so a child outliving its parent (a training helper finishing its share after a kill -9)
    would otherwise keep the run locked."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


class RunLock:
    """An exclusive, non-blocking lock on a run directory, held until `release` (or the process's end)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or stop at once with one line naming the run that holds it."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock rather than no training
            return self
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TformerError(f"cannot write to --out '{self.out}': {e.strerror or e}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise TformerError(f"cannot write to --out '{self.out}': {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise TformerError(f"'{self.out}' is in use by another tformer train{holder}; wait for it to "
                                   f"finish or choose another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the one that is there now
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        """Let go of the lock and remove its file (a run opening it meanwhile sees that and starts over)."""
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {int(info['pid'])} on {info['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
