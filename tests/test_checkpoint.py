import json

import pytest
import torch
from conftest import tiny_config

from tformer.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from tformer.errors import CheckpointError, TformerError
from tformer.model.transformer import build_model

ARCHS = ["decoder", "encoder", "encoder-decoder"]


def forward(model, idx):
    if model.cfg.arch == "encoder-decoder":
        return model(idx, idx[:, :5]).logits
    return model(idx).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path, arch, tie):
    cfg = tiny_config(arch=arch, tie_embeddings=tie, pos_encoding="rope" if arch == "decoder" else "sinusoidal")
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path, model, cfg, extra={"train": {"lr": 3e-4}})
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == cfg and loaded.extra == {"train": {"lr": 3e-4}}
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.equal(forward(model, idx), forward(loaded.model, idx))
    assert not loaded.model.training
    # tied weights are stored once, and the config is the full resolved one
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert document["format"] == "tformer" and document["model"] == cfg.to_dict()


def test_compiled_model_saves_plain_names(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg)
    compiled = torch.compile(model)  # the wrapper alone; no compilation happens until it is called
    save_checkpoint(tmp_path, compiled, cfg)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
    assert names == set(model.state_dict()) and not any("_orig_mod" in n for n in names)
    assert set(load_checkpoint(tmp_path).model.state_dict()) == names


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    cfg = tiny_config()
    model = build_model(cfg)
    save_checkpoint(tmp_path, model, cfg)
    good = (tmp_path / WEIGHTS_FILE).read_bytes()

    import tformer.checkpoint as ck

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, build_model(cfg), cfg)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left


def one_line_error(directory) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, TformerError)
    return message


def test_truncated_weights_give_a_one_line_error(tmp_path):
    cfg = tiny_config()
    save_checkpoint(tmp_path, build_model(cfg), cfg)
    weights = tmp_path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(tmp_path)
    weights.write_bytes(data[:5])
    assert WEIGHTS_FILE in one_line_error(tmp_path)


def test_missing_config_missing_weights_and_missing_directory(tmp_path):
    cfg = tiny_config()
    save_checkpoint(tmp_path / "ck", build_model(cfg), cfg)
    (tmp_path / "ck" / CONFIG_FILE).unlink()
    assert "config.json is missing" in one_line_error(tmp_path / "ck")
    assert "does not exist" in one_line_error(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "ck2", build_model(cfg), cfg)
    (tmp_path / "ck2" / WEIGHTS_FILE).unlink()
    assert "has no model.safetensors" in one_line_error(tmp_path / "ck2")
    (tmp_path / "ck2" / CONFIG_FILE).write_text("{not json")
    assert "not valid JSON" in one_line_error(tmp_path / "ck2")


def test_shape_mismatch_and_missing_tensor_are_named(tmp_path):
    cfg = tiny_config()
    save_checkpoint(tmp_path, build_model(cfg), cfg)
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    document["model"]["d_ff"] = 96
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    message = one_line_error(tmp_path)
    assert "decoder.layers.0.ffn.w1.weight" in message and "(64, 32)" in message and "(96, 32)" in message

    document["model"]["d_ff"] = 64
    document["model"]["n_decoder_layers"] = 3
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    assert "missing tensor(s) 'decoder.layers.2." in one_line_error(tmp_path)

    document["model"]["n_decoder_layers"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    assert "unexpected tensor(s) 'decoder.layers.1." in one_line_error(tmp_path)


def test_invalid_config_values_are_reported(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "tformer", "model": {"d_model": 30, "n_heads": 4}}))
    assert "d_model=30" in one_line_error(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "t5"}))  # llama became supported (issue 13)
    assert "'t5' is not supported" in one_line_error(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "llama"}))
    assert "lacks 'hidden_size'" in one_line_error(tmp_path)


def test_read_config_without_loading_weights(tmp_path):
    cfg = tiny_config(arch="encoder")
    save_checkpoint(tmp_path, build_model(cfg), cfg)
    config, source, _ = read_config(tmp_path)
    assert config == cfg and source == "tformer"


def test_loading_to_a_dtype(tmp_path):
    cfg = tiny_config()
    save_checkpoint(tmp_path, build_model(cfg), cfg)
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16).model
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model(torch.randint(0, 61, (1, 4))).logits.dtype == torch.bfloat16


def test_find_latest_checkpoint(tmp_path):
    import os

    from tformer.checkpoint import find_latest_checkpoint

    cfg = tiny_config()
    for i, name in enumerate(["run-a/latest", "run-b/best", "run-a/best"]):
        save_checkpoint(tmp_path / name, build_model(cfg), cfg)
        os.utime(tmp_path / name / WEIGHTS_FILE, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / CONFIG_FILE).write_text("{}")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run-a/best"
    assert find_latest_checkpoint(tmp_path / "run-b/best") == tmp_path / "run-b/best"
    with pytest.raises(CheckpointError, match="no checkpoint found under"):
        find_latest_checkpoint(tmp_path / "not-a-checkpoint")


def test_find_latest_skips_temporary_dirs_but_finds_an_interrupted_swap(tmp_path):
    import os

    from tformer.checkpoint import find_latest_checkpoint

    cfg = tiny_config()
    save_checkpoint(tmp_path / "run" / "best", build_model(cfg), cfg)
    save_checkpoint(tmp_path / "run" / ".latest.new-abc", build_model(cfg), cfg)  # half-written
    os.utime(tmp_path / "run" / "best" / WEIGHTS_FILE, (1_000_000, 1_000_000))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run" / "best"
    save_checkpoint(tmp_path / "run" / ".latest.old", build_model(cfg), cfg)  # killed between the renames
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run" / ".latest.old"
    save_checkpoint(tmp_path / "run" / "latest", build_model(cfg), cfg)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run" / "latest"


def test_atomic_directory_swap_and_recovery(tmp_path):
    from tformer.files import atomic_directory, recover_directory

    target = tmp_path / "latest"
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("one")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "w").write_text("half")
            raise KeyboardInterrupt
    assert (target / "w").read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["latest"]
    # simulate kill -9 between the two renames: only .latest.old exists
    target.rename(tmp_path / ".latest.old")
    recover_directory(target)
    assert (target / "w").read_text() == "one"


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from tformer.files import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "page.html", "<p>hi</p>")
        with atomic_directory(tmp_path / "run") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "page.html").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
