"""Fast decoding on the CPU: how the weights are stored, and matrix-vector products split over threads.

A decode step at batch 1 multiplies one row by every weight matrix, so its speed is the speed of
reading the weights from memory (GPT-2 124M: 497 MB per token in float32). Two measurements on a
2-core machine (benchmarks/RESULTS.md, "generate") shape this module:

- MKL's product of a row with a matrix stored (in, out), i.e. `x @ W` as GPT-2's Conv1D computes it,
  is about 1.4x faster than with `nn.Linear`'s (out, in) storage.
- MKL runs such a product on one thread however many it has, reaching about 18 GB/s where two
  threads read memory at about 32 GB/s. Splitting the input dimension into one slice per thread and
  running the slices as a batched product (`torch.bmm` puts one batch entry on each thread), then
  summing the partial results, is 1.8-2x faster for one row, 1.5-1.9x for 8, and still faster at 32.

The split changes only the order of the additions inside each dot product (floating-point rounding,
about 1e-7 relative); the tests check the greedy tokens against transformers' GPT-2.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_SPLIT_ROWS = 32  # above this many rows (prefill, large batches) MKL's own threading is the faster one
MIN_SPLIT_SIZE = 1 << 18  # weights with fewer elements stay in cache, and the split's overhead outweighs it


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, slices: int) -> Tensor:
    """F.linear(x, weight, bias) computed as `slices` partial products over the input dimension,
    one per thread. weight (out, in) must be stored transposed (weight.t() contiguous), as
    `cpu_decoding_layout` leaves it; otherwise, or for many rows, this is plain F.linear."""
    if torch.compiler.is_compiling():
        # Opaque to the compiler: inductor would turn a one-row bmm into a slower fused loop.
        return torch.ops.tformer.split_linear(x, weight, bias, slices)
    return _split_linear(x, weight, bias, slices)


def _split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, slices: int) -> Tensor:
    d_in = x.size(-1)
    rows = x.numel() // d_in
    if rows > MAX_SPLIT_ROWS or slices < 2 or d_in % slices or not weight.t().is_contiguous():
        return F.linear(x, weight, bias)
    part = d_in // slices
    x_parts = x.reshape(rows, slices, part).transpose(0, 1)  # (slices, rows, part)
    w_parts = weight.t().view(slices, part, weight.size(0))  # (slices, part, out): views, no copy
    y = torch.bmm(x_parts, w_parts).sum(dim=0)  # (rows, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.size(0))


_split_linear_op = torch.library.custom_op("tformer::split_linear", _split_linear, mutates_args=())


@_split_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, slices: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


class SplitLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose product with a few rows uses `split_linear`."""

    slices: int = 1

    def forward(self, x: Tensor) -> Tensor:
        return split_linear(x, self.weight, self.bias, self.slices)


def _slices_for(weight: Tensor, threads: int) -> int:
    """The most slices, at most one per thread, that divide the input dimension evenly (1: no split)."""
    if weight.numel() < MIN_SPLIT_SIZE:
        return 1
    return max(s for s in range(1, threads + 1) if weight.size(1) % s == 0)


def cpu_decoding_layout(model: nn.Module, threads: int | None = None) -> nn.Module:
    """Prepare a model for decoding on the CPU, in place (the values and shapes are unchanged).

    Every weight matrix that multiplies activations (the linear layers, and the token embedding when
    the output projection reuses it) is stored transposed, strides (1, out) instead of (in, 1). With
    more than one thread (default: torch.get_num_threads()), the linear layers and the tied output
    projection also split their products with a few rows over the threads, where the matrix has at
    least MIN_SPLIT_SIZE elements (smaller ones are quicker unsplit). Returns the model.
    """
    threads = torch.get_num_threads() if threads is None else threads
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # the token embedding is the output projection (unless an int8 copy of it is: quantize.HEAD)
    tied = getattr(model, "lm_head", True) is None and not hasattr(model, "output_int8")
    weights = [m.weight for m in linears] + ([model.embed.tok.weight] if tied else [])
    for w in weights:
        if w.is_contiguous():
            w.data = w.data.t().contiguous().t()
    for m in linears:
        if (slices := _slices_for(m.weight, threads)) > 1:
            m.__class__ = SplitLinear  # a subclass with no new state: parameters, hooks and names stay
            m.slices = slices
    if tied and (slices := _slices_for(model.embed.tok.weight, threads)) > 1:
        model.output_slices = slices
        model.output_logits = types.MethodType(_tied_output_logits, model)  # shadows the class's method
    return model


def _tied_output_logits(model: nn.Module, h: Tensor) -> Tensor:
    """The output projection by the token embedding matrix (tie_embeddings), split over threads."""
    return split_linear(h, model.embed.tok.weight, None, model.output_slices)
