"""The matrix-vector products of one batch-1 decode step of GPT-2 124M on the CPU, in each way of computing
them, against a plain read of the same matrices (the memory-bandwidth bound), in the same run.

Why `tformer/cpu_decoding.py` exists: MKL's product of one row with a matrix runs on one thread, so it
reads the weights at one core's bandwidth; splitting the input dimension over the threads reads them at
nearly the bandwidth of a plain `sum`.

    python benchmarks/bench_matvec.py                 # the 49 products of one step (12 layers + output)
    python benchmarks/bench_matvec.py --int8          # also int8 weights (tformer/generation/quantize.py)
    python benchmarks/bench_matvec.py --per-matrix    # each shape with 1 and 2 threads
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tformer.generation import quantize
from tformer.generation.cpu_decoding import split_linear

D, V, LAYERS = 768, 50257, 12
SHAPES = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]  # (in, out): qkv, attention out, fc, proj


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def int8_runs(stored_in_out: list[torch.Tensor], x: dict[int, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The int8 candidates for the same products (weights quantized per output channel), and a plain read of
    the int8 bytes (as float32 words: int8 and int32 sums are slow in ATen, which would understate the bound)."""
    qs = [quantize.quantize_weight(w.t()) for w in stored_in_out]  # (out, in) int8, (out,) scales
    block, layout = quantize.BLOCK, quantize.kernel_layout()
    packed = [(quantize.pack(q, layout), F.pad(s, (0, -(-q.size(0) // block) * block - q.size(0)))) for q, s in qs]
    for (q, s), (p, ps) in zip(qs[:4] + qs[-1:], packed[:4] + packed[-1:]):  # compile each shape, check it
        got = quantize.matvec(x[q.size(1)].view(1, -1), p, ps)[:, :q.size(0)]
        want = x[q.size(1)].view(1, -1) @ quantize.dequantize(q, s).t()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3), (got - want).abs().max()
    return {
        "int8 packed kernel (tformer)": lambda: [quantize.matvec(x[p.size(1)].view(1, -1), p, ps) for p, ps in packed],
        "int8 _weight_int8pack_mm": lambda: [torch.ops.aten._weight_int8pack_mm(x[q.size(1)].view(1, -1), q, s)
                                             for q, s in qs],
        "int8 dequantize + F.linear": lambda: [F.linear(x[q.size(1)], quantize.dequantize(q, s)) for q, s in qs],
        "plain sum of the int8 bytes": lambda: [p.view(torch.float32).sum() for p, _ in packed],
    }


def one_step(repeats: int, int8: bool = False) -> None:
    torch.manual_seed(0)
    shapes = SHAPES * LAYERS + [(D, V)]
    stored_in_out = [torch.randn(i, o) for i, o in shapes]  # (in, out) contiguous, as GPT-2's Conv1D
    linear_layout = [w.t().contiguous() for w in stored_in_out]  # (out, in) contiguous, as nn.Linear
    transposed = [w.t() for w in stored_in_out]  # (out, in) views, strides (1, out): cpu_decoding_layout's
    bias = [torch.randn(o) for _, o in shapes]
    x = {i: torch.randn(1, 1, i) for i in (D, 4 * D)}
    slices = torch.get_num_threads()
    gbytes = sum(w.numel() for w in stored_in_out) * 4 / 1e9
    runs = {
        "F.linear, (out, in) storage": lambda: [F.linear(x[w.size(1)], w, b) for w, b in zip(linear_layout, bias)],
        "x @ W, (in, out) storage": lambda: [x[w.size(0)] @ w + b for w, b in zip(stored_in_out, bias)],
        f"split_linear, {slices} slices": lambda: [split_linear(x[w.size(1)], w, b, slices)
                                                   for w, b in zip(transposed, bias)],
        "plain sum (the read bound)": lambda: [w.sum() for w in stored_in_out],
    }
    if int8:
        torch.set_flush_denormal(True)  # the int8 bytes read as floats include denormals
        runs.update(int8_runs(stored_in_out, x))
    print(f"the {len(shapes)} products of one GPT-2 124M decode step, batch 1, fp32, "
          f"{torch.get_num_threads()} threads ({gbytes:.3f} GB of weights)")
    times = {name: seconds_per_call(fn, repeats) for name, fn in runs.items()}
    for name, t in times.items():
        gb = gbytes / 4 if "int8" in name else gbytes
        print(f"  {name:<30} {1 / t:6.1f} steps/s  {gb / t:5.1f} GB/s")
    base = times["F.linear, (out, in) storage"]
    print(f"  ratio split_linear / F.linear: {base / times[f'split_linear, {slices} slices']:.2f}x")
    if int8:
        split = times[f"split_linear, {slices} slices"]
        print(f"  ratio int8 packed kernel / split_linear fp32: {split / times['int8 packed kernel (tformer)']:.2f}x; "
              f"/ plain sum of the int8 bytes: "
              f"{times['plain sum of the int8 bytes'] / times['int8 packed kernel (tformer)']:.2f}")


def per_matrix(repeats: int) -> None:
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for i, o in SHAPES + [(D, V)]:
            copies = 1 if o == V else 12  # several copies, so that no call finds its matrix in the cache
            ws = [torch.randn(i, o) for _ in range(copies)]
            x = torch.randn(1, i)
            mm = seconds_per_call(lambda: [x @ w for w in ws], repeats) / copies
            read = seconds_per_call(lambda: [w.sum() for w in ws], repeats) / copies
            split = seconds_per_call(lambda: [split_linear(x, w.t(), None, n) for w in ws], repeats) / copies
            gb = i * o * 4 / 1e9
            print(f"{n} thread(s), {i} x {o}: x @ W {mm * 1e3:.3f} ms ({gb / mm:.1f} GB/s); "
                  f"split {split * 1e3:.3f} ms ({gb / split:.1f} GB/s); sum {gb / read:.1f} GB/s")
    torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--per-matrix", action="store_true", help="each matrix shape alone, with 1 and N threads")
    p.add_argument("--int8", action="store_true", help="also the int8 kernels (compiles one kernel per shape first)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_matrix:
        per_matrix(args.repeats)
    else:
        one_step(args.repeats, args.int8)


if __name__ == "__main__":
    main()
