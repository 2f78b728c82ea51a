"""CPU speedrun: wall time for `tformer train` to reach a validation loss <= 1.86 on Tiny Shakespeare,
character level, the last 10% as validation, the loss measured on the whole validation split.

    python benchmarks/bench_speedrun.py [--corpus ../shared/data/tinyshakespeare.txt] [--preset shakespeare-speedrun]
    python benchmarks/bench_speedrun.py --seeds 1337,1,2        # one run per seed, one after the other
    python benchmarks/bench_speedrun.py --preset baby-shakespeare --full --target 1.88   # nanoGPT's baby config

It runs what a user types, `tformer train CORPUS --kind char --preset P --eval-batches 0`, in a
subprocess, from raw text (so tokenizing is part of the time). The clock starts when the command is
launched (interpreter start-up and imports included) and reports two times: when metrics.jsonl first
shows a validation loss <= the target (evaluations before it included), and when the command exits
(final checkpoint and sample included). Without --full the run is stopped (SIGTERM) once the target
is reached, as a user would stop it; a preset whose last step reaches the target ends by itself.
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--target", type=float, default=1.86)
    p.add_argument("--seeds", default="", help="comma-separated seeds, one run each (default: the preset's seed)")
    p.add_argument("--full", action="store_true", help="run to the end instead of stopping at the target")
    p.add_argument("extra", nargs="*", help="more `tformer train` options, after --")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    results = [run(args, seed) for seed in seeds]
    if len(results) > 1:
        print("\nseed | val loss | reached | wall from launch (s)")
        for seed, (loss, reached, wall) in zip(seeds, results):
            print(f"{seed} | {loss:.4f} | {'yes' if reached else 'NO'} | {wall:.1f}")


def run(args: argparse.Namespace, seed: int | None) -> tuple[float, bool, float]:
    """One run; returns (last validation loss, whether the target was reached, seconds to the target or to exit)."""
    out = Path(tempfile.mkdtemp(prefix="speedrun-")) / "run"
    cmd = [sys.executable, "-m", "tformer", "train", args.corpus, "--kind", "char", "--preset", args.preset,
           "--eval-batches", "0", "--out", str(out), "--quiet", *args.extra]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    print("command:", "tformer", " ".join(cmd[3:]))
    print(f"machine: {os.cpu_count()} CPUs; load average at the start: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    reached = None
    while proc.poll() is None:
        time.sleep(0.05)
        if reached is not None or not metrics.exists():
            continue
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if row.get("val_loss", 99) <= args.target:
                reached = (time.perf_counter() - start, row)
                if not args.full:
                    proc.send_signal(signal.SIGTERM)
                break
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    # stopped by our SIGTERM: saved and exited 0, or, when the signal came after the last step (while the
    # final sample was printed), ended by it
    if proc.returncode != 0 and not (reached and proc.returncode == -signal.SIGTERM):
        sys.exit(f"tformer train failed ({proc.returncode}): {err.strip()}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [(r["step"], round(r["val_loss"], 4)) for r in rows if "val_loss" in r]
    print("validation losses (step, loss):", evals)
    if reached:
        t, row = reached
        print(f"reached val loss {row['val_loss']:.4f} <= {args.target} at step {row['step']}: {t:.1f} s wall from "
              f"launch ({row['time']:.1f} s in the training loop, {row['tokens']:,} tokens, "
              f"{row['tokens'] / row['time']:,.0f} tokens/s); the command exited after {wall:.1f} s")
    else:
        print(f"did not reach {args.target}; best {min(l for _, l in evals) if evals else None}")
    last = rows[-1]
    print(f"whole command: {wall:.1f} s wall, last step {last['step']}, last val loss {last.get('val_loss')}")
    return evals[-1][1] if evals else float("nan"), reached is not None, reached[0] if reached else wall


if __name__ == "__main__":
    main()
