"""`tformer generate`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tformer.cli.common import (
    CHECKPOINT_HELP,
    THREADS_HELP,
    app,
    err_console,
    print_note,
    set_threads,
    user_errors,
)
from tformer.generation.config import DEFAULT_NEW_TOKENS, GenerateConfig


# --- generate ---
@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (to translate, for an "
                                         "encoder-decoder; with <mask> tokens, for an encoder).", show_default=False),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line, run as one batch.",
                                               show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=CHECKPOINT_HELP,
                                              show_default=False),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", "-n", show_default=False,
        help=f"Tokens to generate per completion. Default: what fits the context after the prompt (at most "
             f"{DEFAULT_NEW_TOKENS})."),
    temperature: float = typer.Option(GenerateConfig.temperature, help="Sampling temperature; 0 is greedy, whatever the options below say."),
    top_k: int = typer.Option(GenerateConfig.top_k, "--top-k", help="Sample from the k most likely tokens only (0: off)."),
    top_p: float = typer.Option(GenerateConfig.top_p, "--top-p", help="Nucleus sampling: the most likely tokens up to probability p."),
    min_p: float = typer.Option(GenerateConfig.min_p, "--min-p", help="Drop tokens below min-p x the top token's probability."),
    repetition_penalty: float = typer.Option(GenerateConfig.repetition_penalty, "--repetition-penalty", help="> 1 discourages repeating tokens."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="End a completion where this text appears "
                                             "(repeatable; the text itself is not printed).", show_default=False),
    seed: Optional[int] = typer.Option(None, help="Random seed: same seed, same text. Default: a fresh one.",
                                       show_default=False),
    num_samples: int = typer.Option(GenerateConfig.num_samples, "--num-samples", help="Completions per prompt."),
    beams: Optional[int] = typer.Option(None, help="Beam search with this many beams (deterministic; 1 is greedy "
                                        "decoding). Default: no beam search.", show_default=False),
    length_penalty: float = typer.Option(GenerateConfig.length_penalty, "--length-penalty", help="Beam score = log-prob / length^this."),
    early_stopping: bool = typer.Option(GenerateConfig.early_stopping, "--early-stopping/--no-early-stopping",
                                        help="End beam search as soon as --beams hypotheses have finished (faster; "
                                             "can miss a better running beam)."),
    fill_top: int = typer.Option(GenerateConfig.fill_top, "--fill-top", "--top",
                                 help="Fill-mask: candidates shown for each <mask> (--top is the old name)."),
    show_special: bool = typer.Option(GenerateConfig.show_special, "--show-special",
                                      help="Print special tokens (<pad>, <unk>, ...) in completions; --json always "
                                           "keeps their ids."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP, show_default=False),
    chat: bool = typer.Option(False, "--chat", help="Render the prompt as a user turn with the checkpoint's chat "
                              "template (tokenizer_config.json; needs jinja2: pip install 'tformer[chat]') and stop "
                              "at the end of the assistant's turn."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence every step (slow; a check)."),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16 (or float32, "
                              "bfloat16, float16)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on a GPU)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: int8 weights (one scale per output "
                                           "channel), float32 activations; CPU only, about 4x fewer bytes read per "
                                           "token. Compiles a small kernel per matrix shape on first use.",
                                           show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the generated text: no timings or notes."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (prompts, completions, token ids, "
                                  "timings) instead of streaming text."),
) -> None:
    """Generate text from a checkpoint: continue a prompt (decoder), translate it (encoder-decoder), or fill in
    its <mask> tokens (encoder). Text streams to stdout; timings go to stderr."""
    import json

    from tformer.generation.fill_mask import fill_mask
    from tformer.generation.generate import generate as generate_text
    from tformer.generation.load import load
    from tformer.generation.prompts import read_prompts

    def note(message: str) -> None:
        if not quiet:
            print_note(message)

    set_threads(threads)
    with user_errors():
        stdin = None if prompt is not None or prompt_file is not None or sys.stdin.isatty() else read_stdin()
        prompts = read_prompts(prompt, prompt_file, stdin)
        cfg = GenerateConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed, num_samples=num_samples,
            beams=1 if beams is None else beams, length_penalty=length_penalty, early_stopping=early_stopping, use_cache=not no_cache,
            compile=compile, fill_top=fill_top, show_special=show_special,
        )
        loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
        check_decoding_memory(loaded, prompts, cfg)
        header = {"checkpoint": str(loaded.path), "arch": loaded.config.arch}
        if loaded.note:
            note(loaded.note)

        if loaded.config.arch == "encoder":
            results = fill_mask(loaded.model, loaded.tokenizer, prompts, top=cfg.fill_top,
                                     specials=loaded.specials)
            if json_out:
                print(json.dumps({**header, "fill_mask": [r.to_dict() for r in results]}, ensure_ascii=False))
                return
            for r in results:
                print(r.filled)
                for i, candidates in enumerate(r.masks, 1):
                    print(f"  <mask> {i}: " + "  ".join(f"{c.token!r} {c.prob:.3f}" for c in candidates))
            return

        if beams == 1:  # one beam is greedy decoding
            cfg = dataclasses.replace(cfg, temperature=0.0)
        specials, shown = loaded.specials, prompts
        if chat:
            prompts, specials = chat_prompts(loaded, prompts)
        streaming = not json_out and len(prompts) * num_samples == 1 and cfg.beams == 1

        echo = [shown[0] if loaded.config.arch == "decoder" and not chat else ""]  # a decoder's prompt comes first

        def on_text(row: int, text: str) -> None:
            sys.stdout.write(echo.pop() + text if echo else text)
            sys.stdout.flush()

        result = generate_text(loaded.model, loaded.tokenizer, prompts, cfg, on_text if streaming else None,
                               specials=specials, add_special_tokens=not chat)
        if json_out:
            doc = {**header, "config": {k: v for k, v in vars(cfg).items()}, **result.to_dict()}
            print(json.dumps(doc, ensure_ascii=False))
        elif streaming:
            print(echo.pop() if echo else "", flush=True)
        else:
            for c in result.completions:
                label = f"prompt {prompts.index(c.prompt) + 1}" if len(prompts) > 1 else "prompt"
                label += f", sample {c.sample + 1}" if len(result.completions) > len(prompts) else ""
                label += f", score {c.score:.4f}" if c.score is not None else ""
                print(f"--- {label} ---")
                print((c.prompt if loaded.config.arch == "decoder" else "") + c.text)
        for message in result.notices:
            note(message)
        if not quiet and not json_out:
            err_console.print(result.timings.describe(), highlight=False, soft_wrap=True, style="dim")


def chat_prompts(loaded, prompts: list[str]) -> tuple[list[str], object]:
    """--chat: each prompt rendered as a user turn by the checkpoint's chat template, and the special ids with
    the template's end-of-turn tokens among those that end a row."""
    from tformer.errors import TformerError
    from tformer.hf.chat import chat_template, end_of_turn_ids, render_chat

    config = chat_template(loaded.path)
    if config is None:
        raise TformerError(f"--chat needs a chat_template in {loaded.path / 'tokenizer_config.json'}; this checkpoint "
                           "has none (give the prompt as plain text instead)")
    stops = end_of_turn_ids(config, loaded.tokenizer.get_vocab(with_added_tokens=True), loaded.extra_generation)
    specials = dataclasses.replace(loaded.specials, also_eos=tuple(sorted(stops - loaded.specials.stops)))
    return [render_chat(config, p) for p in prompts], specials


