"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class TformerError(Exception):
    """A problem the user can fix (bad input, a broken checkpoint); its message is one line."""


class ConfigError(TformerError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class CheckpointError(TformerError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


class UnsupportedModelError(CheckpointError, ValueError):
    """A Hugging Face directory whose model_type, option or value tformer cannot represent exactly."""


# What to do about an operating-system error, by errno name: the message says what is allowed.
_ADVICE = {
    "ENOSPC": "free some space (or choose another directory) and run again",
    "EDQUOT": "the disk quota is full; free some space and run again",
    "EACCES": "choose a directory you can write to, or change its permissions",
    "EPERM": "choose a directory you can write to, or change its permissions",
    "EROFS": "the file system is read-only; choose a writable directory",
    "ELOOP": "the path goes through a loop of symbolic links; give a path without one",
    "ENAMETOOLONG": "give a shorter path",
    "ENOTDIR": "a part of the path is a file, not a directory",
    "EISDIR": "the path is a directory; give a file",
    "ENOENT": "give a path that exists",
    "EEXIST": "remove it or choose another path",
}


def fault_message(e: BaseException) -> str | None:
    """One line for a fault of the machine rather than of the code (an OSError, memory exhausted, a number
    too large for a C type), naming the file and what to do; None for anything else (a bug)."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, "")
        if name in ("EPIPE",):  # the reader of stdout went away: nothing left to tell it
            return None
        where = e.filename if e.filename is not None else "a file"
        advice = _ADVICE.get(name)
        return f"{where}: {e.strerror or e}" + (f"; {advice}" if advice else "")
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch or number of samples"
    if isinstance(e, OverflowError):
        return f"a number is too large: {e}; use values within 64 bits"
    return None
