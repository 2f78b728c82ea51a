"""Training on many processes: torchrun's environment, DDP or FSDP2, rank-0 output and saving.

`tformer train` launched by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT) joins a process group, gloo for CPU tensors and NCCL for CUDA ones, and trains with
DistributedDataParallel, or with `--fsdp` shards parameters, gradients and optimizer state with
FSDP2 (`fully_shard`, per Block and the root). Without those variables every function here is a
no-op, so the single-process loop is unchanged.

What a run means does not depend on the number of ranks:
- `--batch-size` is the GLOBAL micro-batch. Every rank draws the same global batch from the same
  seeded generator and keeps its own `batch_size / world_size` rows (see `data.Batches`), so the
  batches, the optimizer steps and the learning-rate schedule are those of a one-process run, the
  decoder's losses agree up to float summation order, and a checkpoint resumes on any number of ranks.
- Evaluation batches are dealt out round-robin and the sums all-reduced: the same metrics.
- Only rank 0 prints, writes metrics and checkpoints. A checkpoint is the ordinary one-process
  format (a sharded model is gathered on rank 0), so `generate` and `inspect` load it.
- Decisions that end the loop (Ctrl-C, SIGTERM, --time-budget, a NaN) are agreed by all ranks at
  the same step, so one checkpoint is written, by rank 0, and nobody waits for a peer that left.
- Collectives time out (TFORMER_DIST_TIMEOUT seconds, default 600): a rank that dies or hangs makes
  the others stop with a one-line error rather than wait forever.
"""

from __future__ import annotations

import atexit
import inspect
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tformer.checkpoint import load_state, unwrap_model
from tformer.data.batches import IGNORE_INDEX
from tformer.device import Precision
from tformer.errors import CheckpointError, TformerError
from tformer.model.transformer import Block, build_model
from tformer.training.state import load_optimizer_tensors, optimizer_tensors

TIMEOUT_ENV = "TFORMER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # NCCL's own default; long enough for rank 0 to write a large checkpoint


class DistributedError(TformerError):
    """The process group failed: a peer died, hung past the timeout, or could not be reached."""


class _RelayedError(TformerError):
    """An error rank 0 met first and has already reported; the other ranks exit quietly."""


def _same_on_every_rank(message: str) -> TformerError:
    """The error for a check every rank makes alike: rank 0 reports it, the others exit quietly."""
    return TformerError(message) if rank() == 0 else _RelayedError(message)


# -- the process group ----------------------------------------------------------------------------

def launched() -> bool:
    """True when a launcher such as torchrun started this process as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True inside an initialized process group (of any size, also the single-process one of --fsdp)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one that prints, writes metrics and saves checkpoints (always true in one process)."""
    return rank() == 0


def timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
        if seconds <= 0:
            raise ValueError
    except ValueError:
        raise TformerError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds") from None
    return timedelta(seconds=seconds)


def _backend() -> str:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"  # CPU tensors (control flags) go through gloo, CUDA ones through NCCL
    return "gloo"


def setup() -> bool:
    """Join the process group torchrun describes in the environment (nothing without a launcher).
    Returns True when this call created the group."""
    if not launched() or is_distributed():
        return False
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's own GPU (checked in `shard`)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(_backend(), timeout=timeout())
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {os.environ['RANK']} could not join the process group at {where}: "
                               f"{_first_line(e)}") from None
    return True


def setup_single() -> None:
    """A process group of one (for --fsdp without a launcher): FSDP needs a group even on one device."""
    if is_distributed():
        return
    dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout())


def teardown(clean: bool = True) -> None:
    """Leave the process group; after a clean run, wait for every rank first (rank 0 may still be saving)."""
    if not is_distributed():
        return
    try:
        if clean and world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)  # gloo/NCCL prefix their source file
    return re.split(r"(?<=[a-z])\. (?=[A-Z])", line)[0]  # the first sentence; gloo adds advice after it


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(re.search(
        r"gloo|nccl|NCCL|Connection (reset|closed|refused)|[Tt]imed out|ProcessGroup|Broken pipe", str(e)))


@contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's group for the block and leave it after. Inside, a failed collective becomes a
    one-line DistributedError naming the rank; errors rank 0 already reported end the other ranks quietly."""
    setup()
    try:
        yield
        teardown()
    except _RelayedError:
        # Wait until rank 0 has printed the error and left (its exit closes the connection), so that
        # torchrun names rank 0 as the first failure, not this one.
        try:
            dist.barrier()
        except Exception:
            pass
        raise SystemExit(1) from None
    except TformerError as e:
        _leave_at_exit()
        if world_size() > 1 and not is_main() and not str(e).startswith("rank "):
            raise type(e)(f"rank {rank()}: {e}") from None
        raise
    except BaseException as e:
        _leave_at_exit()
        if world_size() > 1 and isinstance(e, Exception) and _is_collective_failure(e):
            _ignore_sigterm()
            raise DistributedError(
                f"rank {rank()} lost contact with the other ranks ({_first_line(e)}); the run stopped and the "
                f"last checkpoint is kept: continue with --resume auto") from None
        raise


def _ignore_sigterm() -> None:
    # A peer's death makes torchrun SIGTERM the surviving ranks; this rank is already ending with its one-line
    # report, which the default action of that signal (once the loop's stop handler is gone) would cut short.
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        pass  # not the main thread: signals cannot be set here


def _leave_at_exit() -> None:
    # After an error the group is left at interpreter exit, once the CLI has printed its message:
    # leaving it earlier would let the other ranks (and torchrun) report first.
    if is_distributed():
        atexit.register(_destroy_quietly)


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception:
        pass  # a broken group cannot say goodbye; the error already printed is what matters


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first (it may write shared files, e.g. tokenize the corpus into --out),
    then on the other ranks. An error on rank 0 is raised on every rank, so none waits for it."""
    if world_size() == 1:
        yield
        return
    if is_main():
        try:
            yield
        except BaseException as e:
            _broadcast_text(_first_line(e) or "rank 0 failed")
            raise
        _broadcast_text("")
    else:
        message = _broadcast_text(None)
        if message:
            raise _RelayedError(message)
        yield


def _broadcast_text(text: str | None) -> str:
    """Rank 0's `text` on every rank (UTF-8 bytes through two broadcasts; no pickling)."""
    data = (text or "").encode("utf-8")
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if is_main() and data:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buf, src=0)
    return bytes(buf.tolist()).decode("utf-8")


# -- agreeing on numbers -----------------------------------------------------------------------------

def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a CPU all-reduce: no GPU sync in the step)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: float) -> float:
    """The largest of a host number over ranks (a CPU all-reduce), so that every rank agrees on it."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_true(flag: Tensor) -> bool:
    """A boolean device tensor (e.g. "the loss was NaN") reduced over ranks and read on the host."""
    if world_size() == 1:
        return bool(flag)
    t = flag.to(torch.float32).reshape(1)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def mean(value: Tensor) -> Tensor:
    """The mean of a scalar tensor over ranks (the logged training loss)."""
    if world_size() == 1:
        return value
    t = value.detach().to(torch.float32).reshape(1).clone()
    dist.all_reduce(t)
    return t[0] / world_size()


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each number summed over ranks (evaluation totals), in float64 so token counts stay exact."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


def my_share(batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """This rank's evaluation batches: batch i goes to rank i % world_size. When the last round is short,
    the ranks left over run a copy with no labels, because FSDP needs every rank in every forward pass."""
    world, me = world_size(), rank()
    if world == 1:
        yield from batches
        return
    round_: list[dict[str, Tensor]] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == world:
            yield round_[me]
            round_ = []
    if round_:
        if me < len(round_):
            yield round_[me]
        else:
            yield {**round_[0], "labels": torch.full_like(round_[0]["labels"], IGNORE_INDEX)}


def check_batch_size(batch_size: int) -> None:
    """The global micro-batch must split evenly over the ranks."""
    world = world_size()
    if batch_size % world:
        raise _same_on_every_rank(f"--batch-size {batch_size} is the global micro-batch and must be a multiple "
                                  f"of the {world} ranks (each rank takes batch_size / {world} rows)")


# -- wrapping the model -----------------------------------------------------------------------------

def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """True when `model` (or the module under torch.compile) was sharded with fully_shard."""

    return is_distributed() and isinstance(unwrap_model(model), _fsdp()[0])


def shard(model: nn.Module, fsdp: bool, precision: Precision, device: torch.device) -> nn.Module:
    """With `fsdp`, shard each Block and then the root with FSDP2, in place; call before the optimizer
    is made (it must see the sharded parameters). Otherwise only checks the device for DDP."""
    if not fsdp and world_size() == 1:
        return model
    if device.type not in ("cpu", "cuda"):
        raise _same_on_every_rank(f"distributed training runs on CUDA GPUs or the CPU, not {device.type}; "
                                  f"use --device cuda or cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise DistributedError(f"rank {rank()} has LOCAL_RANK={local_rank}, but this machine has "
                               f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
                               f"(--nproc_per_node), or train on the CPU with --device cpu")
    if not fsdp:
        return model
    if precision.name == "fp16":
        raise _same_on_every_rank("--fsdp trains in bf16 or fp32; fp16 needs a gradient scaler shared by the "
                                  "shards, which tformer does not have: use --dtype bf16 (or fp32), or drop --fsdp")
    setup_single()

    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    if precision.name == "bf16":
        # bf16 weights in the forward and backward, gradients reduced and kept in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the (possibly compiled) model on more than one rank; a sharded model is left as it is."""
    if world_size() == 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    # Our buffers (positional tables, RoPE angles) are constants, so nothing needs broadcasting each
    # forward; that also keeps evaluation free of collectives.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})  # the older name, deprecated in torch 2.13
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync)


