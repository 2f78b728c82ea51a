"""Choosing the device and numeric precision: one place, used by training and generation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tformer.config import canonical_dtype
from tformer.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but Apple MPS is not available; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r} is not allowed; choose one of: auto, cpu, cuda, mps")
    return torch.device(name)


@dataclass
class Precision:
    """How a step runs numerically: the autocast dtype (None: plain fp32) and whether fp16 needs a GradScaler."""

    name: str  # fp32, bf16 or fp16
    dtype: torch.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.dtype == torch.float32 else self.dtype

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto`: bf16 on a GPU that supports it, else fp16 (with a GradScaler when training) on CUDA,
    fp32 on the CPU and MPS. Also turns TF32 matmuls on for CUDA."""
    name = canonical_dtype(name)
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name not in _DTYPES:
        raise ConfigError(f"--dtype {name!r} is not allowed; choose one of: auto, fp32 (float32), bf16 (bfloat16), "
                          "fp16 (float16)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--dtype bf16 is not supported by this GPU; use fp16 or auto")
    return Precision(name, _DTYPES[name])


# Dense bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s, for the MFU estimate.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a known CUDA GPU (None elsewhere): the denominator of MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)


def flops_per_token(n_params: int, n_layers: int, d_model: int, context: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus the attention scores,
    12 * layers * d_model * context (Kaplan et al., 2020; the PaLM paper's appendix B)."""
    return 6 * n_params + 12 * n_layers * d_model * context
