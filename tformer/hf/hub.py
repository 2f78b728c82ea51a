"""Hugging Face Hub names (`owner/name`, `hf:owner/name`) as checkpoint directories.

The local Hugging Face cache is tried first, so `HF_HUB_OFFLINE=1` works for anything downloaded
before; otherwise only the safetensors weights, the JSON files and the tokenizer files are
downloaded (never a pickle), with huggingface_hub's progress bars. huggingface_hub is an optional
extra (`pip install 'tformer[hub]'`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tformer.errors import CheckpointError

PREFIX = "hf:"
# What a checkpoint needs: the weights (safetensors only), config/index/generation/tokenizer JSON, and
# the files of tokenizers that are not tokenizer.json.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "vocab.txt", "merges.txt", "*.tiktoken"]
# GitHub-like owner/name as the Hub allows them: letters, digits, '-', '_', '.', at most 96 each.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5", "flax_model.msgpack")


def hub_repo_id(name: str) -> str | None:
    """The repository id `name` names: `hf:owner/name` always, a bare `owner/name` only when no local
    path of that name (or whose first component) exists; None otherwise."""
    explicit = name.startswith(PREFIX)
    repo = name[len(PREFIX):] if explicit else name
    if not explicit and (Path(name).exists() or Path(name.split("/")[0]).exists()):
        return None  # a local path (perhaps a mistyped one): the local error message says what is missing
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        if explicit:
            raise CheckpointError(f"'{name}' is not a Hub name; write hf:owner/name (letters, digits, - _ .)")
        return None
    return repo


def resolve_hub_name(name: str) -> Path | None:
    """The local snapshot directory of the Hub repository `name` names, downloading it if needed;
    None when `name` is not a Hub name (a local path, or not of the form owner/name)."""
    repo = hub_repo_id(name)
    if repo is None:
        return None
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"'{name}' is not a local directory, and loading it from the Hugging Face Hub "
                              f"needs huggingface_hub: pip install 'tformer[hub]'") from None
    try:  # the cache first: no network, and HF_HUB_OFFLINE=1 works
        cached = Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError, ValueError):
        cached = None
    if cached is not None and _has_weights(cached):
        return cached
    if cached is not None and _pickle_only(cached):
        raise _pickle_error(repo)
    if _offline():
        raise CheckpointError(f"'{repo}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                              f"unset HF_HUB_OFFLINE to download it, or pass a local directory")
    try:
        path = Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(f"'{repo}' is gated on the Hugging Face Hub: accept its terms on the website, "
                              f"then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no repository '{repo}' on the Hugging Face Hub (or it is private: log in "
                              f"with `hf auth login`)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        raise CheckpointError(f"cannot download '{repo}' from the Hugging Face Hub ({type(e).__name__}); "
                              f"check the network, or download it elsewhere and pass its directory") from None
    if not _has_weights(path):
        if _pickle_only(path) or _remote_has_pickles(huggingface_hub, repo):
            raise _pickle_error(repo)
        raise CheckpointError(f"'{repo}' on the Hugging Face Hub has no model.safetensors or "
                              f"model.safetensors.index.json")
    return path


def _has_weights(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    if (path / "model.safetensors").is_file():
        return True
    index = path / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(isinstance(n, str) and (path / n).is_file() for n in names)


def _pickle_only(path: Path) -> bool:
    return any((path / name).exists() for name in _PICKLES) and not _has_weights(path)


def _remote_has_pickles(huggingface_hub, repo: str) -> bool:
    try:
        files = huggingface_hub.list_repo_files(repo)
    except Exception:  # the listing is only for the message; any failure means "unknown"
        return False
    return any(Path(f).name in _PICKLES for f in files)


def _pickle_error(repo: str) -> CheckpointError:
    return CheckpointError(f"'{repo}' has only pickled weights (pytorch_model.bin), which tformer never loads; "
                           f"use a repository with model.safetensors")


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))
