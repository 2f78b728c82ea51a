"""Benchmarks for `tformer tokenize`; each prints a ratio against a reference measured in the same run.

(a) Encoding throughput of the tokenize code path with --tokenizer FILE (`tokenize_corpus`: read, cut into
    pieces, encode, write train.bin/val.bin, hash the source, write meta.json) on a file of at least 50 MB,
    against `tokenizers`' own `encode_batch` on the same file and tokenizer: the whole file read at once,
    cut into the same ~64 KiB pieces at newlines, encoded in batches of the same size, the ids taken out
    (the reference writes nothing). `encode_batch_fast` (no offsets; what tformer calls) is shown too.
    Runs alternate and repeat because a shared VM is noisy; a ratio is reference time / tformer time (>= 0.8:
    tformer runs at least at 80% of the reference's speed), as the median over rounds of wall time and of
    CPU time (all threads; steadier when other work shares the cores), and best wall time against best.
(b) Peak RSS of `tformer tokenize` on a corpus of S MB and of 10 S MB, each in a fresh subprocess that reports
    its own ru_maxrss, both with --tokenizer FILE and training a BPE. The 10x corpus repeats the text, which
    flatters BPE training (its word counts do not grow); encoding memory does not depend on the text.

usage: python benchmarks/bench_tokenize.py [TEXT] [--mb 50] [--rss-mb 5] [--repeats 3] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def repeat_to(src: Path, dst: Path, min_bytes: int) -> int:
    """Write `src` repeated until `dst` holds at least `min_bytes`; returns the size."""
    data = src.read_bytes()
    dst.write_bytes(data * -(-min_bytes // len(data)))
    return dst.stat().st_size


def tformer_encode(corpus: Path, tokenizer: Path, out: Path) -> int:
    from tformer.data.prepare import tokenize_corpus

    return tokenize_corpus([corpus], out, tokenizer=tokenizer, force=True).total_tokens


def reference_encode(corpus: Path, tokenizer: Path, fast: bool) -> int:
    """tokenizers alone: load, read the whole file, cut into tformer-sized pieces at newlines, encode_batch."""
    from tokenizers import Tokenizer

    from tformer.data.corpus import PIECE_BYTES
    from tformer.data.prepare import BATCH_BYTES

    tok = Tokenizer.from_file(str(tokenizer))
    tok.encode_special_tokens = True  # same work as tformer: special-token text is plain text
    text = corpus.read_text(encoding="utf-8")
    pieces, pos = [], 0
    while pos < len(text):
        end = text.find("\n", pos + PIECE_BYTES)
        end = len(text) if end == -1 else end + 1
        pieces.append(text[pos:end])
        pos = end
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    per_batch = max(1, BATCH_BYTES // PIECE_BYTES)
    tokens = 0
    for i in range(0, len(pieces), per_batch):
        ids = [e.ids for e in encode(pieces[i:i + per_batch], add_special_tokens=False)]
        tokens += sum(map(len, ids))
    return tokens


def timed(fn, *args, **kwargs) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of all this process's threads, fn's result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def cli_seconds(corpus: Path, tokenizer: Path, out: Path) -> float:
    """Wall time of the real command, interpreter start-up and imports included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tformer", "tokenize", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(out), "--force"], check=True, capture_output=True)
    return time.perf_counter() - start


# The child reports VmHWM (peak RSS of its own address space). Not ru_maxrss: Linux carries that across
# fork+exec, so a child would report at least the RSS of this (large) parent.
_RSS_CHILD = """
import sys
from tformer.data.prepare import tokenize_corpus
corpus, out, tokenizer, vocab = sys.argv[1:5]
if tokenizer == "+":
    tokenize_corpus([corpus], out, kind="bpe", vocab_size=int(vocab), force=True)
elif tokenizer != "-":
    tokenize_corpus([corpus], out, tokenizer=tokenizer, force=True)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # kB
"""


