"""tformer tokenize: exact round trips, the token-file formats, pairs, bad input, --force, the default corpus."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import tformer.data.corpus as tokmod
import tformer.data.prepare as prepmod
from tformer.cli import app
from tformer.data.corpus import default_corpus, default_corpus_text
from tformer.data.prepare import tokenize_corpus
from tformer.data.tokenizer import (
    SPECIAL_TOKENS,
    SpecialIds,
    decode,
    load_tokenizer,
    special_ids,
)
from tformer.data.tokens import open_tokens, token_dtype
from tformer.errors import TformerError

runner = CliRunner()

# Hand-made text that breaks naive tokenizers: accents (composed and combining), CJK, emoji with skin
# tones and joiners, right-to-left scripts, CRLF, tabs, runs of spaces, blank lines, special-token text.
MULTILINGUAL = (
    "Café déjà vu: naïve façade, Ångström, straße, œuvre, ﬁne.\r\n"
    "\tA tabbed line with trailing spaces   \r\n"
    "日本語のテキスト、中文字符，한국어 텍스트。\n"
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 — and a zero-width joiner\u200d here.\n"
    "Combining marks: e\u0301 a\u0308 n\u0303 o\u0302\u0323 vs é ä ñ.\n"
    "Special-token text stays text: <eos> <pad> <|endoftext|> <mask>\n"
    "\n\n    indented after two blank lines\n"
    "Arabic مرحبا, Hebrew שלום, Greek αβγδ, Cyrillic привет, Thai สวัสดี\n"
)


def write_corpus(tmp_path, n: int = 12) -> list:
    """Two files of varied multilingual lines; the second ends without a newline."""
    a = "".join(f"{i}: {MULTILINGUAL}" for i in range(n))
    b = "".join(MULTILINGUAL.replace("\n", f" {i}\n") for i in range(n)) + "no newline at the end\t  "
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_bytes(a.encode())
    paths[1].write_bytes(b.encode())
    return paths


def decoded_corpus(out_dir) -> bytes:
    data = open_tokens(out_dir)
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    return data.decode(ids).encode("utf-8")


def one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- exact round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
@pytest.mark.parametrize("piece_bytes", [61, 1 << 16])
def test_round_trip_is_byte_exact(tmp_path, monkeypatch, kind, piece_bytes):
    # Tiny pieces force cuts inside long lines, between multi-byte characters and at the split.
    monkeypatch.setattr(tokmod, "PIECE_BYTES", piece_bytes)
    monkeypatch.setattr(prepmod, "BATCH_BYTES", 4 * piece_bytes)
    paths = write_corpus(tmp_path)
    result = tokenize_corpus(paths, tmp_path / "out", kind=kind, vocab_size=400 if kind == "bpe" else None)
    assert decoded_corpus(tmp_path / "out") == b"".join(p.read_bytes() for p in paths)
    assert result.tokens["train"] > 0 and result.tokens["val"] > 0
    assert result.unk_tokens == 0 and result.warnings == []
    assert result.chars == sum(len(p.read_bytes().decode()) for p in paths)  # CRLF counts as 2


def test_val_starts_at_a_line_start_near_the_requested_fraction(tmp_path):
    paths = write_corpus(tmp_path)
    tokenize_corpus(paths, tmp_path / "out", kind="byte", val_fraction=0.25)
    data = open_tokens(tmp_path / "out")
    text = b"".join(p.read_bytes() for p in paths)
    val = data.decode(data.tokens("val")).encode()
    cut = len(text) - len(val)
    assert text[cut:] == val and text[cut - 1:cut] == b"\n"
    assert abs(len(val) / len(text) - 0.25) < 0.02
    assert data.meta["split"]["val_start"] == {"file": str(paths[1]), "byte": cut - paths[0].stat().st_size}


def test_pieces_do_not_change_bpe_tokens(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path)
    tokenize_corpus(paths[:1], tmp_path / "tok", vocab_size=500, val_fraction=0)
    monkeypatch.setattr(tokmod, "PIECE_BYTES", 200)  # cuts fall after newlines, where BPE splits anyway
    tokenize_corpus(paths[:1], tmp_path / "out", tokenizer=tmp_path / "tok" / "tokenizer.json", val_fraction=0)
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    tok.encode_special_tokens = True  # as tokenize does: "<eos>" in the corpus is text
    whole = tok.encode(paths[0].read_bytes().decode()).ids
    assert open_tokens(tmp_path / "out").tokens("train").tolist() == whole


def test_no_val_split(tmp_path):
    paths = write_corpus(tmp_path)
    result = tokenize_corpus(paths, tmp_path / "out", kind="char", val_fraction=0)
    assert result.tokens["val"] == 0 and (tmp_path / "out" / "val.bin").stat().st_size == 0
    assert len(open_tokens(tmp_path / "out").tokens("val")) == 0
    assert decoded_corpus(tmp_path / "out") == b"".join(p.read_bytes() for p in paths)


def test_unknown_characters_are_counted_and_reported(tmp_path):
    (tmp_path / "train.txt").write_text("abc abc\n", encoding="utf-8")
    (tmp_path / "other.txt").write_text("abc xyz\n", encoding="utf-8")
    tokenize_corpus([tmp_path / "train.txt"], tmp_path / "char", kind="char")
    result = tokenize_corpus([tmp_path / "other.txt"], tmp_path / "out", tokenizer=tmp_path / "char")
    assert result.unk_tokens == 3 and result.unk_rate == pytest.approx(3 / 8)
    assert any("<unk>" in w for w in result.warnings)


# --- files and formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_files_meta_and_memmap(tmp_path, kind):
    paths = write_corpus(tmp_path)
    result = tokenize_corpus(paths, tmp_path / "out", kind=kind, vocab_size=300 if kind == "bpe" else None)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["kind"] == kind and meta["vocab_size"] == tok.get_vocab_size() == result.vocab_size
    assert meta["dtype"] == "uint16" and meta["layout"] == "flat"
    assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    for split in ("train", "val"):
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta["tokens"][split] == result.tokens[split]
        assert ids.max() < meta["vocab_size"]
    assert meta["split"]["val_fraction"] == 0.1
    assert meta["sources"] == [
        {"path": str(p), "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in paths
    ]
    assert meta["stats"]["chars"] == result.chars and meta["stats"]["bytes"] == result.bytes
    if kind == "byte":
        assert meta["vocab_size"] == 261 and tok.encode("A").ids == [5 + ord("A")]


def test_token_dtype_widens_past_16_bits():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_tokenizer_loads_in_transformers_and_decodes_the_same(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    paths = write_corpus(tmp_path)
    tokenize_corpus(paths, tmp_path / "out", vocab_size=400)
    data = open_tokens(tmp_path / "out")
    ids = data.tokens("train")[:300].tolist()
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    assert fast.decode(ids) == data.decode(ids)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "out"))  # tokenizer_config.json names the specials
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id, auto.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert auto.decode(auto(MULTILINGUAL, add_special_tokens=False)["input_ids"]) == MULTILINGUAL


def gpt2_style_tokenizer(path, text: str) -> None:
    """A tiny tokenizer.json shaped like GPT-2's: byte-level BPE whose only special token is <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[AddedToken("<|endoftext|>", special=True)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(str(path))


