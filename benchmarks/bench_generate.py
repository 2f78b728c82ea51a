"""Decoding speed of `tformer generate` against transformers' `generate`, on the same random weights in the same run.

Sections (each prints what it measures: device, dtype, batch size, prompt and generated lengths):
  cpu    batch 1, fp32, GPT-2 124M shape, 16-token prompt, greedy: tokens/s of ours vs transformers (default cache)
  cache  our KV cache vs recomputing the whole sequence (--no-cache), at several generated lengths
  batch  throughput at batch 1, 8, 32 on the CPU, ours vs transformers
  int8   batch 1, GPT-2 124M shape: fp32 vs --quantize int8 tokens/s, and fp32 decode steps/s against a plain read of
         the weight matrices (bench_matvec.py's last row) measured between the trials
  gpu    (CUDA only) bf16 batch 1 with and without --compile vs transformers (GPT-2 124M); the GPT-2 XL shape's
         share of the measured copy bandwidth; batch 32 throughput

Tokens/s is end to end: generated tokens / wall time of the whole call (prefill included), the device
synchronised around it; trials of ours and of the reference are interleaved and medians reported, since
other work on the machine shifts absolute times. Every row generates exactly the same number of
tokens (no <eos> stops either side); the greedy token ids are checked equal.

    python benchmarks/bench_generate.py                      # cpu, cache, batch
    python benchmarks/bench_generate.py --sections gpu       # on a machine with CUDA (--device, --dtype)
    python benchmarks/bench_generate.py --sections int8      # int8 vs fp32 and fp32 vs the read bound (CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from tformer.checkpoint import gpt2_config_from_hf, gpt2_state_from_hf, load_state
from tformer.generation import quantize
from tformer.generation.config import GenerateConfig
from tformer.generation.cpu_decoding import cpu_decoding_layout
from tformer.generation.generate import generate
from tformer.model.transformer import build_model

transformers.logging.set_verbosity_error()


PROMPT_LEN = 16  # tokens in every prompt
GPT2_XL = transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25)  # 1.5B
SMOKE = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512)  # --smoke: checks the script runs
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word "t{i}": every id round-trips, and there is no <eos> to stop a row early."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def pair(hf_config: transformers.GPT2Config, device: str, dtype: torch.dtype):
    """A random transformers GPT-2 and our DecoderLM with the same weights."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides generate exactly N tokens
    hf.generation_config.pad_token_id = 0
    cfg = gpt2_config_from_hf(hf_config.to_dict())
    ours = build_model(cfg)
    load_state(ours, gpt2_state_from_hf(hf.state_dict(), cfg), where="random GPT-2")
    ours = ours.to(device, dtype).eval()
    if device == "cpu":  # as `tformer generate` loads a model for the CPU
        cpu_decoding_layout(ours)
    return hf.to(device, dtype), ours


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def prompts_for(tok: Tokenizer, vocab: int, batch: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"t{i}" for i in torch.randint(0, vocab, (length,), generator=g).tolist()) for _ in range(batch)]


def ours_fn(model, tok, prompts, n, **options):
    cfg = GenerateConfig(max_new_tokens=n, temperature=0, **options)
    return lambda: generate(model, tok, prompts, cfg)


def hf_fn(hf, tok, prompts, n, device):
    ids = torch.tensor([tok.encode(p).ids for p in prompts], device=device)

    def run():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return run


