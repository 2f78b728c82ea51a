"""8-bit weights for decoding on the CPU: weight-only, symmetric, one scale per output channel.

A batch-1 decode step reads every weight matrix once, so storing the weights in one byte instead of four
cuts the bytes read per token by up to 4x. The activations stay float32: each product computes
`x @ (q * scale).T` with q in int8 and scale in float32, one per output row.

The product with one row needs a kernel that reads the int8 bytes once, at full vector width, in memory
order. ATen's `_weight_int8pack_mm` does not, nor does inductor's code for `(x * q.float()).sum(-1)` on
the (out, in) matrix (it walks the matrix by columns). So `pack` stores each block of 64 output rows
interleaved, (blocks, in, 64): the 64 weights of one input feature are adjacent, and `_matvec` walks
the bytes in memory order with one accumulator per row, one block of rows per thread; the rows of a block
form a few groups of one vector each, so that the loop runs independent chains of fused multiply-adds
rather than one chain that waits on each addition's latency. How it turns
the bytes into floats depends on the vector instructions inductor compiles for (`kernel_layout`):
with AVX-512 it converts them directly; with AVX2 that conversion loads eight bytes at a time through
a partial-vector copy, so there the block is read as 32-bit words, each holding four weights, which
two shifts unpack (inductor vectorises int32 shifts and int32-to-float conversion natively).

Products with more rows (prefill, evaluation, large batches) dequantize the matrix and use F.linear.
Only safetensors and JSON are read: `load_quantized` checks every name, shape and dtype first.
"""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.errors import CheckpointError, TformerError

METHODS = ("int8",)
BLOCK = 64  # output rows per packed block: 4 AVX-512 or 8 AVX2 vectors of accumulators
BYTE_GROUPS = 4  # "bytes" layout (AVX-512): 4 groups of 16 rows, one vector of accumulators each
WORD_GROUPS = 2  # "words" layout (AVX2): 2 groups of 8 words, each word's 4 bytes a vector of accumulators
MIN_KERNEL_SIZE = 1 << 16  # smaller matrices stay in cache: dequantizing them costs less than compiling a kernel
MAX_KERNEL_ROWS = 4  # the kernel reads the whole matrix once per row; above this, dequantize once instead
SCALE_SUFFIX = "_scale"
QUANTIZE_CHUNK = 1 << 16  # float elements quantized at a time (256 KB: in L2 with its temporaries)


def check_method(method: str | None) -> str | None:
    """`method` if it is one tformer knows (None: no quantization), else one error naming the allowed values."""
    if method is None or method in METHODS:
        return method
    raise TformerError(f"--quantize {method!r} is not supported; allowed values: {', '.join(METHODS)}")