def test_existing_gpt2_style_tokenizer(tmp_path):
    paths = write_corpus(tmp_path)
    gpt2_style_tokenizer(tmp_path / "gpt2.json", paths[0].read_bytes().decode())
    eot = Tokenizer.from_file(str(tmp_path / "gpt2.json")).token_to_id("<|endoftext|>")
    result = runner.invoke(app, ["tokenize", *map(str, paths), "--tokenizer", str(tmp_path / "gpt2.json"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = open_tokens(tmp_path / "out")
    assert data.meta["kind"] == "file"
    assert data.special == SpecialIds(pad=None, bos=eot, eos=eot, unk=None, mask=None)
    # The corpus spells out "<|endoftext|>": encoded as text, it never becomes the control token.
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert eot not in set(ids.tolist())
    assert decoded_corpus(tmp_path / "out") == b"".join(p.read_bytes() for p in paths)


def test_special_ids_of_our_tokenizers_and_others(tmp_path):
    tokenize_corpus(write_corpus(tmp_path), tmp_path / "out", kind="byte")
    assert special_ids(load_tokenizer(tmp_path / "out")) == SpecialIds(0, 1, 2, 3, 4)
    bert_like = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5},
                                           unk_token="[UNK]"))
    assert special_ids(bert_like) == SpecialIds(pad=0, bos=2, eos=3, unk=1, mask=4)


