"""`tformer inspect`: anatomy, attention statistics and head labels, exports, and the command's bad inputs."""

import json
import math
import shutil
import sys

import pytest
import torch
from conftest import tiny_config
from tokenizers import AddedToken, Tokenizer, decoders, models
from typer.testing import CliRunner

from tformer.checkpoint import TRAINER_STATE_FILE, load_checkpoint, save_checkpoint
from tformer.cli import app
from tformer.inspection.export import write_html
from tformer.inspection.render_terminal import MASKED, SHADES, render_heatmap
from tformer.inspection.report import (
    ALIGN_TOP_K,
    HEATMAP_MAX_TOKENS,
    StackAttention,
    TokenLabeler,
    heatmap,
    inspect_checkpoint,
    stack_names,
    visible,
)
from tformer.inspection.stats import (
    INDUCTION_BATCH,
    INDUCTION_MIN,
    INDUCTION_SEED,
    HeadStats,
    _nan_to_none,
    head_labels,
    head_statistics,
    induction_scores,
)
from tformer.model.attention import MultiHeadAttention
from tformer.model.transformer import build_model

runner = CliRunner()
ARCHS = ["decoder", "encoder", "encoder-decoder"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second thread only adds waiting (training one was 15x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tokenizer(directory):
    """A character tokenizer built here with `tokenizers`: the 5 specials (ids 0..4), then one id per character."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    return tok


def make_checkpoint(directory, arch="decoder", model=None, extra=None, **overrides):
    cfg = tiny_config(arch=arch, **overrides) if model is None else model.cfg
    model = model if model is not None else build_model(cfg).eval()
    save_checkpoint(directory, model, cfg, extra=extra)
    write_tokenizer(directory)
    return directory


def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


# -- statistics and labels on hand-made patterns ---------------------------------------------------

def one_hot_pattern(T, key_of_row):
    w = torch.zeros(T, T)
    for i in range(T):
        w[i, key_of_row(i)] = 1.0
    return w


def stats_of(w, causal=True, positional=True):
    s = head_statistics(w[None, None], causal, positional)
    head = HeadStats(0, 0, *(None if k not in s else _nan_to_none(float(s[k][0, 0])) for k in (
        "entropy", "distance", "uniform_distance", "max_weight")), int(s["top_key"][0, 0]), "t",
        float(s["top_share"][0, 0]), *(_nan_to_none(float(s[k][0, 0])) if k in s else None
                                       for k in ("previous", "first", "current")))
    head.labels = head_labels(head)
    return head


def test_uniform_causal_attention_is_broad_with_full_entropy():
    T = 12
    w = causal_mask(T).float()
    w = w / w.sum(-1, keepdim=True)
    h = stats_of(w)
    assert h.entropy == pytest.approx(1.0)
    # rows 1..T-1 see i + 1 keys at distances 0..i: mean distance i / 2
    assert h.distance == pytest.approx(sum(i / 2 for i in range(1, T)) / (T - 1))
    assert h.distance == pytest.approx(h.uniform_distance)
    assert h.labels == ["broad"]
    # key 0 is seen by every row, so it receives the largest share: sum over rows 1..T-1 of 1/(i+1), per row
    assert h.top_key == 0 and h.top_share == pytest.approx(sum(1 / (i + 1) for i in range(1, T)) / (T - 1))


def test_uniform_bidirectional_attention():
    T = 7
    h = stats_of(torch.full((T, T), 1 / T), causal=False)
    assert h.entropy == pytest.approx(1.0) and h.max_weight == pytest.approx(1 / T)
    assert h.distance == pytest.approx(sum(abs(i - j) for i in range(T) for j in range(T)) / T / T)
    assert "broad" in h.labels


def test_one_hot_previous_token_pattern():
    T = 12
    h = stats_of(one_hot_pattern(T, lambda i: max(i - 1, 0)))
    assert h.entropy == pytest.approx(0.0, abs=1e-9)
    assert h.distance == pytest.approx(1.0) and h.previous == pytest.approx(1.0)
    assert h.first == pytest.approx(0.0) and h.max_weight == 1.0
    assert h.labels == ["previous-token", "local"]


def test_one_hot_first_token_pattern():
    T = 12
    h = stats_of(one_hot_pattern(T, lambda i: 0))
    assert h.entropy == pytest.approx(0.0, abs=1e-9) and h.first == pytest.approx(1.0)
    assert h.distance == pytest.approx(sum(range(1, T)) / (T - 1))  # row i looks i tokens back
    assert h.top_key == 0 and h.top_share == pytest.approx(1.0)
    assert h.labels == ["first-token"]


def test_entropy_of_one_row_by_hand_and_cross_attention_has_no_positional_scores():
    w = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    h = stats_of(w, causal=False, positional=False)
    rows = [-(sum(p * math.log(p) for p in r)) / math.log(3) for r in w.tolist()]
    assert h.entropy == pytest.approx(sum(rows) / 2)
    assert h.distance is None and h.previous is None and h.first is None
    assert h.top_key == 2 and h.top_share == pytest.approx((0.25 + 0.8) / 2)


def test_too_short_for_labels():
    # With two tokens the previous token is the first one: no positional label is claimed.
    h = stats_of(one_hot_pattern(2, lambda i: 0))
    assert h.previous is None and h.first is None and h.labels == []


# -- a model built to have a previous-token head ------------------------------------------------------

def previous_token_model():
    """One post-norm layer, learned one-hot positions and no token information: head 0's query at position i
    is the one-hot of i - 1 and its keys are the one-hot positions, so it attends to the previous token."""
    cfg = tiny_config(n_decoder_layers=1, pos_encoding="learned", norm_placement="post", scale_embeddings=False,
                      n_heads=2, d_model=64, max_seq_len=32)
    model = build_model(cfg).eval()
    hd, q_dim = cfg.head_dim, cfg.n_heads * cfg.head_dim
    with torch.no_grad():
        model.embed.tok.weight.zero_()
        model.embed.pos.weight.copy_(torch.eye(cfg.max_seq_len, cfg.d_model))
        attn = model.decoder.layers[0].self_attn
        attn.qkv_proj.weight.zero_()
        attn.qkv_proj.bias.zero_()
        for r in range(hd - 1):
            attn.qkv_proj.weight[r, r + 1] = 100.0  # q_i = 100 e_(i-1)
        for r in range(hd):
            attn.qkv_proj.weight[q_dim + r, r] = 1.0  # k_j = e_j; head 1 has zero q, k: uniform
    return model


def test_model_with_a_previous_token_head_is_labelled(tmp_path):
    make_checkpoint(tmp_path, model=previous_token_model())
    ins = inspect_checkpoint(tmp_path, prompt="the cat sat on the mat")
    heads = ins.attention.stacks["decoder"].heads
    assert "previous-token" in heads[0].labels and heads[0].previous > 0.99
    assert "previous-token" not in heads[1].labels and "broad" in heads[1].labels


# -- induction ------------------------------------------------------------------------------------------

def test_induction_score_rises_when_trained_on_repeated_sequences():
    cfg = tiny_config(vocab_size=32, d_model=64, n_heads=4, n_decoder_layers=2, d_ff=128, max_seq_len=32,
                      pos_encoding="learned", norm_placement="pre", scale_embeddings=False, init="gpt2")
    model = build_model(cfg)
    n = 12
    before = induction_scores(model.eval(), length=n)
    assert before.shape == (2, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(100):  # about a second: predict the second copy of a random sequence
        first = torch.randint(0, cfg.vocab_size, (16, n), generator=g)
        seq = torch.cat([first, first], dim=1)
        logits = model(seq[:, :-1]).logits[:, n:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), seq[:, n + 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = induction_scores(model.eval(), length=n)
    assert before.max() < INDUCTION_MIN
    assert after.max() >= INDUCTION_MIN and after.max() > before.max() + 0.3


def test_induction_score_of_a_hand_made_copying_pattern():
    # A model stand-in whose decoder attention is exactly the induction pattern scores 1.
    class Fake(torch.nn.Module):
        cfg = tiny_config(max_seq_len=20)

        def forward(self, seq, need_weights=False):
            B, T = seq.shape
            n = T // 2
            w = torch.zeros(B, 1, T, T)
            w[:, :, torch.arange(n, T), torch.arange(1, n + 1)] = 1.0
            return type("Out", (), {"attentions": {"decoder": [w]}})()

        def parameters(self):
            return iter([torch.zeros(1)])

    scores = induction_scores(Fake(), length=50)  # capped at max_seq_len // 2
    assert scores.shape == (1, 1) and scores.item() == 1.0


# -- the inspection path against Q and K by hand; the same output on both paths -------------------------

def recompute_from_q_and_k(attn, x, memory=None):
    """softmax(Q K^T / sqrt(d_k)) of one MultiHeadAttention from its input, with plain tensor code."""
    B, T, _ = x.shape
    hd, H, Hkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    if memory is None:
        q, k, _ = attn.qkv_proj(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    else:
        q = attn.q_proj(x)
        k = attn.kv_proj(memory)[..., : Hkv * hd]
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, k.size(1), Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    return (q @ k.transpose(-1, -2) / math.sqrt(hd))


@pytest.mark.parametrize("arch", ARCHS)
def test_inspection_weights_equal_q_and_k_by_hand_and_outputs_match(tmp_path, arch):
    make_checkpoint(tmp_path, arch, n_kv_heads=2, pos_encoding="learned", norm_placement="pre")
    ins = inspect_checkpoint(tmp_path, prompt="hello there", target="bonjour" if arch == "encoder-decoder" else None)
    model, report = ins.checkpoint.model, ins.attention
    inputs: dict[str, list] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            def keep(mod, args, kwargs, name=name):
                inputs.setdefault(name, []).append((args[0], kwargs.get("memory")))
            hooks.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    ids = {k: torch.tensor([v]) for k, v in report.ids.items()}
    with torch.no_grad():
        if arch == "encoder-decoder":
            fast = model(ids["encoder"], ids["decoder"]).logits
        else:
            fast = model(next(iter(ids.values()))).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        if arch == "encoder-decoder":
            slow = model(ids["encoder"], ids["decoder"], need_weights=True).logits
        else:
            slow = model(next(iter(ids.values())), need_weights=True).logits
    assert torch.allclose(fast, slow, atol=1e-5)

    for stack, att in report.stacks.items():
        prefix = {"encoder": "encoder", "decoder": "decoder", "cross": "decoder"}[stack]
        module = "cross_attn" if stack == "cross" else "self_attn"
        for layer in range(att.n_layers):
            attn_name = f"{prefix}.layers.{layer}.{module}"
            x, memory = inputs[attn_name][0]
            scores = recompute_from_q_and_k(model.get_submodule(attn_name), x, memory)
            if att.causal:
                scores = scores.masked_fill(~causal_mask(scores.size(-1)), float("-inf"))
            assert torch.allclose(att.weights[layer], scores.softmax(-1)[0], atol=1e-6), (stack, layer)


# -- JSON against values recomputed independently ---------------------------------------------------------

def test_json_fields_match_an_independent_recomputation(tmp_path):
    cfg = tiny_config(tie_embeddings=False, pos_encoding="learned")
    extra = {"train": {"batch_size": 3, "context": 16, "lr": 1e-3, "dtype": "fp32"}}
    make_checkpoint(tmp_path, model=build_model(cfg).eval(), extra=extra)
    state = {"step": 120, "total_steps": 500, "tokens_seen": 5760, "best_val_loss": 2.5, "val_loss": 2.75,
             "lr": 4e-4, "elapsed": 3.5}
    (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps(state))
    prompt = "abcab cab"
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", prompt, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)

    a = doc["anatomy"]
    model = build_model(cfg)
    assert a["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert a["parameters"]["embeddings"] == cfg.vocab_size * cfg.d_model + cfg.max_seq_len * cfg.d_model
    assert a["parameters"]["output head"] == cfg.vocab_size * cfg.d_model  # untied
    per_layer_attention = 4 * (cfg.d_model * cfg.d_model + cfg.d_model)
    assert a["parameters"]["attention"] == cfg.n_decoder_layers * per_layer_attention
    assert a["parameters"]["norms"] == (2 * cfg.n_decoder_layers) * 2 * cfg.d_model  # post-norm: 2 per layer
    assert a["size"]["dtype"] == "float32"
    assert a["size"]["weights_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    mem = a["memory"]
    assert (mem["batch"], mem["context"], mem["assumed"]) == (3, 16, None)
    assert mem["inference"]["weights"] == 4 * a["parameters"]["total"]
    assert mem["inference"]["kv_cache"] == 2 * cfg.n_decoder_layers * 3 * 16 * cfg.d_model * 4
    assert mem["training"]["weights_gradients_optimizer"] == 16 * a["parameters"]["total"]
    assert {k: a["training"][k] for k in state} == state
    assert a["tokenizer"]["vocab_size"] == 5 + len(ALPHABET)
    assert a["tokenizer"]["special"]["mask"] == {"id": 4, "token": "<mask>"}
    assert a["tokenizer"]["kind"] == "char"

    att = doc["attention"]
    ids = [5 + ALPHABET.index(c) for c in prompt]
    assert att["ids"]["decoder"] == ids
    assert att["stacks"]["decoder"]["queries"] == ["a", "b", "c", "a", "b", "␣", "c", "a", "b"]
    with torch.no_grad():
        loaded = load_checkpoint(tmp_path).model
        weights = loaded(torch.tensor([ids]), need_weights=True).attentions["decoder"]
        # The induction probe: 4 random orderings of the non-special ids (seeded), each cut to 32 tokens and
        # fed twice; the score is the mean weight from position 32 + k to position k + 1.
        g = torch.Generator().manual_seed(INDUCTION_SEED)
        allowed = torch.arange(5, cfg.vocab_size)
        n = cfg.max_seq_len // 2
        probes = [allowed[torch.randperm(len(allowed), generator=g)[:n]] for _ in range(INDUCTION_BATCH)]
        probe_weights = [loaded(torch.cat([r, r])[None], need_weights=True).attentions["decoder"] for r in probes]
    T = len(ids)
    for head in att["stacks"]["decoder"]["heads"]:
        w = weights[head["layer"]][0, head["head"]].tolist()
        rows = range(1, T)  # rows with at least two visible keys
        ent = sum(-sum(p * math.log(p) for p in w[i][: i + 1] if p > 0) / math.log(i + 1) for i in rows) / (T - 1)
        dist = sum(sum(w[i][j] * (i - j) for j in range(i + 1)) for i in rows) / (T - 1)
        prev = sum(w[i][i - 1] for i in range(2, T)) / (T - 2)
        first = sum(w[i][0] for i in range(2, T)) / (T - 2)
        received = [sum(w[i][j] for i in rows) / (T - 1) for j in range(T)]
        assert head["entropy"] == pytest.approx(ent, abs=1e-6)
        assert head["distance"] == pytest.approx(dist, abs=1e-5)
        assert head["previous"] == pytest.approx(prev, abs=1e-6)
        assert head["first"] == pytest.approx(first, abs=1e-6)
        assert head["max_weight"] == pytest.approx(max(max(w[i]) for i in rows), abs=1e-6)
        assert head["top_key"] == max(range(T), key=received.__getitem__)
        induction = sum(pw[head["layer"]][0, head["head"], n + k, k + 1].item() for pw in probe_weights
                        for k in range(n)) / (n * len(probe_weights))
        assert head["induction"] == pytest.approx(induction, abs=1e-6)
    hm = att["heatmap"]
    assert (hm["stack"], hm["layer"], hm["head"]) == ("decoder", cfg.n_decoder_layers - 1, None)
    mean = weights[-1][0].mean(0)
    assert torch.allclose(torch.tensor(hm["matrix"]), mean, atol=1e-4)


def test_json_cross_attention_and_alignment_match_an_independent_recomputation(tmp_path):
    make_checkpoint(tmp_path, "encoder-decoder")
    source, target = "the cat", "le chat"
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", source, "--target", target,
                                 "--json"])
    assert result.exit_code == 0, result.output
    att = json.loads(result.stdout)["attention"]
    src = [5 + ALPHABET.index(c) for c in source]
    tgt = [5 + ALPHABET.index(c) for c in target]
    assert att["ids"] == {"encoder": src, "decoder": [1] + tgt[:-1], "produced": tgt}  # <bos> = 1 shifts it right
    assert att["target"] == target and att["target_from"] == "given" and att["target_tokens"] == list("le␣chat")
    with torch.no_grad():
        model = load_checkpoint(tmp_path).model
        cross = model(torch.tensor([src]), torch.tensor([[1] + tgt[:-1]]), need_weights=True).attentions["cross"]
    cross = torch.stack([w[0] for w in cross])  # (L, H, T, S)
    S = cross.size(-1)
    for head in att["stacks"]["cross"]["heads"]:
        w = cross[head["layer"], head["head"]].double()
        assert head["entropy"] == pytest.approx(float((-(w * w.log()).sum(-1) / math.log(S)).mean()), abs=1e-6)
        assert head["max_weight"] == pytest.approx(float(w.max()), abs=1e-6)
        assert head["top_key"] == int(w.mean(0).argmax())
        assert head["distance"] is None and head["previous"] is None  # no positions shared with the source
    mean = cross.mean(dim=(0, 1))  # the alignment: every layer and head
    for k, row in enumerate(att["alignment"]):
        assert row["target"] == att["target_tokens"][k]
        best = mean[k].topk(ALIGN_TOP_K)
        assert [s["position"] for s in row["sources"]] == best.indices.tolist()
        assert [s["weight"] for s in row["sources"]] == pytest.approx(best.values.tolist(), abs=1e-6)
        assert [s["token"] for s in row["sources"]] == [("␣" if source[j] == " " else source[j])
                                                         for j in best.indices.tolist()]


def test_untrained_checkpoint_says_so_and_assumes_batch_one(tmp_path):
    make_checkpoint(tmp_path, "encoder")
    a = inspect_checkpoint(tmp_path).anatomy
    assert a["training"] is None
    assert (a["memory"]["batch"], a["memory"]["context"]) == (1, 64) and "batch 1" in a["memory"]["assumed"]
    assert a["memory"]["inference"]["kv_cache"] == 0  # an encoder keeps no cache
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path)])
    assert result.exit_code == 0 and "not trained with tformer" in result.output


# -- tokens --------------------------------------------------------------------------------------------

def test_token_labels_are_readable():
    assert visible("a b\nc\td") == "a␣b\\nc\\td"
    assert visible("") == "∅" and visible("\x00") == "\\x00"
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["Ġthe"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    label = TokenLabeler(tok)
    assert label(vocab["Ġthe"]) == "␣the"
    assert label(vocab["Ċ"]) == "\\n"
    assert label(vocab["â"]) == "\\xe2"  # the first byte of a UTF-8 character, alone


# -- the heatmap ----------------------------------------------------------------------------------------

def test_long_input_is_cut_to_a_named_window(tmp_path):
    make_checkpoint(tmp_path, max_seq_len=128)
    prompt = ("abc " * 30)[:100]
    ins = inspect_checkpoint(tmp_path, prompt=prompt, layer=0, head=1)
    hm = ins.heatmap
    assert hm.matrix.shape == (HEATMAP_MAX_TOKENS, HEATMAP_MAX_TOKENS)
    assert hm.window == "showing queries 0-63 of 100 and keys 0-63 of 100: the first 64 tokens"
    assert torch.equal(hm.matrix, ins.attention.stacks["decoder"].weights[0, 1, :64, :64])
    text = render_heatmap(hm).plain
    assert hm.window in text and text.count("\n") > 64
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", prompt])
    assert result.exit_code == 0 and "showing queries 0-63 of 100" in result.output


def test_heatmap_rows_show_tokens_shades_and_mask():
    w = one_hot_pattern(3, lambda i: max(i - 1, 0))
    att = StackAttention("decoder", w[None, None], ["x", "␣y", "z"], ["x", "␣y", "z"], True, [], [])
    lines = render_heatmap(heatmap(att, 0, 0)).plain.splitlines()
    rows = [line for line in lines if line[:1].isdigit()]
    full, empty, masked = SHADES[-1] * 2, SHADES[0] * 2, MASKED + " "
    # two characters per cell while the input is short; labels "index token", then the cells
    assert rows == ["0 x  " + full + masked + masked,
                    "1 ␣y " + full + empty + masked,
                    "2 z  " + empty + full + empty]


# -- all three architectures, with and without a prompt ---------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_runs_on_every_architecture(tmp_path, arch):
    make_checkpoint(tmp_path, arch)
    plain = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path)])
    assert plain.exit_code == 0, plain.output
    assert "parameters" in plain.output and "tokenizer" in plain.output and "entropy" not in plain.output
    shown = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", "a cat sat"])
    assert shown.exit_code == 0, shown.output
    stacks = stack_names(tiny_config(arch=arch))
    for stack in stacks:
        assert f"{stack} attention: 2 layers" in shown.output
    assert ("cross-attention alignment" in shown.output) == (arch == "encoder-decoder")
    doc = json.loads(runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", "a cat sat",
                                         "--json"]).stdout)
    assert list(doc["attention"]["stacks"]) == stacks
    assert len(doc["attention"]["stacks"][stacks[-1]]["heads"]) == 2 * 4


def test_encoder_decoder_alignment_with_a_given_target(tmp_path):
    make_checkpoint(tmp_path, "encoder-decoder")
    ins = inspect_checkpoint(tmp_path, prompt="the cat", target="le chat", layer=1, head=2)
    report = ins.attention
    assert report.target_from == "given" and report.target == "le chat"
    assert report.ids["decoder"][0] == 1 and len(report.alignment) == len("le chat")  # <bos>, then the target
    cross = report.stacks["cross"].weights[1, 2]  # (T, S): the chosen layer and head
    for row in report.alignment:
        best = cross[row["position"]].topk(ALIGN_TOP_K)
        assert [s["position"] for s in row["sources"]] == best.indices.tolist()
    greedy = inspect_checkpoint(tmp_path, prompt="the cat").attention
    assert greedy.target_from == "greedy" and len(greedy.alignment) >= 1


# -- bad input ------------------------------------------------------------------------------------------

def one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_clear_line(tmp_path, monkeypatch):
    good = make_checkpoint(tmp_path / "good")
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], ["does not exist"]),
        (["--checkpoint", str(good), "--layer", "2", "--prompt", "ab"], ["--layer 2 is out of range", "0-1"]),
        (["--checkpoint", str(good), "--head", "4", "--prompt", "ab"], ["--head 4 is out of range", "0-3"]),
        (["--checkpoint", str(good), "--layer", "-1", "--prompt", "ab"], ["out of range"]),
        (["--checkpoint", str(good), "--prompt", ""], ["--prompt is empty"]),
        (["--checkpoint", str(good), "--prompt", "   "], ["--prompt is empty"]),
        (["--checkpoint", str(good), "--layer", "0"], ["needs --prompt"]),
        (["--checkpoint", str(good), "--html", str(tmp_path / "p.html")], ["--html", "needs --prompt"]),
        (["--checkpoint", str(good), "--prompt", "ab", "--target", "x"], ["encoder-decoder"]),
        (["--checkpoint", str(good), "--prompt", "ab", "--stack", "cross"], ["choose one of: decoder"]),
        (["--checkpoint", str(good), "--prompt", "a" * 65], ["65 tokens", "at most 64"]),
    ]
    for args, fragments in cases:
        one_line_error(runner.invoke(app, ["inspect", *args]), *fragments)

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(runner.invoke(app, ["inspect", "--checkpoint", str(broken)]), "unreadable")
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    one_line_error(runner.invoke(app, ["inspect", "--checkpoint", str(not_ckpt)]), "config.json is missing")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(good, no_tok)
    (no_tok / "tokenizer.json").unlink()
    one_line_error(runner.invoke(app, ["inspect", "--checkpoint", str(no_tok), "--prompt", "ab"]), "tokenizer.json")

    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    one_line_error(runner.invoke(app, ["inspect"]), "no checkpoint found")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    one_line_error(runner.invoke(app, ["inspect", "--checkpoint", str(good), "--prompt", "ab", "--png",
                                       str(tmp_path / "x.png")]), "--png needs matplotlib", "pip install")
    assert not (tmp_path / "x.png").exists()


def test_default_checkpoint_is_the_newest(tmp_path, monkeypatch):
    import os

    old = make_checkpoint(tmp_path / "checkpoints" / "old", "encoder")
    new = make_checkpoint(tmp_path / "checkpoints" / "run" / "latest", "decoder")
    os.utime(old / "model.safetensors", (1, 1))
    monkeypatch.chdir(tmp_path)
    doc = json.loads(runner.invoke(app, ["inspect", "--json"]).stdout)
    assert doc["anatomy"]["checkpoint"] == str(new.relative_to(tmp_path)) and doc["anatomy"]["arch"] == "decoder"


def test_a_run_directory_means_its_newest_checkpoint(tmp_path):
    import os

    best = make_checkpoint(tmp_path / "run" / "best", "encoder")
    latest = make_checkpoint(tmp_path / "run" / "latest", "decoder")
    os.utime(best / "model.safetensors", (1, 1))
    doc = json.loads(runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path / "run"), "--json"]).stdout)
    assert doc["anatomy"]["checkpoint"] == str(latest) and doc["anatomy"]["arch"] == "decoder"


# -- exports --------------------------------------------------------------------------------------------

def test_png_export(tmp_path):
    pytest.importorskip("matplotlib")
    make_checkpoint(tmp_path)
    out = tmp_path / "attn.png"
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", "a cat", "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".attn.png.*"))  # written atomically: no temporary file left


def test_html_is_self_contained_and_json_in_it_is_escaped(tmp_path):
    make_checkpoint(tmp_path, "encoder-decoder")
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["inspect", "--checkpoint", str(tmp_path), "--prompt", "a <mask> b",
                                 "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    for remote in ("http://", "https://", "//cdn", " src=", "<link", "url(", "@import", "fetch("):
        assert remote not in page, remote  # everything is inline: the page works offline
    assert page.count("</script>") == 2  # token text like "<mask>" cannot end the data block
    data = page.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    parsed = json.loads(data)
    assert set(parsed["stacks"]) == {"encoder", "decoder", "cross"}
    assert parsed["stacks"]["encoder"]["queries"][2] == "<mask>"


CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser of its own here
# As root Chromium needs --no-sandbox; the rest keep it from reaching for the network at start-up.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_html_page_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright  # in the test extra

    make_checkpoint(tmp_path, "encoder-decoder")
    out = tmp_path / "page.html"
    ins = inspect_checkpoint(tmp_path, prompt="the cat sat", target="le chat")
    write_html(ins, out)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_selector(".tok")
            canvas = lambda: page.eval_on_selector("#heatmap", "c => c.toDataURL()")  # noqa: E731
            assert page.input_value("#stack") == "cross" and page.input_value("#head") == "mean"
            before = canvas()
            page.select_option("#head", "1")
            after = canvas()
            assert after != before  # another head: another picture
            assert page.inner_text("#maptitle") == "cross attention, layer 1, head 1"
            page.select_option("#stack", "encoder")
            assert page.inner_text("#maptitle") == "encoder attention, layer 1, head 1" and canvas() != after
            # Hovering token 2 shades every token by the weight token 2 gives it, in this layer and head.
            page.hover('.tok[data-i="2"]')
            titles = page.eval_on_selector_all(".tok", "ts => ts.map(t => t.title)")
            row = ins.attention.stacks["encoder"].weights[1, 1, 2].tolist()
            assert len(titles) == len(row)
            for title, w in zip(titles, row):
                assert title.startswith("weight ") and float(title.split()[1]) == pytest.approx(w, abs=1.5e-3)
            shaded = page.eval_on_selector_all(".tok", "ts => ts.filter(t => t.style.background).length")
            assert shaded >= 1
            page.mouse.move(0, 0)
            assert page.eval_on_selector_all(".tok", "ts => ts.filter(t => t.title).length") == 0  # cleared
            page.click("#stats tr.pick >> nth=3")  # a row of the heads table picks that head
            assert page.input_value("#head") == "3" and page.inner_text("#maptitle").endswith("head 3")
        finally:
            browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests)


def test_module_name_does_not_shadow_the_standard_library():
    import inspect

    import tformer.inspection

    assert hasattr(inspect, "signature") and tformer.inspection.__name__ == "tformer.inspection"
