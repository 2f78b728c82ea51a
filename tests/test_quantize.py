"""int8 weights (tformer/generation/quantize.py): the numbers, the kernel, and the CLI paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tformer.checkpoint import save_checkpoint
from tformer.cli import app
from tformer.data.tokenizer import char_tokenizer
from tformer.generation import quantize as q
from tformer.generation.load import load
from tformer.model.transformer import build_model

runner = CliRunner()
ALPHABET = "abcdefgh \n"


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A random tiny decoder (tied embeddings, biases) with a character tokenizer."""
    torch.manual_seed(0)
    tok = char_tokenizer(ALPHABET)
    root = tmp_path_factory.mktemp("decoder")
    cfg = tiny_config(vocab_size=tok.get_vocab_size())
    save_checkpoint(root, build_model(cfg), cfg)
    tok.save(str(root / "tokenizer.json"))
    return root


def test_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(40, 24) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    w[3] = 0  # an all-zero row stays exact
    qw, scale = q.quantize_weight(w)
    assert qw.dtype == torch.int8 and scale.shape == (40,) and qw.abs().max() <= 127
    err = (q.dequantize(qw, scale) - w).abs()
    assert (err <= w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5) + 1e-12).all()
    assert err[3].max() == 0


def test_quantizing_a_few_rows_at_a_time_equals_the_whole_matrix_at_once(monkeypatch):
    w = torch.randn(37, 24) * torch.logspace(-2, 1, 37)[:, None]
    w[5] = 0
    monkeypatch.setattr(q, "QUANTIZE_CHUNK", 24 * 4)  # chunks of 4 rows, the last one of 1
    qw, scale = q.quantize_weight(w)
    expect_scale = w.abs().amax(1) / 127
    expect_scale[5] = 1.0
    assert torch.equal(scale, expect_scale)
    assert torch.equal(qw, torch.round(w / expect_scale[:, None]).clamp(-127, 127).to(torch.int8))


