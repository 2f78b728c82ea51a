"""The optimizers: fused AdamW against PyTorch's per-tensor loop, Muon's orthogonalization against the SVD and its
step against a hand computation, parameter groups, learning rates, and bad options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from tformer.cli import app
from tformer.config import ModelConfig
from tformer.errors import ConfigError
from tformer.model.transformer import build_model
from tformer.training.config import TrainConfig
from tformer.training.optim import MuonAdamW, learning_rate, make_optimizer, orthogonalize, set_learning_rate

CPU = torch.device("cpu")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny", vocab_size=50, d_model=32, n_heads=2, n_kv_heads=2, d_ff=48,
                                               n_decoder_layers=2, max_seq_len=16, bias=True))


def random_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def mirrored_groups(ours: torch.nn.Module, reference: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """`groups` of `ours` as parameter groups of the same parameters (by name) of `reference`."""
    by_name, names = dict(reference.named_parameters()), {id(p): n for n, p in ours.named_parameters()}
    return [{"params": [by_name[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in groups]


def step_both(models: tuple[torch.nn.Module, torch.nn.Module], optimizers: tuple, steps: int = 3) -> None:
    """`steps` optimizer steps of each model on the same random gradients."""
    for step in range(steps):
        for model, opt in zip(models, optimizers):
            random_grads(model, step)
            opt.step()


def test_adamw_is_fused_on_the_cpu_and_equals_the_per_tensor_loop():
    ours, reference = tiny_model(), tiny_model()
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = make_optimizer(ours, cfg, CPU)
    assert isinstance(opt, torch.optim.AdamW) and all(g["fused"] for g in opt.param_groups)
    slow = torch.optim.AdamW(mirrored_groups(ours, reference, opt.param_groups), lr=1e-2, betas=(cfg.beta1, cfg.beta2),
                             foreach=False)
    step_both((ours, reference), (opt, slow))
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_orthogonalize_approximates_u_v_transpose():
    g = torch.randn(24, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for matrix in (g, g.T):  # wide and tall
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        o = orthogonalize(matrix)
        assert o.shape == matrix.shape
        singular = torch.linalg.svdvals(o)
        assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic's band around 1, not exactly 1
        # the same singular vectors: projecting onto U V^T recovers the singular values on the diagonal
        diag = torch.diagonal(u.T @ o @ vh.T)
        assert torch.allclose(diag, singular.sort(descending=True).values, atol=0.35)
        assert ((u @ vh) * o).sum() / (o.norm() * (u @ vh).norm()) > 0.97


def test_a_stack_of_matrices_is_orthogonalized_as_each_alone():
    stack = torch.randn(3, 24, 80, generator=torch.Generator().manual_seed(2))
    for s in (stack, stack.mT):  # wide and tall
        together = orthogonalize(s)
        for i in range(3):
            torch.testing.assert_close(together[i], orthogonalize(s[i]), rtol=1e-4, atol=1e-5)


def test_muon_step_is_the_hand_computation_and_the_rest_is_adamw():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1)
    opt = make_optimizer(model, cfg, CPU)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "decoder.layers.0.self_attn.qkv_proj.weight" in muon and "decoder.layers.1.ffn.w2.weight" in muon
    assert {"embed.tok.weight", "decoder.layers.0.ffn.w1.bias", "decoder.layers.0.self_attn_norm.weight"} <= adamw
    assert not muon & adamw and muon | adamw == set(names.values())

    w = model.decoder.layers[0].ffn.w1.weight  # (48, 32): tall
    before = w.detach().clone()
    random_grads(model, 0)
    grad = w.grad.clone()
    opt.step()
    update = orthogonalize(grad + 0.95 * grad)  # first step: momentum buffer = grad; Nesterov look-ahead
    expected = before * (1 - 0.05 * 0.1) - 0.05 * (48 / 32) ** 0.5 * update
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(opt.state[w]["momentum_buffer"], grad)


def test_muons_adamw_groups_step_and_save_as_torchs_adamw():
    ours, reference = tiny_model(), tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.1)
    opt = make_optimizer(ours, cfg, CPU)
    by_name = dict(reference.named_parameters())
    names = {id(p): n for n, p in ours.named_parameters()}
    adamw_groups = [g for g in opt.param_groups if not g["muon"]]
    torch_adamw = torch.optim.AdamW(mirrored_groups(ours, reference, adamw_groups), lr=1e-2,
                                    betas=(cfg.beta1, cfg.beta2), fused=True)
    step_both((ours, reference), (opt, torch_adamw))
    for g in adamw_groups:
        for p in g["params"]:
            q = by_name[names[id(p)]]
            assert torch.equal(p, q), names[id(p)]
            assert opt.state[p].keys() == torch_adamw.state[q].keys()
            for key, value in opt.state[p].items():
                other = torch_adamw.state[q][key]
                assert value.dtype == other.dtype and torch.equal(value, other), (names[id(p)], key)


def test_a_cpu_run_does_not_import_torch_dynamo(tmp_path):
    # torch.optim's classes import it (seconds) on their first step or zero_grad; nothing here is compiled
    script = (
        "import sys, torch\n"
        "from tformer.config import ModelConfig\n"
        "from tformer.model.transformer import build_model\n"
        "from tformer.training.config import TrainConfig\n"
        "from tformer.training.optim import make_optimizer\n"
        "model = build_model(ModelConfig.from_preset('tiny', vocab_size=50, d_model=32, n_heads=2, d_ff=48,\n"
        "                                            n_decoder_layers=2, max_seq_len=16))\n"
        "opt = make_optimizer(model, TrainConfig(optimizer='muon'), torch.device('cpu'))\n"
        "model(torch.randint(50, (2, 8))).logits.sum().backward()\n"
        "opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_each_group_follows_the_schedule_scaled_to_its_peak():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.04, warmup=10)
    opt = make_optimizer(model, cfg, CPU)
    set_learning_rate(opt, learning_rate(4, cfg, 100), cfg)  # half way through the warmup
    rates = {g["muon"]: g["lr"] for g in opt.param_groups}
    assert rates[True] == pytest.approx(0.04 * 5 / 10) and rates[False] == pytest.approx(2e-3 * 5 / 10)


def test_bad_optimizer_options_are_one_error_line(tmp_path):
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="fsdp"):
        TrainConfig(optimizer="muon", fsdp=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 200)
    result = CliRunner().invoke(app, ["train", str(corpus), "--optimizer", "lion", "--out", str(tmp_path / "r")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(errors) == 1 and "adamw" in errors[0] and "muon" in errors[0]
    assert not (tmp_path / "r").exists()