def check_applies(device: torch.device, dtype: torch.dtype) -> None:
    """int8 decoding is a CPU float32 path: say so for anything else."""
    if device.type != "cpu":
        raise TformerError(f"--quantize int8 runs on the CPU only (this run is on {device.type}); "
                           "use --device cpu, or leave out --quantize on a GPU")
    if dtype != torch.float32:
        raise TformerError(f"--quantize int8 keeps the activations in float32; --dtype "
                           f"{str(dtype).removeprefix('torch.')} does not apply (use --dtype fp32 or auto)")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q, scale): q int8 (out, in) in [-127, 127] and scale float32 (out,) with weight ~= q * scale[:, None].
    Each element's error is at most scale / 2 = max|row| / 254."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.size(0), dtype=torch.float32, device=w.device)
    # a few rows at a time: the float temporaries stay in cache, instead of whole-matrix ones that each cost
    # a pass over freshly allocated memory
    rows = max(1, QUANTIZE_CHUNK // max(1, w.size(1)))
    for r in range(0, w.size(0), rows):
        chunk = w[r:r + rows].float()
        s = chunk.abs().amax(dim=1).div_(127)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale is exact
        scale[r:r + rows] = s
        q[r:r + rows] = torch.div(chunk, s[:, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scale[:, None] in `dtype` (one pass: the int8 operand is promoted inside the multiply)."""
    return torch.mul(q, scale.to(dtype)[:, None])


_layout: str | None = None  # kernel_layout's answer, found once


def kernel_layout() -> str:
    """How `_matvec` reads a packed block on this CPU: "bytes" (int8, converted directly) where inductor compiles
    for AVX-512, else "words" (int32 words typed as float32, unpacked by shifts). The words are typed float32
    because at::vec loads AVX2 int32 vectors through a stack copy that stalls on store forwarding, and float32
    vectors directly; their bits are never used as floats. (Measured: RESULTS.md, int8 decoding.)"""
    global _layout
    if _layout is None:
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            _layout = "bytes" if pick_vec_isa().bit_width() >= 512 else "words"
        except Exception:  # noqa: BLE001 - no compiler, or another inductor: the eager fallback reads either
            _layout = "words"
    return _layout


def pack(q: Tensor, layout: str = "bytes") -> Tensor:
    """q int8 (out, in) as blocks of BLOCK rows, (ceil(out/BLOCK), in, BLOCK): element [b, i, j] is q[b*BLOCK + j, i]
    (zero rows pad the last block). layout "words" gives the same bytes typed as float32, (blocks, in, BLOCK/4)."""
    out, d_in = q.shape
    padded = -(-out // BLOCK) * BLOCK
    if padded != out:
        q = torch.cat([q, q.new_zeros(padded - out, d_in)])
    b = q.reshape(padded // BLOCK, BLOCK, d_in).transpose(1, 2).contiguous()
    return b.view(torch.float32) if layout == "words" else b


def _matvec(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (1, in) times the packed int8 matrix, times the scales, plus the bias: (1, out_padded). Written for
    inductor: one loop over each block's bytes in memory order, each byte read once, and the block's rows split
    into groups of one vector each, so that the loop carries several independent accumulators (a single chain
    of additions waits on each one's latency)."""
    xs = x.reshape(1, -1, 1)
    blocks, d_in = packed.shape[:2]
    if packed.dtype == torch.int8:
        groups = packed.view(blocks, d_in, BYTE_GROUPS, BLOCK // BYTE_GROUPS)
        y = torch.stack([(xs * groups[:, :, g].float()).sum(1) for g in range(BYTE_GROUPS)], 1)
    else:
        # a bit cast after the load; byte k of word l is row 4l + k
        groups = packed.view(torch.int32).view(blocks, d_in, WORD_GROUPS, BLOCK // 4 // WORD_GROUPS)
        # (w << (24 - 8k)) >> 24 is byte k, sign-extended (arithmetic shift of int32)
        y = torch.stack([torch.stack([(xs * ((groups[:, :, g] << (24 - 8 * k)) >> 24).float()).sum(1)
                                      for k in range(4)], -1) for g in range(WORD_GROUPS)], 1)
    y = y.reshape(1, -1) * scale
    return y if bias is None else y + bias


_kernels: dict[tuple, Any] = {}  # one compiled kernel per (shapes, bias or not)
_kernel_failed: str | None = None  # why compiled kernels are not used (no C++ compiler, ...): eager instead


def _kernel_args(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
    return (x, packed, scale) if bias is None else (x, packed, scale, bias)


def _kernel_for(args: tuple[Tensor, ...]) -> Any | None:
    """The compiled kernel for these arguments' shapes, compiled on first use; None where compiling failed."""
    global _kernel_failed
    if _kernel_failed is not None:
        return None
    key = tuple((tuple(a.shape), a.dtype) for a in args)
    kernel = _kernels.get(key)
    if kernel is None:
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            graph = make_fx(lambda *a: _matvec(*a))(*args)
            # fused multiply-adds: one rounding instead of two, and one instruction per weight fewer
            flag = "enable_floating_point_contract_flag"
            fma = {f"cpp.{flag}": "fast"} if hasattr(torch._inductor.config.cpp, flag) else {}
            with torch._inductor.config.patch(fma):
                kernel = _kernels[key] = torch._inductor.compile(graph, list(args))
        except Exception as e:  # noqa: BLE001 - no C++ compiler, or inductor failing: the same math, eager (slower)
            _kernel_failed = f"{type(e).__name__}: {e}".splitlines()[0]
            import warnings

            warnings.warn(f"int8 kernel not compiled ({_kernel_failed}); decoding with the eager fallback",
                          stacklevel=3)
            return None
    return kernel


def matvec(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """`_matvec`, compiled by inductor once per matrix shape (eager where compiling failed).

    The graph goes to inductor directly (traced by make_fx), not through torch.compile: a decode step makes
    one call per matrix, and dynamo's guards and wrapper would cost about as much as a small product."""
    args = _kernel_args(x, packed, scale, bias)
    # inside a compiled step the math is traced into the caller's graph
    kernel = None if torch.compiler.is_compiling() else _kernel_for(args)
    return _matvec(*args) if kernel is None else kernel(*args)


def compile_kernels(model: nn.Module) -> float | None:
    """Compile (or load from inductor's cache) the kernel of each matrix shape a one-row product of `model`
    uses, so that none compiles inside a timed decode step. Returns the seconds that took, or None where
    every kernel was ready (or the model has none)."""
    start, before = time.perf_counter(), len(_kernels)
    for m in model.modules():
        if isinstance(m, Int8Linear) and m.use_kernel:
            x = m.packed.new_zeros(1, m.in_features, dtype=torch.float32)
            _kernel_for(_kernel_args(x, m.packed, m.padded_scale, m.padded_bias))
    return time.perf_counter() - start if len(_kernels) > before else None


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (buffer `weight`, (out, in)) and float32 scales (`weight_scale`, (out,)).

    The state dict holds those two and the float bias; the packed copy the kernel reads is derived."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight" + SCALE_SUFFIX, torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_buffer("packed", None, persistent=False)
        self.use_kernel = False

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> Int8Linear:
        """Quantize a float weight (out, in) (and keep the bias in float32)."""
        m = cls(weight.size(1), weight.size(0), bias is not None, device="meta")
        q, scale = quantize_weight(weight)
        m.weight, m.weight_scale = q, scale
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().clone())
        return m.prepare()

    def prepare(self) -> Int8Linear:
        """Build the packed copy the kernel reads (after the weights are loaded); returns self."""
        self.use_kernel = self.weight.device.type == "cpu" and self.weight.numel() >= MIN_KERNEL_SIZE
        if self.use_kernel:
            self.packed = pack(self.weight, kernel_layout())
            pad = self.packed.size(0) * BLOCK - self.out_features
            self.padded_scale = F.pad(self.weight_scale.float(), (0, pad))
            self.padded_bias = None if self.bias is None else F.pad(self.bias.detach().float(), (0, pad))
        return self

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if not (self.use_kernel and rows <= MAX_KERNEL_ROWS and x.dtype == torch.float32):
            return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:
            y = matvec(flat, self.packed, self.padded_scale, self.padded_bias)
        else:
            y = torch.cat([matvec(flat[r:r + 1], self.packed, self.padded_scale, self.padded_bias)
                           for r in range(rows)])
        if y.size(1) != self.out_features:
            y = y[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


HEAD = "output_int8"  # the tied output projection's int8 copy (the embedding itself stays float for lookups)


def quantize_model(model: nn.Module, head: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place; with `head`, also give a tied output
    projection (the token embedding reused) an int8 copy that `output_logits` uses. Returns the model."""
    _swap_linears(model, head, lambda weight, bias: Int8Linear.from_weight(weight, bias))
    return model


def _empty_int8(model: nn.Module, head: bool) -> None:
    """The structure `quantize_model` gives, with empty int8 modules (on the meta device), for loading into."""
    _swap_linears(model, head, lambda weight, bias: Int8Linear(weight.size(1), weight.size(0), bias is not None,
                                                               device="meta"))


def _swap_linears(model: nn.Module, head: bool, make: Any) -> None:
    """Replace every nn.Linear (but an untied head, without `head`) by `make(weight, bias)`, in place; with `head`,
    give a tied output projection an int8 copy `make(token embedding, None)` that `output_logits` uses."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (head or child is not getattr(model, "lm_head", None)):
                setattr(parent, name, make(child.weight, child.bias))
    if head and getattr(model, "lm_head", True) is None:
        setattr(model, HEAD, make(model.embed.tok.weight, None))
        model.output_logits = types.MethodType(lambda self, h: getattr(self, HEAD)(h), model)


def quantization_section(model: nn.Module) -> dict[str, Any]:
    """What config.json records of a model quantized by `quantize_model`."""
    head = hasattr(model, HEAD) or isinstance(getattr(model, "lm_head", None), Int8Linear)
    return {"method": "int8", "scheme": "weight-only, symmetric, per output channel", "head": head,
            "scale_suffix": SCALE_SUFFIX}


def save_quantized(model: nn.Module, config: Any, source_dir: Path, out: Path, extra: dict[str, Any]) -> Path:
    """Write a quantized model as a tformer checkpoint directory: int8 weights and float32 scales in
    model.safetensors, the `quantization` section in config.json, and the source's tokenizer.json."""
    import shutil

    from tformer.checkpoint import TOKENIZER_FILE, save_checkpoint

    sections = {k: v for k, v in extra.items() if k in ("generation",)} | {"quantization": quantization_section(model)}
    save_checkpoint(out, model, config, sections)
    if (source_dir / TOKENIZER_FILE).is_file():
        shutil.copyfile(source_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return out


def load_quantized(directory: Path, config: Any, extra: dict[str, Any], device: torch.device) -> nn.Module:
    """The model of a checkpoint `save_quantized` wrote, on the CPU in float32 with int8 linear layers.
    Every tensor's name, shape and dtype is checked against what the config makes before it is used."""
    from tformer import limits
    from tformer.checkpoint import WEIGHTS_FILE, load_state, read_safetensors
    from tformer.checkpoint_checks import check_tensors
    from tformer.model.transformer import build_model

    section = extra.get("quantization")
    where = directory / "config.json"
    if not isinstance(section, dict) or section.get("method") not in METHODS:
        method = section.get("method") if isinstance(section, dict) else section
        raise CheckpointError(f"{where}: quantization method {method!r} is unknown; tformer reads: {', '.join(METHODS)}")
    if not isinstance(section.get("head", False), bool):
        raise CheckpointError(f"{where}: quantization.head must be true or false")
    check_applies(device, torch.float32)
    limits.check_memory(f"the model of '{directory}'", limits.parameter_count(config) * 6, device)
    with torch.device("meta"):
        model = build_model(config)
    _empty_int8(model, section.get("head", False))
    expected = dict(model.state_dict())
    tensors = read_safetensors(directory)
    problems = [f"missing tensor '{k}'" for k in expected if k not in tensors]
    problems += [f"unexpected tensor '{k}'" for k in tensors if k not in expected]
    for name, t in tensors.items():
        want = expected.get(name)
        exact = want is not None and (want.dtype == torch.int8 or name.endswith(SCALE_SUFFIX))  # others: any float
        if want is not None and (tuple(t.shape) != tuple(want.shape) or (exact and t.dtype != want.dtype)):
            problems.append(f"tensor '{name}' is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} but the "
                            f"config needs {str(want.dtype).removeprefix('torch.')} {tuple(want.shape)}")
    if problems:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match its quantized config: "
                              + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    check_tensors({k: v for k, v in tensors.items() if v.dtype != torch.int8}, str(directory))
    scales = {k: v for k, v in tensors.items() if k.endswith(SCALE_SUFFIX)}
    for name, s in scales.items():
        if s.numel() and not bool((s > 0).all()):
            raise CheckpointError(f"{directory}: scale tensor '{name}' must be positive")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    load_state(model, tensors, where=str(directory / WEIGHTS_FILE), assign=True)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(device="cpu")
        if isinstance(module, Int8Linear):
            module.prepare()
    return model.eval()