@pytest.mark.parametrize("layout", ["bytes", "words"])
@pytest.mark.parametrize("out, d_in", [(128, 48), (70, 33)])  # a whole number of blocks, and a padded one
def test_packed_matvec_equals_the_dequantized_product(out, d_in, layout):
    w, x = torch.randn(out, d_in), torch.randn(1, d_in)
    qw, scale = q.quantize_weight(w)
    packed = q.pack(qw, layout)
    blocks = -(-out // q.BLOCK)
    assert packed.shape == ((blocks, d_in, q.BLOCK) if layout == "bytes" else (blocks, d_in, q.BLOCK // 4))
    padded = F.pad(scale, (0, blocks * q.BLOCK - out))
    got = q._matvec(x, packed, padded)[:, :out]  # the math the compiled kernel runs
    torch.testing.assert_close(got, x @ q.dequantize(qw, scale).t(), rtol=1e-5, atol=1e-5)


def test_kernel_layout_follows_the_vector_width(monkeypatch):
    import torch._inductor.cpu_vec_isa as isa

    for bits, want in [(512, "bytes"), (256, "words"), (0, "words")]:  # 0: inductor found no usable ISA
        monkeypatch.setattr(q, "_layout", None)
        monkeypatch.setattr(isa, "pick_vec_isa", lambda bits=bits: type("ISA", (), {"bit_width": lambda s: bits})())
        assert q.kernel_layout() == want


@pytest.mark.parametrize("layout", ["bytes", "words"])
def test_int8_linear_kernel_equals_a_naive_dequantized_matmul(monkeypatch, layout):
    torch.manual_seed(1)
    w, b = torch.randn(96, 64), torch.randn(96)  # 96 rows: the last block padded
    monkeypatch.setattr(q, "MIN_KERNEL_SIZE", 0)  # the compiled kernel on a small matrix
    monkeypatch.setattr(q, "_layout", layout)  # either layout compiles on any x86 CPU
    m = q.Int8Linear.from_weight(w, b)
    assert m.use_kernel and m.packed.size(0) == 2 and m.padded_scale.numel() == 2 * q.BLOCK
    naive = lambda x: x @ (m.weight.float() * m.weight_scale[:, None]).t() + b
    for shape in [(1, 1, 64), (2, 1, 64), (3, 5, 64)]:  # one row (kernel), two rows (kernel twice), many (dequantize)
        x = torch.randn(*shape)
        torch.testing.assert_close(m(x), naive(x), rtol=1e-5, atol=1e-5)


def test_kernels_compile_before_the_decode_clock(monkeypatch, decoder_dir):
    from tformer.generation.config import GenerateConfig
    from tformer.generation.generate import generate

    monkeypatch.setattr(q, "MIN_KERNEL_SIZE", 0)  # the tiny model's matrices get kernels
    monkeypatch.setattr(q, "_kernels", {})
    loaded = load(decoder_dir, device="cpu", quantize="int8")
    cfg = GenerateConfig(max_new_tokens=4, temperature=0)
    first = generate(loaded.model, loaded.tokenizer, ["abc"], cfg).timings
    assert first.compile_s is not None and first.compile_s > 0  # compiled, reported apart from decode_s
    ready = len(q._kernels)
    assert ready >= 2  # the layers' shapes and the tied head's
    assert q.compile_kernels(loaded.model) is None  # nothing left to compile
    again = generate(loaded.model, loaded.tokenizer, ["abcd"], cfg).timings
    assert again.compile_s is None and len(q._kernels) == ready  # no kernel compiled inside the timed steps
    monkeypatch.setattr(q, "_kernels", {})
    beam = generate(loaded.model, loaded.tokenizer, ["abc"], GenerateConfig(max_new_tokens=4, beams=2)).timings
    assert beam.compile_s is not None and len(q._kernels) == ready  # beam search compiles before its clock too


def test_without_a_compiled_kernel_the_product_falls_back_to_eager(monkeypatch):
    import torch._inductor

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(q, "MIN_KERNEL_SIZE", 0)
    monkeypatch.setattr(q, "_kernels", {})
    monkeypatch.setattr(q, "_kernel_failed", None)
    monkeypatch.setattr(torch._inductor, "compile", no_compiler)
    m = q.Int8Linear.from_weight(torch.randn(96, 64), torch.randn(96))
    with pytest.warns(UserWarning, match="eager fallback"):
        assert q.compile_kernels(m) is None
    assert q._kernel_failed.startswith("RuntimeError") and not q._kernels
    x = torch.randn(1, 64)
    torch.testing.assert_close(m(x), x @ (m.weight.float() * m.weight_scale[:, None]).t() + m.bias)


def test_generate_cli_with_int8(decoder_dir):
    args = ["generate", "-c", str(decoder_dir), "-p", "abc", "-n", "8", "--temperature", "0", "--json"]
    fp32 = runner.invoke(app, args)
    int8 = runner.invoke(app, args + ["--quantize", "int8"])
    assert fp32.exit_code == 0 and int8.exit_code == 0, int8.output
    ids = [json.loads(r.stdout)["completions"][0]["token_ids"] for r in (fp32, int8)]
    assert len(ids[1]) == 8


def test_export_int8_then_load_equals_quantizing_at_load(decoder_dir, tmp_path):
    out = tmp_path / "int8"
    r = runner.invoke(app, ["export", str(decoder_dir), "--out", str(out), "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    stored = load_file(str(out / "model.safetensors"))
    assert any(t.dtype == torch.int8 for t in stored.values())
    assert json.loads((out / "config.json").read_text())["quantization"]["method"] == "int8"
    at_load, saved = load(decoder_dir, device="cpu", quantize="int8"), load(out, device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(saved.model(ids).logits, at_load.model(ids).logits, rtol=0, atol=0)
    ev = runner.invoke(app, ["eval", "-c", str(out), str(decoder_dir / "tokenizer.json"), "--json"])
    assert ev.exit_code == 0, ev.output


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_bad_quantize_value_is_one_error_line(decoder_dir, tmp_path, command):
    args = {"generate": ["generate", "-c", str(decoder_dir), "-p", "ab"],
            "eval": ["eval", "-c", str(decoder_dir), str(decoder_dir / "tokenizer.json")],
            "export": ["export", str(decoder_dir), "--out", str(tmp_path / "x")]}[command]
    r = runner.invoke(app, args + ["--quantize", "int4"])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "int8" in lines[0], r.output


def test_int8_on_another_dtype_is_one_error_line(decoder_dir):
    r = runner.invoke(app, ["generate", "-c", str(decoder_dir), "-p", "ab", "--quantize", "int8", "--dtype", "bf16"])
    assert r.exit_code != 0 and r.output.strip().startswith("error:") and "float32" in r.output


@pytest.mark.parametrize("tamper", ["scale_shape", "scale_dtype", "weight_dtype", "missing_scale"])
def test_tampered_quantized_checkpoint_is_one_error_line(decoder_dir, tmp_path, tamper):
    out = tmp_path / "int8"
    assert runner.invoke(app, ["export", str(decoder_dir), "--out", str(out), "--quantize", "int8"]).exit_code == 0
    tensors = load_file(str(out / "model.safetensors"))
    scale = next(k for k in tensors if k.endswith("weight_scale"))
    weight = scale.removesuffix("_scale")
    if tamper == "scale_shape":
        tensors[scale] = tensors[scale][:-1].clone()
    elif tamper == "scale_dtype":
        tensors[scale] = tensors[scale].to(torch.int8)
    elif tamper == "weight_dtype":
        tensors[weight] = tensors[weight].float()
    else:
        del tensors[scale]
    save_file(tensors, str(out / "model.safetensors"))
    r = runner.invoke(app, ["generate", "-c", str(out), "-p", "ab", "-n", "2"])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]])
def test_exporting_an_int8_checkpoint_again_is_one_error_line(decoder_dir, tmp_path, extra):
    out = tmp_path / "int8"
    assert runner.invoke(app, ["export", str(decoder_dir), "--out", str(out), "--quantize", "int8"]).exit_code == 0
    r = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "again")] + extra)
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and "int8 weights" in lines[0], r.output
