"""A checkpoint is untrusted input: what is checked before (and right after) its tensors are read.

- the safetensors header of each file (its 8-byte length and JSON, not the data) against the file's size,
  and, for our own format, every tensor's name, dtype and shape against the config, so a header that
  describes a 12 GiB tensor is refused before a byte of it is read;
- the memory the config's model needs, against what the device has (`tformer.limits`);
- after reading: every weight a finite float;
- the training state of a run to resume (`trainer_state.json`, `optimizer.safetensors`), by type and range.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from pathlib import Path
from typing import Any

from tformer.errors import CheckpointError
from tformer.limits import short

# Bytes per element of each safetensors dtype; the float ones may hold weights.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) from the header of the safetensors file `path`, after checking that
    the header is well formed and that every tensor's bytes lie inside the file and match its shape."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is unreadable (truncated or not a safetensors file): {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path} is unreadable (truncated or not a safetensors file): its header "
                                      f"claims {short(n)} bytes of a {size:,}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is unreadable (truncated or not a safetensors file): its header is not "
                              f"JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is unreadable (not a safetensors file): its header is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has no description in the header")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{where} has the unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
        if not (isinstance(shape, list) and all(_index(d) for d in shape)):
            raise CheckpointError(f"{where} has the invalid shape {shape!r}; a shape is a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_index(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has invalid data offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] > data_size:
            raise CheckpointError(f"{where} ({_gib(nbytes)}) lies beyond the end of the file "
                                  f"({data_size:,} bytes of data): the file is truncated or corrupt")
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: shape {tuple(shape)} of {dtype} needs {nbytes:,} bytes, the header "
                                  f"gives it {offsets[1] - offsets[0]:,}")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):,.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes:,} bytes"


def check_weight_headers(files: list[Path], expected: dict[str, tuple[int, ...]] | None, budget: int) -> None:
    """The headers of a checkpoint's weight files: well formed, float weights, and either exactly the
    `expected` names and shapes (our format) or, when the names are not known here, at most `budget` bytes."""
    declared: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        declared.update(read_header(path))
    if expected is None:
        total = sum(math.prod(shape) * DTYPE_BYTES[dtype] for dtype, shape in declared.values())
        if total > budget:
            raise CheckpointError(f"the weight files of '{files[0].parent}' describe {_gib(total)} of tensors, "
                                  f"more than a model of its config holds ({_gib(budget)})")
        return
    problems = []
    missing = [k for k in expected if k not in declared]
    unexpected = [k for k in declared if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_names(unexpected)}")
    for name, (dtype, shape) in declared.items():
        if name in expected and shape != tuple(expected[name]):
            problems.append(f"tensor '{name}' has shape {shape} but the config needs {tuple(expected[name])}")
        elif name in expected and dtype not in FLOAT_DTYPES:
            problems.append(f"tensor '{name}' is {dtype}, but weights are floats (F32, F16, BF16 or F64)")
    if problems:
        where = files[0] if len(files) == 1 else files[0].parent
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems[:4])
                              + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a model of `config` saves, from a model built on the meta device
    (no memory is allocated)."""
    import torch

    from tformer.model.transformer import build_model

    with torch.device("meta"):
        model = build_model(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


FINITE_CHUNK = 1 << 20  # elements checked at a time: the temporaries stay small beside a large weight


def _all_finite(tensor: Any) -> bool:
    """Whether every value is finite, checked in chunks of a flat view (no copy of a memory-mapped weight)."""
    import torch

    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def check_tensors(tensors: dict[str, Any], where: str) -> None:
    """Every weight must be a float tensor with finite values; the first that is not is named."""
    import torch

    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, "
                                  f"but weights are floats (float32, float16, bfloat16 or float64)")
        if tensor.numel() and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{where}: tensor '{name}' holds {bad:,} NaN or infinite value(s) of "
                                  f"{tensor.numel():,}; weights must be finite")