@pytest.mark.parametrize("batch_bytes", [60, 1 << 20])
def test_pairs_from_tsv(tmp_path, monkeypatch, batch_bytes):
    monkeypatch.setattr(prepmod, "BATCH_BYTES", batch_bytes)  # small: offsets must carry across batches
    pairs = [("Hello world", "Bonjour le monde"), ("Straße is", ""), ("日本語", "にほんご 😀"),
             ("e\u0301", "é")] * 5
    lines = [f"{s}\t{t}\r\n" if i % 2 else f"{s}\t{t}\n" for i, (s, t) in enumerate(pairs)]
    lines.insert(3, "\n")  # a blank line is skipped
    (tmp_path / "pairs.tsv").write_text("".join(lines), encoding="utf-8", newline="")
    result = tokenize_corpus([tmp_path / "pairs.tsv"], tmp_path / "out", kind="char", val_fraction=0.2)
    data = open_tokens(tmp_path / "out")
    train, val = data.pairs("train"), data.pairs("val")
    assert result.pairs == {"train": len(train), "val": len(val)} and len(train) + len(val) == len(pairs)
    assert len(val) > 0 and len(train) > 0
    got = [(data.decode(s), data.decode(t)) for split in (train, val) for i in range(len(split)) for s, t in [split[i]]]
    assert got == pairs
    assert train.src_offsets.dtype == np.uint64 and train.src_offsets[-1] == len(train.src)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.idx")) == [
        "train.src.idx", "train.tgt.idx", "val.src.idx", "val.tgt.idx"]
    with pytest.raises(TformerError, match="pairs"):
        data.tokens("train")


# --- bad input through the CLI ----------------------------------------------------------------------

