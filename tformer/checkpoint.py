"""Checkpoints are directories: `model.safetensors`, `config.json` (the full resolved config), and,
once a tokenizer or training state exists, `tokenizer.json` and the training state beside them.

Only safetensors and JSON are ever read: no pickle. A directory written by Hugging Face
`transformers` for GPT-2 (`save_pretrained`) loads as a `DecoderLM` wherever a checkpoint is accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tformer import __version__
from tformer.config import ModelConfig
from tformer.errors import CheckpointError, ConfigError
from tformer.files import atomic_write, atomic_write_json
from tformer.files import old_sibling as _old_sibling
from tformer.hf.config import config_from_hf, generation_ids
from tformer.hf.weights import state_from_hf
from tformer.model.transformer import build_model

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # a Hugging Face directory's generation defaults
# Written by `tformer train` beside the weights: optimizer/scheduler tensors, and step, tokens seen,
# best_val_loss, lr, RNG states and data position as JSON.
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT = "tformer"
DEFAULT_ROOT = Path("checkpoints")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its config, and config.json's other sections."""

    model: nn.Module
    config: ModelConfig
    path: Path
    source: str = FORMAT  # "tformer", or "hf-<model_type>" (e.g. "hf-llama") for a directory written by transformers
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None


def is_checkpoint_dir(directory: Path) -> bool:
    """True when `directory` holds a config.json and weights (a single file or a shard index)."""
    return (directory / CONFIG_FILE).is_file() and (
        (directory / WEIGHTS_FILE).is_file() or (directory / SHARD_INDEX_FILE).is_file()
    )


def find_latest_checkpoint(root: str | Path = DEFAULT_ROOT) -> Path:
    """The checkpoint directory under `root` (at any depth) whose weights were written most recently."""
    root = Path(root)
    if is_checkpoint_dir(root):
        return root
    candidates = [p.parent for p in root.rglob(CONFIG_FILE) if _visible(p.parent, root)] if root.is_dir() else []
    if not candidates:
        raise CheckpointError(
            f"no checkpoint found under '{root}'; train one with `tformer train` or pass --checkpoint DIR"
        )

    return max(candidates, key=_written)


def resolve_checkpoint(given: str | Path | None, root: str | Path = DEFAULT_ROOT) -> tuple[Path, str | None]:
    """The checkpoint directory a command-line argument names, and a note when it was chosen for the user.

    The one rule every command follows (generate, inspect, train --resume/--init-from):
    - nothing: the newest checkpoint under `root` (checkpoints/);
    - a checkpoint directory (ours, or a Hugging Face one: config.json and safetensors weights): itself;
    - a training run's directory (holding latest/ and/or best/): the newer of the two;
    - any other directory: the newest checkpoint anywhere below it, named in the note.
    A checkpoint caught between the two renames of its swap (`.NAME.old` without NAME) is read where it is,
    without changing anything on disk. A path that holds no checkpoint is returned as given: loading it
    says what is missing.
    """
    if given is None:
        path = find_latest_checkpoint(root)
        return path, f"using the checkpoint {path} (the newest under {root})"
    path = Path(given)
    if is_checkpoint_dir(path):
        return path, None
    if not path.exists():
        path = _local_or_hub(path)  # a Hub name (owner/name, hf:owner/name): its local snapshot
        if is_checkpoint_dir(path):
            return path, None
    present = _present(path)
    if present is not None and present != path:
        return present, f"using the checkpoint {present} (the save replacing '{path}' did not finish)"
    if not path.is_dir():
        return path, None
    run = [d for d in (_present(path / "latest"), _present(path / "best")) if d is not None]
    if run:
        newest = max(run, key=_written)
        return newest, f"using the checkpoint {newest} (the newest of the run '{path}')"
    try:
        newest = find_latest_checkpoint(path)
    except CheckpointError:
        return path, None  # nothing inside either: loading says what is missing
    return newest, f"using the checkpoint {newest} (the newest under '{path}')"


def _present(directory: Path) -> Path | None:
    """`directory` if it is a checkpoint, else the previous version a swap left beside it, else None."""
    if is_checkpoint_dir(directory):
        return directory
    old = _old_sibling(directory)
    return old if not directory.exists() and is_checkpoint_dir(old) else None


