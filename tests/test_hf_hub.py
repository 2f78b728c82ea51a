"""Hub names resolve through the local Hugging Face cache (HF_HUB_OFFLINE=1 works); pickles are refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from hf_tiny import VOCAB, make  # noqa: E402

from tformer.checkpoint import load_checkpoint
from tformer.errors import CheckpointError
from tformer.hf.hub import hub_repo_id, resolve_hub_name

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo: str) -> Path:
    """An empty snapshot of `repo` laid out as huggingface_hub's cache: models--owner--name/{refs/main, snapshots/<rev>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local owner/ directory
    return cache


def test_cached_repo_loads_offline_by_name(offline_cache):
    hf = make(transformers, "qwen2", cached_repo(offline_cache, "tiny-org/tiny-qwen"))
    for name in ("tiny-org/tiny-qwen", "hf:tiny-org/tiny-qwen"):
        ckpt = load_checkpoint(name)
        assert ckpt.source == "hf-qwen2" and ckpt.path.name == REVISION
        idx = torch.randint(0, VOCAB, (1, 9))
        with torch.no_grad():
            assert (hf(idx).logits - ckpt.model(idx).logits).abs().max().item() <= 1e-4


def test_pickle_only_repo_is_refused(offline_cache):
    snapshot = cached_repo(offline_cache, "tiny-org/old-model")
    make(transformers, "llama", snapshot)
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_checkpoint("tiny-org/old-model")


def test_missing_repo_offline_says_what_to_do(offline_cache):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("tiny-org/absent")
    assert "not in the local Hugging Face cache" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert "\n" not in str(err.value)


def test_pickle_only_local_directory_is_refused(tmp_path):
    make(transformers, "llama", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, a pickle, which tformer never loads"):
        load_checkpoint(tmp_path)


def test_local_paths_win_over_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub_repo_id("runs/missing") is None  # a mistyped local path is not sent to the Hub
    assert resolve_hub_name("/abs/path") is None and hub_repo_id("a/b/c") is None
    assert hub_repo_id("owner/name") == "owner/name" and hub_repo_id("hf:owner/name") == "owner/name"
    with pytest.raises(CheckpointError, match="not a Hub name"):
        hub_repo_id("hf:../etc")


def test_cli_loads_a_hub_name_from_the_cache_in_a_fresh_process(tmp_path):
    """The environment variables as a user sets them (read by huggingface_hub at import)."""
    cache = tmp_path / "hub"
    make(transformers, "llama", cached_repo(cache, "tiny-org/tiny-llama"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "from tformer.checkpoint import load_checkpoint; print(load_checkpoint('tiny-org/tiny-llama').source)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf-llama"
