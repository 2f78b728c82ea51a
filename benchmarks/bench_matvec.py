"""The matrix-vector products of one batch-1 decode step of GPT-2 124M on the CPU, in each way of computing
them, against a plain read of the same matrices (the memory-bandwidth bound), in the same run.

Why `tformer/cpu_decoding.py` exists: MKL's product of one row with a matrix runs on one thread, so it
reads the weights at one core's bandwidth; splitting the input dimension over the threads reads them at
nearly the bandwidth of a plain `sum`.

    python benchmarks/bench_matvec.py                 # the 49 products of one step (12 layers + output)
    python benchmarks/bench_matvec.py --per-matrix    # each shape with 1 and 2 threads
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tformer.generation.cpu_decoding import split_linear

D, V, LAYERS = 768, 50257, 12
SHAPES = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]  # (in, out): qkv, attention out, fc, proj


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def one_step(repeats: int) -> None:
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
    print(f"the {len(shapes)} products of one GPT-2 124M decode step, batch 1, fp32, "
          f"{torch.get_num_threads()} threads ({gbytes:.3f} GB of weights)")
    times = {name: seconds_per_call(fn, repeats) for name, fn in runs.items()}
    for name, t in times.items():
        print(f"  {name:<30} {1 / t:6.1f} steps/s  {gbytes / t:5.1f} GB/s")
    base = times["F.linear, (out, in) storage"]
    print(f"  ratio split_linear / F.linear: {base / times[f'split_linear, {slices} slices']:.2f}x")


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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (per_matrix if args.per_matrix else one_step)(args.repeats)


if __name__ == "__main__":
    main()
