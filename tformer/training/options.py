"""Resolving `tformer train` options (flags, a --config file, presets, a checkpoint) into the two configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.training.config import TrainConfig

# Short option names (CLI flags and --config keys) for ModelConfig fields; other ModelConfig and
# TrainConfig field names are accepted as they are.
MODEL_OPTION_NAMES = {"heads": "n_heads", "kv_heads": "n_kv_heads", "d_model": "d_model", "d_ff": "d_ff"}


def read_toml(path: Path) -> dict[str, Any]:
    """Options from a TOML file: flat `key = value` lines, keys as the CLI flags (dashes or underscores)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TformerError(f"--config file '{path}' does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TformerError(f"--config file '{path}' is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve_configs(options: dict[str, Any], base_model: ModelConfig | None = None,
                    base_train: TrainConfig | None = None) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from option values (None = not given).

    Precedence: dataclass defaults < preset < the options (the --config file merged under the flags).
    With `base_model` (resuming, or --init-from) the model's shape comes from the checkpoint and only
    dropout may change; with `base_train` (resuming) training options start from the saved ones.
    """
    import dataclasses

    from tformer.training.config import DEFAULT_STEPS, train_preset

    options = {k: v for k, v in options.items() if v is not None}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    preset = options.pop("preset", None)
    model_opts: dict[str, Any] = {}
    train_opts: dict[str, Any] = {}
    for key, value in options.items():
        if key == "layers":
            model_opts["n_encoder_layers"] = model_opts["n_decoder_layers"] = value
        elif key in MODEL_OPTION_NAMES:
            model_opts[MODEL_OPTION_NAMES[key]] = value
        elif key in train_fields:
            train_opts[key] = value
        elif key in model_fields:
            model_opts[key] = value
        else:
            known = sorted(train_fields | model_fields | set(MODEL_OPTION_NAMES) | {"layers", "preset"})
            raise TformerError(f"unknown option {key!r}; known options: {', '.join(known)}")
    if "context" in train_opts:
        model_opts.setdefault("max_seq_len", train_opts["context"])

    if base_model is not None:
        changed = {k: v for k, v in model_opts.items()
                   if k not in ("dropout", "max_seq_len") and getattr(base_model, k) != v}
        if changed:
            raise TformerError(
                "the model's shape comes from the checkpoint; these options disagree with it: "
                + ", ".join(f"{k}={v!r} (checkpoint: {getattr(base_model, k)!r})" for k, v in changed.items())
            )
        model_cfg = base_model.replace(dropout=model_opts.get("dropout", base_model.dropout))
        if train_opts.get("context", 0) > model_cfg.max_seq_len:
            raise TformerError(f"--context {train_opts['context']} is longer than the checkpoint's "
                               f"max_seq_len={model_cfg.max_seq_len}")
        train_defaults = base_train.to_dict() if base_train is not None else {}
        if base_train is None:
            train_defaults["context"] = min(TrainConfig.context, model_cfg.max_seq_len)
        values = {**train_defaults, **train_opts}
        if values.get("steps") is None and values.get("epochs") is None:
            values["steps"] = DEFAULT_STEPS
        return model_cfg, TrainConfig.from_dict(values)

    model_preset, model_overrides, train_defaults = train_preset(preset or "tiny")
    train_values = {**train_defaults, **train_opts}
    if "epochs" in train_opts and "steps" not in train_opts:
        train_values.pop("steps", None)  # --epochs replaces the preset's step count
    elif train_values.get("steps") is None:
        train_values["steps"] = DEFAULT_STEPS
    train_cfg = TrainConfig.from_dict(train_values)
    model_overrides.setdefault("max_seq_len", train_cfg.context)
    model_cfg = ModelConfig.from_preset(model_preset, **{**model_overrides, **model_opts})
    if model_cfg.max_seq_len < train_cfg.context:
        raise TformerError(f"--context {train_cfg.context} is longer than max_seq_len={model_cfg.max_seq_len}")
    return model_cfg, train_cfg
