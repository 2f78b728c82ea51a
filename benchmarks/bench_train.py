"""Training-step throughput on the CPU: tformer's training step against nanoGPT's own `GPT` and transformers'
`GPT2LMHeadModel` of the same shape, trained on the same batches (fp32, AdamW, clip 1.0) in one process.

    python benchmarks/bench_train.py --nanogpt PATH/TO/nanoGPT [--steps 40] [--trials 5]
    python benchmarks/bench_train.py --nanogpt PATH --layers 6 --d-model 384 --heads 6 --context 256 --batch 16
    python benchmarks/bench_train.py --profile            # where tformer's step spends its time

PATH is a checkout of nanoGPT (karpathy/nanoGPT): its `model.py` is imported from there, never copied here.
Each side runs its own training step as its own trainer does it: nanoGPT as its train.py (the model computes the
loss, `configure_optimizers`: AdamW with decay on 2-D weights), transformers as a plain AdamW loop, tformer as
`tformer train` (training/optim.py's optimizer, objectives.loss_fn). Trials are interleaved so that drift in
the machine's speed hits all alike; tokens/s is the median over trials, warm-up steps excluded.
The default shape is nanoGPT's "baby" Shakespeare model: 4 layers, 4 heads, d_model 128, context 64,
batch 12, a 65-token character vocabulary, no bias, no dropout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_nanogpt(path: str):
    """nanoGPT's model.py, imported from a checkout given on the command line."""
    file = Path(path) / "model.py"
    if not file.is_file():
        sys.exit(f"error: --nanogpt {path!r} has no model.py (give a checkout of karpathy/nanoGPT)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tformer_step(args):
    from tformer.config import ModelConfig
    from tformer.model.transformer import DecoderLM
    from tformer.device import resolve_precision
    from tformer.training.config import TrainConfig
    from tformer.training.cpu_parallel import CPUDataParallel, auto_processes
    from tformer.training.objectives import loss_fn
    from tformer.training.optim import make_optimizer

    cfg = ModelConfig(arch="decoder", vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads,
                      n_decoder_layers=args.layers, n_encoder_layers=0, d_ff=4 * args.d_model, dropout=0.0,
                      max_seq_len=args.context, pos_encoding="learned", norm_placement="pre", norm="layernorm",
                      activation="gelu", bias=False, tie_embeddings=True, scale_embeddings=False, init="gpt2")
    model = DecoderLM(cfg).train()
    train_cfg = TrainConfig(lr=1e-3, beta2=0.99, weight_decay=0.1, clip=1.0, optimizer=args.optimizer)
    opt = make_optimizer(model, train_cfg, torch.device("cpu"))
    forward = torch.compile(model) if args.compile else model
    threads = torch.get_num_threads()
    processes = args.processes or (1 if args.compile else auto_processes(threads, args.batch))
    if processes > 1:  # as tformer's loop: the rows shared out among processes of one thread each
        parallel = CPUDataParallel(model, "decoder", processes, 0.0, resolve_precision("fp32", torch.device("cpu")),
                                   optimizer=opt)  # Muon's orthogonalization shared out too
        torch.set_num_threads(threads)  # the other programs' steps keep theirs; ours is set per trial
        loss_of = lambda x, y: parallel.forward_backward({"idx": x, "labels": y}, 1.0)  # noqa: E731
    else:
        loss_of = lambda x, y: loss_fn(forward(x).logits, y)  # noqa: E731
    # as tformer's loop: foreach norms for the clipping
    step = training_step(model, opt, loss_of, clip_foreach=True, backward=processes == 1)
    step.threads = max(1, threads // processes)
    step.processes = processes
    return step


def nanogpt_step(args, module):
    conf = module.GPTConfig(block_size=args.context, vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                            n_embd=args.d_model, dropout=0.0, bias=False)
    model = module.GPT(conf).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    # nanoGPT's train.py, without gradient accumulation and the (disabled) scaler: the model computes the loss
    return training_step(model, opt, lambda x, y: model(x, y)[1])


def transformers_step(args):
    import transformers

    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def loss_of(x, y):
        logits = model(x).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    return training_step(model, opt, loss_of)


def training_step(model, opt, loss_of, clip_foreach: bool | None = None, backward: bool = True):
    """One step as each trainer runs it: the loss, backward (unless `loss_of` did it), clipping at 1.0, the
    optimizer step."""

    def step(x, y):
        loss = loss_of(x, y)
        if backward:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=clip_foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def tokens_per_s(step, batches, warmup: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(step, "threads", threads))
    try:
        return _tokens_per_s(step, batches, warmup)
    finally:
        torch.set_num_threads(threads)


def _tokens_per_s(step, batches, warmup: int) -> float:
    for x, y in batches[:warmup]:
        step(x, y)
    start = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y).item()
    n = sum(x.numel() for x, _ in batches[warmup:])
    return n / (time.perf_counter() - start)


def profile(step, batches) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(getattr(step, "threads", torch.get_num_threads()))
    for x, y in batches[:5]:
        step(x, y)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches[5:25]:
            step(x, y).item()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    names = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return ", ".join(names) or "none of avx2/avx512/amx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", metavar="PATH", help="a checkout of karpathy/nanoGPT (its model.py is imported)")
    p.add_argument("--no-transformers", action="store_true", help="leave GPT2LMHeadModel out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--optimizer", default="adamw", help="tformer's --optimizer (adamw or muon)")
    p.add_argument("--compile", action="store_true", help="tformer's model under torch.compile (time reported apart)")
    p.add_argument("--processes", type=int, default=None,
                   help="tformer's --processes (default: as tformer train, one per thread)")
    p.add_argument("--profile", action="store_true", help="profile tformer's step and stop")
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(args.vocab, (args.batch, args.context), generator=g),
                torch.randint(args.vocab, (args.batch, args.context), generator=g))
               for _ in range(args.steps + args.warmup)]
    ours = tformer_step(args)
    if args.profile:
        profile(ours, batches)
        return
    if args.compile:
        start = time.perf_counter()
        for x, y in batches[:2]:
            ours(x, y)
        print(f"tformer compile (first two steps): {time.perf_counter() - start:.1f} s")
    steps = {"tformer": ours}
    if args.nanogpt:
        steps["nanoGPT"] = nanogpt_step(args, load_nanogpt(args.nanogpt))
    if not args.no_transformers:
        steps["transformers"] = transformers_step(args)
    results = {name: [] for name in steps}
    for _ in range(args.trials):  # interleaved
        for name, step in steps.items():
            results[name].append(tokens_per_s(step, batches, args.warmup))
    med = {name: statistics.median(v) for name, v in results.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: cpu ({torch.get_num_threads()} threads; {cpu_flags()}), fp32, torch {torch.__version__}, "
          f"load average {load:.2f}")
    print(f"shape: {args.layers} layers, {args.heads} heads, d_model {args.d_model}, context {args.context}, "
          f"batch {args.batch}, vocab {args.vocab}; {args.steps} timed steps x {args.trials} trials; "
          f"tformer: {args.optimizer}{', compiled' if args.compile else ''}, "
          f"{ours.processes} process{'es' if ours.processes > 1 else ''} x {ours.threads} thread(s)")
    for name, v in results.items():
        print(f"{name:>13}: {med[name]:>9,.0f} tokens/s (trials: {', '.join(f'{x:,.0f}' for x in v)})")
    for ref in ("nanoGPT", "transformers"):
        if ref in med:
            print(f"ratio tformer / {ref}: {med['tformer'] / med[ref]:.2f}")


if __name__ == "__main__":
    main()
