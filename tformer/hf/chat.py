"""Chat templates of Hugging Face tokenizers, for `tformer generate --chat` (the generation loop calls these).

A `tokenizer_config.json` may carry a `chat_template`: a Jinja template that turns a list of
messages into the prompt text the model was tuned on. It is rendered in Jinja's immutable sandbox
(a template is code from the model's author) with jinja2, an optional extra (`tformer[chat]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tformer.errors import TformerError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def chat_template(directory: str | Path) -> dict[str, Any] | None:
    """The directory's tokenizer_config.json when it has a string chat_template, else None."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TformerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("chat_template"), str):
        return None
    return config


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def render_chat(config: dict[str, Any], user_text: str, system: str | None = None) -> str:
    """The prompt for one user turn (after an optional system turn), ending where the assistant answers."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TformerError("--chat renders the model's chat template with jinja2: pip install 'tformer[chat]'") from None

    def raise_exception(message: str) -> None:
        raise TformerError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    try:
        return env.from_string(config["chat_template"]).render(messages=messages, add_generation_prompt=True,
                                                                **specials)
    except TemplateError as e:
        raise TformerError(f"the chat template of {TOKENIZER_CONFIG_FILE} failed: {e}") from None


def end_of_turn_ids(config: dict[str, Any], vocab: dict[str, int], generation: dict[str, Any] | None = None) -> set[int]:
    """Ids that end the assistant's turn: the eos token, generation_config's eos_token_id (one or a
    list), and the usual end-of-turn markers the vocabulary has."""
    ids: set[int] = set()
    eos = _token_text(config.get("eos_token"))
    if eos is not None and eos in vocab:
        ids.add(vocab[eos])
    gen_eos = (generation or {}).get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if isinstance(i, int) and not isinstance(i, bool):
            ids.add(i)
    for marker in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return ids
