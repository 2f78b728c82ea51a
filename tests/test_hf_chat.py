"""Chat templates render as transformers renders them, and name the end-of-turn tokens."""

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from tformer.data.tokenizer import train_tokenizer
from tformer.errors import TformerError
from tformer.hf.chat import chat_template, end_of_turn_ids, render_chat

# The ChatML template (as Qwen2 and SmolLM ship it), written out here.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chatml_renders_as_transformers_does(tmp_path):
    tok = train_tokenizer(["hello there"], "byte")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = chat_template(tmp_path)
    ours = render_chat(loaded, "hi!", system="be brief")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}],
        tokenize=False, add_generation_prompt=True)
    assert ours == ref and ours.endswith("<|im_start|>assistant\n")
    assert end_of_turn_ids(loaded, tok.get_vocab(), {"eos_token_id": [2]}) == {tok.token_to_id("<|im_end|>"), 2}


def test_no_template_and_refusing_template(tmp_path):
    assert chat_template(tmp_path) is None
    bad = {"chat_template": "{{ raise_exception('only user turns') }}"}
    with pytest.raises(TformerError, match="refused the conversation: only user turns"):
        render_chat(bad, "hi")
    sneaky = {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    with pytest.raises(TformerError):  # the sandbox forbids reaching Python internals
        render_chat(sneaky, "hi")


def test_generate_chat_decodes_the_templated_turn_as_transformers(tmp_path):
    """`tformer generate --chat` renders the user turn with the template, encodes it as apply_chat_template does
    (no extra special tokens) and stops at the end of the turn: transformers' greedy ids."""
    import sys

    import torch
    from typer.testing import CliRunner

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from hf_tiny import make

    from tformer.cli import app

    tok = train_tokenizer(["hello there, how are you today?"], "byte")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = make(transformers, "llama", tmp_path, vocab=tok.get_vocab_size())
    tok.save(str(tmp_path / "tokenizer.json"))
    end = tok.token_to_id("<|im_end|>")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["generate", "-c", str(tmp_path), "--chat", "-p", "hi!", "-n", "20",
                                      "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["completions"][0]["token_ids"]
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi!"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                          eos_token_id=[end, 2], pad_token_id=0)[0, len(ids):].tolist()
    ref = ref[:next((i for i, t in enumerate(ref) if t in (end, 2)), len(ref))]
    assert ours == ref and len(ours) > 0
