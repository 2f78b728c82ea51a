"""Data parallelism across the cores of one CPU, inside one `tformer train`.

On a CPU the usual way to use several cores is intra-op threads: every matrix product and element-wise op is
split between them. For the small models trained on a CPU most ops are too small for that to pay (each one
waits for the slowest thread, and the Python between ops runs on one core). Here each core instead gets its
own process with one thread and a share of every micro-batch's rows, as DDP does across machines:

- the parameters live in shared memory, so the optimizer's in-place update in the main process is what the
  other processes compute with at the next step; nothing is copied per step but the batch rows and gradients;
- each helper process writes its gradients into a flat shared buffer, and the main process adds them to its
  own before clipping and the optimizer step;
- each share's loss is weighted by its count of labelled tokens, so the summed gradient is the gradient of
  the whole micro-batch's mean loss (up to the order of floating-point additions);
- dropout in a helper draws from a seed the main process takes from its own generator, so a run is
  reproducible and a resumed run continues exactly;
- evaluation shares out whole validation batches, the processes taking them in turns;
- Muon's orthogonalization, the largest part of its step, is shared out too: the helpers would otherwise wait
  through the optimizer step, and their gradient buffers are free by then (already added up).

Helpers are forked (no re-import, the model is already built), ignore Ctrl-C and SIGTERM (the main process
stops the run and saves), and exit when the main process closes their pipe or dies.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tformer.checkpoint import eval_mode
from tformer.data.batches import IGNORE_INDEX
from tformer.errors import TformerError
from tformer.training.config import MAX_PROCESSES
from tformer.training.evaluate import batch_totals
from tformer.training.lock import close_inherited_locks
from tformer.training.objectives import forward_logits, loss_fn
from tformer.training.optim import MuonAdamW, orthogonalize

_POLL_S = 0.5  # how often a waiting main process checks that its helpers are still alive


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def auto_processes(threads: int, batch_size: int) -> int:
    """Processes for a CPU run in one process: one per thread, no more than the batch has rows. On Linux only:
    elsewhere forking a process that has started threads is unsafe (macOS) or impossible (Windows), so
    --processes must be asked for."""
    return max(1, min(threads, batch_size)) if can_fork() and sys.platform.startswith("linux") else 1


SHM_DIR = "/dev/shm"  # where torch's shared CPU tensors live on Linux (a tmpfs, often small in containers)


def shared_memory_needed(model: nn.Module, processes: int) -> int:
    """Bytes of shared memory for `processes`: the parameters and buffers, and one gradient buffer per helper."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return params + buffers + (processes - 1) * grads


def shared_memory_free() -> int | None:
    """Free bytes in SHM_DIR (None: unknown). A tmpfs that fills up kills the writer with SIGBUS, not an error."""
    try:
        st = os.statvfs(SHM_DIR)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def shared_memory_shortfall(model: nn.Module, processes: int) -> str | None:
    """Why `processes` would not fit in shared memory (None: it fits, or the free space is unknown)."""
    need, free = shared_memory_needed(model, processes), shared_memory_free()
    if free is None or need <= 0.9 * free:
        return None
    return (f"training in {processes} processes needs {need / 2**20:,.0f} MiB of shared memory in {SHM_DIR}, "
            f"which has {free / 2**20:,.0f} MiB free")


def _share_loss(model: nn.Module, arch: str, batch: dict[str, Tensor], weight: float, smoothing: float,
                autocast: Any) -> Tensor:
    """This share's loss, weighted so that the shares' gradients add up to the micro-batch's."""
    with autocast:
        logits = forward_logits(model, arch, batch)
    return loss_fn(logits, batch["labels"], smoothing) * weight