# -- values of a foreign config.json (a boolean is a boolean) ---------------------------------------

def as_int(doc: dict[str, Any], key: str, default: int | None = None) -> int:
    """doc[key] as an integer; a bool, a string or a fraction is refused (KeyError when missing)."""
    value = doc.get(key) if default is not None else doc[key]
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise CheckpointError(f"config.json: {key}={value!r} must be an integer")
    return int(value)


def as_float(doc: dict[str, Any], key: str, default: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {key}={value!r} must be a finite number")
    return float(value)


def as_bool(doc: dict[str, Any], key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {key}={value!r} must be a boolean (true or false)")
    return value


# -- the training state of a run to resume ----------------------------------------------------------

def check_trainer_state(info: Any, path: Path) -> dict[str, Any]:
    """trainer_state.json's fields by type and range; returns it. Nothing of the run is touched before."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(info).__name__}; the run cannot be "
                              f"resumed from it (use --init-from for its weights)")
    for name, kinds, required in (("step", int, True), ("tokens_seen", int, True), ("lr", (int, float), True),
                                  ("best_val_loss", (int, float, type(None)), True), ("rng", dict, True),
                                  ("elapsed", (int, float), False), ("train_loss", (int, float, type(None)), False),
                                  ("val", (dict, type(None)), False), ("scaler", (dict, type(None)), False),
                                  ("arch", str, False), ("progress", (int, float), False)):
        if name not in info:
            if required:
                raise CheckpointError(f"{path} lacks the field '{name}'; the run cannot be resumed from it")
            continue
        value = info[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise CheckpointError(f"{path}: '{name}' is {value!r}, not of the right type "
                                  f"({_kinds(kinds)}); the run cannot be resumed from it")
        if isinstance(value, float) and not math.isfinite(value) and name not in ("best_val_loss", "train_loss"):
            raise CheckpointError(f"{path}: '{name}' is {value!r}; it must be finite")
    if not 0 <= info.get("progress", 0) <= 1:
        raise CheckpointError(f"{path}: 'progress'={info['progress']} is out of range; allowed: 0 to 1")
    for name in ("step", "tokens_seen"):
        if not 0 <= info[name] < 2**62:
            raise CheckpointError(f"{path}: '{name}'={info[name]} is out of range; allowed: 0 to 2**62")
    rng = info["rng"]
    for name in ("torch", "data"):
        if not isinstance(rng.get(name), str) or not _base64(rng[name]):
            raise CheckpointError(f"{path}: the random state 'rng.{name}' is missing or not base64")
    if "cuda" in rng and not (isinstance(rng["cuda"], list) and all(isinstance(s, str) and _base64(s)
                                                                     for s in rng["cuda"])):
        raise CheckpointError(f"{path}: the random state 'rng.cuda' is not a list of base64 strings")
    return info


def _kinds(kinds: Any) -> str:
    names = {"int": "an integer", "float": "a number", "NoneType": "null", "dict": "an object", "str": "text"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names.get(k.__name__, k.__name__) for k in kinds))


def _base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def read_trainer_state(directory: Path, state_file: str, optimizer_file: str) -> dict[str, Any]:
    """The checked training state of a checkpoint to resume, after checking its optimizer file's header."""
    path = directory / state_file
    for needed in (path, directory / optimizer_file):
        if not needed.is_file():
            raise CheckpointError(f"'{directory}' has no training state ({needed.name} is missing); it cannot "
                                  f"be resumed, only used with --init-from")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run cannot be resumed from it") from None
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable: {e.strerror or e}") from None
    check_trainer_state(info, path)
    for name, (dtype, _) in read_header(directory / optimizer_file).items():
        if dtype not in FLOAT_DTYPES and dtype != "I64":  # moments are floats; a step counter may be an integer
            raise CheckpointError(f"{directory / optimizer_file}: tensor '{name}' is {dtype}, not a float")
    return info