def compare(label: str, runs: dict[str, Callable[[], object]], n_tokens: int, trials: int, device: str,
            warmup: int = 1) -> dict[str, float]:
    """Interleaved trials of each run; prints and returns the median tokens/s of each (n_tokens per call)."""
    outputs = {name: fn() for name, fn in runs.items() for _ in range(warmup)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    steady: dict[str, list[float]] = {name: [] for name in runs}  # ours: decode steps only, per row
    for _ in range(trials):
        for name, fn in runs.items():
            seconds, out = timed(fn, device)
            rates[name].append(n_tokens / seconds)
            if hasattr(out, "timings"):
                steady[name].append(out.timings.tokens_per_s)
    print(f"\n{label}")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        line = f"  {name:<24} {medians[name]:9.1f} tok/s   (median of {trials}; range {min(r):.1f}-{max(r):.1f})"
        if steady[name]:
            line += f"; decode steps alone {statistics.median(steady[name]):.1f} tok/s per row"
        print(line)
    ids = [generated_ids(out) for out in outputs.values() if out is not None]  # None: a run that is no decoding
    print(f"  greedy ids identical across runs: {all(i == ids[0] for i in ids)}")
    return medians


def generated_ids(out: object) -> list[list[int]]:
    """The generated ids of each row, from our result or from transformers' (prompt + generated) tensor."""
    if isinstance(out, torch.Tensor):
        return [row[PROMPT_LEN:] for row in out.tolist()]
    return [c.token_ids for c in out.completions]


def where(device: str, dtype: torch.dtype, batch: int, prompt: int, new: int) -> str:
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    return f"{device} {str(dtype).removeprefix('torch.')}{threads}, batch {batch}, prompt {prompt}, {new} new tokens"


# -- sections -----------------------------------------------------------------------------------------

def section_cpu(args) -> None:
    hf, ours = pair(transformers.GPT2Config(), "cpu", torch.float32)
    tok = word_tokenizer(hf.config.vocab_size)
    prompts = prompts_for(tok, hf.config.vocab_size, 1, PROMPT_LEN)
    n = args.new_tokens
    runs = {"tformer": ours_fn(ours, tok, prompts, n), "transformers generate": hf_fn(hf, tok, prompts, n, "cpu")}
    if args.cpu_compile:
        runs["tformer --compile"] = ours_fn(ours, tok, prompts, n, compile=True)
    m = compare(f"[cpu] GPT-2 124M, greedy, {where('cpu', torch.float32, 1, PROMPT_LEN, n)}", runs, n, args.trials,
                "cpu")
    ref = m["transformers generate"]
    print(f"  ratio tformer / transformers: {m['tformer'] / ref:.2f}x  (target >= 1.5)"
          + (f"; with --compile {m['tformer --compile'] / ref:.2f}x" if args.cpu_compile else ""))


def section_cache(args) -> None:
    # A smaller GPT-2 shape: recomputing the whole sequence at every step is quadratic, and the 124M
    # shape at 1024 tokens would take hours on 2 cores.
    shape = dict(n_embd=args.cache_d_model, n_layer=args.cache_layers, n_head=args.cache_d_model // 64,
                 vocab_size=8192, n_positions=max(args.cache_lengths) + PROMPT_LEN)
    _, ours = pair(transformers.GPT2Config(**shape), "cpu", torch.float32)
    tok = word_tokenizer(8192)
    prompts = prompts_for(tok, 8192, 1, PROMPT_LEN)
    print(f"\n[cache] GPT-2 shape d_model={shape['n_embd']}, layers={shape['n_layer']}, vocab 8192; "
          f"cpu float32, {torch.get_num_threads()} threads, batch 1, prompt {PROMPT_LEN}")
    print(f"  {'new tokens':>10} {'cache tok/s':>12} {'no-cache tok/s':>15} {'ratio':>7}")
    for n in args.cache_lengths:
        runs = {"cache": ours_fn(ours, tok, prompts, n), "no-cache": ours_fn(ours, tok, prompts, n, use_cache=False)}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        outs = {}
        trials = args.trials if n <= 256 else 1
        for _ in range(trials):
            for name, fn in runs.items():
                seconds, outs[name] = timed(fn, "cpu")
                rates[name].append(n / seconds)
        c, nc = statistics.median(rates["cache"]), statistics.median(rates["no-cache"])
        same = outs["cache"].completions[0].token_ids == outs["no-cache"].completions[0].token_ids
        print(f"  {n:>10} {c:>12.1f} {nc:>15.1f} {c / nc:>6.1f}x   (median of {trials}; ids identical: {same})")


def section_batch(args) -> None:
    hf, ours = pair(transformers.GPT2Config(), "cpu", torch.float32)
    tok = word_tokenizer(hf.config.vocab_size)
    n = args.batch_new_tokens
    for batch in args.batches:
        prompts = prompts_for(tok, hf.config.vocab_size, batch, PROMPT_LEN)
        m = compare(f"[batch] GPT-2 124M, greedy, {where('cpu', torch.float32, batch, PROMPT_LEN, n)} (tok/s counts all rows)", {
            "tformer": ours_fn(ours, tok, prompts, n),
            "transformers generate": hf_fn(hf, tok, prompts, n, "cpu"),
        }, n * batch, max(1, args.trials // 2 if batch > 8 else args.trials), "cpu")
        print(f"  ratio: {m['tformer'] / m['transformers generate']:.2f}x")


def section_int8(args) -> None:
    hf, ours = pair(transformers.GPT2Config(), "cpu", torch.float32)
    cfg = gpt2_config_from_hf(hf.config.to_dict())
    int8 = build_model(cfg)
    load_state(int8, gpt2_state_from_hf(hf.state_dict(), cfg), where="random GPT-2")
    del hf
    cpu_decoding_layout(quantize.quantize_model(int8.eval()))  # as `tformer generate --quantize int8` loads it
    tok = word_tokenizer(cfg.vocab_size)
    prompts = prompts_for(tok, cfg.vocab_size, 1, PROMPT_LEN)
    n = args.new_tokens
    # The read bound: one plain sum over each weight matrix a step multiplies by (bench_matvec.py's last row).
    mats = [p for name, p in ours.named_parameters() if p.dim() == 2 and "pos" not in name]
    read_rates: list[float] = []

    def plain_read() -> None:
        for _ in range(3):
            seconds, _ = timed(lambda: [w.sum() for w in mats], "cpu")
            read_rates.append(1 / seconds)

    runs = {"tformer fp32": ours_fn(ours, tok, prompts, n), "tformer int8": ours_fn(int8, tok, prompts, n)}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up (int8: compiles its kernels)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    steady: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.trials):  # interleaved: the read bound, then each decode
        plain_read()
        for name, fn in runs.items():
            seconds, outs[name] = timed(fn, "cpu")
            rates[name].append(n / seconds)
            steady[name].append(outs[name].timings.tokens_per_s)
    print(f"\n[int8] GPT-2 124M shape, greedy, {where('cpu', torch.float32, 1, PROMPT_LEN, n)}")
    m = {name: statistics.median(r) for name, r in rates.items()}
    st = {name: statistics.median(r) for name, r in steady.items()}
    for name in runs:
        print(f"  {name:<14} {m[name]:7.1f} tok/s end to end (range {min(rates[name]):.1f}-{max(rates[name]):.1f}); "
              f"decode steps alone {st[name]:.1f} steps/s  (median of {args.trials})")
    fp32_ids, int8_ids = (generated_ids(o)[0] for o in outs.values())
    same = sum(a == b for a, b in zip(fp32_ids, int8_ids))
    read = statistics.median(read_rates)
    print(f"  ratio int8 / fp32: {m['tformer int8'] / m['tformer fp32']:.2f}x end to end, "
          f"{st['tformer int8'] / st['tformer fp32']:.2f}x decode steps (target >= 1.6); greedy ids equal: "
          f"{same}/{len(fp32_ids)} (random weights: agreement means little)")
    print(f"  plain read of the fp32 weights: {read:.1f} steps/s (median of {len(read_rates)}); fp32 decode steps "
          f"{st['tformer fp32'] / read:.0%} of it (target >= 85%), end to end {m['tformer fp32'] / read:.0%}")


def copy_bandwidth(device: str, size: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy of `size` bytes (median of 10)."""
    a = torch.empty(size, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        seconds, _ = timed(lambda: b.copy_(a), device)
        times.append(seconds)
    return 2 * a.numel() / statistics.median(times[2:])


def section_gpu(args) -> None:
    dev, dtype = args.device, DTYPES[args.dtype]
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("\n[gpu] no CUDA device: GPU figures still to be taken")
        return
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else dev
    print(f"\n[gpu] {name}, torch {torch.__version__}, transformers {transformers.__version__}"
          + ("  (--smoke: tiny shapes, the numbers mean nothing)" if args.smoke else ""))
    n = args.new_tokens
    small, xl = (SMOKE, SMOKE) if args.smoke else (transformers.GPT2Config(), GPT2_XL)
    hf, ours = pair(small, dev, dtype)
    tok = word_tokenizer(hf.config.vocab_size)
    for batch in (1, 32):
        prompts = prompts_for(tok, hf.config.vocab_size, batch, PROMPT_LEN)
        m = compare(f"[gpu] GPT-2 124M, greedy, {where(dev, dtype, batch, PROMPT_LEN, n)} (tok/s counts all rows)", {
            "tformer": ours_fn(ours, tok, prompts, n),
            "tformer --compile": ours_fn(ours, tok, prompts, n, compile=True),
            "transformers generate": hf_fn(hf, tok, prompts, n, dev),
        }, n * batch, args.trials, dev, warmup=2)
        ref = m["transformers generate"]
        print(f"  ratio vs transformers: eager {m['tformer'] / ref:.2f}x, compiled {m['tformer --compile'] / ref:.2f}x"
              + ("  (target >= 4x)" if batch == 1 else ""))
    del hf, ours
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    # GPT-2 XL (1.5B): decoding one row is bound by reading the weights (and the cache) once per token.
    cfg = gpt2_config_from_hf(xl.to_dict())
    torch.manual_seed(0)
    model = build_model(cfg).to(dev, dtype).eval()
    tok = word_tokenizer(cfg.vocab_size)
    bw = copy_bandwidth(dev, 1 << 20 if args.smoke else 1 << 30)
    for batch in (1, 32):
        prompts = prompts_for(tok, cfg.vocab_size, batch, PROMPT_LEN)
        m = compare(f"[gpu] GPT-2 XL shape, greedy, {where(dev, dtype, batch, PROMPT_LEN, n)} (tok/s counts all rows)", {
            "tformer": ours_fn(model, tok, prompts, n),
            "tformer --compile": ours_fn(model, tok, prompts, n, compile=True),
        }, n * batch, args.trials, dev, warmup=2)
        if batch == 1:
            size = dtype.itemsize
            # the position table is read one row per token; everything else in full
            weights = sum(p.numel() for name, p in model.named_parameters() if "pos" not in name) * size
            cache_len = PROMPT_LEN + n - 1  # the static cache is read in full at every step
            cache = 2 * cfg.n_decoder_layers * batch * cache_len * cfg.d_model * size
            for name, rate in m.items():
                r = rate / batch
                print(f"  {name}: {(weights + cache) * r / 1e9:.0f} GB/s read ({weights / 1e9:.2f} GB weights + "
                      f"{cache / 1e9:.3f} GB cache per token) = {(weights + cache) * r / bw:.0%} of the copy "
                      f"bandwidth {bw / 1e9:.0f} GB/s (read + written)  (target >= 60%)")


SECTIONS = {"cpu": section_cpu, "cache": section_cache, "batch": section_batch, "gpu": section_gpu,
            "int8": section_int8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="cpu,cache,batch", help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--trials", type=int, default=5, help="interleaved timed trials per measurement")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-compile", action="store_true", help="cpu section: also time --compile (slow to compile)")
    p.add_argument("--cache-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256, 1024])
    p.add_argument("--cache-d-model", type=int, default=256)
    p.add_argument("--cache-layers", type=int, default=4)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--batch-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda", help="gpu section: the device (cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="gpu section: the weights' dtype")
    p.add_argument("--smoke", action="store_true", help="gpu section: tiny shapes, to check the script runs "
                   "anywhere (e.g. --sections gpu --device cpu --dtype fp32 --smoke --new-tokens 8 --trials 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