class CPUDataParallel:
    """`processes` processes (this one and `processes - 1` forked helpers) share each micro-batch.

    Create it when the model and optimizer are final (built, resumed, in train mode): the helpers are forked
    then and see the parameters through shared memory from there on. Given a MuonAdamW `optimizer`, it shares
    out that optimizer's orthogonalization until `close`.
    """

    def __init__(self, model: nn.Module, arch: str, processes: int, smoothing: float, precision: Any,
                 threads_each: int = 1, optimizer: torch.optim.Optimizer | None = None):
        if not 2 <= processes <= MAX_PROCESSES:
            raise ValueError(f"processes={processes} must be in [2, {MAX_PROCESSES}]")
        self.model, self.arch, self.smoothing, self.precision = model, arch, smoothing, precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        if (shortfall := shared_memory_shortfall(model, processes)) is not None:
            raise TformerError(f"{shortfall}; use --processes 1 (or a larger {SHM_DIR}, e.g. docker --shm-size)")
        model.share_memory()  # in place: the optimizer keeps its references to the same Parameter objects
        self.threads_before = torch.get_num_threads()
        self.threads_each = threads_each
        self.muon = optimizer if isinstance(optimizer, MuonAdamW) else None
        self.helpers: list[tuple[Any, Any]] = []  # (process, connection)
        self.flats: list[Tensor] = []  # each helper's gradient buffer
        self.views: list[list[Tensor]] = []  # the same, as one view per parameter
        context = multiprocessing.get_context("fork")
        try:
            for rank in range(1, processes):
                flat = torch.zeros(numel).share_memory_()
                ours, theirs = context.Pipe()
                process = context.Process(target=_helper, args=(self, rank, flat, theirs, ours), daemon=True,
                                          name=f"tformer-train-{rank}")
                process.start()
                theirs.close()
                self.helpers.append((process, ours))
                self.flats.append(flat)
                self.views.append(_views(flat, self.params))
        except OSError as e:
            self.close()
            raise TformerError(f"cannot start {processes} training processes: {e.strerror or e} "
                               "(try --processes 1)") from None
        torch.set_num_threads(threads_each)
        if self.muon is not None:
            self.muon.orthogonalize_stacks = self.orthogonalize

    @property
    def processes(self) -> int:
        return len(self.helpers) + 1

    def forward_backward(self, batch: dict[str, Tensor], scale: float) -> Tensor:
        """Forward and backward of one micro-batch split by rows; gradients (times `scale`) are added to the
        parameters' `.grad`. Returns the micro-batch's loss times `scale`, detached."""
        shares = _split(batch, self.processes)
        counts = [int((s["labels"] != IGNORE_INDEX).sum()) for s in shares]
        total = sum(counts)
        if total == 0:  # nothing labelled: as the single-process loss, NaN, which the loop then reports
            return (loss_fn(forward_logits(self.model, self.arch, batch), batch["labels"]) * scale).detach()
        busy = []
        for rank, (share, count) in enumerate(zip(shares[1:], counts[1:]), start=1):
            seed = int(torch.randint(2**62, (1,)))  # from this process's generator: reproducible and resumable
            if count:
                self._send(rank, share, scale * count / total, seed)
                busy.append(rank)
        loss = torch.zeros(())
        if counts[0]:
            own = _share_loss(self.model, self.arch, shares[0], scale * counts[0] / total, self.smoothing,
                              self.precision.autocast(torch.device("cpu")))
            own.backward()
            loss += own.detach()
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for rank in busy:
            loss += self._receive(rank)["loss"]
            torch._foreach_add_(grads, self.views[rank - 1])
        return loss

    @torch.no_grad()
    def orthogonalize(self, stacks: list[Tensor], steps: int) -> list[list[Tensor]]:
        """`optim.orthogonalize_each` with each stack's matrices shared out among the processes. Call it between
        steps (the helpers' gradient buffers are reused: they carry the matrices both ways)."""
        parts = [torch.tensor_split(stack, self.processes) for stack in stacks]  # parts[stack][rank]
        layouts: dict[int, list[tuple[int, int, list[int]]]] = {}  # rank -> (stack, offset, shape) of its shares
        for rank in range(1, self.processes):
            flat, offset, layout = self.flats[rank - 1], 0, []
            for i, share in enumerate(p[rank] for p in parts):
                if not share.numel():  # a stack of fewer matrices than processes
                    continue
                if offset + share.numel() > flat.numel():
                    raise ValueError("the stacks are larger than the model's parameters")
                flat[offset:offset + share.numel()].view_as(share).copy_(share)
                layout.append((i, offset, list(share.shape)))
                offset += share.numel()
            if layout:
                self._send_header(rank, {"mode": "orthogonalize", "steps": steps, "layout": layout})
                layouts[rank] = layout
        results = [list(orthogonalize(p[0], steps).unbind(0)) for p in parts]  # tensor_split fills share 0 first
        for rank, layout in layouts.items():
            self._receive(rank)
            for i, offset, shape in layout:
                results[i] += self.flats[rank - 1][offset:offset + math.prod(shape)].view(shape).unbind(0)
        return results

    @torch.no_grad()
    def evaluate(self, batches: Any) -> tuple[float, int, int]:
        """(summed loss, correct predictions, labelled tokens) over `batches`, which the processes take in turns."""
        totals = [0.0, 0, 0]
        batches = iter(batches)
        autocast = self.precision.autocast(torch.device("cpu"))
        with eval_mode(self.model):
            while True:
                round_ = [b for _, b in zip(range(self.processes), batches)]
                if not round_:
                    break
                for rank, batch in enumerate(round_[1:], start=1):
                    self._send(rank, batch, 0.0, 0, mode="eval")
                for i, value in enumerate(batch_totals(self.model, self.arch, round_[0], autocast)):
                    totals[i] += value
                for rank in range(1, len(round_)):
                    reply = self._receive(rank)
                    for i, key in enumerate(("loss", "correct", "tokens")):
                        totals[i] += reply[key]
        return totals[0], totals[1], totals[2]

    @contextmanager
    def full_threads(self) -> Iterator[None]:
        """A context in which this process has all the threads (greedy decoding for BLEU runs here alone)."""
        torch.set_num_threads(self.threads_before)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads_each)

    def close(self) -> None:
        """Stop the helpers (closing their pipes ends them) and give this process its threads back."""
        for process, conn in self.helpers:
            conn.close()
        for process, conn in self.helpers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self.helpers = []
        torch.set_num_threads(self.threads_before)
        if self.muon is not None:
            self.muon.orthogonalize_stacks = None

    def _send(self, rank: int, share: dict[str, Tensor], weight: float, seed: int, mode: str = "train") -> None:
        names = list(share)
        self._send_header(rank, {"mode": mode, "weight": weight, "seed": seed, "tensors": [
            [n, str(share[n].dtype).removeprefix("torch."), list(share[n].shape)] for n in names]})
        try:
            for n in names:
                self.helpers[rank - 1][1].send_bytes(share[n].contiguous().numpy().tobytes())
        except OSError:
            self._lost(rank)

    def _send_header(self, rank: int, header: dict[str, Any]) -> None:
        try:
            self.helpers[rank - 1][1].send_bytes(json.dumps(header).encode())
        except OSError:
            self._lost(rank)

    def _receive(self, rank: int) -> dict[str, Any]:
        process, conn = self.helpers[rank - 1]
        try:
            while not conn.poll(_POLL_S):
                if not process.is_alive():
                    self._lost(rank)
            reply = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            self._lost(rank)
        if "error" in reply:
            raise TformerError(f"training process {rank} failed: {reply['error']}")
        return reply

    def _lost(self, rank: int) -> None:
        process = self.helpers[rank - 1][0]
        process.join(timeout=1)
        code = process.exitcode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}" if code is not None else "stopped answering")
        raise TformerError(f"training process {rank} of {self.processes} {how} (out of memory?); training "
                           "stopped, the last checkpoint is kept (then --resume auto, or --processes 1)")


