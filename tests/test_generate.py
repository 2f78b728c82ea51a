"""Generation: parity with transformers, cache vs recompute, sampling filters, beam search, fill-mask,
streaming, and the `tformer generate` command."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import tformer.generation.cpu_decoding
from tformer.checkpoint import save_checkpoint
from tformer.cli import app
from tformer.data.tokenizer import byte_alphabet
from tformer.errors import ConfigError, TformerError
from tformer.generation.beam import beam_search
from tformer.generation.config import GenerateConfig
from tformer.generation.cpu_decoding import SplitLinear, cpu_decoding_layout
from tformer.generation.fill_mask import fill_mask
from tformer.generation.generate import generate, sample_continuation
from tformer.generation.load import load
from tformer.generation.prompts import read_prompts
from tformer.generation.sampling import process_logits, sample_logits
from tformer.generation.stream import Row
from tformer.model.transformer import build_model

transformers = pytest.importorskip("transformers")

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]
PAD, BOS, EOS, MASK = 0, 1, 2, 4
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "héllo wörld, 你好世界 🙂 emoji and ünïcode"] * 5
PROMPTS = ["the cat", "a dog ran in the park and the cat sat", "h", "你好 the mat 🙂"]  # different lengths


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE trained on a few sentences, with our five special tokens at ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def vocab(tokenizer_file):
    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_file, vocab):
    """A random transformers GPT-2 saved with save_pretrained, plus our tokenizer.json."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=96, n_embd=48, n_layer=2, n_head=4,
                                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random norms and biases, so a mistake in either shows in the logits
        for name, p in hf.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return path


def make_checkpoint(root, tokenizer_file, vocab, **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=vocab, **overrides)
    save_checkpoint(root, build_model(cfg), cfg)
    (root / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return root


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory, tokenizer_file, vocab):
    return make_checkpoint(tmp_path_factory.mktemp("s2s"), tokenizer_file, vocab, arch="encoder-decoder")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tokenizer_file, vocab):
    return make_checkpoint(tmp_path_factory.mktemp("enc"), tokenizer_file, vocab, arch="encoder",
                           pos_encoding="learned", norm_placement="pre")


GREEDY = GenerateConfig(max_new_tokens=50, temperature=0)