def read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are refused naming their offset (as in --prompt-file)."""
    from tformer.errors import TformerError

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes underneath (a test harness)
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as e:
            raise TformerError(f"stdin is not UTF-8 text (byte {e.start}); give UTF-8 text") from None
    data = stream.read()
    try:  # line ends as text-mode stdin reads them
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise TformerError(f"stdin is not UTF-8 text (byte {e.start}); give UTF-8 text") from None


def check_decoding_memory(loaded, prompts: list[str], cfg: GenerateConfig) -> None:
    """Refuse, before the KV cache is allocated, a batch (prompts x samples, or x beams) that cannot fit."""
    from tformer.limits import check_memory, decoding_bytes

    if loaded.config.arch == "encoder":
        return
    rows = len(prompts) * (cfg.beams if cfg.beams > 1 else cfg.num_samples)
    # a prompt has at most as many tokens as bytes (every tokenizer here covers a byte with one token or fewer)
    new = cfg.new_tokens(loaded.config.max_seq_len, 0)  # at most this many, whatever the prompt
    slots = min(loaded.config.max_seq_len, new + max(len(p.encode()) for p in prompts) + 1)
    needed = decoding_bytes(loaded.config, rows, slots, loaded.dtype.itemsize, weights=False)
    check_memory(f"generating {rows:,} row(s) of up to {slots:,} tokens", needed, loaded.device,
                 advice="use fewer prompts, --num-samples or --beams, or a smaller --max-new-tokens")