def _split(batch: dict[str, Tensor], n: int) -> list[dict[str, Tensor]]:
    """`n` shares of a batch's rows (sizes differing by at most one; some empty if it has fewer rows)."""
    parts = {k: torch.tensor_split(v, n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _helper(parallel: CPUDataParallel, rank: int, flat: Tensor, conn: Any, main_end: Any) -> None:
    """A forked helper: serve shares until the pipe closes; never returns into the parent's code."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close_inherited_locks()  # the run stays locked by the main process alone
        torch.set_num_threads(parallel.threads_each)
        # copies of the main process's pipe ends, this one's and earlier helpers': held here, they would keep a
        # pipe open after the main process closes it, and its helper would never see the end
        main_end.close()
        for _, ours in parallel.helpers:
            ours.close()
        _serve(parallel, flat, conn)
    except BaseException:  # noqa: BLE001 - a helper must never unwind into the parent's code
        code = 1
    finally:
        os._exit(code)  # no flushing of the parent's buffers, no atexit handlers


def _serve(parallel: CPUDataParallel, flat: Tensor, conn: Any) -> None:
    params = parallel.params
    autocast = parallel.precision.autocast(torch.device("cpu"))
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            share = {}
            for name, dtype, shape in header.get("tensors", ()):
                data = bytearray(conn.recv_bytes())
                share[name] = torch.frombuffer(data, dtype=getattr(torch, dtype)).view(shape) if data \
                    else torch.empty(shape, dtype=getattr(torch, dtype))
        except (EOFError, OSError):
            return  # the main process closed the pipe (or is gone)
        try:
            if header["mode"] == "orthogonalize":
                with torch.no_grad():
                    for _, offset, shape in header["layout"]:
                        x = flat[offset:offset + math.prod(shape)].view(shape)
                        x.copy_(orthogonalize(x, header["steps"]))
                reply = {}
            elif header["mode"] == "eval":
                with torch.no_grad(), eval_mode(parallel.model):
                    loss, correct, tokens = batch_totals(parallel.model, parallel.arch, share, autocast)
                reply = {"loss": loss, "correct": correct, "tokens": tokens}
            else:
                torch.manual_seed(header["seed"])
                loss = _share_loss(parallel.model, parallel.arch, share, header["weight"], parallel.smoothing,
                                   autocast)
                grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                torch.cat([g.reshape(-1) for g in grads], out=flat)
                reply = {"loss": loss.item()}
        except Exception as e:  # noqa: BLE001 - reported to the main process, which stops with one line
            last = traceback.extract_tb(e.__traceback__)[-1:]
            where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
            reply = {"error": f"{type(e).__name__}: {e}{where}"}
        conn.send_bytes(json.dumps(reply).encode())