def peak_rss_mib(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> float:
    """Peak RSS of a fresh interpreter that tokenizes `corpus` ("+": training a BPE; "-": imports only)."""
    args = [str(corpus), str(out), tokenizer, str(vocab_size)]
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, *args], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", nargs="?", type=Path, default=DEFAULT_TEXT, help="text repeated into the corpora")
    parser.add_argument("--mb", type=float, default=50, help="size of the throughput corpus (MB)")
    parser.add_argument("--rss-mb", type=float, default=5, help="size S of the small RSS corpus (MB); large is 10 S")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE trained on TEXT and used to encode")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"text file {args.text} not found; pass one")

    from tformer.data.prepare import tokenize_corpus

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenize_corpus([args.text], tmp / "tok", kind="bpe", vocab_size=args.vocab_size, val_fraction=0)
        tokenizer = tmp / "tok" / "tokenizer.json"

        # (a) throughput
        big = tmp / "big.txt"
        size = repeat_to(args.text, big, int(args.mb * 1e6))
        print(f"\n(a) encoding {size / 1e6:.1f} MB ({args.text.name} repeated), BPE vocab {args.vocab_size}")
        runs: dict[str, list[tuple[float, float]]] = {"tformer": [], "encode_batch": [], "encode_batch_fast": []}
        counts = set()
        tformer_encode(big, tokenizer, tmp / "out")  # warm-up: page cache, imports
        for _ in range(args.repeats):
            for name in runs:
                if name == "tformer":
                    wall, cpu, n = timed(tformer_encode, big, tokenizer, tmp / "out")
                else:
                    wall, cpu, n = timed(reference_encode, big, tokenizer, fast=name == "encode_batch_fast")
                runs[name].append((wall, cpu))
                counts.add(n)
        assert len(counts) == 1, f"token counts differ: {counts}"
        for name, times in runs.items():
            best = min(w for w, _ in times)
            print(f"  {name:<18} best {best:6.2f} s wall, {size / 1e6 / best:6.2f} MB/s;  runs (wall/CPU s): "
                  + ", ".join(f"{w:.1f}/{c:.1f}" for w, c in times))
        print(f"  tokens: {counts.pop():,}")
        ratios = {}
        for ref in ("encode_batch", "encode_batch_fast"):
            for k, clock in enumerate(("wall", "CPU")):
                key = f"{ref} ({clock})"
                ratios[key] = statistics.median(r[k] / t[k] for r, t in zip(runs[ref], runs["tformer"]))
            best = min(w for w, _ in runs[ref]) / min(w for w, _ in runs["tformer"])
            print(f"  throughput ratio tformer / {ref}: {ratios[f'{ref} (wall)']:.2f} wall, "
                  f"{ratios[f'{ref} (CPU)']:.2f} CPU time (medians of rounds), {best:.2f} best wall vs best wall "
                  "(target >= 0.8)")
        cli = cli_seconds(big, tokenizer, tmp / "out")
        print(f"  the CLI end to end (start-up included): {cli:.2f} s, {size / 1e6 / cli:.2f} MB/s")

        # (b) peak RSS
        small, large = tmp / "small.txt", tmp / "large.txt"
        small_size = repeat_to(args.text, small, int(args.rss_mb * 1e6))
        large.write_bytes(small.read_bytes() * 10)
        print(f"\n(b) peak RSS, corpus {small_size / 1e6:.1f} MB vs {10 * small_size / 1e6:.1f} MB (10x)")
        base = peak_rss_mib(small, tmp / "rss-out", "-", args.vocab_size)
        print(f"  interpreter + imports alone: {base:.0f} MiB")
        for label, tok in (("--tokenizer FILE", str(tokenizer)), ("training BPE", "+")):
            rss = [peak_rss_mib(corpus, tmp / "rss-out", tok, args.vocab_size) for corpus in (small, large)]
            ratios[label] = rss[1] / rss[0]
            print(f"  {label:<17} {rss[0]:6.0f} MiB -> {rss[1]:6.0f} MiB   ratio {ratios[label]:.2f} (target <= 1.2);"
                  f" above imports {rss[0] - base:.0f} -> {rss[1] - base:.0f} MiB")
        print("\n" + json.dumps({k: round(v, 3) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
