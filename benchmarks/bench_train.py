"""Training-step throughput on the CPU: tformer's DecoderLM against transformers' GPT2LMHeadModel of the
same shape, trained the same way (same batches, AdamW, gradient clipping, fp32) in the same run.

    python benchmarks/bench_train.py [--steps 60] [--trials 3]

Prints tokens/s of each (median over interleaved trials, warm-up steps excluded) and their ratio.
The default shape is nanoGPT's "baby" Shakespeare model: 4 layers, 4 heads, d_model 128, context 64,
batch 12, a 65-token character vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def make_models(args):
    import transformers

    from tformer.config import ModelConfig
    from tformer.model.transformer import DecoderLM

    cfg = ModelConfig(arch="decoder", vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads,
                      n_decoder_layers=args.layers, n_encoder_layers=0, d_ff=4 * args.d_model, dropout=0.0,
                      max_seq_len=args.context, pos_encoding="learned", norm_placement="pre",
                      activation="gelu_tanh", bias=True, tie_embeddings=True, scale_embeddings=False, init="gpt2")
    ours = DecoderLM(cfg)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    assert abs(sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in hf.parameters())) == 0
    return ours, hf


def step_fn(model, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def step(x, y):
        logits = model(x).logits  # both return an object with .logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def tokens_per_s(step, batches, warmup: int) -> float:
    for x, y in batches[:warmup]:
        step(x, y)
    start = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y).item()
    n = sum(x.numel() for x, _ in batches[warmup:])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--vocab", type=int, default=65)
    args = p.parse_args()
    torch.manual_seed(0)
    ours, hf = make_models(args)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(args.vocab, (args.batch, args.context), generator=g),
                torch.randint(args.vocab, (args.batch, args.context), generator=g))
               for _ in range(args.steps + args.warmup)]
    steps = {"tformer": step_fn(ours, False), "transformers": step_fn(hf, True)}
    results = {name: [] for name in steps}
    for trial in range(args.trials):  # interleaved, so drift in the machine's speed hits both alike
        for name, step in steps.items():
            results[name].append(tokens_per_s(step, batches, args.warmup))
    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"device: cpu ({torch.get_num_threads()} threads), fp32, torch {torch.__version__}")
    print(f"shape: {args.layers} layers, {args.heads} heads, d_model {args.d_model}, context {args.context}, "
          f"batch {args.batch}, vocab {args.vocab}; {args.steps} timed steps x {args.trials} trials")
    for name, v in results.items():
        print(f"{name:>13}: {med[name]:>9,.0f} tokens/s (trials: {', '.join(f'{x:,.0f}' for x in v)})")
    print(f"ratio tformer / transformers: {med['tformer'] / med['transformers']:.2f} (target >= 1.1)")


if __name__ == "__main__":
    main()