def micro_step(model: nn.Module, last: bool) -> Any:
    """Gradient accumulation without needless communication: gradients are reduced across ranks only
    in the backward pass of the last micro-batch of an optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return nullcontext() if last else model.no_sync()
    if is_sharded(model):

        unwrap_model(model).set_requires_gradient_sync(last)
    return nullcontext()


def describe(model: nn.Module) -> str:
    """How the run is spread, for the start line: "" in one process, else e.g. " x 8 ranks (DDP)"."""
    if not is_distributed() or (world_size() == 1 and not is_sharded(model)):
        return ""
    return f" x {world_size()} rank{'s' if world_size() > 1 else ''} ({'FSDP' if is_sharded(model) else 'DDP'})"


def local_model(model: nn.Module) -> nn.Module | None:
    """The trained model as a usable module in this process (None when it is sharded across ranks)."""
    return None if is_sharded(model) else model


# -- saving and restoring ---------------------------------------------------------------------------

def _full_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def snapshot_for_saving(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: Any
) -> tuple[nn.Module, dict[str, Tensor]] | None:
    """What rank 0 writes: (a plain module holding the full weights, the optimizer tensors by name).

    Every rank must call this (gathering a sharded model is a collective); the others get None.
    """

    if not is_sharded(model):
        return (model, optimizer_tensors(optimizer, model)) if is_main() else None
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _full_options(cpu_offload=True)  # gathered shard by shard into rank 0's CPU memory
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main():
        return None

    with torch.device("meta"):
        plain = build_model(model_cfg)  # no memory and no init: the gathered tensors are assigned to it
    plain.load_state_dict(weights, strict=True, assign=True)
    tensors = {f"{name}.{key}": value.detach().contiguous()
               for name, entry in optim["state"].items() for key, value in entry.items() if isinstance(value, Tensor)}
    return plain, tensors


def load_model_state(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Weights of a one-process checkpoint into `model`, sharded or not."""

    if not is_sharded(model):
        load_state(unwrap_model(model), tensors, where)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    try:
        set_model_state_dict(unwrap_model(model), tensors, options=_full_options(strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{where} does not match the model: {_first_line(e)}") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Optimizer tensors by name (as `snapshot_for_saving` writes them) into `optimizer`, sharded or not."""

    if not is_sharded(model):
        load_optimizer_tensors(optimizer, model, tensors)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    plain = unwrap_model(model)
    names = {id(p): n for n, p in plain.named_parameters()}
    # the full optimizer state dict, keyed by parameter name: each rank keeps the slices of its shards
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    state: dict[str, dict[str, Tensor]] = {}
    for name in names.values():
        prefix = f"{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if entry:
            state[name] = entry
    set_optimizer_state_dict(plain, optimizer, {"state": state, "param_groups": groups}, options=_full_options())