def test_missing_path(tmp_path):
    line = one_line_error(runner.invoke(app, ["tokenize", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]))
    assert "nope.txt" in line and "does not exist" in line
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_empty_file_and_directory_without_text(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in one_line_error(runner.invoke(app, ["tokenize", str(tmp_path / "empty.txt")]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("not a .txt file")
    (tmp_path / "d" / "blank.txt").write_bytes(b"")
    assert "has no text" in one_line_error(runner.invoke(app, ["tokenize", str(tmp_path / "d")]))


def test_not_utf8_names_file_and_offset_and_replace_goes_on(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("naïve\n".encode() * 3 + b"ok \xff\xfe end\n")
    out = tmp_path / "out"
    line = one_line_error(runner.invoke(app, ["tokenize", str(bad), "--out", str(out), "--kind", "byte"]))
    assert str(bad) in line and "byte 24" in line  # 3 * len("naïve\n".encode()) + len(b"ok ")
    assert not out.exists() and leftovers(tmp_path) == []
    result = runner.invoke(app, ["tokenize", str(bad), "--out", str(out), "--kind", "byte", "--errors", "replace"])
    assert result.exit_code == 0 and "replaced 2 invalid UTF-8" in result.output
    assert decoded_corpus(out).decode() == bad.read_bytes().decode("utf-8", "replace")


def test_vocab_size_smaller_than_alphabet_plus_specials(tmp_path):
    paths = write_corpus(tmp_path)
    line = one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--vocab-size", "100"]))
    assert "256 bytes plus 5 special tokens" in line and "261" in line
    n_chars = len(set(paths[0].read_bytes().decode()))
    line = one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--kind", "char", "--vocab-size", "20"]))
    assert f"{n_chars} distinct characters" in line and str(n_chars + 5) in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("line,tabs", [("no tab here", 0), ("one\ttwo\tthree", 2)])
def test_tsv_line_without_exactly_one_tab(tmp_path, line, tabs):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(f"a\tb\nc\td\n{line}\ne\tf\n", encoding="utf-8")
    msg = one_line_error(runner.invoke(app, ["tokenize", str(tsv), "--out", str(tmp_path / "out")]))
    assert f"{tsv}:3:" in msg and f"found {tabs}" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_needs_force_and_force_replaces(tmp_path):
    paths = write_corpus(tmp_path)
    out = tmp_path / "out"
    assert runner.invoke(app, ["tokenize", str(paths[0]), "--out", str(out), "--kind", "char"]).exit_code == 0
    before = (out / "train.bin").read_bytes()
    assert "--force" in one_line_error(runner.invoke(app, ["tokenize", str(paths[1]), "--out", str(out)]))
    assert (out / "train.bin").read_bytes() == before
    result = runner.invoke(app, ["tokenize", str(paths[1]), "--out", str(out), "--kind", "byte", "--force"])
    assert result.exit_code == 0
    assert open_tokens(out).meta["kind"] == "byte" and leftovers(tmp_path) == []


def test_force_keeps_old_output_when_the_new_run_fails(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path)
    out = tmp_path / "out"
    tokenize_corpus(paths, out, kind="char")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    # Fails halfway through encoding, after the new files were started.
    bad = tmp_path / "late-bad.txt"
    bad.write_bytes(b"fine line\n" * 50_000 + b"\xc3(\n")
    monkeypatch.setattr(prepmod, "BATCH_BYTES", 4096)
    line = one_line_error(runner.invoke(app, ["tokenize", str(bad), "--tokenizer", str(out / "tokenizer.json"),
                                              "--out", str(out), "--force"]))
    assert "byte 500000" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert leftovers(tmp_path) == []


def test_force_refuses_to_replace_an_unrelated_directory(tmp_path):
    paths = write_corpus(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    line = one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--out", str(tmp_path / "mine"), "--force"]))
    assert "not a tformer token directory" in line
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_inconsistent_options(tmp_path):
    paths = write_corpus(tmp_path)
    assert "--kind must be one of" in one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--kind", "word"]))
    line = one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--tokenizer", "x.json", "--kind", "char"]))
    assert "--tokenizer" in line
    assert "--val-fraction" in one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), "--val-fraction", "1"]))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a\tb\n")
    assert "mixes" in one_line_error(runner.invoke(app, ["tokenize", str(paths[0]), str(tsv)]))


# --- corpus discovery, the default corpus, the CLI end to end ---------------------------------------

def test_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/sub/a.txt", "d/skip.md", "c.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    sources = tokmod.find_corpus([str(tmp_path / "d"), str(tmp_path / "*.txt"), str(tmp_path / "c.txt")])
    assert [s.path.relative_to(tmp_path).as_posix() for s in sources] == ["d/b.txt", "d/sub/a.txt", "c.txt"]
    assert [s.start for s in sources] == [0, sources[0].size, sources[0].size + sources[1].size]
    with pytest.raises(TformerError, match="no file matches"):
        tokmod.find_corpus([str(tmp_path / "*.nothing")])


def test_default_corpus_is_large_english_and_cached(tmp_path):
    path = default_corpus(tmp_path / "data")
    text = path.read_text(encoding="utf-8")
    assert len(path.read_bytes()) >= 300_000 and text == default_corpus_text()
    assert text.count(" the ") > 2000  # English prose, not just code
    mtime = path.stat().st_mtime_ns
    assert default_corpus(tmp_path / "data") == path and path.stat().st_mtime_ns == mtime  # reused
    path.write_text("damaged")
    assert default_corpus(tmp_path / "data").read_text(encoding="utf-8") == text


def test_cli_with_no_corpus_uses_the_default_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["tokenize", "--kind", "char"])
    assert result.exit_code == 0, result.output
    for row in ("files", "characters", "bytes", "tokens", "characters per token", "vocabulary used",
                "unknown-token rate", "time", "MB/s"):
        assert row in result.output
    out = tmp_path / "data" / "pydoc-topics-char"
    assert decoded_corpus(out) == (tmp_path / "data" / "pydoc-topics.txt").read_bytes()


def test_progress_reports_bytes_up_to_the_total(tmp_path, monkeypatch):
    monkeypatch.setattr(prepmod, "BATCH_BYTES", 1024)
    paths = write_corpus(tmp_path)
    total = sum(p.stat().st_size for p in paths)
    calls = []
    tokenize_corpus(paths, tmp_path / "out", kind="char", progress=lambda *a: calls.append(a))
    for phase in ("train", "encode"):
        done = [d for p, d, t in calls if p == phase]
        assert len(done) > 2 and done == sorted(done) and done[-1] == total
    assert {t for _, _, t in calls} == {total}


def test_decode_keeps_special_tokens(tmp_path):
    tokenize_corpus(write_corpus(tmp_path), tmp_path / "out", kind="byte")
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert decode(tok, [1, 5 + ord("h"), 5 + ord("i"), 2]) == "<bos>hi<eos>"
