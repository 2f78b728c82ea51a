"""Peak memory while loading a checkpoint: how far above the interpreter's baseline the resident set
grows, as a multiple of the weight bytes (the target is at most 1.3x).

Each measurement runs in a fresh process: it imports torch and tformer, loads the checkpoint once
and frees it (warming up code paths and shared libraries), takes the baseline RSS, resets the kernel's peak-RSS
counter (/proc/self/clear_refs), calls `load_checkpoint`, and reads the peak (VmHWM); then it reads
every weight once (a memory-mapped page counts only once touched) and reads the peak again. Linux only.

    python benchmarks/bench_load.py                      # ~270 MB Llama-shaped model: tformer, HF, HF sharded
    python benchmarks/bench_load.py --d-model 2048 --layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import gc, json, sys, time
import torch
from tformer.checkpoint import load_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# Warm up: the first load runs code (and maps library pages) that a baseline taken right after the
# imports would not count yet; its model is freed before the baseline is taken.
del load_checkpoint(sys.argv[1]).model
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
ckpt = load_checkpoint(sys.argv[1])
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in ckpt.model.state_dict().values())
peak = status("VmHWM")
# Memory-mapped weights are read when first used: touch every one, as a forward pass would.
with torch.no_grad():
    checksum = sum(float(t.float().sum()) for t in ckpt.model.state_dict().values())
print(json.dumps({"base": base, "peak": peak, "touched": status("VmHWM"), "weights": weights,
                  "seconds": seconds}))
"""


def write_models(root: Path, d_model: int, layers: int, vocab: int) -> dict[str, Path]:
    """A random Llama-shaped tformer checkpoint, and the same model exported as a Hugging Face
    directory, single-file and in shards."""
    import torch
    from safetensors.torch import save_file

    from tformer.checkpoint import save_checkpoint, state_dict_for_saving
    from tformer.config import ModelConfig
    from tformer.hf.export import hf_config
    from tformer.hf.weights import state_to_hf
    from tformer.model.transformer import build_model

    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab, d_model=d_model, n_heads=d_model // 64,
                                  n_kv_heads=max(1, d_model // 256), n_decoder_layers=layers,
                                  d_ff=(8 * d_model // 3 + 63) // 64 * 64, max_seq_len=2048)
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(cfg)
    paths = {"tformer": root / "tformer", "hf": root / "hf", "hf-sharded": root / "hf-sharded"}
    save_checkpoint(paths["tformer"], model, cfg)
    tensors = state_to_hf("llama", state_dict_for_saving(model), cfg)
    del model
    config = hf_config(cfg, "llama", {"bos": 1, "eos": 2, "pad": 0})
    for name in ("hf", "hf-sharded"):
        paths[name].mkdir()
        (paths[name] / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(paths["hf"] / "model.safetensors"), metadata={"format": "pt"})
    names = sorted(tensors)
    shards = [names[i::4] for i in range(4)]
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({n: tensors[n] for n in part}, str(paths["hf-sharded"] / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (paths["hf-sharded"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return paths


def measure(path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(Path(tmp), args.d_model, args.layers, args.vocab)
        print(f"load average {os.getloadavg()[0]:.2f}; d_model {args.d_model}, {args.layers} layers, "
              f"vocab {args.vocab}")
        print(f"{'checkpoint':<12} {'weights MB':>10} {'load: peak above base':>22} "
              f"{'then every weight read':>23} {'load s':>7}")
        for name, path in paths.items():
            r = measure(path)
            load, touched = r["peak"] - r["base"], r["touched"] - r["base"]
            print(f"{name:<12} {r['weights'] / 1e6:>10.1f} {load / 1e6:>11.1f} MB {load / r['weights']:>5.2f}x "
                  f"{touched / 1e6:>12.1f} MB {touched / r['weights']:>5.2f}x {r['seconds']:>7.2f}")


if __name__ == "__main__":
    main()
