"""The optimizers (AdamW; Muon for the hidden weight matrices with AdamW for the rest) and the learning-rate
schedules."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as functional_adamw

from tformer.training.config import TrainConfig

# -- schedules ----------------------------------------------------------------------------------

def learning_rate(step: int, cfg: TrainConfig, total_steps: int, progress: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup to `lr`, then cosine decay to lr * min_lr_ratio at the last step, or sooner:
      `progress` (0 to 1, e.g. the share of a time budget spent) moves the decay on when it is ahead.
    noam: the paper's (section 5.3) d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), scaled so its peak
      at s = warmup equals `lr`; lr = d_model^-0.5 * warmup^-0.5 gives the paper's formula exactly.
    constant: linear warmup, then `lr`.
    Parameter groups with a peak of their own (Muon's `muon_lr`) follow the same curve, scaled.
    """
    s = step + 1
    if cfg.schedule == "noam":
        return cfg.lr * min(s ** -0.5, s * cfg.warmup ** -1.5) / cfg.warmup ** -0.5
    if cfg.warmup and s <= cfg.warmup:
        return cfg.lr * s / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, max(progress, (s - cfg.warmup) / max(1, total_steps - cfg.warmup)))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, cfg: TrainConfig) -> None:
    """Set the scheduled rate `lr` (on the scale of cfg.lr) in every parameter group, scaled to the group's peak."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("peak_lr", cfg.lr) / cfg.lr


# -- parameter groups -----------------------------------------------------------------------------

def _is_embedding(name: str) -> bool:
    return any(part in f".{name}" for part in (".tok.", ".pos.", ".token_type."))


def _hidden_matrix(name: str, p: Tensor) -> bool:
    """A weight matrix inside the stacks (attention and feed-forward): what Muon orthogonalizes. Embeddings and
    the output head are not hidden layers (their rows are per-token vectors, not a linear map between widths)."""
    return p.dim() == 2 and not _is_embedding(name) and not name.endswith("lm_head.weight")


def _plain_tensors(params: list[Tensor]) -> bool:
    """Fused kernels take plain tensors only (not FSDP's DTensor shards)."""
    return all(type(p) is nn.Parameter or type(p) is Tensor for p in params)


def skip_dynamo_import() -> None:
    """Let torch.optim's methods run without importing torch._dynamo, in a process that compiles nothing.

    torch.optim.Optimizer wraps `add_param_group`, `zero_grad` and `(load_)state_dict` in
    `torch._disable_dynamo`, which imports torch._dynamo (seconds, in a run that may last a minute) on
    their first call, only to mark them as never to be compiled. The wrapper looks for that mark on the
    function first; setting it to the function itself skips the import. Nothing of the optimizer is ever
    compiled here (--compile compiles the model alone), and a torch whose wrapper differs is left as it is.
    """
    if "torch._dynamo" in sys.modules:
        return
    wrapper_code = torch._disable_dynamo(lambda: None).__code__
    for method in vars(torch.optim.Optimizer).values():
        inner = getattr(method, "__wrapped__", None)
        if getattr(method, "__code__", None) is wrapper_code and inner is not None:
            setattr(inner, "__dynamo_disable", inner)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices only (not on norms, biases or embeddings); with
    `cfg.optimizer == "muon"`, Muon for the hidden weight matrices and AdamW for the rest.

    AdamW runs fused (one kernel over all tensors) on the CPU and CUDA: far fewer small operations per step
    than the per-tensor loop, and the same update.
    """
    if not cfg.compile:
        skip_dynamo_import()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if cfg.optimizer == "muon" and _hidden_matrix(n, p)]
    hidden_ids = {id(p) for p in hidden}
    decay, no_decay = [], []
    for n, p in named:
        if id(p) not in hidden_ids:
            (decay if p.dim() >= 2 and not _is_embedding(n) else no_decay).append(p)
    fused = device.type in ("cpu", "cuda") and _plain_tensors([p for _, p in named])
    adamw_groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    for g in adamw_groups:
        g["peak_lr"] = cfg.lr
    if not hidden:
        return torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return MuonAdamW([{"params": hidden, "weight_decay": cfg.weight_decay, "lr": cfg.muon_lr, "peak_lr": cfg.muon_lr}],
                     adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# -- Muon -------------------------------------------------------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al. (2024): steepest slope at zero


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """An approximation of U V^T for g = U S V^T by a quintic Newton-Schulz iteration (singular values end near 1,
    not exactly 1, which is what Muon needs); g may be a stack (n, rows, cols) of matrices of one shape, done in
    batched products. Kept in g's dtype: fp32 on the CPU, where bf16 products are slow on most x86 cores and
    would round differently on different ones."""
    a, b, c = NS_COEFFICIENTS
    wide = g.size(-2) <= g.size(-1)
    x = g if wide else g.mT  # iterate on the side whose Gram matrix is smaller
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral <= Frobenius <= 1
    mm, addmm = (torch.matmul, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    for _ in range(steps):
        gram = mm(x, x.mT)
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum, then the update orthogonalized by Newton-Schulz; Jordan et al., 2024) for the parameter
    groups given as `muon_groups`, AdamW for `adamw_groups`, as one optimizer: one state, saved and resumed by
    parameter name like AdamW's alone.

    Muon's step for a matrix W (rows x cols): B = mu B + G; U = orth(G + mu B) (Nesterov);
    W = W (1 - lr wd) - lr sqrt(max(1, rows / cols)) U.
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *, lr: float,
                 betas: tuple[float, float], fused: bool, momentum: float = 0.95, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=fused or None,
                        decoupled_weight_decay=True, momentum=momentum, ns_steps=ns_steps)
        groups = [{**g, "muon": True} for g in muon_groups] + [{**g, "muon": False} for g in adamw_groups]
        super().__init__(groups, defaults)
        # what orthogonalizes the stacks of a step (`orthogonalize_each` when None): training on the CPU in
        # several processes shares them out (CPUDataParallel.orthogonalize)
        self.orthogonalize_stacks: Callable[[list[Tensor], int], list[list[Tensor]]] | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW takes no closure")
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """torch's functional AdamW on one group, its state kept as torch.optim.AdamW keeps it. (AdamW.step itself
        would import torch._dynamo on its first call: seconds of a short run.)"""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group["fused"]
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                             fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, group: dict[str, Any]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        # matrices of one shape, up to a transpose, are orthogonalized as one stack, each turned wide (rows <= cols)
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(tuple(sorted(p.shape)), []).append(p)
        stacks = []
        for params in by_shape.values():
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            stacks.append(torch.stack([n if n.size(0) <= n.size(1) else n.mT for n in nesterov]))  # (n, rows, cols)
        orthogonalized = (self.orthogonalize_stacks or orthogonalize_each)(stacks, group["ns_steps"])
        for params, updates in zip(by_shape.values(), orthogonalized):
            updates = [u if u.shape == p.shape else u.mT for p, u in zip(params, updates)]
            torch._foreach_mul_(updates, [-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 for p in params])
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, updates)


def orthogonalize_each(stacks: list[Tensor], steps: int) -> list[list[Tensor]]:
    """Each stack (n, rows, cols) orthogonalized, as a list of its n matrices."""
    return [list(orthogonalize(stack, steps).unbind(0)) for stack in stacks]
