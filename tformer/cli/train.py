"""`tformer train`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from tformer.cli.app import app, console, err_console, print_note, user_errors

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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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
    from tformer.training import loop as core
    from tformer.training.plan import plan_run

    options = dict(arch=arch, d_model=d_model, layers=layers, heads=heads, d_ff=d_ff, context=context,
                   batch_size=batch_size, grad_accum=grad_accum, steps=steps, epochs=epochs, time_budget=time_budget,
                   lr=lr, warmup=warmup, schedule=schedule, weight_decay=weight_decay, dropout=dropout, clip=clip,
                   label_smoothing=label_smoothing, seed=seed, device=device, dtype=dtype, compile=compile,
                   eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, log_every=log_every,
                   preset=preset, fsdp=fsdp)
    from tformer.training import distributed

    # distributed: under torchrun, join the process group; rank 0 alone prints and prepares the data first
    with user_errors(), distributed.process_group():
        view = _TrainView(quiet or not distributed.is_main())
        with distributed.rank_zero_first():
            plan = plan_run(corpus, options, config_file=config, out=out, resume=resume, init_from=init_from,
                                 force=force, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer,
                                 lock=distributed.is_main())  # one training per --out (rank 0 holds it)
        for message in plan.notes:
            print_note(message)
        stop = core.StopFlag()
        try:
            with stop.installed():
                result = core.train(plan.model_cfg, plan.train_cfg, plan.data, plan.out, resume=plan.resume,
                                    init_from=plan.init_model, on_event=view, stop=stop,
                                    extra_config=plan.extra_config)
        finally:
            view.close()
            plan.release()
        if distributed.is_main():
            _train_summary(result, view, plan)
            if distributed.world_size() > 1 and result.stopped != "done":
                console.print(f"(under torchrun, with its options as before or any number of ranks: torchrun ... "
                              f"-m tformer train --out {result.out_dir} --resume auto)",
                              highlight=False, soft_wrap=True)


def _train_summary(result, view: _TrainView, plan) -> None:
    from rich.table import Table

    from tformer.training.evaluate import BLEU_SAMPLE

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
