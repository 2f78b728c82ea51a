"""CPU speedrun: wall time for `tformer train` to reach a validation loss <= 1.88 on Tiny Shakespeare,
character level, the last 10% as validation, the loss measured on the whole validation split.

    python benchmarks/bench_speedrun.py [--corpus ../shared/data/tinyshakespeare.txt] [--preset shakespeare-speedrun]
    python benchmarks/bench_speedrun.py --preset baby-shakespeare --full   # nanoGPT's baby config, all 2000 steps

The corpus is tokenized once first (`tformer tokenize --kind char`; its time is printed apart). Then
`tformer train` runs in a subprocess; the clock starts when it is launched and stops when metrics.jsonl
first shows a validation loss <= the target (with --full, when the run ends).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--preset", default="shakespeare-speedrun")
    p.add_argument("--target", type=float, default=1.88)
    p.add_argument("--full", action="store_true", help="run to the end instead of stopping at the target")
    p.add_argument("extra", nargs="*", help="more `tformer train` options, after --")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="speedrun-"))
    tokens = work / "tokens"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tformer", "tokenize", args.corpus, "--kind", "char", "--out", str(tokens)],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"tokenize: {time.perf_counter() - start:.1f} s")

    out = work / "run"
    cmd = [sys.executable, "-m", "tformer", "train", str(tokens), "--preset", args.preset, "--eval-batches", "0",
           "--out", str(out), "--quiet", *args.extra]
    print("command:", " ".join(cmd[2:]))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    reached = None
    while proc.poll() is None:
        time.sleep(0.1)
        if not metrics.exists():
            continue
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if reached is None and row.get("val_loss", 99) <= args.target:
                reached = (time.perf_counter() - start, row)
        if reached and not args.full:
            proc.send_signal(signal.SIGTERM)
            break
    proc.wait()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [(r["step"], round(r["val_loss"], 4)) for r in rows if "val_loss" in r]
    print("validation losses (step, loss):", evals)
    if reached:
        t, row = reached
        print(f"reached val loss {row['val_loss']:.4f} <= {args.target} at step {row['step']} after {t:.1f} s "
              f"wall ({row['time']:.1f} s in the loop, {row['tokens']:,} tokens, "
              f"{row['tokens'] / row['time']:,.0f} tokens/s)")
    else:
        print(f"did not reach {args.target}; best {min(l for _, l in evals) if evals else None}")
    if args.full:
        last = rows[-1]
        print(f"full run: {wall:.1f} s wall, final step {last['step']}, final val loss {last.get('val_loss')}")


if __name__ == "__main__":
    main()
