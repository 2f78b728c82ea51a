"""What `tformer train` shows: progress from the first second (preparing, tokenizing, training), log lines when
the output is not a terminal, and the summary. A closed output (a pipe whose reader is gone) never stops a run:
the view goes quiet and training saves as usual."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from tformer.cli.common import console, err_console

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


class EtaColumn(ProgressColumn):
    """Time left: rich's estimate from the recent speed, or, when its window is empty (slow steps, a busy
    machine), from the task's own average since it started."""

    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        done = task.completed - task.fields.get("first", 0)
        if remaining is None and task.total and done > 0 and task.elapsed:
            remaining = task.elapsed / done * (task.total - task.completed)
        if remaining is None or task.finished:
            return Text("eta -:--:--" if not task.finished else "", style="progress.remaining")
        minutes, seconds = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


def _write(target: Any, *args: Any, **kwargs: Any) -> bool:
    """Print, or report False when the output is gone (EPIPE: the reader of a pipe has exited)."""
    try:
        target.print(*args, **kwargs)
        return True
    except (BrokenPipeError, OSError, ValueError):  # ValueError: the file was closed
        return False


class TrainView:
    """The run as it goes: a live progress display on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.losses: list[float] = []
        self.vals: list[float] = []
        self.info: dict = {}
        self.gone = False  # the output was closed: say nothing more, keep training
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), EtaColumn(), console=console,
            transient=False,
        ) if self.live else None
        self.task = None
        self.preparing = None
        self.tokenize_tasks: dict[str, Any] = {}
        self.started = time.perf_counter()
        if self.progress is not None:
            self.progress.start()
            self.preparing = self.progress.add_task("preparing", total=None, stats="reading the options and data")
        elif not quiet:
            self._line("preparing the run (options, data, tokenizer)")

    def _line(self, text: str) -> None:
        if not self.gone and not self.quiet:
            self.gone = not _write(console, text, highlight=False, soft_wrap=True)

    def tokenizing(self, phase: str, done: int, total: int) -> None:
        """Progress of the tokenizer on raw text (bytes read), before training starts."""
        name = "tokenizer" if phase == "train" else "encoding"
        if self.progress is not None:
            if phase not in self.tokenize_tasks:
                self.tokenize_tasks[phase] = self.progress.add_task(name, total=total, stats="MB of text")
            self.progress.update(self.tokenize_tasks[phase], completed=done,
                                 stats=f"{done / 1e6:.1f} of {total / 1e6:.1f} MB")
        elif phase not in self.tokenize_tasks:
            self.tokenize_tasks[phase] = True
            self._line(f"{'training the tokenizer on' if phase == 'train' else 'encoding'} {total / 1e6:.1f} MB "
                       f"of text")

    def planned(self) -> None:
        if self.progress is not None and self.preparing is not None:
            self.progress.remove_task(self.preparing)
            self.preparing = None

    def __call__(self, kind: str, info: dict) -> None:
        try:
            self._event(kind, info)
        except (BrokenPipeError, OSError, ValueError):
            self.gone = True  # never let the display stop the run

    def _event(self, kind: str, info: dict) -> None:
        if kind == "start":
            self.info = info
            n = info.get("threads")
            threads = f", {n} thread{'s' if n != 1 else ''}" if n else ""
            if n and info.get("processes", 1) > 1:
                threads += " each"
            self._line(f"training {info['parameters']:,} parameters on {info['device']} ({info['dtype']}{threads}), "
                       f"{info['total_steps']:,} steps, checkpoints in {info['out']}")
            if self.progress is not None:
                self.planned()
                self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"],
                                                   stats="", first=info["step"])
        elif kind == "log":
            self.losses.append(info["loss"])
            evaluated = "val_loss" in info
            if evaluated:
                self.vals.append(info["val_loss"])
            stats = f"loss {info['loss']:.4f}"
            if evaluated:
                stats += f"  val {info['val_loss']:.4f}"
            elif self.vals and self.progress is not None:  # the bar keeps the last one, marked as earlier
                stats += f"  [dim]val {self.vals[-1]:.4f}[/]"
            if "val_bleu" in info:
                stats += f"  BLEU {info['val_bleu']:.1f}"
            stats += f"  lr {info['lr']:.2e}  {info['tokens_per_s']:,.0f} tok/s"
            if "mfu" in info:
                stats += f"  MFU {info['mfu']:.1%}"
            if self.progress is not None:
                self.progress.update(self.task, completed=info["step"], stats=stats)
            else:
                self._line(f"step {info['step']}/{self.info.get('total_steps', '?')}  {stats}  "
                           f"({info['time']:.0f} s)")
        elif kind == "notice" and not self.quiet and not self.gone:
            self.gone = not _write(err_console, f"[yellow]note:[/] {escape(info['message'])}", highlight=False,
                                   soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            try:
                self.progress.stop()
            except (BrokenPipeError, OSError, ValueError):
                self.gone = True


def summary(result: Any, view: TrainView, plan: Any) -> None:
    """The run's table, the command that continues it, and a sample (decoders). Quiet once the output is gone."""
    from rich.table import Table

    from tformer.training.evaluate import BLEU_SAMPLE

    if view.gone:
        return
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
    if not _write(console, table):
        return
    hint = None
    if result.stopped == "interrupted":
        hint = f"stopped at step {result.step}; continue with: tformer train --out {result.out_dir} --resume auto"
    elif result.stopped == "time budget":
        hint = (f"time budget reached at step {result.step}; continue with: tformer train --out {result.out_dir} "
                f"--resume auto --time-budget SECONDS")
    if hint is not None and not _write(console, hint, highlight=False, soft_wrap=True):  # part of the summary
        return
    if plan.sample is not None and result.model is not None and result.stopped != "interrupted":
        try:
            text = plan.sample(result.model)
        except KeyboardInterrupt:  # everything is saved: Ctrl-C here only skips the sample
            return
        if text and _write(console, "[bold]sample:[/]"):
            _write(console, text, markup=False, highlight=False)
