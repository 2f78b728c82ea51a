"""The `tformer` command line: parse, call the core, print with rich. No model or training logic here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tformer import __version__
from tformer.errors import TformerError

app = typer.Typer(
    name="tformer",
    help="Tokenize text, train Transformers on it, generate from them, and inspect their attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print_error(message)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the core's TformerError into a one-line message instead of a traceback."""
    try:
        yield
    except TformerError as e:
        fail(str(e))


def _print_version(value: bool) -> None:
    if value:
        console.print(f"tformer {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Tokenize text, train Transformers on it, generate from them, and inspect their attention."""


# --- tokenize ---
@app.command()
def tokenize(
    corpus: list[str] | None = typer.Argument(
        None, show_default=False,
        help="Text files, globs or directories (every *.txt below); .tsv files of source<TAB>target lines "
        "give pairs. Default: the built-in corpus (Python's pydoc help topics).",
    ),
    kind: str | None = typer.Option(None, help="bpe (byte-level BPE, the default), char or byte.", show_default=False),
    vocab_size: int | None = typer.Option(
        None, help="Largest vocabulary, special tokens included (BPE default 4096).", show_default=False
    ),
    tokenizer: str | None = typer.Option(
        None, help="Encode with this existing tokenizer.json instead of training one.", show_default=False
    ),
    out: str | None = typer.Option(
        None, help="Output directory. Default: data/<corpus name>-<kind>.", show_default=False
    ),
    val_fraction: float = typer.Option(0.1, help="Share of the corpus, at its end, kept for validation."),
    errors: str = typer.Option("strict", help="strict: stop at bytes that are not UTF-8; replace: use U+FFFD."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory once the new one is done."),
) -> None:
    """Train a tokenizer on a corpus and encode the corpus into token files for `tformer train`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Table

    from tformer.tokenize import tokenize_corpus

    columns = (TextColumn("{task.description:<9}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    bars = Progress(*columns, console=err_console, transient=True)  # the table sums it up; errors stay one line
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if not tasks:
            bars.start()  # only once there is something to show: errors before that stay one line
        if phase not in tasks:
            tasks[phase] = bars.add_task("training" if phase == "train" else "encoding", total=total)
        bars.update(tasks[phase], completed=done)

    with user_errors():
        try:
            result = tokenize_corpus(
                corpus or [], out, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer,
                val_fraction=val_fraction, errors=errors, force=force, progress=progress,
            )
        finally:
            if tasks:  # stopping a display that never started still prints a blank line
                bars.stop()

    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    table = Table(title=f"{result.kind} tokenizer, {result.vocab_size:,} tokens → {escape(str(result.out_dir))}",
                  title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    split = f"train {result.tokens['train']:,} / val {result.tokens['val']:,}"
    if result.pairs is not None:
        split += f"; pairs {result.pairs['train']:,} / {result.pairs['val']:,}"
    used = result.vocab_used / result.vocab_size
    rows = {
        "files": f"{result.files:,}",
        "characters": f"{result.chars:,}",
        "bytes": f"{result.bytes:,}",
        "tokens": f"{result.total_tokens:,} ({split}; {result.dtype})",
        "characters per token": f"{result.chars_per_token:.2f}",
        "vocabulary used": f"{result.vocab_used:,} of {result.vocab_size:,} ({used:.0%})",
        "unknown-token rate": f"{result.unk_rate:.3%}",
        "time": f"{result.seconds:.2f} s (training {result.train_seconds:.2f}, encoding {result.encode_seconds:.2f})",
        "MB/s": f"{result.mb_per_s:.1f} (encoding)",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)


# --- train ---

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """A one-line drawing of a series (e.g. the loss), resampled to at most `width` characters."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1) + 0.5))] for v in values)


class _TrainView:
    """What `tformer train` shows: a live progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.losses: list[float] = []
        self.vals: list[float] = []
        self.info: dict = {}
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=console, transient=False,
        ) if self.live else None
        self.task = None

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "start":
            self.info = info
            line = (f"training {info['parameters']:,} parameters on {info['device']} ({info['dtype']}), "
                    f"{info['total_steps']:,} steps, checkpoints in {info['out']}")
            if not self.quiet:
                console.print(line, highlight=False, soft_wrap=True)
            if self.progress is not None:
                self.progress.start()
                self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"],
                                                   stats="")
        elif kind == "log":
            self.losses.append(info["loss"])
            if "val_loss" in info:
                self.vals.append(info["val_loss"])
            stats = f"loss {info['loss']:.4f}"
            if self.vals:
                stats += f"  val {self.vals[-1]:.4f}"
            if "val_bleu" in info:
                stats += f"  BLEU {info['val_bleu']:.1f}"
            stats += f"  lr {info['lr']:.2e}  {info['tokens_per_s']:,.0f} tok/s"
            if "mfu" in info:
                stats += f"  MFU {info['mfu']:.1%}"
            if self.progress is not None:
                self.progress.update(self.task, completed=info["step"], stats=stats)
            elif not self.quiet:
                print(f"step {info['step']}/{self.info.get('total_steps', '?')}  {stats}", flush=True)
        elif kind == "notice" and not self.quiet:
            err_console.print(f"[yellow]note:[/] {escape(info['message'])}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command("train")
def train_command(
    corpus: Optional[List[Path]] = typer.Argument(
        None, help="Text files, directories, a .tsv of source<TAB>target pairs, or a `tformer tokenize` "
                   "output directory. Default: the built-in corpus.", show_default=False),
    arch: Optional[str] = typer.Option(None, help="encoder, decoder (default) or encoder-decoder."),
    preset: Optional[str] = typer.Option(None, help="Model/training preset: tiny (default), small, "
                                         "baby-shakespeare, shakespeare-speedrun, gpt2, bert-base, vaswani-base, "
                                         "vaswani-big."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of options; flags override it."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="Model width."),
    layers: Optional[int] = typer.Option(None, help="Layers (of each stack)."),
    heads: Optional[int] = typer.Option(None, help="Attention heads."),
    d_ff: Optional[int] = typer.Option(None, "--d-ff", help="Feed-forward width."),
    context: Optional[int] = typer.Option(None, help="Tokens per training sequence."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per micro-batch (under "
                                             "torchrun: the global one, split over the ranks)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the training data (instead of --steps)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop (and save) after this many seconds."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup: Optional[int] = typer.Option(None, help="Warmup steps."),
    schedule: Optional[str] = typer.Option(None, help="cosine (default), noam (the paper's) or constant."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (not on norms, biases, embeddings)."),
    dropout: Optional[float] = typer.Option(None, help="Dropout probability."),
    clip: Optional[float] = typer.Option(None, help="Gradient-norm clipping (0: off)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Encoder-decoder label smoothing (default 0.1)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="auto (default), cpu, cuda or mps."),
    dtype: Optional[str] = typer.Option(None, help="auto (default), fp32, bf16 or fp16."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="Under torchrun: shard parameters, "
                                        "gradients and optimizer state with FSDP2 instead of DDP."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between evaluations (loss, perplexity, token accuracy; "
                                            "BLEU for encoder-decoder pairs, with sacrebleu installed)."),
    eval_batches: Optional[int] = typer.Option(None, "--eval-batches", help="Validation batches (0: the whole split)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between log lines."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: checkpoints/<corpus>-<arch>)."),
    resume: Optional[str] = typer.Option(None, help="Continue a run: a checkpoint directory, or `auto` (the latest of --out). "
                                         "New raw text is encoded with the run's tokenizer."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a checkpoint's weights (ours or a GPT-2 directory) and its tokenizer."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out."),
    kind: Optional[str] = typer.Option(None, help="Tokenizer for raw text: bpe (default), char or byte."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocabulary size."),
    tokenizer: Optional[Path] = typer.Option(None, help="Encode raw text with this tokenizer.json."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final summary."),
) -> None:
    """Train a model on your text (decoder: causal LM; encoder: masked LM; encoder-decoder: pairs or denoising)."""
    from tformer import train as core

    options = dict(arch=arch, d_model=d_model, layers=layers, heads=heads, d_ff=d_ff, context=context,
                   batch_size=batch_size, grad_accum=grad_accum, steps=steps, epochs=epochs, time_budget=time_budget,
                   lr=lr, warmup=warmup, schedule=schedule, weight_decay=weight_decay, dropout=dropout, clip=clip,
                   label_smoothing=label_smoothing, seed=seed, device=device, dtype=dtype, compile=compile,
                   eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, log_every=log_every,
                   preset=preset, fsdp=fsdp)
    from tformer import distributed

    # distributed: under torchrun, join the process group; rank 0 alone prints and prepares the data first
    with user_errors(), distributed.process_group():
        view = _TrainView(quiet or not distributed.is_main())
        with distributed.rank_zero_first():
            plan = core.plan_run(corpus, options, config_file=config, out=out, resume=resume, init_from=init_from,
                                 force=force, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer)
        stop = core.StopFlag()
        try:
            with stop.installed():
                result = core.train(plan.model_cfg, plan.train_cfg, plan.data, plan.out, resume=plan.resume,
                                    init_from=plan.init_model, on_event=view, stop=stop,
                                    extra_config=plan.extra_config)
        finally:
            view.close()
        if distributed.is_main():
            _train_summary(result, view, plan)
            if distributed.world_size() > 1 and result.stopped != "done":
                console.print(f"(under torchrun, with its options as before or any number of ranks: torchrun ... "
                              f"-m tformer train --out {result.out_dir} --resume auto)",
                              highlight=False, soft_wrap=True)


def _train_summary(result, view: _TrainView, plan) -> None:
    from rich.table import Table

    from tformer.train import BLEU_SAMPLE

    table = Table(title="training run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{result.step:,} / {result.total_steps:,}")
    table.add_row("tokens seen", f"{result.tokens_seen:,}")
    table.add_row("time", f"{result.elapsed:.1f} s")
    if result.train_loss is not None:
        table.add_row("train loss", f"{result.train_loss:.4f}")
    if result.val:
        table.add_row("validation loss", f"{result.val['val_loss']:.4f} (perplexity {result.val['val_ppl']:.2f})")
        label = "masked-token accuracy" if plan.model_cfg.arch == "encoder" else "token accuracy"
        table.add_row(label, f"{result.val['val_acc']:.1%}")
        if "val_bleu" in result.val:
            table.add_row("BLEU", f"{result.val['val_bleu']:.1f} (greedy, first {BLEU_SAMPLE} validation pairs)")
    if result.best_val_loss is not None:
        table.add_row("best validation loss", f"{result.best_val_loss:.4f}  ({result.out_dir / 'best'})")
    table.add_row("latest checkpoint", str(result.out_dir / "latest"))
    if view.losses:
        table.add_row("loss", sparkline(view.losses) + f"  {view.losses[0]:.2f} → {view.losses[-1]:.2f}")
    console.print(table)
    if result.stopped == "interrupted":
        console.print(f"stopped at step {result.step}; continue with: tformer train --out {result.out_dir} "
                      f"--resume auto", highlight=False, soft_wrap=True)
    elif result.stopped == "time budget":
        console.print(f"time budget reached at step {result.step}; continue with: tformer train --out "
                      f"{result.out_dir} --resume auto --time-budget SECONDS", highlight=False, soft_wrap=True)
    if plan.sample is not None and result.model is not None and result.stopped != "interrupted":
        try:
            text = plan.sample(result.model)
        except KeyboardInterrupt:  # everything is saved: Ctrl-C here only skips the sample
            return
        if text:
            console.print("[bold]sample:[/]")
            console.print(text, markup=False, highlight=False)


# --- generate ---
@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (to translate, for an "
                                         "encoder-decoder; with <mask> tokens, for an encoder).", show_default=False),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line, run as one batch.",
                                               show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint directory (ours, or a "
                                              "transformers GPT-2 one), or a training run's directory (its newest "
                                              "checkpoint). Default: the newest under checkpoints/.",
                                              show_default=False),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens to generate per completion."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy, whatever the options below say."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k most likely tokens only (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: the most likely tokens up to probability p."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top token's probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeating tokens."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="End a completion where this text appears "
                                             "(repeatable; the text itself is not printed).", show_default=False),
    seed: Optional[int] = typer.Option(None, help="Random seed: same seed, same text. Default: a fresh one.",
                                       show_default=False),
    num_samples: int = typer.Option(1, "--num-samples", help="Completions per prompt."),
    beams: int = typer.Option(1, help="Beam search with this many beams (deterministic)."),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="Beam score = log-prob / length^this."),
    early_stopping: bool = typer.Option(True, "--early-stopping/--no-early-stopping",
                                        help="End beam search once --beams hypotheses have finished."),
    top: int = typer.Option(5, help="Fill-mask: candidates shown for each <mask>."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence every step (slow; a check)."),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on a GPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the generated text: no timings or notes."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (prompts, completions, token ids, "
                                  "timings) instead of streaming text."),
) -> None:
    """Generate text from a checkpoint: continue a prompt (decoder), translate it (encoder-decoder), or fill in
    its <mask> tokens (encoder). Text streams to stdout; timings go to stderr."""
    import json
    import sys

    from tformer import generate as core

    def note(message: str) -> None:
        if not quiet:
            err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)

    with user_errors():
        stdin = None if prompt is not None or prompt_file is not None or sys.stdin.isatty() else sys.stdin.read()
        prompts = core.read_prompts(prompt, prompt_file, stdin)
        cfg = core.GenerateConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed, num_samples=num_samples,
            beams=beams, length_penalty=length_penalty, early_stopping=early_stopping, use_cache=not no_cache,
            compile=compile, fill_top=top,
        )
        loaded = core.load(checkpoint, device=device, dtype=dtype)
        header = {"checkpoint": str(loaded.path), "arch": loaded.config.arch}
        if checkpoint is None or loaded.path != checkpoint:
            note(f"using the checkpoint {loaded.path}")

        if loaded.config.arch == "encoder":
            results = core.fill_mask(loaded.model, loaded.tokenizer, prompts, top=cfg.fill_top,
                                     specials=loaded.specials)
            if json_out:
                print(json.dumps({**header, "fill_mask": [r.to_dict() for r in results]}, ensure_ascii=False))
                return
            for r in results:
                print(r.filled)
                for i, candidates in enumerate(r.masks, 1):
                    print(f"  <mask> {i}: " + "  ".join(f"{c.token!r} {c.prob:.3f}" for c in candidates))
            return

        streaming = not json_out and len(prompts) * (1 if beams > 1 else num_samples) == 1 and beams == 1

        echo = [prompts[0] if loaded.config.arch == "decoder" else ""]  # a decoder's prompt is shown first

        def on_text(row: int, text: str) -> None:
            sys.stdout.write(echo.pop() + text if echo else text)
            sys.stdout.flush()

        result = core.generate(loaded.model, loaded.tokenizer, prompts, cfg, on_text if streaming else None,
                               specials=loaded.specials)
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


# --- inspect ---
@app.command("inspect")
def inspect_command(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Checkpoint directory (ours or a Hugging Face GPT-2 one), or a training run's "
        "directory (its newest checkpoint). Default: the newest under checkpoints/.", show_default=False),
    prompt: Optional[str] = typer.Option(
        None, help="Run the model on this text and summarise its attention (the source, for an encoder-decoder).",
        show_default=False),
    layer: Optional[int] = typer.Option(None, help="Layer of the heatmap, 0-based (default: the last).",
                                        show_default=False),
    head: Optional[int] = typer.Option(None, help="Head of the heatmap, 0-based (default: the mean over heads).",
                                       show_default=False),
    stack: Optional[str] = typer.Option(
        None, help="Attention of the heatmap: encoder, decoder or cross (default: the model's own; cross for "
        "an encoder-decoder).", show_default=False),
    target: Optional[str] = typer.Option(
        None, help="Encoder-decoder: the target text for the cross-attention (default: decoded greedily).",
        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON document instead."),
    html: Optional[Path] = typer.Option(
        None, help="Write an interactive, self-contained page (works offline) to this file.", show_default=False),
    png: Optional[Path] = typer.Option(
        None, help="Write the heatmap(s) of the chosen layer to this PNG file (needs matplotlib).",
        show_default=False),
) -> None:
    """Show a checkpoint's anatomy and, with --prompt, what each attention head does on that text."""
    import json

    from tformer import inspect as core

    with user_errors():
        if png is not None:
            core.require_matplotlib()
        drawn = tuple(name for name, path in (("--html", html), ("--png", png)) if path is not None)
        result = core.inspect_checkpoint(checkpoint, prompt=prompt, target=target, stack=stack, layer=layer,
                                         head=head, needs_prompt=drawn)
        if html is not None:
            core.write_html(result, html)
        if png is not None:
            core.write_png(result, png)
    if json_out:
        typer.echo(json.dumps(core.to_json(result), indent=1, ensure_ascii=False))
    else:
        for part in core.render(result):
            console.print(part)
            console.print()
    for name, path in (("page", html), ("image", png)):
        if path is not None:
            err_console.print(f"wrote {name} {escape(str(path))}", highlight=False)


# -- export (issue 13): a checkpoint as a Hugging Face directory -------------------------------------

@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (or Hugging Face directory / Hub name)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (config.json, model.safetensors, "
                             "generation_config.json, tokenizer files)."),
) -> None:
    """Write a checkpoint as a Hugging Face directory that transformers loads (GPT-2, Llama, Qwen2, BERT, BART shapes)."""
    from tformer.hf.export import export_checkpoint

    with user_errors():
        path, architecture = export_checkpoint(checkpoint, out)
    err_console.print(f"wrote {escape(str(path))} ({architecture})", highlight=False)


def run(args: list[str] | None = None) -> NoReturn:
    """The `tformer` command: the Typer app, with its own usage errors (an unknown option, a value of the
    wrong type) on one line like every other error, instead of click's framed message."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        code = app(args=args or ["--help"], prog_name="tformer", standalone_mode=False)
    except typer.Abort:
        print_error("aborted")
        raise SystemExit(1) from None
    except Exception as e:
        # Click's usage errors (vendored by recent Typer versions, so matched by what they carry).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise  # anything else is a bug, and its traceback is wanted
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print_error(e.format_message() + hint)
        raise SystemExit(e.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