def hf_greedy(hf_dir, tok, prompts, n):
    """transformers' greedy generate on left-padded prompts; each row cut at its <eos>."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    P = max(map(len, ids))
    inp = torch.tensor([[PAD] * (P - len(i)) + i for i in ids])
    attn = torch.tensor([[0] * (P - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        out = hf.generate(inp, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                          eos_token_id=EOS)[:, P:].tolist()
    return [row[:row.index(EOS)] if EOS in row else row for row in out]


# -- decoder parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["", "split"])
@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["batch1", "batch4"])
def test_greedy_equals_transformers_token_for_token(gpt2_dir, prompts, split, monkeypatch):
    loaded = load(gpt2_dir, device="cpu")
    if split:  # products split over 2 threads, as on the CPU for larger models (cpu_decoding.py)
        monkeypatch.setattr(tformer.generation.cpu_decoding, "MIN_SPLIT_SIZE", 0)
        cpu_decoding_layout(loaded.model, threads=2)
        assert any(isinstance(m, SplitLinear) for m in loaded.model.modules())
    ours = generate(loaded.model, loaded.tokenizer, prompts, GREEDY)
    ref = hf_greedy(gpt2_dir, loaded.tokenizer, prompts, 50)
    assert [c.token_ids for c in ours.completions] == ref
    assert sum(len(r) for r in ref) > 40 * len(prompts)  # mostly full-length rows, not early <eos>
    for c, r in zip(ours.completions, ref):
        assert c.finish_reason == ("length" if len(r) == 50 else "eos")


@pytest.mark.parametrize("variant", [
    dict(pos_encoding="learned", norm_placement="pre"),
    dict(pos_encoding="rope", n_kv_heads=2),
    dict(arch="encoder-decoder"),
])
def test_cache_and_no_cache_give_identical_ids(tmp_path, tokenizer_file, vocab, variant):
    # max_seq_len 32 with prompts up to 15 tokens and 60 new tokens: the window slides several times
    loaded = load(make_checkpoint(tmp_path, tokenizer_file, vocab, max_seq_len=32, **variant), device="cpu")
    for cfg in (GenerateConfig(max_new_tokens=60, temperature=0),
                GenerateConfig(max_new_tokens=60, temperature=1.2, top_k=0, seed=5, repetition_penalty=1.3)):
        cached = generate(loaded.model, loaded.tokenizer, PROMPTS, cfg)
        oracle = generate(loaded.model, loaded.tokenizer, PROMPTS, GenerateConfig(**{**vars(cfg), "use_cache": False}))
        assert [c.token_ids for c in cached.completions] == [c.token_ids for c in oracle.completions]
        assert max(len(c.token_ids) for c in cached.completions) > 32  # it did go past the context
    if variant.get("arch") != "encoder-decoder":
        assert any("slid" in n for n in cached.notices)


def test_cpu_decoding_layout_keeps_values_and_ids(gpt2_dir):
    from tformer.checkpoint import load_checkpoint

    plain = load_checkpoint(gpt2_dir).model
    loaded = load(gpt2_dir, device="cpu")  # on the CPU, load() stores the matrices transposed
    for (name, a), b in zip(plain.named_parameters(), loaded.model.parameters()):
        assert torch.equal(a, b), name
    w = loaded.model.embed.tok.weight  # tied: also the output projection
    assert w.stride() == (1, w.size(0)) and plain.embed.tok.weight.is_contiguous()
    idx = torch.tensor([loaded.tokenizer.encode(PROMPTS[1]).ids])
    with torch.no_grad():
        full = plain(idx).logits
        last = loaded.model(idx, last_only=True).logits  # (1, 1, V): the last position's only
    assert last.shape == (1, 1, full.size(-1)) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    tok = loaded.tokenizer
    assert [c.token_ids for c in generate(plain, tok, PROMPTS, GREEDY).completions] == \
        [c.token_ids for c in generate(loaded.model, tok, PROMPTS, GREEDY).completions]


def test_long_prompt_keeps_its_last_tokens_and_says_so(tmp_path, tokenizer_file, vocab):
    loaded = load(make_checkpoint(tmp_path, tokenizer_file, vocab, max_seq_len=16), device="cpu")
    long = "the cat sat on the mat " * 10
    result = generate(loaded.model, loaded.tokenizer, [long], GenerateConfig(max_new_tokens=5, temperature=0))
    assert result.completions[0].prompt_tokens == 16
    assert any("keeping its last 16" in n for n in result.notices)
    tail = loaded.tokenizer.encode(long).ids[-16:]
    alone = generate(loaded.model, loaded.tokenizer, [loaded.tokenizer.decode(tail)],
                     GenerateConfig(max_new_tokens=5, temperature=0))
    assert alone.completions[0].token_ids == result.completions[0].token_ids


# -- sampling -------------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_seed(gpt2_dir):
    loaded = load(gpt2_dir, device="cpu")
    cfg = GenerateConfig(max_new_tokens=30, temperature=1.0, top_k=0, seed=123, num_samples=2)
    a = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], cfg)
    b = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], cfg)
    c = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], GenerateConfig(**{**vars(cfg), "seed": 124}))
    ids = lambda r: [x.token_ids for x in r.completions]  # noqa: E731
    assert ids(a) == ids(b) and a.seed == 123
    assert ids(a) != ids(c)
    assert ids(a)[0] != ids(a)[1]  # two samples of one prompt differ
    assert generate(loaded.model, loaded.tokenizer, PROMPTS[:1], GenerateConfig(temperature=1.0)).seed is not None


LOGITS = torch.tensor([[4.0, 3.0, 2.5, 1.0, 0.0, -1.0, -3.0, 2.9]])  # softmax: 0.51, 0.19, 0.11, 0.02, ...


@pytest.mark.parametrize("options, allowed", [
    (dict(top_k=3), {0, 1, 7}),
    (dict(top_p=0.7), {0, 1, 7}),  # 0.51 + 0.19 < 0.7, so the third token (0.17) is kept too
    (dict(top_p=0.5), {0}),  # the first token alone reaches 0.5
    (dict(min_p=0.3), {0, 1, 7}),  # p >= 0.3 x 0.51
    (dict(min_p=0.3, temperature=0.5), {0}),  # a colder distribution: the others fall under the threshold
    (dict(top_k=2, top_p=0.99), {0, 1}),
    (dict(top_k=5, min_p=0.25, top_p=0.9), {0, 1, 7}),  # top-p keeps 4 tokens; min-p drops the 4th
])
def test_filters_never_choose_outside_the_allowed_set(options, allowed):
    cfg = GenerateConfig(**{"temperature": 1.0, "top_k": 0, **options})
    kept = set(torch.isfinite(process_logits(LOGITS, cfg)).nonzero()[:, 1].tolist())
    assert kept == allowed
    g = torch.Generator().manual_seed(0)
    chosen = set(sample_logits(LOGITS.repeat(2000, 1), cfg, generator=g).tolist())
    assert chosen <= allowed and len(chosen) == len(allowed)  # only allowed tokens, and all of them in time


def test_temperature_zero_is_argmax_whatever_else_is_set():
    logits = torch.randn(16, 50)
    cfg = GenerateConfig(temperature=0, top_k=3, top_p=0.1, min_p=0.9)
    assert torch.equal(sample_logits(logits, cfg, generator=torch.Generator().manual_seed(1)), logits.argmax(-1))


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = process_logits(logits, GenerateConfig(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.1), "--temperature=-0.1 must be >= 0"),
    (dict(top_p=0.0), "--top-p=0.0 must be in (0, 1]"),
    (dict(top_p=1.01), "--top-p"),
    (dict(top_k=-1), "--top-k=-1 must be an integer >= 0"),
    (dict(min_p=1.5), "--min-p=1.5 must be in [0, 1]"),
    (dict(max_new_tokens=0), "--max-new-tokens=0 must be an integer >= 1"),
    (dict(repetition_penalty=0), "--repetition-penalty"),
    (dict(beams=0), "--beams"),
    (dict(stop=("",)), "stop strings"),
])
def test_config_rejects_out_of_range_options(options, message):
    with pytest.raises(ConfigError) as e:
        GenerateConfig(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- beam search ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["seq2seq", "decoder"])
def test_one_beam_equals_greedy(which, seq2seq_dir, gpt2_dir):
    loaded = load(seq2seq_dir if which == "seq2seq" else gpt2_dir, device="cpu")
    greedy = generate(loaded.model, loaded.tokenizer, PROMPTS, GenerateConfig(max_new_tokens=20, temperature=0))
    beam = beam_search(loaded.model, loaded.tokenizer, PROMPTS, GenerateConfig(max_new_tokens=20, beams=1))
    assert [c.token_ids for c in beam.completions] == [c.token_ids for c in greedy.completions]
    assert [c.finish_reason for c in beam.completions] == [c.finish_reason for c in greedy.completions]


def rescore(model, src_ids, out_ids):
    """Teacher-forced sum of log-probs of <bos> + out (+ <eos> when it ended there)."""
    src = torch.tensor([src_ids])
    tgt = torch.tensor([[BOS] + out_ids[:-1]])
    with torch.no_grad():
        logp = model(src, tgt).logits.float().log_softmax(-1)[0]
    return float(logp[torch.arange(len(out_ids)), torch.tensor(out_ids)].sum())


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_returns_the_best_score_under_the_length_penalty(seq2seq_dir, length_penalty):
    loaded = load(seq2seq_dir, device="cpu")
    cfg = GenerateConfig(max_new_tokens=12, beams=4, num_samples=2, length_penalty=length_penalty)
    result = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], cfg)
    assert len(result.completions) == 4  # 2 prompts x 2 returned beams
    greedy = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], GenerateConfig(max_new_tokens=12, temperature=0))
    for i, prompt in enumerate(PROMPTS[:2]):
        best, second = result.completions[2 * i], result.completions[2 * i + 1]
        beams = best.beams
        assert len(beams) == 4 and best.score == max(b["score"] for b in beams) == beams[0]["score"]
        assert second.score == beams[1]["score"] <= best.score
        src_ids = loaded.tokenizer.encode(prompt).ids
        for b in beams:  # each reported score is its hypothesis' log-prob / length ** length_penalty
            out = b["token_ids"] + ([EOS] if b["finish_reason"] == "eos" else [])
            expected = rescore(loaded.model, src_ids, out) / len(out) ** length_penalty
            assert b["score"] == pytest.approx(expected, abs=1e-4)
        g = greedy.completions[i].token_ids + ([EOS] if greedy.completions[i].finish_reason == "eos" else [])
        greedy_score = rescore(loaded.model, src_ids, g) / len(g) ** length_penalty
        assert best.score >= greedy_score - 1e-4  # the search finds at least what greedy finds


def test_beam_search_with_and_without_cache_agree(gpt2_dir):
    loaded = load(gpt2_dir, device="cpu")
    cfg = GenerateConfig(max_new_tokens=10, beams=3, num_samples=3)
    a = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], cfg)
    b = generate(loaded.model, loaded.tokenizer, PROMPTS[:2], GenerateConfig(**{**vars(cfg), "use_cache": False}))
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert [c.score for c in a.completions] == pytest.approx([c.score for c in b.completions], abs=1e-5)


def test_seq2seq_projects_cross_attention_keys_and_values_once(seq2seq_dir):
    loaded = load(seq2seq_dir, device="cpu")
    calls = []
    hooks = [layer.cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
             for layer in loaded.model.decoder.layers]
    try:
        for cfg in (GenerateConfig(max_new_tokens=10, temperature=0), GenerateConfig(max_new_tokens=10, beams=3)):
            calls.clear()
            result = generate(loaded.model, loaded.tokenizer, PROMPTS, cfg)
            assert len(calls) == len(loaded.model.decoder.layers)  # once per layer, not once per step
            assert max(len(c.token_ids) for c in result.completions) > 1
            # the prompt of an encoder-decoder is its source
            assert result.timings.prompt_tokens == max(len(loaded.tokenizer.encode(p).ids) for p in PROMPTS)
    finally:
        for h in hooks:
            h.remove()


# -- fill-mask ------------------------------------------------------------------------------------

def test_fill_mask_gives_the_top_candidates_with_probabilities(encoder_dir):
    loaded = load(encoder_dir, device="cpu")
    prompts = ["the <mask> sat on the <mask>", "a <mask> ran"]
    results = fill_mask(loaded.model, loaded.tokenizer, prompts, top=4)
    assert [len(r.masks) for r in results] == [2, 1]
    ids = loaded.tokenizer.encode(prompts[0].replace(" <mask>", "<mask>")).ids  # the mask takes its space
    with torch.no_grad():
        probs = loaded.model(torch.tensor([ids])).logits.softmax(-1)[0]
    for where, cands in zip([i for i, t in enumerate(ids) if t == MASK], results[0].masks):
        assert [c.id for c in cands] == probs[where].topk(4).indices.tolist()
        assert [c.prob for c in cands] == pytest.approx(probs[where].topk(4).values.tolist(), abs=1e-5)
    assert "<mask>" not in results[0].filled
    with pytest.raises(TformerError, match="has no <mask>"):
        fill_mask(loaded.model, loaded.tokenizer, ["no mask here"])
    with pytest.raises(TformerError, match="encoder"):
        generate(loaded.model, loaded.tokenizer, ["the <mask>"])


# -- streaming and stopping -----------------------------------------------------------------------

def byte_ids(tok, text):
    """Ids of the single-byte tokens of `text` (byte-level BPE): a multi-byte character spans several."""
    return [tok.token_to_id(byte_alphabet()[b]) for b in text.encode("utf-8")]


def test_streaming_never_splits_a_multibyte_character(tokenizer_file):
    tok = Tokenizer.from_file(str(tokenizer_file))
    text = "naïve 你好 🙂👍🏽 done"
    pieces = []
    row = Row(0, tok, EOS, (), lambda r, t: pieces.append(t))
    for i in byte_ids(tok, text):
        row.add(i)
    row.add(EOS)
    assert "".join(pieces) == text == row.text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5 and "🙂" in pieces  # released as soon as each character is whole
    assert row.finish_reason == "eos"


def test_stop_string_is_never_streamed_and_ends_the_row(tokenizer_file):
    tok = Tokenizer.from_file(str(tokenizer_file))
    pieces = []
    row = Row(0, tok, EOS, ("STOP", "\n\n"), lambda r, t: pieces.append(t))
    for i in byte_ids(tok, "abc ST and then STOP more"):
        row.add(i)
    assert row.done and row.finish_reason == "stop"
    assert "".join(pieces) == row.text == "abc ST and then "
    assert row.ids == byte_ids(tok, "abc ST and then STOP")  # ids up to the one completing the stop string


def test_byte_level_text_equals_the_tokenizers_decode_and_invalid_bytes_do_not_stall(tokenizer_file):
    tok = Tokenizer.from_file(str(tokenizer_file))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random byte and merged tokens: many sequences are invalid UTF-8
        ids = torch.randint(5, tok.get_vocab_size(), (30,), generator=g).tolist()
        pieces = []
        row = Row(0, tok, EOS, (), lambda r, t: pieces.append(t))
        for i in ids:
            row.add(i)
        row.finish("length")
        assert row.text == "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    pieces = []
    row = Row(0, tok, EOS, (), lambda r, t: pieces.append(t))
    for i in byte_ids(tok, "ok") + [tok.token_to_id(byte_alphabet()[0x80])] * 3:
        row.add(i)  # stray continuation bytes: no character can complete them
    assert "".join(pieces) == "ok\ufffd\ufffd\ufffd"  # shown at once, not held to the end


def test_other_tokenizers_stream_whole_characters_too():
    # A byte-fallback tokenizer (sentencepiece style: <0xF0> tokens), decoded without the byte-level path.
    vocab = {"<eos>": 0, "a": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    pieces = []
    row = Row(0, tok, 0, (), lambda r, t: pieces.append(t))
    for i in tok.encode("a🙂a你").ids:
        row.add(i)
    row.add(0)
    assert pieces == ["a", "🙂", "a", "你"] and row.text == "a🙂a你"


def test_incomplete_character_at_the_token_limit_shows_as_replacement(tokenizer_file):
    tok = Tokenizer.from_file(str(tokenizer_file))
    pieces = []
    row = Row(0, tok, EOS, (), lambda r, t: pieces.append(t))
    for i in byte_ids(tok, "ok 🙂")[:-2]:
        row.add(i)
    assert "".join(pieces) == "ok "
    row.finish("length")
    assert row.text.startswith("ok ") and row.text.endswith("\ufffd") and "".join(pieces) == row.text


def test_streamed_text_equals_the_completion(gpt2_dir):
    loaded = load(gpt2_dir, device="cpu")
    pieces = {}
    result = generate(loaded.model, loaded.tokenizer, PROMPTS, GenerateConfig(max_new_tokens=25, seed=0),
                      on_text=lambda r, t: pieces.setdefault(r, []).append(t))
    assert ["".join(pieces.get(r, [])) for r in range(len(PROMPTS))] == [c.text for c in result.completions]


def test_sample_continuation_restores_training_mode(gpt2_dir):
    loaded = load(gpt2_dir, device="cpu")
    loaded.model.train()
    text = sample_continuation(loaded.model, loaded.tokenizer, max_new_tokens=5)
    assert isinstance(text, str) and loaded.model.training
    assert loaded.model.decoder.layers[0].self_attn.cache is None


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n  \nsecond line\n", encoding="utf-8")
    assert read_prompts(prompt_file=f) == ["first", "second line"]
    assert read_prompts(stdin="one\ntwo\n") == ["one\ntwo"]
    for kwargs, message in [({}, "no prompt"), ({"prompt": ""}, "empty"), ({"prompt": "a", "prompt_file": f}, "not both")]:
        with pytest.raises(TformerError, match=message):
            read_prompts(**kwargs)


# -- the command line -----------------------------------------------------------------------------

runner = CliRunner()


def test_cli_streams_a_continuation_and_reports_timings(gpt2_dir):
    result = runner.invoke(app, ["generate", "-c", str(gpt2_dir), "-p", "the cat", "-n", "12", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    loaded = load(gpt2_dir, device="cpu")
    expected = generate(loaded.model, loaded.tokenizer, ["the cat"], GenerateConfig(max_new_tokens=12, temperature=0))
    assert result.stdout == "the cat" + expected.completions[0].text + "\n"
    n = len(loaded.tokenizer.encode("the cat").ids)
    assert f"cpu fp32, batch 1, prompt {n} tokens" in result.stderr and "tok/s" in result.stderr


def test_cli_stop_strings_and_no_cache(gpt2_dir):
    args = ["generate", "-c", str(gpt2_dir), "-p", "the cat", "-n", "30", "--temperature", "0", "--top-k", "3",
            "--json"]
    full = json.loads(runner.invoke(app, args).stdout)["completions"][0]
    stop = full["text"][6:9]
    cut = full["text"][:full["text"].index(stop)]
    for extra in (["--stop", "never there", "--stop", stop], ["--stop", stop, "--no-cache"]):
        result = runner.invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        c = json.loads(result.stdout)["completions"][0]
        assert c["text"] == cut and c["finish_reason"] == "stop"
    no_cache = json.loads(runner.invoke(app, args + ["--no-cache"]).stdout)
    assert no_cache["completions"][0]["token_ids"] == full["token_ids"] and no_cache["timings"]["cache"] is False


def test_cli_json_fields(gpt2_dir, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the cat\na dog\n", encoding="utf-8")
    result = runner.invoke(app, ["generate", "-c", str(gpt2_dir), "--prompt-file", str(f), "-n", "6", "--seed", "3",
                                 "--num-samples", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["arch"] == "decoder" and doc["seed"] == 3 and doc["config"]["num_samples"] == 2
    assert [(c["prompt"], c["sample"]) for c in doc["completions"]] == [
        ("the cat", 0), ("the cat", 1), ("a dog", 0), ("a dog", 1)]
    for c in doc["completions"]:
        assert set(c) >= {"prompt", "text", "token_ids", "prompt_tokens", "finish_reason"}
        assert 0 < len(c["token_ids"]) <= 6 or c["finish_reason"] == "eos"
    t = doc["timings"]
    tok = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    longest = max(len(tok.encode(p).ids) for p in ("the cat", "a dog"))
    assert t["device"] == "cpu" and t["dtype"] == "fp32" and t["batch_size"] == 4 and t["prompt_tokens"] == longest
    assert t["first_token_s"] > 0 and t["tokens_per_s"] > 0


def test_cli_translates_and_fills_masks(seq2seq_dir, encoder_dir):
    result = runner.invoke(app, ["generate", "-c", str(seq2seq_dir), "-p", "the cat", "-n", "5", "--beams", "2",
                                 "--quiet"])
    assert result.exit_code == 0 and result.stderr == "" and result.stdout.startswith("--- prompt, score ")
    result = runner.invoke(app, ["generate", "-c", str(encoder_dir), "-p", "the <mask> sat", "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("  <mask> 1: ") and lines[1].count("'") == 6


def test_cli_reads_the_newest_checkpoint_and_stdin(gpt2_dir, tmp_path, monkeypatch):
    import os
    import shutil

    for age, run in enumerate(["new/latest", "new/best", "old/latest"]):  # written 0, 100 and 200 s ago
        shutil.copytree(gpt2_dir, tmp_path / "checkpoints" / run)
        written = (tmp_path / "checkpoints" / run / "model.safetensors").stat().st_mtime - 100 * age
        os.utime(tmp_path / "checkpoints" / run / "model.safetensors", (written, written))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "-n", "3", "--temperature", "0"], input="the cat\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the cat")
    assert f"using the checkpoint {Path('checkpoints/new/latest')}" in result.stderr
    # a training run's directory: the newest of its checkpoints
    result = runner.invoke(app, ["generate", "-c", "checkpoints/old", "-p", "the cat", "-n", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(Path("checkpoints/old/latest"))
    result = runner.invoke(app, ["generate", "-c", "checkpoints/new/best", "-p", "the cat", "-n", "3"])
    assert result.exit_code == 0 and "using the checkpoint" not in result.stderr  # named exactly: no note


@pytest.mark.parametrize("args, message", [
    (["-p", ""], "the prompt is empty"),
    (["-p", "x", "--min-p", "1.5"], "--min-p"),
    (["-p", "x", "--temperature", "-1"], "--temperature"),
    (["-p", "x", "--top-p", "0"], "--top-p"),
    (["-p", "x", "--top-p", "1.5"], "--top-p"),
    (["-p", "x", "--top-k", "-1"], "--top-k"),
    (["-p", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["-p", "a <mask> b"], "needs an encoder"),
    (["-p", "x", "-c", "{missing}"], "does not exist"),
    (["-p", "x", "-c", "{not_ckpt}"], "is not a checkpoint"),
    (["-p", "x", "--device", "quantum"], "--device"),
    (["-p", "x", "--num-samples", "3", "--beams", "2"], "--num-samples"),
    (["--prompt-file", "{missing}"], "does not exist"),
    ([], "no prompt given"),
])
def test_cli_bad_input_is_one_line_and_nonzero(gpt2_dir, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing", not_ckpt=tmp_path) for a in args]
    if "-c" not in args:
        args += ["-c", str(gpt2_dir)]
    result = runner.invoke(app, ["generate", *args], input="")
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_cli_mask_in_encoder_prompt_is_required(encoder_dir):
    result = runner.invoke(app, ["generate", "-c", str(encoder_dir), "-p", "no mask"])
    assert result.exit_code != 0 and "has no <mask>" in result.stderr and len(result.stderr.splitlines()) == 1


def test_tiny_logits_never_nan():
    # probabilities underflowing to 0 with exponential noise must never yield NaN or a filtered token
    logits = torch.tensor([[0.0, -200.0, -math.inf]])
    cfg = GenerateConfig(temperature=1.0, top_k=0)
    out = sample_logits(logits.repeat(1000, 1), cfg, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {0}
