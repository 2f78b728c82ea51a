"""What users trip on in `generate`: one beam is greedy, beam search defaults that cannot lose to greedy, a
default length that fits the context, a slide notice only when the window slid, special tokens neither
sampled nor printed."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import tiny_config
from tokenizers import AddedToken, Tokenizer, decoders, models
from typer.testing import CliRunner

from tformer.checkpoint import save_checkpoint
from tformer.cli import app
from tformer.data.tokenizer import special_ids
from tformer.generation.config import GenerateConfig
from tformer.generation.generate import generate
from tformer.generation.sampling import Sampler, never_sampled
from tformer.generation.stream import Row, hidden_tokens
from tformer.model.transformer import Seq2Seq, build_model

runner = CliRunner()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]
PAD, BOS, EOS, UNK, MASK = range(5)
DIGITS = "0123456789"


def char_tokenizer(alphabet: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def checkpoint(tmp_path, arch="decoder", max_seq_len=32):
    tok = char_tokenizer("abcdefgh ")
    cfg = tiny_config(arch=arch, vocab_size=tok.get_vocab_size(), max_seq_len=max_seq_len)
    torch.manual_seed(0)
    save_checkpoint(tmp_path, build_model(cfg).eval(), cfg)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def ids_of(result) -> list[list[int]]:
    assert result.exit_code == 0, result.output
    return [c["token_ids"] for c in json.loads(result.stdout)["completions"]]


def test_one_beam_is_greedy_from_the_cli(tmp_path):
    ckpt = checkpoint(tmp_path)
    args = ["generate", "-c", str(ckpt), "-p", "abc", "-n", "12", "--json"]
    greedy = ids_of(runner.invoke(app, [*args, "--temperature", "0"]))
    for seed in ("1", "2"):  # sampling would differ between seeds; one beam never does
        assert ids_of(runner.invoke(app, [*args, "--beams", "1", "--seed", seed])) == greedy


def test_default_length_fits_the_context_and_no_false_slide_notice(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path, max_seq_len=32)
    result = runner.invoke(app, ["generate", "-c", str(ckpt), "-p", "abcd", "--temperature", "0", "--json"])
    doc = json.loads(result.stdout)
    assert len(doc["completions"][0]["token_ids"]) <= 32 - 4 and not doc["notices"]
    # past the context the window slides (an untrained model's <eos> ignored here), and the notice says so
    real_add = Row.add

    def never_eos(self, token):
        self.eos = frozenset()
        real_add(self, token)

    monkeypatch.setattr(Row, "add", never_eos)
    result = runner.invoke(app, ["generate", "-c", str(ckpt), "-p", "abcd", "-n", "80", "--json"])
    assert any("slid" in n for n in json.loads(result.stdout)["notices"])
    # the same request, stopped after one token, never slid: no notice

    def stop_after_one(self, token):
        real_add(self, token)
        self.finish("stop")

    monkeypatch.setattr(Row, "add", stop_after_one)
    result = runner.invoke(app, ["generate", "-c", str(ckpt), "-p", "abcd", "-n", "80", "--json"])
    assert result.exit_code == 0 and not any("slid" in n for n in json.loads(result.stdout)["notices"])


def test_sampling_never_draws_pad_mask_or_bos():
    specials = special_ids(char_tokenizer("ab"))
    banned = never_sampled(specials, byte_fallback=True)
    assert sorted(banned) == [PAD, BOS, UNK, MASK] and EOS not in banned
    cfg = GenerateConfig(temperature=5.0, top_k=0)
    sampler = Sampler(cfg, 64, 8, torch.device("cpu"), seed=0, banned=banned)
    logits = torch.zeros(64, 8)
    logits[:, [PAD, BOS, MASK, UNK]] = 10.0  # the most likely tokens, and still never drawn
    for _ in range(20):
        sampler.draw()
        tokens = sampler.choose(logits, *sampler.state)
        assert not torch.isin(tokens, torch.tensor(banned)).any()
    greedy = Sampler(GenerateConfig(temperature=0.0), 2, 8, torch.device("cpu"), 0, banned=banned)
    assert greedy.choose(logits[:2], *greedy.state).tolist() == [PAD, PAD]  # greedy keeps transformers' ids


def test_special_tokens_are_not_printed_unless_asked(tmp_path):
    tok = char_tokenizer("ab")
    row = Row(0, tok, EOS, (), None, hidden=hidden_tokens(special_ids(tok)))
    for token in (5, UNK, PAD, 6):
        row.add(token)
    assert row.text == "ab" and row.ids == [5, UNK, PAD, 6]
    ckpt = checkpoint(tmp_path)
    out = runner.invoke(app, ["generate", "-c", str(ckpt), "-p", "ab", "-n", "40", "--temperature", "3", "--top-k",
                              "0", "--seed", "0", "--json"])
    completion = json.loads(out.stdout)["completions"][0]
    assert not {PAD, BOS, MASK} & set(completion["token_ids"])
    assert not any(s in completion["text"] for s in SPECIALS)


def copy_task_model() -> tuple[Seq2Seq, Tokenizer, list[str]]:
    """A tiny encoder-decoder trained in about ten seconds to copy digit strings."""
    tok = char_tokenizer(DIGITS)
    cfg = tiny_config(arch="encoder-decoder", vocab_size=tok.get_vocab_size(), max_seq_len=16, d_model=48,
                      n_heads=4, d_ff=96, norm_placement="pre", pos_encoding="learned")
    torch.manual_seed(0)
    model = Seq2Seq(cfg)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n):
        lengths = torch.randint(3, 8, (n,), generator=g)
        srcs = [torch.randint(5, 15, (int(k),), generator=g) for k in lengths]
        S = max(len(s) for s in srcs)
        src = torch.full((n, S), PAD)
        tgt = torch.full((n, S + 2), PAD)
        for i, s in enumerate(srcs):
            src[i, :len(s)] = s
            tgt[i, :len(s) + 2] = torch.cat([torch.tensor([BOS]), s, torch.tensor([EOS])])
        return src, src != PAD, tgt

    for _ in range(300):  # well trained (as the model), so that greedy is near the top on any CPU's numerics
        src, mask, tgt = batch(32)
        logits = model(src, tgt[:, :-1], mask, tgt[:, :-1] != PAD).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    rng = torch.Generator().manual_seed(1)
    tests = ["".join(DIGITS[int(d)] for d in torch.randint(0, 10, (int(k),), generator=rng))
             for k in torch.randint(3, 8, (24,), generator=rng)]
    return model, tok, tests


def test_beam_search_is_never_worse_than_greedy_on_a_trained_model():
    model, tok, tests = copy_task_model()

    def exact(cfg):
        out = generate(model, tok, tests, cfg).completions
        return sum(c.text == t for c, t in zip(out, tests))

    greedy = exact(GenerateConfig(temperature=0.0, max_new_tokens=12))
    assert greedy >= len(tests) // 2  # the model learned the task
    for beams in (2, 4):
        assert exact(GenerateConfig(beams=beams, max_new_tokens=12)) >= greedy


def test_the_mask_absorbs_the_space_before_it():
    """With a byte-level BPE, "the <mask> and" masks one token that carries its space (as the masked-LM objective
    masks Ġking in training), never a lone space token before the mask."""
    from tformer.data.tokenizer import mask_prompt, train_bpe

    texts = ["the king and the queen sat on the mat and the cat ran to the king"] * 20
    tok = train_bpe(texts, vocab_size=300)
    assert "Ġ" in tok.encode("the <mask> and").tokens  # the defect, without help
    encoding = tok.encode(mask_prompt(tok, "the <mask> and", MASK))
    assert encoding.tokens == ["the", "<mask>", "Ġand"]
    assert tok.decode(tok.encode("a <mask> b").ids, skip_special_tokens=False) == "a <mask> b"  # text that spells <mask> still round-trips
