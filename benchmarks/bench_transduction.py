"""How fast an encoder-decoder learns synthetic transduction tasks from the `tformer train` CLI.

For each task: a train .tsv of source<TAB>target pairs and a disjoint set of unseen test sources are
generated; `tformer train pairs.tsv --arch encoder-decoder` runs under `--time-budget`; then the run's
checkpoint translates every test source in one batch, greedily (tformer's own `generate`), and the
exact-match rate against the expected targets is reported with the steps and wall time of training.

    python benchmarks/bench_transduction.py                      # every task, 240 s each, the transduction preset
    python benchmarks/bench_transduction.py --tasks reverse --budget 120 -- --preset tiny --lr 1e-3

Anything after `--` is passed to `tformer train` as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# -- tasks ------------------------------------------------------------------------------------------

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
        if n == 0:
            return words
    if n < 20:
        words.append(_ONES[n])
    else:
        words.append(_TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10]))
    return words


def number_words(n: int) -> str:
    """English words for 0 <= n < 10**6: 3631 -> 'three thousand six hundred thirty-one'."""
    if n < 1000:
        return " ".join(_below_thousand(n))
    high, low = divmod(n, 1000)
    return " ".join(_below_thousand(high) + ["thousand"] + (_below_thousand(low) if low else []))


def _numbers(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10 ** rng.randint(1, 6))  # as many short numbers as long ones
    return str(n), number_words(n)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 16)))
    return s, s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 16)))
    return s, "".join(sorted(s))


def _dates(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return f"{d} {_MONTHS[m - 1]} {y}", f"{y:04d}-{m:02d}-{d:02d}"


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "numbers": _numbers, "reverse": _reverse, "sort": _sort, "dates": _dates,
}


def make_task(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train pairs and test pairs whose sources never occur in training."""
    rng = random.Random(f"{name}-{seed}")
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_test)):
        if len(seen) >= n_train + n_test:
            break
        src, tgt = TASKS[name](rng)
        seen.setdefault(src, tgt)
    pairs = list(seen.items())
    rng.shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


# -- measuring --------------------------------------------------------------------------------------

def exact_match(run: Path, test: list[tuple[str, str]], threads: int) -> float:
    """Share of test sources that the run's checkpoint translates exactly (greedy, one batch)."""
    import torch

    from tformer.generation.config import GenerateConfig
    from tformer.generation.generate import generate
    from tformer.generation.load import load

    torch.set_num_threads(threads)
    loaded = load(run, device="cpu")
    longest = max(len(t) for _, t in test)
    cfg = GenerateConfig(temperature=0, max_new_tokens=longest + 8)
    hits = 0
    for first in range(0, len(test), 256):  # batches of 256 keep the KV cache small
        chunk = test[first:first + 256]
        result = generate(loaded.model, loaded.tokenizer, [s for s, _ in chunk], cfg)
        hits += sum(c.text.strip() == t for c, (_, t) in zip(result.completions, chunk))
    return hits / len(test)


def train(pairs_file: Path, out: Path, budget: float, threads: int, extra: list[str]) -> tuple[int, float, str]:
    """Run `tformer train` on the pairs; (steps done, seconds, the last log line)."""
    command = [sys.executable, "-m", "tformer", "train", str(pairs_file), "--arch", "encoder-decoder",
               "--out", str(out), "--force", "--quiet", "--time-budget", str(budget), "--threads", str(threads),
               *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: training failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    return last["step"], seconds, f"loss {last['loss']:.3f} val_acc {last.get('val_acc', float('nan')):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="numbers,reverse,dates", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-pairs", type=int, default=20000)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("train_args", nargs="*", help="after --: options for tformer train "
                        "(default: --preset transduction)")
    args = parser.parse_args()
    extra = args.train_args or ["--preset", "transduction"]
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"tformer train ... --arch encoder-decoder --time-budget {args.budget:g} {' '.join(extra)}; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        print(f"{'task':<9} {'steps':>6} {'wall s':>7} {'exact %':>8}  last log", flush=True)
        for name in names:
            train_pairs, test = make_task(name, args.train_pairs, args.test_pairs, args.seed)
            tsv = work / f"{name}.tsv"
            tsv.write_text("".join(f"{s}\t{t}\n" for s, t in train_pairs), encoding="utf-8")
            steps, seconds, last = train(tsv, work / f"run-{name}", args.budget, args.threads, extra)
            match = exact_match(work / f"run-{name}", test, args.threads)
            print(f"{name:<9} {steps:>6} {seconds:>7.0f} {100 * match:>8.1f}  {last}", flush=True)


if __name__ == "__main__":
    main()