def _written(directory: Path) -> float:
    weights = directory / WEIGHTS_FILE
    return (weights if weights.is_file() else directory / SHARD_INDEX_FILE).stat().st_mtime


def _visible(directory: Path, root: Path) -> bool:
    """A complete checkpoint not inside a temporary directory; a `.NAME.old` left by an interrupted
    directory swap (see files.atomic_directory) counts while NAME itself is missing."""
    if not is_checkpoint_dir(directory):
        return False
    for part in directory.relative_to(root).parts:
        if part.startswith("."):
            if not (part.endswith(".old") and not (directory.parent / part[1:-4]).exists()):
                return False
    return True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP/FSDP-style (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode (no dropout), then put it back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def state_dict_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """Contiguous CPU tensors of the plain module, with no wrapper prefixes in their names."""
    state = unwrap_model(model).state_dict()
    clean = {}
    for name, tensor in state.items():
        name = re.sub(r"^(?:_orig_mod\.|module\.)+", "", name)
        clean[name] = tensor.detach().to("cpu").contiguous()
    return clean


def save_checkpoint(
    directory: str | Path, model: nn.Module, config: ModelConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write model.safetensors and config.json into `directory`, each atomically (temp file, then rename).

    `extra` adds sections to config.json beside "model" (e.g. the training config).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_saving(model)
    metadata = {"format": "pt", "tformer_version": __version__}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    document = {"format": FORMAT, "tformer_version": __version__, "model": config.to_dict(), **(extra or {})}
    atomic_write_json(directory / CONFIG_FILE, document)
    return directory


def read_config(directory: str | Path) -> tuple[ModelConfig, str, dict[str, Any]]:
    """The model config of a checkpoint directory without loading weights: (config, source, other sections)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"'{directory}' is not a checkpoint directory (it is a file)")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"'{directory}' is not a checkpoint: {CONFIG_FILE} is missing "
            f"(a checkpoint directory holds {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    if document.get("format") == FORMAT:
        if not isinstance(document.get("model"), dict):
            raise CheckpointError(f"{config_path} has no 'model' section")
        try:
            config = ModelConfig.from_dict(document["model"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        extra = {k: v for k, v in document.items() if k not in ("format", "tformer_version", "model")}
        return config, FORMAT, extra
    if "model_type" in document:
        generation = _read_json_object(directory / GENERATION_CONFIG_FILE)
        config = config_from_hf(document, config_path)
        extra = {"hf_config": document, "generation": generation_ids(document, generation)}
        return config, f"hf-{document['model_type']}", extra
    raise CheckpointError(
        f"{config_path} is neither a tformer config (\"format\": \"tformer\") nor a Hugging Face config "
        f"(with a model_type)"
    )


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file beside the config, or None when absent; a broken one is an error naming it."""
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return document


def load_checkpoint(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load a checkpoint directory (ours, or a transformers directory of a supported model type, or a
    Hugging Face Hub name such as `owner/name`) into an eval-mode model.

    The config is checked before any tensor is read. Tensors come memory-mapped from the safetensors
    files and become the model's parameters without a copy where they need no change (the model is
    built on the meta device, so nothing is allocated twice); every missing, unexpected or wrongly
    shaped tensor is an error that names it. The weights are then converted to `dtype` (default
    float32) and moved to `device`.
    """
    from tformer import checkpoint_checks, limits

    directory = _local_or_hub(directory)
    directory = _present(directory) or directory  # a swap stopped between its renames
    config, source, extra = read_config(directory)
    # untrusted input: the memory the config asks for, then the headers, before a tensor is read
    item = torch.finfo(dtype).bits // 8 if dtype is not None and dtype.is_floating_point else 4
    values = limits.parameter_count(config)
    limits.check_memory(f"the model of '{directory}'", values * (4 + item), torch.device(device))
    expected = checkpoint_checks.expected_shapes(config) if source == FORMAT else None
    checkpoint_checks.check_weight_headers(weight_files(directory), expected, budget=values * 8 + (1 << 20))
    with torch.device("meta"):  # shapes only: the loaded tensors are assigned to it
        model = build_model(config)
    tensors = read_safetensors(directory)
    if source != FORMAT:
        tensors = state_from_hf(source.removeprefix("hf-"), tensors, config, _expected_names(config, model),
                                where=str(directory))
    checkpoint_checks.check_tensors(tensors, str(directory))
    target = dtype or torch.float32
    tensors = {k: v.to(target) if v.is_floating_point() and v.dtype != target else v for k, v in tensors.items()}
    load_state(model, tensors, where=str(directory / WEIGHTS_FILE), assign=True)
    for module in model.modules():  # derived tables (RoPE, sinusoidal) were not built on the meta device
        if hasattr(module, "init_buffers"):
            module.init_buffers(device="cpu")
    model.to(device=device, dtype=dtype)
    model.eval()
    return Checkpoint(model=model, config=config, path=directory, source=source, extra=extra)


def _local_or_hub(directory: str | Path) -> Path:
    """`directory`, or for a Hub name (`owner/name`, `hf:owner/name`) that is no local path, its snapshot."""
    if not Path(directory).exists():
        from tformer.hf.hub import resolve_hub_name

        resolved = resolve_hub_name(str(directory))
        if resolved is not None:
            return resolved
    return Path(directory)


def _expected_names(config: ModelConfig, model: nn.Module | None = None) -> list[str]:
    """The tensor names a model of `config` has (built on the meta device when not given)."""
    if model is None:
        with torch.device("meta"):
            model = build_model(config)
    return list(model.state_dict())


def load_state(model: nn.Module, tensors: dict[str, Tensor], where: str, assign: bool = False) -> None:
    """Copy `tensors` into `model` (or, with `assign`, make them its parameters), naming any missing,
    unexpected or wrongly shaped tensor."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_names(unexpected)}")
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(
                f"tensor '{name}' has shape {tuple(tensor.shape)} but the config needs {tuple(expected[name].shape)}"
            )
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems[:4])
                              + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
    model.load_state_dict(tensors, strict=True, assign=assign)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def stored_dtypes(files: list[Path]) -> dict[str, int]:
    """Bytes of tensor data per stored dtype ("F32", "BF16", ...), read from the safetensors headers only."""
    sizes: Counter[str] = Counter()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                sizes[piece.get_dtype()] += math.prod(piece.get_shape()) * DTYPE_BYTES.get(piece.get_dtype(), 4)
    return dict(sizes)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names (each must be a plain file name inside `directory`)."""
    single, index = directory / WEIGHTS_FILE, directory / SHARD_INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        hint = ""
        if (directory / "pytorch_model.bin").exists():
            hint = " (it has pytorch_model.bin, a pickle, which tformer never loads; re-save with safetensors)"
        raise CheckpointError(f"'{directory}' has no {WEIGHTS_FILE}{hint}")
    return shard_files(directory)


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors` (or of the shards a `model.safetensors.index.json` names), on the CPU."""
    files = weight_files(directory)
    # safe_open memory-maps each file: get_tensor returns tensors backed by the mapping (no copy;
    # pages are read as the tensor is first used), so the weights are never held twice.
    tensors: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"weights file {path} is missing")
        from tformer.checkpoint_checks import read_header

        read_header(path)  # the header against the file's size, before the data is touched
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path} is unreadable (truncated or not a safetensors file): {detail}") from None
    return tensors


def shard_files(directory: Path) -> list[Path]:
    """The shard files that `model.safetensors.index.json` names, in order, each checked to be a plain
    file name inside `directory` (an index must not point elsewhere on the disk)."""
    index = directory / SHARD_INDEX_FILE
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not (isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name
                and not name.startswith(".")):
            raise CheckpointError(f"{index}: shard {name!r} must be a .safetensors file name inside '{directory}'")
        files.append(directory / name)
    return files


# -- Hugging Face GPT-2 (kept for callers of the old names; the mapping lives in tformer/hf/) --------

def gpt2_config_from_hf(hf: dict[str, Any], where: Path | str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers GPT2Config dict."""
    return config_from_hf({**hf, "model_type": "gpt2"}, where)


def gpt2_state_from_hf(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename (and transpose Conv1D weights of) a transformers GPT-2 state dict into ours."""
    return state_from_hf("gpt2", tensors, config, _expected_names(config), where="GPT-2 state dict")
