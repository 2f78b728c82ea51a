"""Limits checked before anything is spent: number ranges, and the memory a model, its training or its
decoding will need, estimated from the config and the options and compared with what the device has.

Kept free of torch at import time (the CLI starts fast); the estimates are arithmetic on the config, so
no message costs more than the check it explains.
"""

from __future__ import annotations

import os
from typing import Any

from tformer.errors import ConfigError, TformerError

INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1  # torch.manual_seed takes any unsigned 64-bit value
# Sizes no model here can have; a config beyond them is refused before any arithmetic or loop runs on it.
MAX_DIM = 2**24  # vocab_size, d_model, d_ff, max_seq_len
MAX_HEADS = 2**16
MAX_LAYERS = 2**12
MAX_BEAMS = 256
MAX_SAMPLES = 4096
GIB = 1 << 30


# -- numbers ----------------------------------------------------------------------------------------

def check_int(name: str, value: Any, low: int = 0, high: int = INT64_MAX) -> None:
    """`value` must be an integer (not a bool) in [low, high]; the message names `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = short(value)
        raise ConfigError(f"{name}={shown} is out of range; allowed: an integer from {low} to {_big(high)}")


def short(value: Any) -> str:
    """A value for a message, with huge integers abbreviated (so the message stays one short line)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"{'-' if value < 0 else ''}~2**{abs(value).bit_length() - 1}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _big(n: int) -> str:
    return f"2**{n.bit_length()}-1" if n > 10**12 and (n + 1) & n == 0 else f"{n:,}"


# -- memory -----------------------------------------------------------------------------------------

def parameter_count(cfg: Any) -> int:
    """The values a ModelConfig's model holds (parameters and position tables), counted from its shape."""
    d, v, ff = cfg.d_model, cfg.vocab_size, cfg.d_ff
    kv = (cfg.n_kv_heads or cfg.n_heads) * (d // cfg.n_heads)
    attention = d * d * 2 + d * kv * 2 + 4 * d
    ffn = d * ff * (3 if cfg.activation == "swiglu" else 2) + ff + d
    layer = attention + ffn + 4 * d
    layers = (cfg.n_encoder_layers if cfg.has_encoder else 0) * layer
    layers += (cfg.n_decoder_layers if cfg.has_decoder else 0) * layer
    if cfg.arch == "encoder-decoder":
        layers += cfg.n_decoder_layers * (attention + 2 * d)  # cross-attention
    embed = v * d + cfg.max_seq_len * d  # learned positions, or the sinusoidal / rotary tables (buffers)
    head = 0 if cfg.tie_embeddings else v * d
    return embed + layers + head + 2 * d


def training_bytes(model_cfg: Any, batch_size: int, context: int, dtype_bytes: int = 4) -> int:
    """A lower estimate of the memory a training step needs: fp32 weights, gradients and AdamW's two
    moments (16 bytes per parameter), and the activations of one micro-batch (what backward keeps per
    token and layer, the attention scores, and the logits with their gradient)."""
    params = parameter_count(model_cfg)
    layers = model_cfg.n_decoder_layers * model_cfg.has_decoder + model_cfg.n_encoder_layers * model_cfg.has_encoder
    tokens = batch_size * context
    per_token = layers * (10 * model_cfg.d_model + 2 * model_cfg.d_ff) + 3 * model_cfg.vocab_size
    return 16 * params + tokens * per_token * dtype_bytes


def decoding_bytes(model_cfg: Any, rows: int, slots: int, dtype_bytes: int, weights: bool = True) -> int:
    """The memory generation needs: the weights (unless already loaded), a static KV cache of `slots`
    positions per row and layer (plus the cross-attention keys and values of an encoder-decoder), and
    the logits of each row."""
    kv_dim = (model_cfg.n_kv_heads or model_cfg.n_heads) * (model_cfg.d_model // model_cfg.n_heads)
    caches = 2 if model_cfg.arch == "encoder-decoder" else 1
    cache = 2 * caches * model_cfg.n_decoder_layers * rows * slots * kv_dim * dtype_bytes
    return (parameter_count(model_cfg) * dtype_bytes if weights else 0) + cache + rows * model_cfg.vocab_size * 8


def available_bytes(device: Any = "cpu") -> int | None:
    """Memory free for a new allocation: device memory on a GPU, else RAM available to this process (the
    smaller of /proc/meminfo's MemAvailable and a cgroup limit); None where it cannot be told."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:  # a driver that cannot answer: no check rather than a wrong one
            return None
    if kind != "cpu":
        return None
    found = [b for b in (_meminfo_available(), _cgroup_free()) if b is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _cgroup_free() -> int | None:
    """What a cgroup v2 (or v1) memory limit leaves free, when the process runs under one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def check_memory(what: str, needed: int, device: Any = "cpu", advice: str = "") -> None:
    """Refuse (before allocating) when `needed` bytes cannot fit in what `device` has free."""
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    where = "device memory" if getattr(device, "type", str(device)) != "cpu" else "RAM"
    raise TformerError(f"{what} needs about {_size(needed)}, more than the {_size(free)} of {where} available"
                       + (f"; {advice}" if advice else ""))


def _size(n: int) -> str:
    if n >= 1 << 50:
        return f"{n / (1 << 50):,.0f} PiB"
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def check_model_size(cfg: Any, where: str = "the model") -> None:
    """Bounds on a config's sizes (beyond them no model fits anywhere), checked before any estimate or
    allocation: a config read from a file is untrusted."""
    prefix = f"{where}: " if where else ""
    for name in ("vocab_size", "d_model", "d_ff", "max_seq_len"):
        check_int(prefix + name, getattr(cfg, name), 1, MAX_DIM)
    for name in ("n_heads", "n_kv_heads"):
        value = getattr(cfg, name)
        if value is not None:
            check_int(prefix + name, value, 1, MAX_HEADS)
    for name in ("n_encoder_layers", "n_decoder_layers"):
        check_int(prefix + name, getattr(cfg, name), 0, MAX_LAYERS)
