"""Distributed and single-GPU training throughput of tformer's own training loop (`tformer.train.train`).

    python benchmarks/bench_distributed.py             # GPU section when CUDA is there, else the CPU one
    python benchmarks/bench_distributed.py --mode gpu [--steps 60 --batch-size 16]
    python benchmarks/bench_distributed.py --mode cpu [--steps 200]

GPU (one device): the GPT-2 124M shape (12 layers, 12 heads, d_model 768, vocabulary 50,257, context
1024, dropout 0) trained in bf16 with torch.compile and fused AdamW on random tokens. Prints tokens/s,
MFU = (6 x parameters + 12 x layers x d_model x context) x tokens/s over the device's bf16 matmul peak
MEASURED in the same run (an 8192^3 matmul loop; the data-sheet figure is printed beside it), and the
same run with --fsdp (FSDP2 on a process group of one) with the ratio FSDP / plain: FSDP's overhead.

CPU: the same loop on a small decoder, one process (1 thread, then 2 threads) against 2 ranks of DDP
under torchrun (gloo, 1 thread each), same global batch. Prints the scaling efficiency
tokens/s(2 ranks) / (2 x tokens/s(1 rank, 1 thread)).

Tokens/s is the median of the loop's own log windows after the warm-up ones (compilation and the
first steps excluded); the GPU is synchronised at each log step, where the loop reads the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GPT2 = dict(vocab=50257, layers=12, heads=12, d_model=768, context=1024)
CPU = dict(vocab=256, layers=4, heads=4, d_model=128, context=128)


def worker(args: argparse.Namespace) -> dict:
    """One training run through tformer.train.train; returns its median tokens/s (and memory on GPUs)."""
    from tformer.config import ModelConfig
    from tformer.data.tokenizer import SpecialIds
    from tformer.training import distributed
    from tformer.training.config import TrainConfig
    from tformer.training.loop import train
    from tformer.training.objectives import TrainData

    shape = GPT2 if args.shape == "gpt2" else CPU
    cfg = ModelConfig(arch="decoder", vocab_size=shape["vocab"], d_model=shape["d_model"], n_heads=shape["heads"],
                      n_decoder_layers=shape["layers"], n_encoder_layers=0, d_ff=4 * shape["d_model"], dropout=0.0,
                      max_seq_len=shape["context"], pos_encoding="learned", norm_placement="pre",
                      activation="gelu_tanh", init="gpt2", scale_embeddings=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab"], size=2_000_000, dtype=np.uint16 if shape["vocab"] < 65536 else np.int32)
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        tokenizer.write_text("{}", encoding="utf-8")  # only copied into the checkpoint
        data = TrainData("causal", SpecialIds(), shape["vocab"], tokenizer, train_tokens=tokens,
                         val_tokens=tokens[:200_000])
        train_cfg = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, context=shape["context"],
                                steps=args.steps, lr=6e-4, warmup=10, device=args.device, dtype=args.dtype,
                                compile=args.compile_model, eval_every=10**9, eval_batches=1, save_every=10**9,
                                log_every=args.log_every, fsdp=args.fsdp, seed=1337)
        windows: list[float] = []

        def on_event(kind: str, info: dict) -> None:
            if kind == "log":
                windows.append(info["tokens_per_s"])

        with distributed.process_group():
            train(cfg, train_cfg, data, Path(tmp) / "run", on_event=on_event)
            result = {"rank": distributed.rank(), "world": distributed.world_size()}
        kept = windows[args.warmup_windows:-1] or windows[-1:]  # the last window holds the final eval + save
        result["tokens_per_s"] = statistics.median(kept)
        result["best_tokens_per_s"] = max(kept)  # what the machine can do when other work leaves it alone
        result["windows"] = [round(w) for w in windows]
        result["parameters"] = _parameters(cfg)
        if torch.cuda.is_available():
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _parameters(cfg) -> int:
    from tformer.model.transformer import build_model

    with torch.device("meta"):
        return build_model(cfg).num_parameters()


def measured_bf16_peak(n: int = 8192, repeats: int = 30) -> float:
    """FLOP/s of a large bf16 matmul on this GPU: the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def run_worker(extra: list[str], ranks: int, threads: int) -> dict:
    """This script as a worker in a fresh process (or `ranks` processes under torchrun); rank 0's result."""
    script = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               script, "--worker", *extra]
    else:
        cmd = [sys.executable, script, "--worker", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return next(r for r in results if r["rank"] == 0)


def gpu(args: argparse.Namespace) -> None:
    from tformer.device import flops_per_token, peak_flops

    name = torch.cuda.get_device_name()
    peak = measured_bf16_peak()
    sheet = peak_flops(torch.device("cuda"))
    print(f"device: {name}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
          + (f" (data sheet {sheet / 1e12:.0f})" if sheet else ""))
    common = ["--shape", "gpt2", "--device", "cuda", "--dtype", "bf16", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
              "--log-every", str(args.log_every), "--warmup-windows", str(args.warmup_windows)]
    if args.compile:
        common.append("--compile-model")
    rows = {}
    for label, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        rows[label] = run_worker(common + extra, ranks=1, threads=max(1, os.cpu_count() // 2))
    layers, d_model, context = GPT2["layers"], GPT2["d_model"], GPT2["context"]
    for label, r in rows.items():
        per_token = flops_per_token(r["parameters"], layers, d_model, context)
        r["mfu"] = per_token * r["tokens_per_s"] / peak
        print(f"{label:>5}: {r['tokens_per_s']:>10,.0f} tokens/s  MFU {r['mfu']:.1%}  "
              f"peak memory {r.get('peak_memory_gib', 0):.1f} GiB  (windows {r['windows']})")
    print(f"GPT-2 124M shape ({rows['plain']['parameters']:,} parameters), context {context}, micro-batch "
          f"{args.batch_size} x {args.grad_accum}, bf16, compile={args.compile}, {args.steps} steps")
    print(f"ratio FSDP / plain tokens/s: {rows['fsdp']['tokens_per_s'] / rows['plain']['tokens_per_s']:.3f}")
    print(f"MFU (plain) {rows['plain']['mfu']:.1%} against the 45% target")


def cpu(args: argparse.Namespace) -> None:
    common = ["--shape", "cpu", "--device", "cpu", "--dtype", "fp32", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
              "--log-every", str(args.log_every), "--warmup-windows", str(args.warmup_windows)]
    one_1 = run_worker(common, ranks=1, threads=1)
    one_2 = run_worker(common, ranks=1, threads=2)
    two = run_worker(common, ranks=2, threads=1)
    print(f"small decoder ({one_1['parameters']:,} parameters: {CPU['layers']} layers, d_model {CPU['d_model']}, "
          f"context {CPU['context']}), global micro-batch {args.batch_size} x {args.grad_accum}, fp32, "
          f"{args.steps} steps, {os.cpu_count()} CPU cores")
    runs = (("1 process, 1 thread", one_1), ("1 process, 2 threads", one_2), ("2 ranks DDP, 1 thread each", two))
    for label, r in runs:
        print(f"{label:>27}: {r['tokens_per_s']:>9,.0f} tokens/s median, {r['best_tokens_per_s']:>9,.0f} best window  "
              f"(windows {r['windows']})")
    for stat in ("tokens_per_s", "best_tokens_per_s"):
        name = "median" if stat == "tokens_per_s" else "best window"
        print(f"{name}: scaling efficiency, 2 ranks / (2 x 1 rank): {two[stat] / (2 * one_1[stat]):.2f}; "
              f"ratio 2 ranks DDP / 1 process with 2 threads: {two[stat] / one_2[stat]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (gpu 60, cpu 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="global micro-batch (gpu 16, cpu 16)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--warmup-windows", type=int, default=2, help="log windows left out (compilation)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="gpu: without torch.compile")
    # the worker's own options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--compile-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or (60 if mode == "gpu" else 200)
    args.batch_size = args.batch_size or 16
    gpu(args) if mode == "gpu" else cpu(args)


if __name__ == "__main__":
    main()
